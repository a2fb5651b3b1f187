//! The messages canal peers exchange about Raft groups: Raft's own RPCs, each tagged with
//! its group, and the forwarded client operations (writes, linearizable reads, membership
//! changes, status), which a follower sends on to the leader.

use crate::types::{GroupId, NodeId, RaftNode, Request, Response, TypeConfig};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{LogId, Vote};
use serde::{Deserialize, Serialize};

/// One member's own view of a group: the API's type, so what a member reports reaches the
/// client as it is.
pub type MemberStatus = canal_proto::api::RaftMemberStatus;

/// A request to a peer about one group.
#[derive(Debug, Serialize, Deserialize)]
pub enum RpcRequest {
    /// Raft: replicate entries / heartbeat.
    Append(GroupId, AppendEntriesRequest<TypeConfig>),
    /// Raft: ask for a vote.
    Vote(GroupId, VoteRequest<NodeId>),
    /// Raft: a chunk of a snapshot.
    Snapshot(GroupId, InstallSnapshotRequest<TypeConfig>),
    /// A client write, forwarded to the leader.
    Write(GroupId, Request),
    /// A linearizable read of one key, forwarded to the leader.
    Read(GroupId, String),
    /// Add a peer as a learner, forwarded to the leader.
    AddLearner(GroupId, NodeId, RaftNode),
    /// Make the given nodes voters (and only those), forwarded to the leader.
    SetVoters(GroupId, Vec<NodeId>),
    /// Remove a node from the group (voter or learner), forwarded to the leader.
    Remove(GroupId, NodeId),
    /// This member's view of the group.
    Status(GroupId),
    /// The leader (at this vote) asks a member to stop its election timer: the group is idle
    /// and the member has this last entry (see [`crate::quiet`]). Appended last: older
    /// variants keep their wire tags.
    Quiesce(GroupId, Vote<NodeId>, Option<LogId<NodeId>>),
    /// Sent once per heartbeat interval to each peer sharing a group, whatever the number of
    /// groups: the sender is alive, leads the groups in `leading`, and follows the groups in
    /// `quiet` with its election timer off.
    Alive {
        /// The groups the sender leads.
        leading: Vec<GroupId>,
        /// The groups the sender follows quietly.
        quiet: Vec<GroupId>,
    },
    /// A read of the group's topic logs from the receiving member's own state machine (any
    /// replica answers; no leader is needed), for a node that does not host the group.
    /// Appended last: older variants keep their wire tags.
    LogRead(GroupId, LogQuery),
    /// The leader (at this vote) asks a voter to stand for election now: it hands the lead
    /// of the group to it (see [`crate::groups::Consensus::hand_off`]). Appended last:
    /// older variants keep their wire tags.
    TakeLead(GroupId, Vote<NodeId>),
}

/// The answer to an [`RpcRequest`], variant for variant.
#[derive(Debug, Serialize, Deserialize)]
pub enum RpcResponse {
    /// To `Append`.
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// To `Vote`.
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// To `Snapshot`.
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    /// To `Write`.
    Write(Result<Response, ClientError>),
    /// To `Read`: the value, as of a read index confirmed by a quorum.
    Read(Result<Option<Vec<u8>>, ClientError>),
    /// To `AddLearner`, `SetVoters` and `Remove`.
    Membership(Result<(), ClientError>),
    /// To `Status`.
    Status(Result<MemberStatus, ClientError>),
    /// To `Quiesce`: whether the member now follows quietly (`false`: it differs from the
    /// leader, which stays active and asks again later).
    Quiesce(Result<bool, ClientError>),
    /// To `Alive`.
    Alive,
    /// To `LogRead`.
    LogRead(Result<LogAnswer, ClientError>),
    /// To `TakeLead`: whether the member stood for election.
    TakeLead(Result<(), ClientError>),
}

/// The most topics one [`LogQuery::Topics`] answer lists; the reader pages on with `after`.
pub const MAX_LOG_PAGE_TOPICS: usize = 1024;
/// The most events one [`LogQuery::Events`] answer carries, whatever its `limit` says.
pub const MAX_LOG_EVENTS: usize = 256;
/// The most event bytes (payloads, ids and headers) one [`LogQuery::Events`] answer
/// carries, unless its first event alone is larger (it then comes alone, so a reader never
/// stalls on a large event).
pub const MAX_LOG_ANSWER_BYTES: usize = 4 << 20;
/// The longest a [`LogQuery::Changes`] waits for a change, whatever its `wait_ms` says.
pub const MAX_CHANGES_WAIT_MS: u32 = 5000;
/// The most topic names one [`LogQuery::Changes`] answer lists; more changed topics are
/// answered "anything may have changed" (`topics: None`).
pub const MAX_CHANGES_TOPICS: usize = 4096;

/// What a [`RpcRequest::LogRead`] asks of a replica's topic logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogQuery {
    /// The topics with a log and where each starts and ends, in name order after `after`,
    /// at most `limit` (and [`MAX_LOG_PAGE_TOPICS`]).
    Topics {
        /// The last topic of the previous page; `None` for the first page.
        after: Option<String>,
        /// How many the reader wants at most.
        limit: u32,
    },
    /// Where one topic's log starts and ends.
    Meta {
        /// The topic.
        topic: String,
    },
    /// Events of one topic from an offset on, at most `limit` (and [`MAX_LOG_EVENTS`] and
    /// [`MAX_LOG_ANSWER_BYTES`]).
    Events {
        /// The topic.
        topic: String,
        /// The first offset wanted.
        from: u64,
        /// How many the reader wants at most.
        limit: u32,
    },
    /// The offset of the first event of a topic accepted at or after a time.
    OffsetAt {
        /// The topic.
        topic: String,
        /// The time, ms since the Unix epoch (the state machine's clock).
        time_ms: u64,
    },
    /// Where a durable subscription continues on a topic.
    SubscriptionCursor {
        /// The subscription.
        name: String,
        /// The topic.
        topic: String,
    },
    /// Long-poll for changes: answered at once if applies after index `since` changed
    /// topics, else after the first such apply or `wait_ms` (at most
    /// [`MAX_CHANGES_WAIT_MS`]).
    Changes {
        /// The last applied index the reader has heard of from this replica.
        since: u64,
        /// How long to wait for a change, in ms.
        wait_ms: u32,
    },
}

/// The answer to a [`LogQuery`], variant for variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogAnswer {
    /// To `Topics`: a page of topics, in name order.
    Topics(Vec<(String, crate::topics::TopicMeta)>),
    /// To `Meta`.
    Meta(Option<crate::topics::TopicMeta>),
    /// To `Events`.
    Events {
        /// The events, in offset order.
        events: Vec<crate::topics::StoredEvent>,
        /// Whether [`MAX_LOG_ANSWER_BYTES`] cut the answer short (more events may follow
        /// right after the last one).
        cut: bool,
    },
    /// To `OffsetAt`.
    Offset(u64),
    /// To `SubscriptionCursor`.
    Cursor(Option<u64>),
    /// To `Changes`.
    Changes {
        /// The last index the replica applied: the next poll's `since`.
        index: u64,
        /// The topics changed after `since`, sorted (empty: none within the wait); `None`
        /// when anything may have changed (a snapshot was installed, `since` is older than
        /// the replica remembers, or ahead of it: another replica's index).
        topics: Option<Vec<String>>,
    },
}

/// Why a client operation failed, as carried between peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ClientError {
    /// This node is not the leader; the leader is `leader` if known.
    #[error("not the leader of group {group}{}", .leader.as_ref().map(|l| format!(" (the leader is {})", l.peer_id)).unwrap_or_default())]
    NotLeader {
        /// The group.
        group: GroupId,
        /// The leader, if known.
        leader: Option<RaftNode>,
    },
    /// The group has no leader now (an election is under way, or no quorum is reachable).
    #[error("group {group} has no leader now: {reason}")]
    NoLeader {
        /// The group.
        group: GroupId,
        /// Why, as far as known.
        reason: String,
    },
    /// This node hosts no such group (never opened here, or closed).
    #[error("group {0} is not hosted on this node (it was never opened here, or was closed)")]
    UnknownGroup(GroupId),
    /// The group has not been formed yet.
    #[error("group {0} has not been formed yet: start the first nodes with --bootstrap-expect N")]
    NotInitialized(GroupId),
    /// Anything else (storage, a refused membership change).
    #[error("{0}")]
    Other(String),
    /// The request is larger than one Raft entry may be: it could never be replicated.
    #[error(
        "{what} is {bytes} bytes: one Raft entry carries at most {limit} bytes (MAX_ENTRY_BYTES)"
    )]
    TooLarge {
        /// What was too large.
        what: String,
        /// Its size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// The sender may not send this to the group (see [`crate::groups::Consensus::handle`]).
    #[error("refused {kind} for group {group}: {rule}")]
    Refused {
        /// The group.
        group: GroupId,
        /// The kind of request (`append`, `vote`, `write`, ...).
        kind: String,
        /// The rule the request broke.
        rule: String,
    },
}
