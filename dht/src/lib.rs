//! # canal-dht — the peer mesh and the topic space
//!
//! The libp2p swarm of a canal peer: TCP (optionally behind a pre-shared cluster key) and
//! QUIC transports, Noise and yamux, identify, ping, Kademlia under canal's own protocol name,
//! optional mDNS, and a gossip channel on which every peer advertises its capability record.
//! It knows nothing of Raft or Wasm.
//!
//! ## Layout
//!
//! - [`topology`]: pure functions from a topic to its key, shard and home peers.
//! - [`peers`]: the table of live peers and their capability records (pure state).
//! - [`rpc`]: a request-response channel of opaque bytes for the layers above, and the QoS 0
//!   lane (one-way), with their limits.
//! - [`link`]: one long-lived stream per peer and lane carrying both, with bounded queues
//!   (backpressure), batched writes, and requests matched to answers by id.
//! - [`frame`]: the versioned, length-bounded frames on a link.
//! - [`guard`]: bad-message accounting per peer (log, disconnect, ban), pure state.
//! - [`swarm`]: the transports and behaviours, and the one event loop that drives them.
//! - [`Dht`] / [`DhtHandle`]: the boundary the node uses: start, read the tables, stop.
//!
//! ```text
//!   swarm events ─┐                         ┌─> peer table (shared, read by the API)
//!   advertise tick ┼─> select! loop (swarm) ─┼─> gossip: our capability record
//!   sweep tick ────┤                         └─> metrics
//!   commands ──────┘
//! ```

pub mod frame;
pub mod guard;
pub mod link;
pub mod peers;
pub mod rpc;
pub mod swarm;
pub mod topology;

pub use guard::{GuardConfig, PeerGuard, Verdict};
pub use link::{Lane, Reply};
pub use rpc::{InboundQos0, InboundRpc, RpcError};
pub use swarm::{Dht, DhtConfig, DhtError, DhtHandle, LocalRecord, PeerView};
pub use topology::{Placement, TopicSpace};

/// The Kademlia protocol name canal peers speak; peers of other libp2p networks using the
/// default `/ipfs/kad/1.0.0` do not mix with a canal mesh.
pub const KAD_PROTOCOL: &str = "/canal/kad/1.0.0";
/// The identify protocol version string canal peers announce.
pub const IDENTIFY_PROTOCOL: &str = "/canal/id/1.0.0";
/// The gossip topic that carries capability records.
pub const CAPS_TOPIC: &str = "canal/caps/v1";
