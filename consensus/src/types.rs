//! The openraft type configuration and what a group replicates.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Cursor;

/// A Raft node id: derived from the peer id, so every peer computes the same id for a peer.
pub type NodeId = u64;

/// Derives a peer's Raft node id from its peer id bytes: the first eight bytes of their
/// SHA-256, as a big-endian number.
pub fn node_id_of(peer_id_bytes: &[u8]) -> NodeId {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(peer_id_bytes);
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[..8]);
    u64::from_be_bytes(b)
}

/// Which Raft group a message or a store belongs to. Group 0 is the metadata group; data
/// groups are numbered from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GroupId(pub u32);

impl GroupId {
    /// The metadata group: membership, shard map, functions, triggers, topic settings.
    pub const METADATA: GroupId = GroupId(0);
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == GroupId::METADATA {
            write!(f, "metadata")
        } else if let Some(shard) = crate::routing::shard_of_group(*self) {
            write!(f, "shard-{shard}")
        } else {
            write!(f, "data-{}", self.0)
        }
    }
}

/// A Raft member as the cluster knows it: its libp2p peer id and addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftNode {
    /// The peer id, base58.
    pub peer_id: String,
    /// Multiaddrs where the peer was last seen.
    pub addrs: Vec<String>,
}

impl fmt::Display for RaftNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.peer_id)
    }
}

/// An operation on a group's replicated key-value state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Sets `key` to `value`. Refused for a key in the internal keyspace (starting with
    /// U+0001): only [`Op::Internal`] and the typed operations write there.
    Put {
        /// The key.
        key: String,
        /// The value.
        #[serde(with = "canal_proto::wire::bytes")]
        value: Vec<u8>,
    },
    /// Removes `key`. Refused for a key in the internal keyspace, like [`Op::Put`].
    Delete {
        /// The key.
        key: String,
    },
    /// Appends an event to a topic's log; the reply carries its offset.
    Publish(crate::topics::PublishOp),
    /// Moves a durable subscription's cursor on a topic past `offset` (never backwards).
    Ack {
        /// The subscription's name.
        subscription: String,
        /// The topic.
        topic: String,
        /// The last offset the subscriber has processed.
        offset: u64,
    },
    /// Applies what executions of a function did: outputs, state changes and a trigger's
    /// cursor move, together or not at all (see [`crate::functions`]).
    Effects(crate::functions::Effects),
    /// Applies a topic's retention at the entry's time (drops what is too old or too much);
    /// the reply's offset is the oldest offset kept.
    Trim {
        /// The topic.
        topic: String,
        /// Its retention.
        retention: canal_proto::settings::Retention,
    },
    /// Several client requests in one entry (group commit): each is applied as if proposed
    /// alone, with its own id, and answered in [`Response::batch`].
    Batch(Vec<Request>),
    /// Adds `delta` to the number stored at `key` (decimal text; a missing key counts as 0).
    /// Not idempotent, so it shows whether a write was applied more than once. Refused for a
    /// key in the internal keyspace, like [`Op::Put`].
    Add {
        /// The key.
        key: String,
        /// What to add.
        delta: i64,
    },
    /// Sets (`Some`) or removes (`None`) one internal record: the only way a request writes
    /// the internal keyspace by key, and only the keys [`InternalKey`] builds.
    Internal {
        /// Which record.
        key: InternalKey,
        /// Its new value; `None` removes it.
        value: Option<Vec<u8>>,
    },
    /// Appends an outbox entry of another group to its topic's log here, once: the group
    /// keeps, per producer, the last sequence number applied; `seq` at or below it is a
    /// duplicate (answered as success, [`Response::duplicate`], changing nothing), `seq`
    /// past it by more than one is refused as a gap.
    Deliver {
        /// The producer ([`crate::functions::producer_id`]).
        producer: String,
        /// The entry's sequence number in the producer's outbox (from 1).
        seq: u64,
        /// The event.
        event: crate::topics::PublishOp,
    },
    /// Removes a producer's outbox entries up to `upto` (inclusive), once the relay has
    /// had them delivered; never past the last sequence number handed out.
    OutboxTrim {
        /// The producer.
        producer: String,
        /// The last sequence number delivered.
        upto: u64,
    },
}

/// An internal record that a request may write by name ([`Op::Internal`]). Topic logs,
/// cursors, function state and dedup records are written only by the operations that own
/// them (publish, ack, effects) and have no variant here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InternalKey {
    /// A function's spec (metadata group).
    Function(String),
    /// A module's bytes, by hash (metadata group).
    Module(String),
    /// A trigger's spec (metadata group).
    Trigger(String),
    /// A function's committed placement (metadata group).
    Placement(String),
    /// One peer's execution-time measurement of a function (metadata group).
    Measurement {
        /// The function.
        function: String,
        /// The peer that measured, base58.
        peer: String,
    },
    /// The settings of a topic or filter (metadata group).
    Settings(String),
    /// Where a durable subscription started (data group).
    Subscription(String),
    /// The tombstone of a peer removed from the cluster for good (metadata group): the
    /// membership job never adds it back.
    Removed(String),
    /// A peer admitted by hand (`canal cluster admit`, metadata group): on a mesh without a
    /// cluster key, only such peers join.
    Admitted(String),
    /// Whose publish rights a trigger's function has, by trigger uid (metadata group).
    TriggerOwner(String),
    /// The public half of the cluster's token key, by algorithm (metadata group): set once.
    TokenKey(String),
    /// What an issued token says, by token id (metadata group).
    Token(String),
    /// A revoked token, by id (metadata group).
    RevokedToken(String),
    /// A topic's MQTT retained message (data group of the topic).
    Retained(String),
    /// A persistent MQTT session, by client id (data group of its subscriptions).
    MqttSession(String),
    /// The cluster's shard map (metadata group), a wire-encoded
    /// [`canal_proto::shards::ShardMap`]. The apply takes only a map that decodes and
    /// validates, keeps the committed shard count and is at the committed epoch + 1 (1 for
    /// the first), so a stale leader never replaces a newer map; it cannot be removed.
    ShardMap,
}

impl InternalKey {
    /// The record's key in the state machine, built by its [`crate::keys`] table.
    pub fn key(&self) -> String {
        use crate::keys;
        match self {
            InternalKey::Function(name) => keys::FUNCTIONS.key(name),
            InternalKey::Module(hash) => keys::MODULES.key(hash),
            InternalKey::Trigger(name) => keys::TRIGGERS.key(name),
            InternalKey::Placement(function) => keys::placements::<()>().key(function),
            InternalKey::Measurement { function, peer } => {
                keys::measurements::<()>().key((function, peer))
            }
            InternalKey::Settings(filter) => keys::SETTINGS.key(filter),
            InternalKey::Subscription(name) => keys::SUBSCRIPTION_STARTS.key(name),
            InternalKey::Removed(peer) => keys::REMOVED.key(peer),
            InternalKey::Admitted(peer) => keys::ADMITTED.key(peer),
            InternalKey::TriggerOwner(uid) => keys::TRIGGER_OWNERS.key(uid),
            InternalKey::TokenKey(alg) => keys::TOKEN_KEY.key(alg),
            InternalKey::Token(id) => keys::TOKENS.key(id),
            InternalKey::RevokedToken(id) => keys::REVOKED_TOKENS.key(id),
            InternalKey::Retained(topic) => keys::RETAINED.key(topic),
            InternalKey::MqttSession(client) => keys::MQTT_SESSIONS.key(client),
            InternalKey::ShardMap => keys::SHARD_MAP.key(keys::SHARD_MAP_CURRENT),
        }
    }

    /// The names the key is built from, for [`InternalKey::check`].
    fn parts(&self) -> Vec<&str> {
        match self {
            InternalKey::Function(s)
            | InternalKey::Module(s)
            | InternalKey::Trigger(s)
            | InternalKey::Placement(s)
            | InternalKey::Settings(s)
            | InternalKey::Subscription(s)
            | InternalKey::Removed(s)
            | InternalKey::Admitted(s)
            | InternalKey::TriggerOwner(s)
            | InternalKey::TokenKey(s)
            | InternalKey::Token(s)
            | InternalKey::RevokedToken(s) => vec![s.as_str()],
            InternalKey::Retained(s) | InternalKey::MqttSession(s) => vec![s.as_str()],
            InternalKey::Measurement { function, peer } => vec![function, peer],
            InternalKey::ShardMap => Vec::new(),
        }
    }

    /// Checks the names the key is built from: 1 to [`MAX_INTERNAL_NAME_BYTES`] bytes and no
    /// control characters, so one record's key can never be another's (the separators are
    /// control characters).
    pub fn check(&self) -> Result<(), String> {
        for part in self.parts() {
            if part.is_empty()
                || part.len() > MAX_INTERNAL_NAME_BYTES
                || part.chars().any(char::is_control)
            {
                return Err(format!(
                    "internal key name {part:?} is refused: 1 to {MAX_INTERNAL_NAME_BYTES} bytes, no control characters"
                ));
            }
        }
        Ok(())
    }
}

/// The longest name an [`InternalKey`] is built from.
pub const MAX_INTERNAL_NAME_BYTES: usize = 1024;

impl fmt::Display for InternalKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InternalKey::Function(n) => write!(f, "function {n}"),
            InternalKey::Module(h) => write!(f, "module {h}"),
            InternalKey::Trigger(n) => write!(f, "trigger {n}"),
            InternalKey::Placement(n) => write!(f, "placement of {n}"),
            InternalKey::Measurement { function, peer } => {
                write!(f, "measurement of {function} by {peer}")
            }
            InternalKey::Settings(t) => write!(f, "settings of {t}"),
            InternalKey::Subscription(n) => write!(f, "start of durable subscription {n}"),
            InternalKey::Removed(p) => write!(f, "removal of peer {p}"),
            InternalKey::Admitted(p) => write!(f, "admission of peer {p}"),
            InternalKey::TriggerOwner(u) => write!(f, "owner of trigger {u}"),
            InternalKey::TokenKey(a) => write!(f, "{a} token key"),
            InternalKey::Token(id) => write!(f, "token {id}"),
            InternalKey::RevokedToken(id) => write!(f, "revocation of token {id}"),
            InternalKey::Retained(t) => write!(f, "retained message of {t}"),
            InternalKey::MqttSession(c) => write!(f, "MQTT session of {c}"),
            InternalKey::ShardMap => write!(f, "shard map"),
        }
    }
}

impl Request {
    /// Roughly how many bytes the request carries: what a batch of requests is limited by.
    pub fn weight(&self) -> usize {
        64 + match &self.op {
            Op::Put { key, value } => key.len() + value.len(),
            Op::Internal { key, value } => key.key().len() + value.as_ref().map_or(0, Vec::len),
            Op::Publish(p) => p.topic.len() + p.payload.len(),
            Op::Effects(e) => {
                e.outputs.iter().map(|o| o.payload.len()).sum::<usize>()
                    + e.outbox
                        .iter()
                        .map(|o| o.producer.len() + o.event.topic.len() + o.event.payload.len())
                        .sum::<usize>()
                    + e.state
                        .iter()
                        .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
                        .sum::<usize>()
            }
            Op::Batch(b) => b.iter().map(Request::weight).sum(),
            Op::Deliver {
                producer, event, ..
            } => producer.len() + event.topic.len() + event.payload.len(),
            Op::OutboxTrim { producer, .. } => producer.len(),
            Op::Delete { .. } | Op::Ack { .. } | Op::Add { .. } | Op::Trim { .. } => 0,
        }
    }
}

/// A write to a group. A request with an `id` is applied at most once however often it is
/// proposed: a client that retries after a lost answer does not write twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The client's id for this write, unique per write; `None` for writes that are safe
    /// to repeat.
    pub id: Option<String>,
    /// What to do.
    pub op: Op,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.op {
            Op::Put { key, value } => write!(f, "put {key} ({} bytes)", value.len()),
            Op::Delete { key } => write!(f, "delete {key}"),
            Op::Internal {
                key,
                value: Some(v),
            } => write!(f, "set {key} ({} bytes)", v.len()),
            Op::Internal { key, value: None } => write!(f, "remove {key}"),
            Op::Add { key, delta } => write!(f, "add {delta} to {key}"),
            Op::Publish(e) => write!(f, "publish to {} ({} bytes)", e.topic, e.payload.len()),
            Op::Ack {
                subscription,
                topic,
                offset,
            } => write!(f, "ack {subscription} {topic} {offset}"),
            Op::Batch(b) => write!(f, "batch of {} requests", b.len()),
            Op::Trim { topic, .. } => write!(f, "trim {topic}"),
            Op::Effects(e) => write!(
                f,
                "effects of {} ({} outputs, {} to other groups, {} state changes)",
                e.function,
                e.outputs.len(),
                e.outbox.len(),
                e.state.len()
            ),
            Op::Deliver {
                producer,
                seq,
                event,
            } => write!(f, "deliver {producer} #{seq} to {}", event.topic),
            Op::OutboxTrim { producer, upto } => write!(f, "trim outbox {producer} to #{upto}"),
        }
    }
}

/// What applying a request returned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The index of the log entry that applied the request (for a duplicate, of the entry
    /// that applied it the first time).
    pub index: u64,
    /// Whether this request id had been applied before, or (for [`Op::Deliver`]) the
    /// producer's sequence number had, so this proposal changed nothing.
    pub duplicate: bool,
    /// The value the key had before.
    pub previous: Option<Vec<u8>>,
    /// Why the operation did nothing, if it was refused (an `Add` to a key that does not hold
    /// a number).
    pub refused: Option<String>,
    /// For a publish: the offset the event got in its topic's log.
    pub offset: Option<u64>,
    /// For a batch: the answer to each of its requests, in order.
    pub batch: Vec<Response>,
}

/// What a Raft entry carries: a client request and the time the leader proposed it.
///
/// The state machine's clock is this stamp, never the wall clock of the node applying the
/// entry or of the node that accepted the request, and never goes backwards (see
/// [`crate::store`]): every replica measures dedup windows and retention by age alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// Milliseconds since the Unix epoch on the leader when it proposed the entry.
    pub time_ms: u64,
    /// The request.
    pub request: Request,
}

impl fmt::Display for Proposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}", self.request, self.time_ms)
    }
}

openraft::declare_raft_types!(
    /// canal's openraft type configuration.
    pub TypeConfig:
        D = Proposal,
        R = Response,
        NodeId = NodeId,
        Node = RaftNode,
);
