//! The JSON bodies of the HTTP client API (`/v1/...`), shared by the node that writes them and
//! the CLI that reads them, so the two cannot drift apart.

use crate::caps::Capabilities;
use crate::placement::Decision;
use serde::{Deserialize, Serialize};

/// `GET /v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    /// This node's peer id.
    pub peer_id: String,
    /// The canal version it runs.
    pub version: String,
    /// Whether the node is ready to serve: listening, and connected to the mesh if it was
    /// given peers to bootstrap from.
    pub ready: bool,
    /// Why the node is not ready yet; absent when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Seconds since the node started.
    pub uptime_s: u64,
    /// Multiaddrs the node listens on for peers, with its peer id appended.
    pub listen_addrs: Vec<String>,
    /// Peers known alive, this node included.
    pub peers: usize,
    /// Open peer connections.
    pub connections: usize,
    /// The node's MQTT address (`host:port`), when MQTT over TCP is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_addr: Option<String>,
    /// The node's MQTT-over-TLS address (`host:port`), when it is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtts_addr: Option<String>,
}

/// One row of `GET /v1/peers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The peer's latest capability record.
    #[serde(flatten)]
    pub caps: Capabilities,
    /// Whether the row is the answering node itself.
    pub is_self: bool,
    /// Whether the answering node has an open connection to the peer.
    pub connected: bool,
    /// Milliseconds since the answering node last heard the peer's record.
    pub last_seen_ms: u64,
    /// Round-trip time measured by ping on a direct connection, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
}

/// `GET /v1/peers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Peers {
    /// The answering node's peer id.
    pub local_peer_id: String,
    /// Every peer known alive, sorted by peer id.
    pub peers: Vec<PeerInfo>,
}

/// One home peer of a shard, with its Kademlia distance to the shard key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HomePeer {
    /// The peer id.
    pub peer_id: String,
    /// The XOR distance from the peer's key to the shard key, as a hex string.
    pub distance: String,
}

/// `GET /v1/topics/{topic}/locate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Locate {
    /// The topic, as given.
    pub topic: String,
    /// The topic's key in the Kademlia keyspace (SHA-256 of the name), hex.
    pub key: String,
    /// The shard the key falls in.
    pub shard: u32,
    /// How many shards the topic space has.
    pub shards: u32,
    /// The shard's key in the Kademlia keyspace, hex.
    pub shard_key: String,
    /// K, how many home peers a shard has.
    pub replication_factor: usize,
    /// The K peers closest to the shard key, closest first: the DHT topology's answer.
    pub home: Vec<HomePeer>,
    /// The peers that serve the shard, as the placement policy decided.
    pub replicas: Vec<String>,
    /// The placement policy that chose `replicas`.
    pub policy: String,
    /// How many peers the answer was computed from.
    pub members: usize,
    /// The Raft group that holds the topic's events (`data-1`).
    #[serde(default)]
    pub group: String,
    /// That group's leader, as the answering node knows it (peer id).
    #[serde(default)]
    pub leader: Option<String>,
    /// That group's voters (peer ids): the replicas that hold the events and vote.
    #[serde(default)]
    pub voters: Vec<String>,
    /// That group's learners (peer ids): replicas that hold the events without voting.
    #[serde(default)]
    pub learners: Vec<String>,
    /// The epoch of the committed shard map `planned_replicas` come from; `None` before the
    /// metadata leader has committed one.
    #[serde(default)]
    pub map_epoch: Option<u64>,
    /// The shard's replicas in the committed shard map, preferred leader first: where the
    /// shard's own group is to live. Planned only: until shard groups land, the topic's log
    /// is in `group`, on its `voters` and `learners`.
    #[serde(default)]
    pub planned_replicas: Vec<String>,
}

/// One shard of `GET /v1/cluster/shards`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRow {
    /// The shard number.
    pub shard: u32,
    /// Its replicas in the committed map, the preferred leader first.
    pub replicas: Vec<String>,
    /// Why it has fewer than K replicas, naming the constraint; `None` when it has K.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shortfall: Option<String>,
    /// The Raft group that holds the logs of the shard's topics today (`data-1`).
    pub served_by: String,
    /// That group's leader, as the answering node knows it (peer id).
    pub group_leader: Option<String>,
    /// The shard's own Raft group (issue 14) as the answering node sees it; `None` from a
    /// node that does not say (an older one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_group: Option<ShardGroupStatus>,
}

/// A shard's own Raft group as one node sees it, for `GET /v1/cluster/shards`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardGroupStatus {
    /// The group (`shard-N`).
    pub group: String,
    /// `active`, `quiescent` (hosted here, idle), `not formed` (hosted here, no membership
    /// yet) or `not hosted here` (ask one of the shard's replicas).
    pub state: String,
    /// Its leader (peer id), if the answering node knows one.
    pub leader: Option<String>,
    /// Its voters (peer ids).
    pub voters: Vec<String>,
    /// Its learners (peer ids): replicas being added, catching up.
    pub learners: Vec<String>,
}

/// One peer's part in the committed shard map, for `GET /v1/cluster/shards`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardLoad {
    /// The peer id.
    pub peer_id: String,
    /// Shards it holds a replica of.
    pub replicas: usize,
    /// Shards it is the preferred leader of.
    pub leaders: usize,
}

/// One step of the moves from the previous shard map to the committed one, as the placement
/// crate plans them (`canal_placement::shards::plan_moves`). Nothing executes them yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMove {
    /// The shard.
    pub shard: u32,
    /// `add_learner`, `promote`, `transfer_leader` or `remove`.
    pub step: String,
    /// The peer the step is about (for `transfer_leader`, the leader now).
    pub peer: String,
    /// For `transfer_leader`, the leader after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// `GET /v1/cluster/shards`: the shard map committed in the metadata group, as the
/// answering node's replica holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterShards {
    /// The map's epoch; 0 when no map is committed yet (then `rows` is empty).
    pub epoch: u64,
    /// Shards in the topic space, fixed when the cluster was created.
    pub shards: u32,
    /// K, the replicas wanted per shard.
    pub replication: usize,
    /// The label replicas are spread over (`zone`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<String>,
    /// Every shard, in order.
    pub rows: Vec<ShardRow>,
    /// Every peer that holds replicas, by peer id.
    pub peers: Vec<ShardLoad>,
    /// What the map could not do as asked.
    #[serde(default)]
    pub notes: Vec<String>,
    /// The epoch `moves` start from; `None` for the first map.
    #[serde(default)]
    pub moves_from: Option<u64>,
    /// The steps from the previous map to this one, planned and not executed: shard groups
    /// have not landed, so every topic is served by the group in each row's `served_by`.
    #[serde(default)]
    pub moves: Vec<ShardMove>,
}

/// The body of every error answer: `{ "error": "...", "kind": "..." }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong and what is allowed, for a person.
    pub error: String,
    /// A stable machine-readable name for the kind of error (`invalid_topic`, `not_found`).
    pub kind: String,
}

/// What a running node writes to `node.json` in its data directory, so that tools (the
/// testnet, scripts) find its ephemeral ports. Removed on a clean shutdown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuntimeInfo {
    /// The node's process id.
    pub pid: u32,
    /// Its peer id.
    pub peer_id: String,
    /// The base URL of its HTTP API.
    pub api: String,
    /// Its peer listen addresses, each ending in `/p2p/PEER_ID`.
    pub listen_addrs: Vec<String>,
    /// Its MQTT address (`host:port`), when MQTT over TCP is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<String>,
    /// Its MQTT-over-TLS address (`host:port`), when it is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtts: Option<String>,
}

/// One member's own view of a Raft group (`canal cluster status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftMemberStatus {
    /// The member's Raft node id.
    pub node_id: u64,
    /// The member's peer id.
    pub peer_id: String,
    /// `Leader`, `Follower`, `Candidate` or `Learner`.
    pub state: String,
    /// Its current term.
    pub term: u64,
    /// The leader it follows, if any.
    pub leader: Option<u64>,
    /// The index of the last entry in its log.
    pub last_log_index: Option<u64>,
    /// The highest index it knows committed.
    pub committed_index: Option<u64>,
    /// The index of the last entry it applied.
    pub applied_index: Option<u64>,
    /// The last index its latest snapshot covers.
    pub snapshot_index: Option<u64>,
    /// The group's voters, as it knows them.
    pub voters: Vec<u64>,
    /// The group's learners, as it knows them.
    pub learners: Vec<u64>,
    /// Node id and peer id of every member, as it knows them.
    pub nodes: Vec<(u64, String)>,
}

/// One member of a group in `GET /v1/cluster/status`: its status, or why it gave none.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberReport {
    /// The member's Raft node id.
    pub node_id: u64,
    /// Its status, if it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<RaftMemberStatus>,
    /// Why it did not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One group in `GET /v1/cluster/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupStatus {
    /// `metadata`, `data-1`, ...
    pub group: String,
    /// Every member's report, the answering node first.
    pub members: Vec<MemberReport>,
}

/// `GET /v1/cluster/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The answering node's Raft node id.
    pub node_id: u64,
    /// Every group the node hosts.
    pub groups: Vec<GroupStatus>,
    /// Why the node cannot route every topic yet, if it cannot: it has not read the
    /// cluster's shard map, or has not opened the shard groups the map gives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unrouted: Option<String>,
}

impl ClusterStatus {
    /// Whether the answering node routes every topic and every group it hosts knows its
    /// leader (its own view: the first member listed is the answering node).
    pub fn every_group_led(&self) -> bool {
        self.unrouted.is_none()
            && self.groups.iter().all(|g| {
                g.members
                    .first()
                    .and_then(|m| m.status.as_ref())
                    .is_some_and(|m| m.leader.is_some())
            })
    }
}

/// The answer to `PUT /v1/kv/{key}`: where the write was committed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvWritten {
    /// The log index of the entry that applied the write.
    pub index: u64,
    /// Whether the request id had been written before, so nothing changed now.
    pub duplicate: bool,
}

/// `GET /v1/cluster/digest`: a fingerprint of one group's state on the answering node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateDigest {
    /// The group.
    pub group: String,
    /// SHA-256 over the state, hex.
    pub digest: String,
    /// The last log index applied to the state.
    pub applied_index: Option<u64>,
    /// Number of keys.
    pub keys: usize,
}

/// An event as clients see it: CloudEvents' structured JSON (`specversion`, `id`, `source`,
/// `type`, `time`, `datacontenttype`, `data` or `data_base64`) plus canal's `topic`, `offset`
/// (QoS 1 only), `qos` and `headers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Always `1.0`.
    pub specversion: String,
    /// The publisher's message id, or `{topic}:{offset}` for a QoS 1 event without one.
    pub id: String,
    /// Where the event came from: `canal://{peer id of the node that accepted it}`, or
    /// `canal://topic/{topic}` for stored events.
    pub source: String,
    /// Always `canal.event`.
    #[serde(rename = "type")]
    pub kind: String,
    /// When the event was accepted, RFC 3339.
    pub time: String,
    /// `text/plain; charset=utf-8` when the payload is UTF-8 text, else
    /// `application/octet-stream`.
    pub datacontenttype: String,
    /// The payload, when it is UTF-8 text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The payload in base64, when it is not UTF-8 text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    /// The topic.
    pub topic: String,
    /// The event's offset in its topic's log (QoS 1 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// 0 or 1.
    pub qos: u8,
    /// Custom headers.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

/// The answer to a publish.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Published {
    /// The topic.
    pub topic: String,
    /// 0 or 1.
    pub qos: u8,
    /// The event's offset (QoS 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Whether the message id had been published before, so this publish stored nothing new.
    pub duplicate: bool,
}

/// Sent to a subscriber whose events were dropped by retention before it read them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lagged {
    /// The topic.
    pub topic: String,
    /// The first offset the subscriber missed.
    pub from: u64,
    /// The offset it continues from (the oldest still stored).
    pub to: u64,
}

/// What `GET /v1/topics/{topic}/log` answers: where a topic's QoS 1 log starts and ends on
/// the answering node's replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicLog {
    /// The topic.
    pub topic: String,
    /// The oldest offset still stored.
    pub first: u64,
    /// The offset the next event gets (the number of events ever published).
    pub next: u64,
}

/// A peer's execution-time measurement of a function, as stored in the metadata group and
/// reported by placement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// The EWMA of the execution time, in milliseconds.
    pub exec_ms: f64,
    /// How many invocations it summarises.
    pub samples: u64,
}

/// A function's committed placement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placed {
    /// The decision, with the explanation it was made with.
    pub decision: Decision,
    /// When it was made, ms since the Unix epoch.
    pub decided_ms: u64,
}

/// What `GET /v1/functions/{name}/placement` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlacementAnswer {
    /// The function.
    pub function: String,
    /// Its policy.
    pub policy: String,
    /// The decision in force (what executors follow), if one was made.
    pub committed: Option<Placed>,
    /// What placement would decide now, from the answering node's view, with a verdict for
    /// every candidate.
    pub live: Decision,
    /// The peer that answered (its round trips are the ones in `live`).
    pub answered_by: String,
}

/// One entry of a function's state, as `GET /v1/functions/{name}/state` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateEntry {
    /// The key.
    pub key: String,
    /// The value, when it is UTF-8 text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The value in base64, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
}

/// What `GET /v1/functions/{name}/state` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateList {
    /// The entries, in key order.
    pub entries: Vec<StateEntry>,
}

/// An acknowledgement a durable subscriber sends over its WebSocket:
/// `{"ack": {"topic": TOPIC, "offset": N}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WsAck {
    /// What is acknowledged.
    pub ack: WsAckBody,
}

/// The body of a [`WsAck`]: every event of `topic` up to and including `offset` is done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WsAckBody {
    /// The topic.
    pub topic: String,
    /// The offset acknowledged.
    pub offset: u64,
}

/// One line of an NDJSON batch publish (`POST /v1/topics/{topic}/events` or
/// `POST /v1/events` with `Content-Type: application/x-ndjson`), and the body of a publish
/// stream's frame (`GET /v1/publish`, which adds `seq` and `qos`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishLine {
    /// The topic: required on `POST /v1/events` and on a stream, taken from the path on
    /// `POST /v1/topics/{topic}/events` (where it may be left out, or must match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// The payload as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// The payload as standard base64, for bytes that are not text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    /// The publisher's message id: a retry with the same id is stored once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Custom headers.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub headers: std::collections::BTreeMap<String, String>,
}

/// The most lines one batch publish may hold.
pub const MAX_BATCH_EVENTS: usize = 10_000;

/// A frame a client sends on a publish stream (`GET /v1/publish`): a publish numbered by the
/// client, answered by a [`StreamAck`] with the same `seq`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamPublish {
    /// The client's number for this publish; acks come back in the order frames were sent.
    pub seq: u64,
    /// QoS 0 or 1 (1 if left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<u8>,
    /// The publish.
    #[serde(flatten)]
    pub line: PublishLine,
}

/// Why a publish on a stream was refused: the same `kind` and message a single publish
/// would get.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamError {
    /// The error's stable name (`invalid_topic`, `too_large`, `no_leader`, ...).
    pub kind: String,
    /// What was wrong and what is allowed.
    pub message: String,
}

/// The node's answer to one [`StreamPublish`]: `{"seq", "topic", "offset"?, "duplicate"}`
/// or `{"seq", "error": {kind, message}}`. `seq` is absent only for a frame that did not
/// decode far enough to have one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamAck {
    /// The `seq` of the frame answered.
    pub seq: Option<u64>,
    /// The topic published to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// The event's offset (QoS 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Whether the message id had been published before (nothing new stored).
    #[serde(default)]
    pub duplicate: bool,
    /// Why the publish was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<StreamError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_websocket_ack_has_the_documented_shape() {
        let a: WsAck = serde_json::from_str(r#"{"ack": {"topic": "a/b", "offset": 7}}"#)
            .expect("the documented ack parses");
        assert_eq!(a.ack.topic, "a/b");
        assert_eq!(a.ack.offset, 7);
        assert_eq!(
            serde_json::to_string(&a).expect("an ack serializes"),
            r#"{"ack":{"topic":"a/b","offset":7}}"#
        );
    }

    #[test]
    fn state_entries_leave_out_the_absent_value() {
        let e = StateEntry {
            key: "k".into(),
            value: Some("v".into()),
            value_base64: None,
        };
        assert_eq!(
            serde_json::to_string(&e).expect("an entry serializes"),
            r#"{"key":"k","value":"v"}"#
        );
    }

    #[test]
    fn a_stream_frame_reads_with_its_line_flattened() {
        let f: StreamPublish = serde_json::from_str(
            r#"{"seq": 3, "topic": "a", "payload": "hi", "id": "m-3", "qos": 1}"#,
        )
        .expect("the documented frame parses");
        assert_eq!(f.seq, 3);
        assert_eq!(f.qos, Some(1));
        assert_eq!(f.line.topic.as_deref(), Some("a"));
        assert_eq!(f.line.payload.as_deref(), Some("hi"));
        assert_eq!(f.line.id.as_deref(), Some("m-3"));
    }

    #[test]
    fn a_batch_line_refuses_unknown_fields() {
        assert!(serde_json::from_str::<PublishLine>(r#"{"payload": "x", "paylod": "y"}"#).is_err());
    }
}

/// `POST /v1/tokens`: the token to issue (admin only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRequest {
    /// Who will hold it.
    pub subject: String,
    /// Topic filters it may publish to.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Topic filters it may not publish to, whatever `publish` says.
    #[serde(default)]
    pub publish_deny: Vec<String>,
    /// Topic filters it may subscribe with.
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Topic filters it may not subscribe to, whatever `subscribe` says.
    #[serde(default)]
    pub subscribe_deny: Vec<String>,
    /// Whether it holds admin rights.
    #[serde(default)]
    pub admin: bool,
    /// How long it is valid, in seconds.
    pub ttl_s: u64,
}

/// What a token says, as `GET /v1/tokens` lists it (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// The token's id (what `canal token revoke` takes).
    pub id: String,
    /// Who holds it.
    pub subject: String,
    /// When it was issued, ms since the Unix epoch.
    pub issued_ms: u64,
    /// When it expires, ms since the Unix epoch.
    pub expires_ms: u64,
    /// Topic filters it may publish to.
    pub publish: Vec<String>,
    /// Topic filters it may not publish to.
    pub publish_deny: Vec<String>,
    /// Topic filters it may subscribe with.
    pub subscribe: Vec<String>,
    /// Topic filters it may not subscribe to.
    pub subscribe_deny: Vec<String>,
    /// Whether it holds admin rights.
    pub admin: bool,
    /// Whether it was revoked.
    pub revoked: bool,
}

/// `POST /v1/tokens`' answer: the token, shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenIssued {
    /// The token (`Authorization: Bearer` it).
    pub token: String,
    /// What it says.
    pub info: TokenInfo,
}
