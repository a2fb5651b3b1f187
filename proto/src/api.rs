//! The JSON bodies of the HTTP client API (`/v1/...`), shared by the node that writes them and
//! the CLI that reads them, so the two cannot drift apart.

use crate::caps::Capabilities;
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
}
