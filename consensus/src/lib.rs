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
//! - [`network`]: openraft's network over a [`Transport`] the node provides (libp2p).
//! - [`rpc`]: the messages between members, each tagged with its group.
//! - [`groups`]: [`Consensus`], the groups of a node and the client operations on them
//!   (writes and linearizable reads forwarded to the leader, membership, status).
//! - [`topics`]: durable topic logs kept in a data group's state machine.
//! - [`functions`]: functions, triggers, function state and the atomic [`functions::Effects`]
//!   of executions.
//! - `mem` (tests, feature `mem-transport`): an in-memory [`Transport`] for clusters
//!   without sockets.
//! - [`store`]: the sled database ([`RaftDb`]), with its format marker, and per group the
//!   log store ([`LogStore`]) and the state machine ([`StateMachine`]), snapshots included.
//!
//! ```text
//!   client write ─> Raft (openraft) ─> LogStore::append ─> sled tree g{N}.log (flushed)
//!                                   └> StateMachine::apply ─> sled tree g{N}.sm (one batch)
//! ```

pub mod functions;
pub mod groups;
#[cfg(any(test, feature = "mem-transport"))]
pub mod mem;
pub mod network;
pub mod rpc;
pub mod store;
pub mod topics;
pub mod types;

pub use groups::{Consensus, ConsensusError, Settings};
pub use network::Transport;
pub use rpc::{ClientError, MemberStatus};
pub use store::{LogStore, RaftDb, StateMachine, StoreError};
pub use types::{
    GroupId, InternalKey, NodeId, Op, Proposal, RaftNode, Request, Response, TypeConfig,
};
