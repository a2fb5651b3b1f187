//! # canal-proto — the vocabulary and wire format of canal
//!
//! Everything two canal processes (or a node and its client) must agree on lives here, and
//! nothing here does I/O.
//!
//! ## Layout
//!
//! - [`topic`]: topic names and filters (`/`-separated levels, MQTT `+` and `#`), validation
//!   and matching.
//! - [`caps`]: the capability record every peer advertises (CPU, memory, GPUs, tier, labels,
//!   load), and the `MODEL:MEMORY` GPU declaration.
//! - [`function`]: functions and triggers as stored, their limits, requirements and
//!   settings, and what an invocation returns.
//! - [`settings`]: per-topic retention and payload limits, set on topics or filters.
//! - [`size`]: byte sizes written by people (`80GiB`, `512MiB`).
//! - [`keyspace`]: topic -> key -> shard, shard keys and the XOR distance (one definition,
//!   used by the DHT and by placement).
//! - [`shards`]: the shard map (every shard's replicas, first the preferred leader), as
//!   the metadata group stores it, with its bounded decoder.
//! - [`api`]: the JSON bodies of the HTTP client API, shared by the node and the CLI.
//! - [`wire`]: the versioned binary envelope (bincode) for peer-to-peer messages.
//! - [`peer`]: the peer messages outside the log: the channel byte of peer RPCs
//!   ([`PeerChannel`]), formation requests and answers, QoS 0 events.
//! - [`placement`]: placement policies and decisions, as the API reports them.
//! - [`qos`]: QoS 0 and 1, as written in headers, queries and flags.
//! - [`time`]: the wall clock (`now_ms`), never used inside a state machine.

pub mod api;
pub mod caps;
pub mod function;
pub mod keyspace;
pub mod peer;
pub mod placement;
pub mod qos;
pub mod settings;
pub mod shards;
pub mod size;
pub mod time;
pub mod topic;
pub mod wire;

pub use caps::{Capabilities, Gpu, GpuSource, Load, parse_label};
pub use peer::PeerChannel;
pub use qos::{Qos, QosError};
pub use topic::{Topic, TopicError, TopicFilter};

/// The version of canal this crate belongs to, reported by `/v1/health` and in capability
/// records so mixed-version meshes can be spotted.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
