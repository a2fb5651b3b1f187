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
    /// Sets `key` to `value`.
    Put {
        /// The key.
        key: String,
        /// The value.
        #[serde(with = "crate::bytes")]
        value: Vec<u8>,
    },
    /// Removes `key`.
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
    /// Applies a topic's retention at `now_ms` (drops what is too old or too much); the
    /// reply's offset is the oldest offset kept.
    Trim {
        /// The topic.
        topic: String,
        /// Its retention.
        retention: canal_proto::settings::Retention,
        /// The time the retention is measured at, ms since the Unix epoch.
        now_ms: u64,
    },
    /// Several client requests in one entry (group commit): each is applied as if proposed
    /// alone, with its own id, and answered in [`Response::batch`].
    Batch(Vec<Request>),
    /// Adds `delta` to the number stored at `key` (decimal text; a missing key counts as 0).
    /// Not idempotent, so it shows whether a write was applied more than once.
    Add {
        /// The key.
        key: String,
        /// What to add.
        delta: i64,
    },
}

impl Request {
    /// Roughly how many bytes the request carries: what a batch of requests is limited by.
    pub fn weight(&self) -> usize {
        64 + match &self.op {
            Op::Put { key, value } => key.len() + value.len(),
            Op::Publish(p) => p.topic.len() + p.payload.len(),
            Op::Effects(e) => {
                e.outputs.iter().map(|o| o.payload.len()).sum::<usize>()
                    + e.state
                        .iter()
                        .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
                        .sum::<usize>()
            }
            Op::Batch(b) => b.iter().map(Request::weight).sum(),
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
                "effects of {} ({} outputs, {} state changes)",
                e.function,
                e.outputs.len(),
                e.state.len()
            ),
        }
    }
}

/// What applying a request returned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The index of the log entry that applied the request (for a duplicate, of the entry
    /// that applied it the first time).
    pub index: u64,
    /// Whether this request id had been applied before, so this proposal changed nothing.
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

openraft::declare_raft_types!(
    /// canal's openraft type configuration.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = RaftNode,
);
