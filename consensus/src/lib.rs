//! # canal-consensus — replication through Raft
//!
//! openraft drives consensus; sled stores the Raft log, the vote and the state machine. One
//! sled database per node holds every Raft group the node is a member of, each in trees of its
//! own, so a node can host the metadata group and any number of data groups. It knows
//! nothing about Wasm.
//!
//! ## Layout
//!
//! - [`types`]: the openraft type configuration ([`TypeConfig`]), group ids, node ids and
//!   the requests and responses a group replicates.
//! - [`routing`]: which group holds what: a [`Route`] (the cluster's, from
//!   [`Consensus::route`]) answers the group of a topic, a function's state and cursors, a
//!   durable subscription, and the groups a filter may read; the one place that knows.
//! - [`keys`]: every key of every group's state machine, as typed tables that build, parse
//!   and decode them, and [`UserKey`], the client keys that can never name an internal one.
//! - [`network`]: openraft's network over a [`Transport`] the node provides (libp2p).
//! - [`rpc`]: the messages between members, each tagged with its group.
//! - [`quiet`]: quiescent groups: an idle group stops heartbeating, its members stop their
//!   election timers, and one per-peer liveness signal wakes them when a leader goes silent.
//! - [`groups`]: [`Consensus`], the groups of a node (opened and closed at run time:
//!   [`Consensus::open_group`], [`Consensus::close_group`]) and the client operations on them
//!   (writes and linearizable reads forwarded to the leader, typed reads of internal
//!   records, membership, status, [`Consensus::is_leader`] and [`Consensus::describe`]).
//! - [`reader`]: [`GroupReader`], the one way to read a group's topic logs, local or
//!   remote (a replica's, over the transport, for a group this node does not host), and
//!   its change watch [`GroupWatch`].
//! - [`topics`]: what a topic log holds (publishes, events, where a log starts and ends).
//! - [`functions`]: the atomic [`functions::Effects`] of executions of functions.
//! - [`store`]: Raft storage on sled, one file per concern: `db` (the [`RaftDb`] and its
//!   format marker), `log` ([`LogStore`]), `state` ([`StateMachine`] and its reads, which
//!   fail with [`ReadError`]), `apply` (the deterministic apply of operations: the clock,
//!   dedup, topic logs, effects) over `overlay` (one apply call's writes), and `snapshot`.
//! - `mem` (tests, feature `mem-transport`): an in-memory [`Transport`] for clusters
//!   without sockets.
//!
//! ```text
//!   client write ─> Raft (openraft) ─> LogStore::append ─> sled tree g{N}.log (flushed)
//!                                   └> StateMachine::apply ─> sled tree g{N}.sm (one batch)
//! ```

pub mod functions;
pub mod groups;
pub mod keys;
#[cfg(any(test, feature = "mem-transport"))]
pub mod mem;
pub mod network;
pub mod quiet;
pub mod reader;
pub mod routing;
pub mod rpc;
pub mod store;
pub mod topics;
pub mod types;

pub use groups::{Consensus, ConsensusError, GroupView, Settings};
pub use keys::UserKey;
pub use network::Transport;
pub use reader::{Directory, GroupReader, GroupWatch};
pub use routing::{DATA_GROUPS, Route};
pub use rpc::{ClientError, MemberStatus};
pub use store::{
    ChangeWatch, Changed, LogStore, RaftDb, ReadError, StateMachine, StoreError, Wake,
};
pub use types::{
    GroupId, InternalKey, NodeId, Op, Proposal, RaftNode, Request, Response, TypeConfig,
};
