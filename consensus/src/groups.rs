//! The Raft groups a node takes part in, and the client operations on them: writes and
//! linearizable reads forwarded to the leader, membership changes, status.
//!
//! ```text
//!   write(g, req) ──> leader known? ──yes, me──> raft.client_write ──> Response
//!                         │          └─yes, other─> RPC Write ──> (its client_write)
//!                         └─no──> wait for an election (bounded), retry
//! ```

use crate::keys::{Codec, Shape, Table, UserKey};
use crate::network::{MAX_ENTRY_BYTES, Network, Transport, call};
use crate::quiet::{self, Quiet};
use crate::routing::Route;
use crate::rpc::{ClientError, MemberStatus, RpcRequest, RpcResponse};
use crate::store::{LogStore, RaftDb, StateMachine, StoreError};
use crate::types::{GroupId, NodeId, Op, RaftNode, Request, Response, TypeConfig};
use canal_proto::wire;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Raft, RaftMetrics, ServerState, SnapshotPolicy};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

/// Timing and log-compaction settings shared by all groups of a node.
///
/// openraft 0.9 uses one setting for two jobs: how often a leader sends heartbeats and how
/// long it waits for any AppendEntries answer. A short heartbeat is what keeps failover fast,
/// but as a timeout it cuts off every follower further away than it, and nothing commits. So
/// they are kept apart here: openraft's heartbeat interval is set to [`Settings::rpc_timeout`],
/// and a driver of canal's own sends heartbeats every [`Settings::heartbeat`] (and at once when
/// the leader's applied index moves, so followers learn of commits without waiting).
#[derive(Debug, Clone)]
pub struct Settings {
    /// How often the leader of a group sends heartbeats to its followers.
    pub heartbeat: Duration,
    /// How long a leader waits for one AppendEntries (or read-index) answer before it counts
    /// the follower as not answering. Must exceed the round trip to every member, and be
    /// below the shortest election timeout.
    pub rpc_timeout: Duration,
    /// Election timeout range: a follower that hears no leader for a random time in this range
    /// stands for election.
    pub election_timeout: (Duration, Duration),
    /// Build a snapshot (and compact the log) after this many entries since the last one.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot, so a briefly lagging follower catches up
    /// from the log instead of a snapshot.
    pub keep_behind_snapshot: u64,
    /// How long a client operation may wait for a leader before it fails.
    pub client_timeout: Duration,
    /// Test only: added to this node's wall clock where it stamps the entries it proposes
    /// as leader (see [`Consensus::now_ms`]), to test nodes whose clocks are off.
    pub clock_offset_ms: i64,
    /// A group whose leader proposed nothing for this long, and whose members all have its
    /// last entry, goes quiet: no heartbeats, no election timers (see [`crate::quiet`]).
    /// `None`: groups never go quiet.
    pub quiesce_after: Option<Duration>,
    /// Whether topics are routed by shard ([`Route::Sharded`], set by
    /// [`Consensus::set_route`] once the cluster's shard count is known; until then every
    /// routed operation waits or fails with "no shard map yet") or all kept in data group 1
    /// ([`Route::Single`], the in-process tests).
    pub sharded: bool,
}

/// The shortest election timeout of [`Settings::default`]: safe for members up to about
/// 300 ms of round trip apart (the RPC timeout it gives is 400 ms).
pub const SAFE_ELECTION_TIMEOUT: Duration = Duration::from_millis(600);

impl Settings {
    /// The timings that follow from a shortest election timeout `min`: elections after
    /// `min`..`2 * min` without a leader, an RPC timeout of two thirds of `min` (room for a
    /// reply before a follower would stand), idle heartbeats every `min / 4` (a follower's
    /// timer is reset four times before it could stand; more often would only queue
    /// heartbeats before the appends on a link to a far member, since openraft sends one
    /// RPC at a time to each). The rest as [`Settings::default`].
    pub fn with_election_timeout(min: Duration) -> Settings {
        Settings {
            heartbeat: min / 4,
            rpc_timeout: Duration::from_millis((min.as_millis() * 2 / 3) as u64),
            election_timeout: (min, min * 2),
            snapshot_every: 5000,
            keep_behind_snapshot: 1000,
            client_timeout: Duration::from_secs(10),
            clock_offset_ms: 0,
            // Long enough that a group with any steady traffic never goes quiet between
            // writes; short enough that idle groups stop costing within seconds.
            quiesce_after: Some(min * 4),
            sharded: false,
        }
    }

    /// Checks the timings fit together (openraft needs an RPC timeout below the election
    /// timeout; heartbeats must come faster than elections).
    pub fn check(&self) -> Result<(), String> {
        let (min, max) = self.election_timeout;
        if self.heartbeat.is_zero() || self.heartbeat >= min {
            return Err(format!(
                "heartbeat {:?} must be above zero and below the shortest election timeout {min:?}",
                self.heartbeat
            ));
        }
        if self.rpc_timeout.as_millis() == 0 || self.rpc_timeout >= min {
            return Err(format!(
                "RPC timeout {:?} must be at least 1 ms and below the shortest election timeout {min:?}",
                self.rpc_timeout
            ));
        }
        if max <= min {
            return Err(format!(
                "the election timeout range {min:?}..{max:?} is empty: the longest must exceed the shortest"
            ));
        }
        if let Some(q) = self.quiesce_after
            && q <= self.heartbeat
        {
            return Err(format!(
                "quiesce_after {q:?} must exceed the heartbeat interval {:?}",
                self.heartbeat
            ));
        }
        Ok(())
    }
}

impl Default for Settings {
    /// Safe for members up to ~300 ms of round trip apart (edge to cloud). openraft waits out
    /// a leader lease on top of the election timeout before it votes again, so a failover
    /// takes about 2-3x the timeout: about 2-3 s here; close peers can use
    /// `with_election_timeout(200 ms)` for failover under a second.
    fn default() -> Self {
        Settings::with_election_timeout(SAFE_ELECTION_TIMEOUT)
    }
}

/// What [`Consensus::handle`] did with a request from a peer.
#[derive(Debug)]
pub struct Handled {
    /// The answer to send back.
    pub answer: Vec<u8>,
    /// What the peer did wrong, if the request was refused.
    pub offence: Option<Offence>,
}

/// A request a peer should not have sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offence {
    /// The kind of request (`append`, `vote`, `snapshot`, `write`, ...), or `decode` for
    /// bytes that are no request.
    pub kind: &'static str,
    /// What was wrong.
    pub detail: String,
    /// Whether no honest peer could have sent it (undecodable bytes, a leader or candidate
    /// named that is not the sender), so the node may ban the peer. "Not a member" is not:
    /// a lagging follower legitimately hears from a leader it does not know yet.
    pub ban_worthy: bool,
}

/// The kind of a request, as named in refusals and the refused-RPC metric.
fn kind_of(req: &RpcRequest) -> &'static str {
    match req {
        RpcRequest::Append(..) => "append",
        RpcRequest::Vote(..) => "vote",
        RpcRequest::Snapshot(..) => "snapshot",
        RpcRequest::Write(..) => "write",
        RpcRequest::Read(..) => "read",
        RpcRequest::AddLearner(..) => "add_learner",
        RpcRequest::SetVoters(..) => "set_voters",
        RpcRequest::Remove(..) => "remove",
        RpcRequest::Status(..) => "status",
        RpcRequest::Quiesce(..) => "quiesce",
        RpcRequest::Alive { .. } => "alive",
        RpcRequest::LogRead(..) => "log_read",
        RpcRequest::TakeLead(..) => "take_lead",
    }
}

/// The kind of an encoded request (`unknown` if it does not decode), for test transports
/// that count what is sent.
pub fn kind_of_body(body: &[u8]) -> &'static str {
    wire::decode::<RpcRequest>(body)
        .map(|r| kind_of(&r))
        .unwrap_or("unknown")
}

fn group_of(req: &RpcRequest) -> GroupId {
    match req {
        RpcRequest::Append(g, _)
        | RpcRequest::Vote(g, _)
        | RpcRequest::Snapshot(g, _)
        | RpcRequest::Write(g, _)
        | RpcRequest::Read(g, _)
        | RpcRequest::AddLearner(g, ..)
        | RpcRequest::SetVoters(g, _)
        | RpcRequest::Remove(g, _)
        | RpcRequest::Status(g)
        | RpcRequest::Quiesce(g, ..)
        | RpcRequest::LogRead(g, _)
        | RpcRequest::TakeLead(g, _) => *g,
        // Not about one group; `dispatch` answers it before it looks for a group. Named as
        // the metadata group only where a refusal needs a group to name.
        RpcRequest::Alive { .. } => GroupId::METADATA,
    }
}

/// Whether `from` may send `req`, judged against this node's membership of the request's
/// group: `sender_is_member` is `None` while the group has no membership here (not formed,
/// or waiting to be added), when anyone may speak Raft to it (the node's admission rules
/// decide who may connect at all).
///
/// - Append and InstallSnapshot only from the leader they name, Vote only from the
///   candidate it names (anything else is forged: ban-worthy), and only from a member.
/// - Forwarded client operations (writes, linearizable reads, status, log reads) from
///   members of the group, or of the metadata group (`sender_in_metadata`): any cluster
///   member may serve clients of a group it does not host. Membership changes only from
///   members of the group.
pub fn admit(
    req: &RpcRequest,
    from: NodeId,
    sender_is_member: Option<bool>,
    sender_in_metadata: bool,
) -> Result<(), Offence> {
    let kind = kind_of(req);
    let named = match req {
        RpcRequest::Append(_, r) => Some(r.vote.leader_id().voted_for()),
        RpcRequest::Snapshot(_, r) => Some(r.vote.leader_id().voted_for()),
        RpcRequest::Vote(_, r) => Some(r.vote.leader_id().voted_for()),
        RpcRequest::Quiesce(_, vote, _) => Some(vote.leader_id().voted_for()),
        RpcRequest::TakeLead(_, vote) => Some(vote.leader_id().voted_for()),
        _ => None,
    };
    if let Some(named) = named
        && named != Some(from)
    {
        let role = if kind == "vote" {
            "candidate"
        } else {
            "leader"
        };
        return Err(Offence {
            kind,
            detail: format!(
                "the {kind} names {role} {} but was sent by node {from}: a {kind} is accepted only from the {role} it names",
                named.map_or_else(|| "none".to_string(), |n| format!("node {n}"))
            ),
            ban_worthy: true,
        });
    }
    if sender_is_member == Some(false) && !(is_forwarded_client_op(req) && sender_in_metadata) {
        let who = if is_forwarded_client_op(req) {
            "members of the group or of the metadata group"
        } else {
            "members"
        };
        return Err(Offence {
            kind,
            detail: format!(
                "node {from} is not a member (voter or learner) of group {} here: only {who} may send a {kind}",
                group_of(req)
            ),
            ban_worthy: false,
        });
    }
    Ok(())
}

/// Whether `req` is a client operation a node forwards for its clients to a group it may
/// not host: admitted from any member of the metadata group ([`admit`]).
fn is_forwarded_client_op(req: &RpcRequest) -> bool {
    matches!(
        req,
        RpcRequest::Write(..)
            | RpcRequest::Read(..)
            | RpcRequest::Status(..)
            | RpcRequest::LogRead(..)
    )
}

/// The most groups whose last known leader a node remembers for its remote writes.
pub const MAX_KNOWN_LEADERS: usize = 65_536;

/// Why the groups could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    /// The database.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// openraft refused the configuration or could not start.
    #[error("cannot start Raft group {group}: {reason}")]
    Start {
        /// The group.
        group: GroupId,
        /// Why.
        reason: String,
    },
}

/// One hosted group: its Raft, storage, write queue, tasks and quiescence.
struct Group {
    id: GroupId,
    raft: Raft<TypeConfig>,
    sm: StateMachine,
    log: LogStore,
    /// Where [`Consensus::write_batched`] queues requests.
    batcher: mpsc::Sender<Pending>,
    /// Where writes other members forward to this leader wait for its batches (at most
    /// [`MAX_FORWARDED_QUEUED`]).
    forwarded: mpsc::Sender<Pending>,
    /// Its batcher, heartbeat driver and metrics watcher: aborted when it closes.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    quiet: Mutex<Quiet>,
    /// Raised by every wake and every activity: a quiesce round that began under another
    /// value does not take the group quiet.
    epoch: AtomicU64,
    /// Tells the heartbeat driver of a quiet leader that the group woke.
    woken: tokio::sync::Notify,
    /// The voter this leader is handing the group's lead to ([`Consensus::hand_off`]):
    /// meanwhile it proposes nothing and serves no linearizable read.
    handing_off: Mutex<Option<NodeId>>,
    /// Why the group last woke from quiet (for a hand-off's error).
    woke_for: Mutex<String>,
    /// Proposals handed to this node's Raft and not answered yet: a hand-off waits for
    /// none, since one still on its way to the log would be appended after the group went
    /// quiet.
    proposing: AtomicU64,
}

/// Counts a proposal in [`Group::proposing`] until its answer comes or its waiter gives up.
struct Proposing(Arc<Group>);

impl Drop for Proposing {
    fn drop(&mut self) {
        self.0.proposing.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Group {
    /// Stops the group's own tasks (batcher, heartbeat driver, metrics watcher).
    fn abort_tasks(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }

    fn quiet(&self) -> std::sync::MutexGuard<'_, Quiet> {
        self.quiet.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handing_off(&self) -> std::sync::MutexGuard<'_, Option<NodeId>> {
        self.handing_off.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// "No leader" (retryable: the caller finds the new leader) while this leader hands
    /// the group's lead on.
    fn refuse_while_handing_off(&self) -> Result<(), ClientError> {
        match *self.handing_off() {
            Some(to) => Err(ClientError::NoLeader {
                group: self.id,
                reason: format!(
                    "the lead of group {} is being handed to node {to}: try again in a moment",
                    self.id
                ),
            }),
            None => Ok(()),
        }
    }

    /// Puts the group's timers back as openraft has them; true if it was quiet.
    fn wake(&self, why: &str) -> bool {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let mut q = self.quiet();
        let was = std::mem::replace(&mut *q, Quiet::Active);
        let rc = self.raft.runtime_config();
        match was {
            Quiet::Active => return false,
            Quiet::Leading { .. } => {
                rc.heartbeat(true);
                rc.tick(true);
                self.woken.notify_one();
            }
            Quiet::Following { .. } => {
                rc.tick(true);
                rc.elect(true);
            }
        }
        drop(q);
        why.clone_into(&mut self.woke_for.lock().unwrap_or_else(|p| p.into_inner()));
        debug!(group = %self.id, why, "group woke");
        true
    }
}

#[derive(Clone)]
struct Metrics {
    commit_seconds: Family<Vec<(String, String)>, Histogram>,
    proposals: Family<Vec<(String, String)>, Counter>,
    elections: Family<Vec<(String, String)>, Counter>,
    snapshots: Family<Vec<(String, String)>, Counter>,
    refused: Family<Vec<(String, String)>, Counter>,
    stopped: Family<Vec<(String, String)>, Gauge>,
    /// Hosted groups by `state`: `active` or `quiescent`.
    groups: Family<Vec<(String, String)>, Gauge>,
    /// Operations on groups not hosted here, by `kind` and `outcome`.
    remote: crate::reader::RemoteCounter,
    /// Log reads answered for other nodes, by `kind` and the bound that cut the answer
    /// (`capped`: a limit's name, or `none`).
    log_reads: Family<Vec<(String, String)>, Counter>,
}

fn group_label(g: GroupId) -> Vec<(String, String)> {
    vec![("group".to_string(), g.to_string())]
}

/// A group as one member sees it locally ([`Consensus::describe`]): where its data is and
/// who serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupView {
    /// The group.
    pub group: GroupId,
    /// Its leader, if this member knows one now.
    pub leader: Option<RaftNode>,
    /// Its voters, in node id order.
    pub voters: Vec<RaftNode>,
    /// Its learners (replicas that do not vote yet), in node id order.
    pub learners: Vec<RaftNode>,
}

/// A node's Raft groups. Cheap to clone.
#[derive(Clone)]
pub struct Consensus<T: Transport> {
    inner: Arc<Inner<T>>,
}

struct Inner<T> {
    me: NodeId,
    node: RaftNode,
    transport: T,
    db: RaftDb,
    config: Arc<openraft::Config>,
    groups: RwLock<BTreeMap<GroupId, Arc<Group>>>,
    /// Held while a group opens or closes, so two calls for one group do not interleave.
    opening: tokio::sync::Mutex<()>,
    settings: Settings,
    metrics: Metrics,
    watermark: Arc<crate::store::Watermark>,
    watermark_task: tokio::task::JoinHandle<()>,
    /// Set by [`Consensus::shutdown`]: a stopped group is then expected, not a fault.
    shutting_down: AtomicBool,
    /// When a refusal was last logged, per sender and kind (logged at most once a minute).
    refusals_logged: std::sync::Mutex<std::collections::HashMap<(NodeId, &'static str), Instant>>,
    /// The per-node liveness task (see [`crate::quiet`]).
    liveness_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The cluster's routing; `None` while a sharded node does not know its shard count.
    route: tokio::sync::watch::Sender<Option<Route>>,
    /// Where the replicas of groups not hosted here are ([`Consensus::set_directory`]).
    directory: Arc<RwLock<crate::reader::Directory>>,
    /// The last leader learned of each group not hosted here, tried first by remote
    /// writes (at most [`MAX_KNOWN_LEADERS`]).
    known_leaders: Mutex<std::collections::HashMap<GroupId, RaftNode>>,
    /// The write batcher of each group not hosted here that was written lately: its
    /// generation, its queue and its task (which ends after [`REMOTE_BATCHER_IDLE`]).
    remote_batchers: Mutex<std::collections::HashMap<GroupId, RemoteBatcher>>,
    /// The generation of the next remote batcher.
    remote_batcher_seq: AtomicU64,
    /// The remote readers' shared state, per group not hosted here, while a reader lives.
    remotes: Mutex<std::collections::HashMap<GroupId, std::sync::Weak<crate::reader::Remote>>>,
}

/// A batcher of a group not hosted here: its generation, its queue and its task.
type RemoteBatcher = (u64, mpsc::Sender<Pending>, tokio::task::JoinHandle<()>);

/// A request waiting for its batch, and where its answer goes.
type Pending = (Request, oneshot::Sender<Result<Response, ClientError>>);

/// The answer of a write queued with [`Consensus::queue_write`], to await.
pub type Queued = futures::future::BoxFuture<'static, Result<Response, ClientError>>;

/// The most requests one batch carries.
const MAX_BATCH_REQUESTS: usize = 1024;
/// A batch stops growing at about this many bytes.
const MAX_BATCH_BYTES: usize = 8 << 20;
/// How many batches of a group may be committing at once.
const BATCHES_IN_FLIGHT: usize = 4;
/// The most writes forwarded by other members that a group holds queued for its batches.
/// An honest member has at most [`BATCHES_IN_FLIGHT`] of a group's batches on their way at
/// once, so only a member flooding the leader meets it: its writes are then refused as
/// busy (counted in `canal_raft_refused_rpcs_total{kind="busy"}`), which it retries.
const MAX_FORWARDED_QUEUED: usize = 256;

/// A request in a batch: where its answer goes, and how many requests it brought (a
/// forwarded batch is merged request by request, and answered as the batch it came as).
struct Item {
    tx: oneshot::Sender<Result<Response, ClientError>>,
    /// `Some(n)`: it came as a batch of `n` requests; `None`: as one request.
    batch_of: Option<usize>,
}

/// Hands a batch's answer back: to each item its answer, one request each or a batch of
/// as many as it brought; an error, or an answer of another length, to every one of them.
fn answer_items(items: Vec<Item>, answer: Result<Response, ClientError>) {
    let total: usize = items.iter().map(|i| i.batch_of.unwrap_or(1)).sum();
    match answer {
        Ok(r) if r.batch.len() == total => {
            let index = r.index;
            let mut answers = r.batch.into_iter();
            for item in items {
                let answer = match item.batch_of {
                    None => answers
                        .next()
                        .ok_or_else(|| other("a batch ran out of answers")),
                    Some(n) => Ok(Response {
                        index,
                        batch: answers.by_ref().take(n).collect(),
                        ..Default::default()
                    }),
                };
                let _ = item.tx.send(answer);
            }
        }
        Ok(r) => {
            let e = other(format!(
                "a batch of {total} requests was answered with {} answers",
                r.batch.len()
            ));
            for item in items {
                let _ = item.tx.send(Err(e.clone()));
            }
        }
        Err(e) => {
            for item in items {
                let _ = item.tx.send(Err(e.clone()));
            }
        }
    }
}

/// A batch: `first` and what is queued behind it, up to [`MAX_BATCH_REQUESTS`] and about
/// [`MAX_BATCH_BYTES`], each with the number of the queue it came from; a request that
/// would take it over the byte limit is `carried` to start the next one. Takes from
/// `queues` in turn, so none waits behind another.
fn gather(
    first: (Pending, usize),
    queues: &mut [&mut mpsc::Receiver<Pending>],
    carried: &mut Option<(Pending, usize)>,
) -> Vec<(Pending, usize)> {
    let mut bytes = first.0.0.weight();
    let mut items = vec![first];
    'fill: loop {
        let mut took = false;
        for (n, rx) in queues.iter_mut().enumerate() {
            if items.len() >= MAX_BATCH_REQUESTS {
                break 'fill;
            }
            match rx.try_recv() {
                Ok(p) if bytes + p.0.weight() > MAX_BATCH_BYTES => {
                    *carried = Some((p, n));
                    break 'fill;
                }
                Ok(p) => {
                    bytes += p.0.weight();
                    items.push((p, n));
                    took = true;
                }
                Err(_) => {}
            }
        }
        if !took {
            break;
        }
    }
    items
}

/// What a batch's entry proposes: its one request as itself, or a batch of them all, a
/// batch among them merged request by request (a batch cannot hold a batch); and who
/// waits for which answers. `None` if there is nothing to propose.
fn one_entry(batch: Vec<Pending>) -> Option<(Request, EntryWaiters)> {
    if let [(Request { op, .. }, _)] = &batch[..]
        && !matches!(op, Op::Batch(_))
    {
        let (req, tx) = batch.into_iter().next()?;
        return Some((req, EntryWaiters::One(tx)));
    }
    let mut reqs = Vec::with_capacity(batch.len());
    let mut items = Vec::with_capacity(batch.len());
    for (req, tx) in batch {
        match req {
            Request {
                id: None,
                op: Op::Batch(inner),
            } => {
                items.push(Item {
                    tx,
                    batch_of: Some(inner.len()),
                });
                reqs.extend(inner);
            }
            req => {
                items.push(Item { tx, batch_of: None });
                reqs.push(req);
            }
        }
    }
    (!items.is_empty()).then_some((
        Request {
            id: None,
            op: Op::Batch(reqs),
        },
        EntryWaiters::Many(items),
    ))
}

/// Who waits for the answer of an entry [`one_entry`] made.
enum EntryWaiters {
    /// Its one request, proposed as itself.
    One(oneshot::Sender<Result<Response, ClientError>>),
    /// The requests (and batches) merged into its batch.
    Many(Vec<Item>),
}

/// Hands an entry's answer to those waiting for it.
fn answer_entry(waiters: EntryWaiters, answer: Result<Response, ClientError>) {
    match waiters {
        EntryWaiters::One(tx) => {
            let _ = tx.send(answer);
        }
        EntryWaiters::Many(items) => answer_items(items, answer),
    }
}

/// The number [`gather`] gives a hosted group's queue of writes forwarded by other members.
const FORWARDED: usize = 1;

/// Group commit: takes the requests queued for a group, as many as are waiting (up to the
/// limits), and proposes them as one entry; up to [`BATCHES_IN_FLIGHT`] entries commit at
/// once, proposed in queue order ([`Consensus::start_write`]). Under light load a batch is
/// one request and adds no wait; under heavy load one Raft round trip, one log flush and
/// one forward carry hundreds of writes.
///
/// Writes other members forward to this leader (`forwarded`: mostly their own batchers'
/// batches) join its batches too. With many groups, each leader gets a few writes at a
/// time from every member; proposed one forward per entry, they made entries of one or two
/// writes, and a Raft round each.
async fn batch_loop<T: Transport>(
    c: Consensus<T>,
    g: GroupId,
    mut local: mpsc::Receiver<Pending>,
    mut forwarded: mpsc::Receiver<Pending>,
) {
    let inflight = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    // A request that would have taken its batch over the byte limit starts the next one, so
    // a batch is never over MAX_BATCH_BYTES unless it is one request alone.
    let mut carried: Option<(Pending, usize)> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => tokio::select! {
                p = local.recv() => match p { Some(p) => (p, 0), None => return },
                p = forwarded.recv() => match p { Some(p) => (p, FORWARDED), None => return },
            },
        };
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            return;
        };
        // Gathered after the permit: what arrives while batches are in flight joins this one.
        let gathered = gather(first, &mut [&mut local, &mut forwarded], &mut carried);
        // Forwarded writes are proposed only by a leader; elsewhere their senders are told
        // to ask the leader. Forwarded on from here, two members each taking the other for
        // the leader would pass them back and forth.
        let leading = c.is_leader(g);
        let mut admitted = Vec::with_capacity(gathered.len());
        for ((req, tx), queue) in gathered {
            if queue == FORWARDED && !leading {
                let _ = tx.send(Err(c.not_leader_here(g)));
            } else {
                admitted.push((req, tx));
            }
        }
        let Some((req, items)) = one_entry(admitted) else {
            continue;
        };
        // Proposed here, in the loop, before the next batch is gathered: batches reach the
        // leader's log in the order their requests were queued (only their answers are
        // awaited concurrently), so one publisher's events get offsets in send order.
        let answer = c.start_write(g, req).await;
        tokio::spawn(async move {
            let _permit = permit;
            answer_entry(items, answer.await);
        });
    }
}

/// The answer of a routed operation on a node that does not know its shard count yet.
fn no_route() -> ClientError {
    ClientError::NoLeader {
        group: GroupId::METADATA,
        reason: "this node has not read the cluster's shard map yet (it is joining, or the cluster is forming): try again in a moment".into(),
    }
}

/// How long a batcher of a group not hosted here waits for a write before it ends.
const REMOTE_BATCHER_IDLE: Duration = Duration::from_secs(30);

/// Group commit for a group this node does not host: takes what is queued (up to the
/// limits of [`batch_loop`]) and forwards it to the leader as one [`Op::Batch`] write, one
/// batch at a time (so batches, and one publisher's writes, reach the log in queue order).
/// Ends when idle for [`REMOTE_BATCHER_IDLE`], after answering what was queued meanwhile.
async fn remote_batch_loop<T: Transport>(
    c: Consensus<T>,
    g: GroupId,
    generation: u64,
    mut rx: mpsc::Receiver<Pending>,
) {
    let mut carried: Option<(Pending, usize)> = None;
    let mut closing = false;
    loop {
        let first = match carried.take() {
            Some((p, _)) => p,
            None if closing => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
            None => match tokio::time::timeout(REMOTE_BATCHER_IDLE, rx.recv()).await {
                Ok(Some(p)) => p,
                Ok(None) => return,
                Err(_) => {
                    c.drop_remote_batcher(g, generation);
                    rx.close();
                    closing = true;
                    continue;
                }
            },
        };
        let batch = gather((first, 0), &mut [&mut rx], &mut carried);
        let Some((req, waiters)) = one_entry(batch.into_iter().map(|(p, _)| p).collect()) else {
            continue;
        };
        answer_entry(waiters, c.write(g, req).await);
    }
}

fn other(e: impl std::fmt::Display) -> ClientError {
    ClientError::Other(e.to_string())
}

fn write_error(
    group: GroupId,
    e: RaftError<NodeId, ClientWriteError<NodeId, RaftNode>>,
) -> ClientError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ClientError::NotLeader {
            group,
            leader: f.leader_node,
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => other(c),
        RaftError::Fatal(f) => other(f),
    }
}

impl<T: Transport> Consensus<T> {
    /// Opens (creating if new) the given groups from `db` and starts their Raft instances.
    /// `me`/`node` name this member; `transport` reaches the others.
    pub async fn start(
        db: &RaftDb,
        me: NodeId,
        node: RaftNode,
        groups: &[GroupId],
        settings: Settings,
        transport: T,
        registry: &mut Registry,
    ) -> Result<Consensus<T>, ConsensusError> {
        let metrics = Metrics {
            commit_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0002, 2.0, 16))
            }),
            proposals: Family::default(),
            elections: Family::default(),
            snapshots: Family::default(),
            refused: Family::default(),
            stopped: Family::default(),
            groups: Family::default(),
            remote: Family::default(),
            log_reads: Family::default(),
        };
        settings.check().map_err(|reason| ConsensusError::Start {
            group: GroupId::METADATA,
            reason,
        })?;
        registry.register(
            "canal_raft_commit_seconds",
            "Time from a client write reaching this node to its commit and apply",
            metrics.commit_seconds.clone(),
        );
        registry.register(
            "canal_raft_proposals",
            "Client writes proposed through this node",
            metrics.proposals.clone(),
        );
        registry.register(
            "canal_raft_elections",
            "Term changes seen by this node (elections)",
            metrics.elections.clone(),
        );
        registry.register(
            "canal_raft_snapshots",
            "Snapshots built or installed on this node",
            metrics.snapshots.clone(),
        );
        registry.register(
            "canal_raft_refused_rpcs",
            "Raft RPCs and forwarded operations refused because of who sent them (or undecodable), by group and kind",
            metrics.refused.clone(),
        );
        registry.register(
            "canal_raft_remote_requests",
            "Client operations and log reads this node sent to groups it does not host, by kind and outcome (ok, retried, failed)",
            metrics.remote.clone(),
        );
        registry.register(
            "canal_raft_log_reads",
            "Log reads this node answered for nodes that do not host the group, by kind and the bound that cut the answer short (capped: MAX_LOG_EVENTS, MAX_LOG_ANSWER_BYTES, MAX_LOG_PAGE_TOPICS or none)",
            metrics.log_reads.clone(),
        );
        registry.register(
            "canal_raft_group_stopped",
            "1 while a Raft group has stopped (a fatal error) though the node is not shutting down",
            metrics.stopped.clone(),
        );
        let rpc_timeout_ms = settings.rpc_timeout.as_millis() as u64;
        let config = openraft::Config {
            cluster_name: "canal".into(),
            // openraft times out every AppendEntries after its "heartbeat interval": it is the
            // RPC timeout here; heartbeats come from `heartbeat_loop`.
            heartbeat_interval: rpc_timeout_ms,
            // A snapshot chunk takes longer than an append; give it a few round trips' time.
            install_snapshot_timeout: (rpc_timeout_ms * 5).max(2000),
            election_timeout_min: settings.election_timeout.0.as_millis() as u64,
            election_timeout_max: settings.election_timeout.1.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(settings.snapshot_every),
            max_in_snapshot_log_to_keep: settings.keep_behind_snapshot,
            ..Default::default()
        };
        let config = Arc::new(config.validate().map_err(|e| ConsensusError::Start {
            group: GroupId::METADATA,
            reason: e.to_string(),
        })?);
        registry.register(
            "canal_raft_groups",
            "Raft groups hosted on this node, by state: active (heartbeats and election timers run) or quiescent (idle: neither runs)",
            metrics.groups.clone(),
        );
        // Record the durable marks a moment after the entries they cover were flushed.
        let watermark = db.watermark();
        let w_task = watermark.clone();
        let watermark_task = tokio::spawn(async move {
            let watermark = w_task;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let w = watermark.clone();
                match tokio::task::spawn_blocking(move || w.write(false)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(error = %e, "cannot write the Raft watermark"),
                    Err(_) => break,
                }
            }
        });
        let sharded = settings.sharded;
        let c = Consensus {
            inner: Arc::new(Inner {
                me,
                node,
                transport,
                db: db.clone(),
                config,
                groups: RwLock::new(BTreeMap::new()),
                opening: tokio::sync::Mutex::new(()),
                settings,
                metrics,
                watermark,
                watermark_task,
                shutting_down: AtomicBool::new(false),
                refusals_logged: std::sync::Mutex::new(std::collections::HashMap::new()),
                liveness_task: Mutex::new(None),
                route: tokio::sync::watch::Sender::new((!sharded).then_some(Route::Single)),
                directory: Arc::new(RwLock::new(crate::reader::no_directory())),
                known_leaders: Mutex::new(std::collections::HashMap::new()),
                remotes: Mutex::new(std::collections::HashMap::new()),
                remote_batchers: Mutex::new(std::collections::HashMap::new()),
                remote_batcher_seq: AtomicU64::new(0),
            }),
        };
        for &g in groups {
            if let Err(e) = c.open_group(g).await {
                c.shutdown().await;
                return Err(e);
            }
        }
        let liveness = tokio::spawn(liveness_loop(c.clone()));
        *c.inner
            .liveness_task
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(liveness);
        info!(node_id = me, groups = ?groups, "Raft groups started");
        Ok(c)
    }

    /// Opens group `g` on this node, now, beside the groups already serving: creates its
    /// storage if it is new (or opens what an earlier open left), starts its Raft, its write
    /// batcher and its heartbeat driver. Idempotent: opening a hosted group does nothing.
    /// A new group has no membership until [`Consensus::initialize_group`] forms it or a
    /// leader adds this node.
    pub async fn open_group(&self, g: GroupId) -> Result<(), ConsensusError> {
        let _one_at_a_time = self.inner.opening.lock().await;
        if self.inner.shutting_down.load(Ordering::Relaxed) {
            return Err(ConsensusError::Start {
                group: g,
                reason: "the node is shutting down".into(),
            });
        }
        if self.read_groups().contains_key(&g) {
            return Ok(());
        }
        let (log, sm) = self.inner.db.group(g)?;
        let network = Network {
            group: g,
            transport: self.inner.transport.clone(),
        };
        let raft = Raft::new(
            self.inner.me,
            self.inner.config.clone(),
            network,
            log.clone(),
            sm.clone(),
        )
        .await
        .map_err(|e| ConsensusError::Start {
            group: g,
            reason: e.to_string(),
        })?;
        let (tx, rx) = mpsc::channel(MAX_BATCH_REQUESTS * 4);
        let (forwarded_tx, forwarded_rx) = mpsc::channel(MAX_FORWARDED_QUEUED);
        let group = Arc::new(Group {
            id: g,
            raft: raft.clone(),
            sm,
            log,
            batcher: tx,
            forwarded: forwarded_tx,
            tasks: Mutex::new(Vec::new()),
            quiet: Mutex::new(Quiet::Active),
            epoch: AtomicU64::new(0),
            woken: tokio::sync::Notify::new(),
            handing_off: Mutex::new(None),
            woke_for: Mutex::new(String::new()),
            proposing: AtomicU64::new(0),
        });
        let tasks = vec![
            watch_metrics(g, raft.metrics(), self.inner.metrics.clone()),
            tokio::spawn(batch_loop(self.clone(), g, rx, forwarded_rx)),
            tokio::spawn(heartbeat_loop(self.clone(), group.clone())),
        ];
        *group.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        self.write_groups().insert(g, group);
        self.count_groups();
        info!(group = %g, "Raft group opened");
        Ok(())
    }

    /// Closes group `g` on this node while the others keep serving: stops its Raft and its
    /// tasks and stops hosting it (its RPCs are then answered "not hosted here", which is no
    /// offence of the sender). Queued writes fail. With `purge` its log and state are
    /// deleted too, so a later [`Consensus::open_group`] starts it empty (as a new replica);
    /// without, a later open resumes from what is stored. Closing a group that is not
    /// hosted does nothing (but still purges, if asked).
    pub async fn close_group(&self, g: GroupId, purge: bool) -> Result<(), ConsensusError> {
        let _one_at_a_time = self.inner.opening.lock().await;
        let removed = self.write_groups().remove(&g);
        if let Some(group) = removed {
            group.abort_tasks();
            if let Err(e) = group.raft.shutdown().await {
                warn!(group = %g, error = %e, "Raft group did not stop cleanly");
            }
            self.inner
                .metrics
                .stopped
                .get_or_create(&group_label(g))
                .set(0);
            self.count_groups();
            info!(group = %g, purge, "Raft group closed");
        }
        if purge {
            self.inner.db.purge_group(g)?;
        }
        Ok(())
    }

    fn read_groups(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<GroupId, Arc<Group>>> {
        // Nothing panics while holding the lock; if something did, the map is still whole.
        self.inner.groups.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_groups(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<GroupId, Arc<Group>>> {
        self.inner.groups.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The hosted groups, for a loop over them without holding the map.
    fn hosted(&self) -> Vec<Arc<Group>> {
        self.read_groups().values().cloned().collect()
    }

    /// Sets `canal_raft_groups{state}` from the hosted groups.
    fn count_groups(&self) {
        let (mut active, mut quiescent) = (0i64, 0i64);
        for group in self.hosted() {
            match group.quiet().label() {
                "active" => active += 1,
                _ => quiescent += 1,
            }
        }
        let set = |state: &str, n: i64| {
            self.inner
                .metrics
                .groups
                .get_or_create(&vec![("state".to_string(), state.to_string())])
                .set(n);
        };
        set("active", active);
        set("quiescent", quiescent);
    }

    /// Wakes `group` (see [`crate::quiet`]) and recounts if it was quiet.
    fn wake(&self, group: &Group, why: &str) {
        if group.wake(why) {
            self.count_groups();
        }
    }

    /// Whether group `g` is quiescent on this node now (it leads it quietly, or follows it
    /// with its election timer off): what `canal_raft_groups{state}` counts. A group not
    /// hosted is not.
    pub fn is_quiescent(&self, g: GroupId) -> bool {
        self.group(g)
            .map(|group| *group.quiet() != Quiet::Active)
            .unwrap_or(false)
    }

    /// How long members keep refusing votes after they last heard their leader: the
    /// longest election timeout plus a heartbeat interval. A hand-off keeps its group quiet
    /// about this long before the preferred leader stands ([`Consensus::hand_off`]).
    pub fn leader_lease(&self) -> Duration {
        let s = &self.inner.settings;
        s.election_timeout.1 + s.heartbeat
    }

    /// Stands for election in group `g` at once: how a follower that should lead the group
    /// (its shard's preferred leader) takes the lead, openraft 0.9 having no leader
    /// transfer. Members grant the vote only once they have not heard their leader for its
    /// lease, so this moves the lead of an idle (quiescent) group, not of a busy one. A
    /// leader's call does nothing.
    pub async fn campaign(&self, g: GroupId) -> Result<(), ClientError> {
        let group = self.group(g)?;
        self.wake(&group, "campaign for the lead");
        group.raft.trigger().elect().await.map_err(other)
    }

    /// Hands the lead of group `g`, which this node leads, to its voter `to`, busy or not:
    /// openraft 0.9 has no leader transfer, and a voter's own campaign is refused while
    /// the members hold a lease on this leader. So this leader
    ///
    /// 1. stops proposing (writes and linearizable reads are answered "no leader", which
    ///    their senders retry until they find the new one: nothing proposed is lost or
    ///    applied twice, nothing is refused for good);
    /// 2. waits until every proposal it made is answered, it has applied every entry, and
    ///    `to` has matched the last one;
    /// 3. takes the group quiet ([`crate::quiet`]): no appends, and no member's election
    ///    timer runs, so nobody but `to` stands;
    /// 4. waits out the members' lease on it (the longest election timeout, plus a
    ///    heartbeat interval) and asks `to` to stand ([`RpcRequest::TakeLead`]);
    /// 5. waits for `to` to lead.
    ///
    /// Writes to the group wait about the leader lease plus two round trips. An error says
    /// which step failed; the group then goes on under this leader (or whoever leads).
    pub async fn hand_off(&self, g: GroupId, to: NodeId) -> Result<(), ClientError> {
        let group = self.group(g)?;
        let me = self.inner.me;
        let to_node = {
            let m = group.raft.metrics();
            let m = m.borrow();
            if m.state != ServerState::Leader || m.current_leader != Some(me) {
                return Err(ClientError::NotLeader {
                    group: g,
                    leader: m
                        .current_leader
                        .and_then(|l| m.membership_config.membership().get_node(&l).cloned()),
                });
            }
            let membership = m.membership_config.membership();
            if membership.get_joint_config().len() != 1 {
                return Err(other(format!(
                    "group {g} is changing its membership: the lead is not handed on meanwhile"
                )));
            }
            match membership.get_node(&to) {
                Some(n) if to != me && membership.voter_ids().any(|v| v == to) => n.clone(),
                _ => {
                    return Err(other(format!(
                        "node {to} is not another voter of group {g}: the lead goes only to one"
                    )));
                }
            }
        };
        {
            let mut h = group.handing_off();
            if let Some(other_to) = *h {
                return Err(other(format!(
                    "the lead of group {g} is already being handed to node {other_to}"
                )));
            }
            *h = Some(to);
        }
        struct Release<'a>(&'a Group);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                *self.0.handing_off() = None;
            }
        }
        let _release = Release(&group);
        let started = Instant::now();
        let s = &self.inner.settings;
        let lease = s.election_timeout.1;
        let lost = |m: &RaftMetrics<NodeId, RaftNode>| m.current_leader != Some(me);
        // 2 and 3: drained, matched by `to`, quiet. A member that has not applied the last
        // entry yet refuses to go quiet: asked again until the deadline.
        let deadline = Instant::now() + lease;
        loop {
            let ready = {
                let m = group.raft.metrics();
                let m = m.borrow();
                if lost(&m) {
                    return Err(other(format!(
                        "this node lost the lead of group {g} during the hand-off"
                    )));
                }
                group.proposing.load(Ordering::SeqCst) == 0
                    && m.last_applied.map(|l| l.index) == m.last_log_index
                    && m.replication
                        .as_ref()
                        .and_then(|r| r.get(&to).copied().flatten())
                        == m.last_applied
            };
            if ready {
                let unanimous = self.try_quiesce(&group).await;
                if matches!(*group.quiet(), Quiet::Leading { .. }) {
                    if unanimous {
                        break;
                    }
                    // A member that did not answer may still run its election timer: it
                    // could stand before `to`. Woken, and asked again.
                    self.wake(&group, "a hand-off needs every member quiet");
                }
            }
            if Instant::now() >= deadline {
                return Err(other(format!(
                    "group {g} did not drain and go quiet within {lease:?} (node {to} has not matched the last entry, or a member refused)"
                )));
            }
            tokio::time::sleep(s.heartbeat.min(Duration::from_millis(20))).await;
        }
        // 4: no append since the group went quiet; the members' lease runs out.
        let lease_end = Instant::now() + self.leader_lease();
        loop {
            if !matches!(*group.quiet(), Quiet::Leading { .. }) {
                let why = group
                    .woke_for
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                return Err(other(format!(
                    "group {g} woke during the hand-off ({why}): the lead stays here"
                )));
            }
            let left = lease_end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            tokio::time::sleep(left.min(Duration::from_millis(50))).await;
        }
        let vote = group.raft.metrics().borrow().vote;
        let asked = tokio::time::timeout(
            s.rpc_timeout,
            call(
                &self.inner.transport,
                &to_node,
                &RpcRequest::TakeLead(g, vote),
            ),
        )
        .await;
        match asked {
            Ok(Ok(RpcResponse::TakeLead(Ok(())))) => {}
            Ok(Ok(RpcResponse::TakeLead(Err(e)))) => return Err(e),
            Ok(Ok(a)) => return Err(other(format!("unexpected answer {a:?}"))),
            Ok(Err(e)) => return Err(other(format!("node {to} was not reached: {e}"))),
            Err(_) => {
                return Err(other(format!(
                    "node {to} did not answer within {:?}",
                    s.rpc_timeout
                )));
            }
        }
        // 5: `to` wins (its log is as long as anyone's, and nobody else stands).
        let mut rx = group.raft.metrics();
        let elected = tokio::time::timeout(lease * 2, async {
            loop {
                if rx.borrow_and_update().current_leader == Some(to) {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await;
        match elected {
            Ok(true) => {
                // How long the group's writes waited.
                info!(group = %g, to, took = ?started.elapsed(), "handed the lead of the group on");
                Ok(())
            }
            _ => Err(other(format!(
                "node {to} stood for the lead of group {g} but does not lead it within {:?}",
                lease * 2
            ))),
        }
    }

    /// Answers a leader's [`RpcRequest::TakeLead`]: stands for election in group `g` if
    /// this node is one of its voters and still knows the asking leader at `vote`.
    async fn take_lead(&self, g: GroupId, vote: openraft::Vote<NodeId>) -> Result<(), ClientError> {
        let group = self.group(g)?;
        {
            let m = group.raft.metrics();
            let m = m.borrow();
            if m.vote != vote {
                return Err(other(format!(
                    "asked to take the lead of group {g} at vote {vote}, but this member is at {}",
                    m.vote
                )));
            }
            if !m
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == self.inner.me)
            {
                return Err(other(format!(
                    "asked to take the lead of group {g}, of which this node is no voter"
                )));
            }
        }
        self.wake(&group, "asked to take the lead");
        group.raft.trigger().elect().await.map_err(other)
    }

    fn group(&self, g: GroupId) -> Result<Arc<Group>, ClientError> {
        self.read_groups()
            .get(&g)
            .cloned()
            .ok_or(ClientError::UnknownGroup(g))
    }

    /// This node's wall clock in ms since the Unix epoch, with the test-only
    /// [`Settings::clock_offset_ms`] applied: the time it stamps on the entries it proposes.
    pub fn now_ms(&self) -> u64 {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis().min(u64::MAX as u128) as u64)
            .unwrap_or(0);
        wall.saturating_add_signed(self.inner.settings.clock_offset_ms)
    }

    /// The cluster's routing now, or "no shard map yet" (retryable, as a missing leader
    /// is) while a sharded node has not read its cluster's shard count.
    pub fn route(&self) -> Result<Route, ClientError> {
        (*self.inner.route.borrow()).ok_or_else(no_route)
    }

    /// [`Consensus::route`], waiting up to the client timeout for the shard count: what a
    /// write just after the node started does.
    pub async fn routing(&self) -> Result<Route, ClientError> {
        if let Some(r) = *self.inner.route.borrow() {
            return Ok(r);
        }
        let mut rx = self.inner.route.subscribe();
        match tokio::time::timeout(
            self.inner.settings.client_timeout,
            rx.wait_for(Option::is_some),
        )
        .await
        {
            Ok(Ok(r)) => (*r).ok_or_else(no_route),
            _ => Err(no_route()),
        }
    }

    /// On a node started with [`Settings::sharded`], routes by `shards` shards from now on
    /// (the node calls it once it has read the committed shard map, whose count never
    /// changes after). A node started unsharded keeps [`Route::Single`].
    pub fn learn_shard_count(&self, shards: u32) {
        if !self.inner.settings.sharded {
            return;
        }
        let route = Route::Sharded { shards };
        self.inner.route.send_if_modified(|r| {
            let changed = *r != Some(route);
            *r = Some(route);
            changed
        });
    }

    /// This member's node id.
    pub fn node_id(&self) -> NodeId {
        self.inner.me
    }

    /// The groups this node hosts now (groups open and close at run time).
    pub fn groups(&self) -> Vec<GroupId> {
        self.read_groups().keys().copied().collect()
    }

    /// Whether the metadata group has a membership on this node (it was formed, or this node
    /// was added to it).
    pub fn is_member(&self) -> bool {
        self.group(GroupId::METADATA)
            .map(|g| {
                g.raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .nodes()
                    .next()
                    .is_some()
            })
            .unwrap_or(false)
    }

    /// The latest Raft metrics of a group on this node.
    pub fn metrics(&self, g: GroupId) -> Result<RaftMetrics<NodeId, RaftNode>, ClientError> {
        Ok(self.group(g)?.raft.metrics().borrow().clone())
    }

    /// Runs `f` on group `g`'s latest Raft metrics, without copying them: for a check made
    /// per message, where [`Consensus::metrics`]' copy would cost an allocation each.
    pub fn with_metrics<R>(
        &self,
        g: GroupId,
        f: impl FnOnce(&RaftMetrics<NodeId, RaftNode>) -> R,
    ) -> Result<R, ClientError> {
        Ok(f(&self.group(g)?.raft.metrics().borrow()))
    }

    /// Whether this node leads group `g` now, as its local Raft metrics say (no RPC): what
    /// jobs that only the leader runs (membership, placement, trimming) check each round.
    /// An unknown group is not led.
    pub fn is_leader(&self, g: GroupId) -> bool {
        self.group(g)
            .map(|group| group.raft.metrics().borrow().current_leader == Some(self.inner.me))
            .unwrap_or(false)
    }

    /// Group `g` as this node sees it from its local Raft metrics (no RPC, so cheap enough
    /// for every `locate`): its leader, if one is known, and its voters and learners.
    pub fn describe(&self, g: GroupId) -> Result<GroupView, ClientError> {
        let group = self.group(g)?;
        let m = group.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        Ok(GroupView {
            group: g,
            leader: m
                .current_leader
                .and_then(|l| membership.get_node(&l).cloned()),
            voters: membership
                .voter_ids()
                .filter_map(|id| membership.get_node(&id).cloned())
                .collect(),
            learners: membership
                .learner_ids()
                .filter_map(|id| membership.get_node(&id).cloned())
                .collect(),
        })
    }

    /// The state machine of a group on this node, for local reads.
    pub fn state_machine(&self, g: GroupId) -> Result<StateMachine, ClientError> {
        Ok(self.group(g)?.sm.clone())
    }

    /// Forms every hosted group with `members` as its voters. Only the first formation
    /// succeeds; on a node whose groups already have a membership it is an error and changes
    /// nothing.
    pub async fn initialize(&self, members: BTreeMap<NodeId, RaftNode>) -> Result<(), ClientError> {
        for g in self.groups() {
            self.initialize_group(g, members.clone()).await?;
        }
        info!(members = ?members.values().map(|n| n.peer_id.clone()).collect::<Vec<_>>(), "Raft groups formed");
        Ok(())
    }

    /// Forms group `g` (opened with [`Consensus::open_group`]) with `members` as its voters:
    /// on one member only, once; the others learn of it from the first leader. A group that
    /// already has a membership is an error and is not changed.
    pub async fn initialize_group(
        &self,
        g: GroupId,
        members: BTreeMap<NodeId, RaftNode>,
    ) -> Result<(), ClientError> {
        let group = self.group(g)?;
        self.wake(&group, "initialize");
        group
            .raft
            .initialize(members)
            .await
            .map_err(|e| other(format!("group {g}: {e}")))
    }

    /// Answers a request from peer `from` (its Raft node id, derived from the authenticated
    /// peer id the request came over): bytes in, bytes out, and what the peer did wrong if
    /// it was refused. Only members speak Raft, and only as themselves (see [`admit`]);
    /// everything refused is answered with an error naming the rule and counted in
    /// `canal_raft_refused_rpcs_total{group,kind}`.
    pub async fn handle(&self, from: NodeId, body: &[u8]) -> Handled {
        self.dispatch(from, body).await.await
    }

    /// [`Consensus::handle`] in two steps, for a caller that takes a peer's requests in the
    /// order they came: the returned future is ready once the request is decoded, admitted
    /// and, for a forwarded write, proposed; it yields the answer to await. Writes
    /// dispatched one after another are proposed in that order (so a follower's forwarded
    /// batches keep the order it sent them in).
    pub async fn dispatch(
        &self,
        from: NodeId,
        body: &[u8],
    ) -> futures::future::BoxFuture<'static, Handled> {
        let ready = |h: Handled| -> futures::future::BoxFuture<'static, Handled> {
            Box::pin(futures::future::ready(h))
        };
        let req = match wire::decode::<RpcRequest>(body) {
            Ok(req) => req,
            Err(e) => {
                let offence = Offence {
                    kind: "decode",
                    detail: format!("undecodable Raft request of {} bytes: {e}", body.len()),
                    ban_worthy: true,
                };
                return ready(self.refuse(from, "unknown", None, offence));
            }
        };
        if let RpcRequest::Alive { leading, quiet } = &req {
            self.heard_alive(from, leading, quiet);
            return ready(Handled {
                answer: wire::encode(&RpcResponse::Alive).unwrap_or_default(),
                offence: None,
            });
        }
        let g = group_of(&req);
        if let Ok(group) = self.group(g) {
            let sender_is_member = {
                let m = group.raft.metrics();
                let m = m.borrow();
                let mut nodes = m.membership_config.membership().nodes().peekable();
                nodes
                    .peek()
                    .is_some()
                    .then(|| nodes.any(|(id, _)| *id == from))
            };
            // Looked up only when it decides: the common case (a member) costs nothing more.
            let sender_in_metadata = sender_is_member == Some(false)
                && is_forwarded_client_op(&req)
                && self.is_metadata_member(from);
            if let Err(offence) = admit(&req, from, sender_is_member, sender_in_metadata) {
                return ready(self.refuse(from, &g.to_string(), Some(&req), offence));
            }
        }
        let answer = |response: RpcResponse| Handled {
            answer: wire::encode(&response).unwrap_or_default(),
            offence: None,
        };
        if let RpcRequest::Write(g, r) = req {
            // Queued here, in link order, so a sender's writes are proposed in the order it
            // sent them; never waited for, since waiting would hold up every group's
            // messages from this sender behind one group's queue.
            let queued = check_entry_size(&r).and_then(|()| self.queue_forwarded(g, r));
            return match queued {
                Ok(rx) => Box::pin(async move {
                    let r = rx.await.unwrap_or_else(|_| {
                        Err(other(format!(
                            "group {g} stopped before the write was answered"
                        )))
                    });
                    answer(RpcResponse::Write(r))
                }),
                Err(e) => ready(answer(RpcResponse::Write(Err(e)))),
            };
        }
        let c = self.clone();
        Box::pin(async move { answer(c.serve(req).await) })
    }

    /// Queues a write another member forwarded for group `g`'s batches; refused if the
    /// group is not hosted here or its queue is full (a member flooding this leader).
    fn queue_forwarded(
        &self,
        g: GroupId,
        req: Request,
    ) -> Result<oneshot::Receiver<Result<Response, ClientError>>, ClientError> {
        let group = self.group(g)?;
        let (tx, rx) = oneshot::channel();
        match group.forwarded.try_send((req, tx)) {
            Ok(()) => Ok(rx),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.inner
                    .metrics
                    .refused
                    .get_or_create(&vec![
                        ("group".to_string(), g.to_string()),
                        ("kind".to_string(), "busy".to_string()),
                    ])
                    .inc();
                Err(ClientError::NoLeader {
                    group: g,
                    reason: format!(
                        "the leader of group {g} has {MAX_FORWARDED_QUEUED} forwarded writes queued (the most it holds): try again in a moment"
                    ),
                })
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(other(format!("group {g} is shutting down")))
            }
        }
    }

    /// "Not the leader" of group `g`, naming the leader this member knows of, if any.
    fn not_leader_here(&self, g: GroupId) -> ClientError {
        let leader = self.group(g).ok().and_then(|group| {
            let m = group.raft.metrics();
            let m = m.borrow();
            m.current_leader
                .and_then(|l| m.membership_config.membership().get_node(&l).cloned())
        });
        ClientError::NotLeader { group: g, leader }
    }

    /// Counts, logs (at most once a minute per sender and kind) and answers a refusal.
    fn refuse(
        &self,
        from: NodeId,
        group: &str,
        req: Option<&RpcRequest>,
        offence: Offence,
    ) -> Handled {
        self.inner
            .metrics
            .refused
            .get_or_create(&vec![
                ("group".to_string(), group.to_string()),
                ("kind".to_string(), offence.kind.to_string()),
            ])
            .inc();
        let log_now = {
            let mut logged = self
                .inner
                .refusals_logged
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            // Bounded: a flood from many ids must not grow it without end.
            if logged.len() > 4096 {
                logged.retain(|_, at| now.duration_since(*at) < Duration::from_secs(60));
            }
            match logged.get(&(from, offence.kind)) {
                Some(at) if now.duration_since(*at) < Duration::from_secs(60) => false,
                _ => {
                    logged.insert((from, offence.kind), now);
                    true
                }
            }
        };
        if log_now {
            warn!(
                node = from,
                group,
                kind = offence.kind,
                ban_worthy = offence.ban_worthy,
                "refused a Raft request: {}",
                offence.detail
            );
        } else {
            debug!(
                node = from,
                group,
                kind = offence.kind,
                "refused a Raft request: {}",
                offence.detail
            );
        }
        let e = match req {
            Some(r) => ClientError::Refused {
                group: group_of(r),
                kind: offence.kind.to_string(),
                rule: offence.detail.clone(),
            },
            None => other(&offence.detail),
        };
        let response = match req {
            Some(RpcRequest::Write(..)) => RpcResponse::Write(Err(e)),
            Some(RpcRequest::Read(..)) => RpcResponse::Read(Err(e)),
            Some(
                RpcRequest::AddLearner(..) | RpcRequest::SetVoters(..) | RpcRequest::Remove(..),
            ) => RpcResponse::Membership(Err(e)),
            Some(RpcRequest::LogRead(..)) => RpcResponse::LogRead(Err(e)),
            _ => RpcResponse::Status(Err(e)),
        };
        Handled {
            answer: wire::encode(&response).unwrap_or_default(),
            offence: Some(offence),
        }
    }

    /// Offers the members of `group`, which this node leads and which has been idle, to go
    /// quiet; if every member accepts and nothing happened to the group meanwhile, stops
    /// its heartbeats and ticks (see [`crate::quiet`]). A refusal leaves it active. True
    /// when it went quiet and every member said yes (none was unreachable, so no member's
    /// election timer still runs).
    async fn try_quiesce(&self, group: &Arc<Group>) -> bool {
        let epoch = group.epoch.load(Ordering::SeqCst);
        let offer = {
            let m = group.raft.metrics();
            let m = m.borrow();
            quiet::quiesce_offer(&m, self.inner.me)
        };
        let offer = match offer {
            Ok(o) => o,
            Err(why) => {
                debug!(group = %group.id, why, "not quiescing the group");
                return false;
            }
        };
        let timeout = self.inner.settings.rpc_timeout;
        let req = RpcRequest::Quiesce(group.id, offer.vote, offer.last);
        let asks = offer.members.iter().map(|(id, node)| {
            let req = &req;
            async move {
                let answer =
                    tokio::time::timeout(timeout, call(&self.inner.transport, node, req)).await;
                let a = match &answer {
                    Ok(Ok(RpcResponse::Quiesce(Ok(true)))) => quiet::Answer::Yes,
                    Ok(Err(_)) | Err(_) => quiet::Answer::Unreachable,
                    Ok(Ok(_)) => quiet::Answer::No,
                };
                if a != quiet::Answer::Yes {
                    debug!(group = %group.id, member = id, ?answer, "a member did not agree to quiesce");
                }
                (*id, a)
            }
        });
        let answers = futures::future::join_all(asks).await;
        if !quiet::answers_quiesce(&offer, &answers) {
            return false;
        }
        {
            let mut q = group.quiet();
            if group.epoch.load(Ordering::SeqCst) != epoch || *q != Quiet::Active {
                return false;
            }
            let m = group.raft.metrics();
            let m = m.borrow();
            if m.vote != offer.vote
                || m.current_leader != Some(self.inner.me)
                || m.last_log_index != offer.last.map(|l| l.index)
            {
                return false;
            }
            let rc = group.raft.runtime_config();
            rc.heartbeat(false);
            rc.tick(false);
            *q = Quiet::Leading {
                since: Instant::now(),
            };
        }
        self.count_groups();
        debug!(group = %group.id, last = ?offer.last, "group quiescent");
        answers.iter().all(|(_, a)| *a == quiet::Answer::Yes)
    }

    /// Answers a leader's [`RpcRequest::Quiesce`]: follows group `g` quietly (election timer
    /// off) if this member has the same leader, vote and last entry as the leader offers.
    fn follow_quietly(
        &self,
        g: GroupId,
        vote: openraft::Vote<NodeId>,
        last: Option<openraft::LogId<NodeId>>,
    ) -> Result<bool, ClientError> {
        let group = self.group(g)?;
        let Some(leader) = vote.leader_id().voted_for() else {
            return Ok(false);
        };
        {
            let mut q = group.quiet();
            if matches!(*q, Quiet::Leading { .. }) {
                return Ok(false);
            }
            let ok = {
                let m = group.raft.metrics();
                let m = m.borrow();
                quiet::may_follow_quietly(&m, leader, &vote, last)
            };
            if let Err(why) = ok {
                debug!(group = %g, leader, why, "not following the group quietly");
                return Ok(false);
            }
            let rc = group.raft.runtime_config();
            rc.elect(false);
            rc.tick(false);
            let (min, max) = self.inner.settings.election_timeout;
            *q = Quiet::Following {
                leader,
                vote,
                confirmed: Instant::now(),
                // As long as openraft's own follower waits (the leader lease, then an
                // election timeout), so a busy moment wakes a quiet group no sooner than it
                // would start an election in an active one.
                patience: max + quiet::patience(min, max),
            };
        }
        self.count_groups();
        Ok(true)
    }

    /// After openraft took an AppendEntries for `group`: entries, or another leader, wake a
    /// quiet group; a bare heartbeat of the leader followed quietly confirms it.
    fn after_append(&self, group: &Group, vote: &openraft::Vote<NodeId>, entries: bool) {
        let wakes = match &mut *group.quiet() {
            Quiet::Active => false,
            // Another leader (or an older one) speaks: openraft sorts out who leads.
            Quiet::Leading { .. } => true,
            Quiet::Following {
                vote: quiet_vote,
                confirmed,
                ..
            } => {
                let wakes = quiet::append_wakes(quiet_vote, vote, entries);
                if !wakes {
                    *confirmed = Instant::now();
                }
                wakes
            }
        };
        if wakes {
            self.wake(group, "append");
        }
    }

    /// Takes peer `from`'s [`RpcRequest::Alive`]: confirms the groups it leads that this
    /// node follows quietly, and wakes the groups this node leads quietly that `from` is a
    /// member of but does not follow quietly (it restarted, reopened the group or woke).
    fn heard_alive(&self, from: NodeId, leading: &[GroupId], quiet: &[GroupId]) {
        let now = Instant::now();
        // An Alive built before `from` agreed to quiesce may arrive after the group went
        // quiet here: not a reason to wake.
        let grace = self.inner.settings.rpc_timeout + self.inner.settings.heartbeat * 2;
        let leading: BTreeSet<GroupId> = leading.iter().copied().collect();
        let quiet: BTreeSet<GroupId> = quiet.iter().copied().collect();
        for group in self.hosted() {
            let wake = match &mut *group.quiet() {
                Quiet::Following {
                    leader, confirmed, ..
                } if *leader == from => {
                    if leading.contains(&group.id) {
                        *confirmed = now;
                    }
                    false
                }
                Quiet::Leading { since }
                    if now.duration_since(*since) > grace && !quiet.contains(&group.id) =>
                {
                    group
                        .raft
                        .metrics()
                        .borrow()
                        .membership_config
                        .membership()
                        .get_node(&from)
                        .is_some()
                }
                _ => false,
            };
            if wake {
                self.wake(&group, "a member is not quiet");
            }
        }
    }

    /// Whether every group is running: a group whose Raft stopped (a fatal error, e.g. in
    /// storage) while the node is not shutting down no longer replicates, and the node must
    /// not report itself healthy. The error names the groups and why.
    pub fn health(&self) -> Result<(), String> {
        if self.inner.shutting_down.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut bad = Vec::new();
        for group in self.hosted() {
            let g = &group.id;
            let m = group.raft.metrics();
            let m = m.borrow();
            let why = match (&m.running_state, m.state) {
                (Err(fatal), _) => Some(format!("group {g} stopped: {fatal}")),
                (Ok(()), ServerState::Shutdown) => Some(format!("group {g} has shut down")),
                _ => None,
            };
            self.inner
                .metrics
                .stopped
                .get_or_create(&group_label(*g))
                .set(i64::from(why.is_some()));
            bad.extend(why);
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(bad.join("; "))
        }
    }

    async fn serve(&self, req: RpcRequest) -> RpcResponse {
        match req {
            RpcRequest::Append(g, r) => match self.group(g) {
                Ok(group) => {
                    let (vote, entries) = (r.vote, !r.entries.is_empty());
                    let answer = group.raft.append_entries(r).await;
                    // After openraft took it: it has reset the election timer by then, so a
                    // member woken here does not stand at once.
                    self.after_append(&group, &vote, entries);
                    RpcResponse::Append(answer)
                }
                Err(e) => RpcResponse::Status(Err(e)),
            },
            RpcRequest::Vote(g, r) => match self.group(g) {
                Ok(group) => {
                    let answer = group.raft.vote(r).await;
                    // Someone stands for election: this member takes part as in any group.
                    self.wake(&group, "vote request");
                    RpcResponse::Vote(answer)
                }
                Err(e) => RpcResponse::Status(Err(e)),
            },
            RpcRequest::Snapshot(g, r) => match self.group(g) {
                Ok(group) => {
                    let answer = group.raft.install_snapshot(r).await;
                    self.wake(&group, "snapshot");
                    RpcResponse::Snapshot(answer)
                }
                Err(e) => RpcResponse::Status(Err(e)),
            },
            RpcRequest::Quiesce(g, vote, last) => {
                RpcResponse::Quiesce(self.follow_quietly(g, vote, last))
            }
            RpcRequest::TakeLead(g, vote) => RpcResponse::TakeLead(self.take_lead(g, vote).await),
            // Answered in `dispatch`; here only for completeness.
            RpcRequest::Alive { .. } => RpcResponse::Alive,
            RpcRequest::Write(g, r) => RpcResponse::Write(match check_entry_size(&r) {
                Ok(()) => self.local_write(g, r).await,
                Err(e) => Err(e),
            }),
            RpcRequest::Read(g, key) => RpcResponse::Read(self.local_read(g, &key).await),
            RpcRequest::AddLearner(g, id, node) => {
                RpcResponse::Membership(self.local_add_learner(g, id, node).await)
            }
            RpcRequest::SetVoters(g, voters) => {
                RpcResponse::Membership(self.local_set_voters(g, voters).await)
            }
            RpcRequest::Remove(g, id) => RpcResponse::Membership(self.local_remove(g, id).await),
            RpcRequest::Status(g) => RpcResponse::Status(self.local_status(g)),
            RpcRequest::LogRead(g, q) => {
                let kind = log_query_kind(&q);
                let answer = match self.state_machine(g) {
                    Ok(sm) => crate::reader::answer(&sm, q).await,
                    Err(e) => Err(e),
                };
                RpcResponse::LogRead(answer.map(|(a, capped)| {
                    self.inner
                        .metrics
                        .log_reads
                        .get_or_create(&vec![
                            ("kind".to_string(), kind.to_string()),
                            ("capped".to_string(), capped.unwrap_or("none").to_string()),
                        ])
                        .inc();
                    a
                }))
            }
        }
    }

    async fn local_write(&self, g: GroupId, req: Request) -> Result<Response, ClientError> {
        self.propose(g, req).await?.await
    }

    /// Hands `req` to this node's Raft for group `g` and returns the answer to await (after
    /// commit and apply; `NotLeader` if this node does not lead). Proposals handed over one
    /// after another are in the log in that order.
    async fn propose(
        &self,
        g: GroupId,
        req: Request,
    ) -> Result<impl Future<Output = Result<Response, ClientError>> + Send + 'static, ClientError>
    {
        let group = self.group(g)?;
        // Counted before the hand-off flag is read: a hand-off that sets the flag and then
        // finds no proposal counted knows none gets past the flag.
        group.proposing.fetch_add(1, Ordering::SeqCst);
        let proposing = Proposing(group.clone());
        group.refuse_while_handing_off()?;
        self.wake(&group, "write");
        // Stamped here, on the leader, just before proposing: the state machine's clock is
        // the leader's, whichever node accepted the request.
        let proposal = crate::types::Proposal {
            time_ms: self.now_ms(),
            request: req,
        };
        let rx = group
            .raft
            .client_write_ff(proposal)
            .await
            .map_err(|e| write_error(g, RaftError::Fatal(e)))?;
        Ok(async move {
            let _proposing = proposing;
            match rx.await {
                Ok(Ok(r)) => Ok(r.data),
                Ok(Err(e)) => Err(write_error(g, RaftError::APIError(e))),
                Err(_) => Err(other(format!(
                    "group {g} stopped before the write was answered"
                ))),
            }
        })
    }

    /// Starts a write through the group's leader and returns its answer to await. The
    /// proposal is under way when this returns: handed to this node's Raft if it leads, or
    /// queued on the link to the leader (which proposes forwarded writes in the order they
    /// came), so writes started one after another are proposed in that order while the
    /// leader stays.
    ///
    /// When the first try cannot be made (no leader known yet, the link to it not open),
    /// the write is done through [`Consensus::write`]'s retries before this returns, so a
    /// write started after it still comes after it: the caller waits that once, instead of
    /// a later write overtaking an earlier one that was still looking for the leader. Once
    /// a write is on its way, a lost answer or a moved leader is retried the same way while
    /// later writes may already be in (order is then not kept).
    pub async fn start_write(
        &self,
        g: GroupId,
        req: Request,
    ) -> futures::future::BoxFuture<'static, Result<Response, ClientError>> {
        let c = self.clone();
        let retry = move |req: Request| -> futures::future::BoxFuture<'static, Result<Response, ClientError>> {
            Box::pin(async move { c.write(g, req).await })
        };
        // Not under way yet: done here, before anything started after it, and handed back
        // answered.
        let first = |req: Request| retry.clone()(req);
        let answered = |r: Result<Response, ClientError>| -> futures::future::BoxFuture<'static, Result<Response, ClientError>> {
            Box::pin(futures::future::ready(r))
        };
        let Ok(group) = self.group(g) else {
            return answered(first(req).await);
        };
        if check_entry_size(&req).is_err() {
            return answered(first(req).await);
        }
        let (leader, node) = {
            let m = group.raft.metrics();
            let m = m.borrow();
            let leader = m.current_leader;
            let node = leader.and_then(|l| m.membership_config.membership().get_node(&l).cloned());
            (leader, node)
        };
        let timeout = self.inner.settings.client_timeout;
        let started = Instant::now();
        let metrics = self.inner.metrics.clone();
        let done = move |r: &Result<Response, ClientError>| {
            metrics.proposals.get_or_create(&group_label(g)).inc();
            if r.is_ok() {
                metrics
                    .commit_seconds
                    .get_or_create(&group_label(g))
                    .observe(started.elapsed().as_secs_f64());
            }
        };
        let no_quorum = move || ClientError::NoLeader {
            group: g,
            reason: format!(
                "not committed within {timeout:?}: no quorum answered (the write may still commit later)"
            ),
        };
        match (leader, node) {
            (Some(l), _) if l == self.inner.me => match self.propose(g, req.clone()).await {
                Ok(committed) => Box::pin(async move {
                    match tokio::time::timeout(timeout, committed).await {
                        Ok(Err(ClientError::NotLeader { .. })) => retry(req).await,
                        Ok(r) => {
                            done(&r);
                            r
                        }
                        Err(_) => Err(no_quorum()),
                    }
                }),
                Err(_) => answered(first(req).await),
            },
            (Some(_), Some(node)) => {
                let Ok(body) = wire::encode(&RpcRequest::Write(g, req.clone())) else {
                    return answered(first(req).await);
                };
                match self.inner.transport.start(&node, body).await {
                    Ok(answer) => Box::pin(async move {
                        let bytes = match tokio::time::timeout(timeout, answer).await {
                            Ok(Ok(bytes)) => bytes,
                            Ok(Err(_)) => return retry(req).await,
                            Err(_) => return Err(no_quorum()),
                        };
                        match wire::decode::<RpcResponse>(&bytes) {
                            Ok(a) if not_leader(&a).is_none() => match a {
                                RpcResponse::Write(r) => {
                                    done(&r);
                                    r
                                }
                                other_answer => {
                                    Err(other(format!("unexpected answer {other_answer:?}")))
                                }
                            },
                            _ => retry(req).await,
                        }
                    }),
                    Err(_) => answered(first(req).await),
                }
            }
            _ => answered(first(req).await),
        }
    }

    async fn local_read(&self, g: GroupId, key: &str) -> Result<Option<Vec<u8>>, ClientError> {
        let group = self.group(g)?;
        // A read index is confirmed by heartbeats, which would renew the members' lease on
        // this leader that a hand-off waits out.
        group.refuse_while_handing_off()?;
        // The read index is confirmed by a round of heartbeats: the group is in use again.
        self.wake(&group, "linearizable read");
        let read_log_id = group
            .raft
            .ensure_linearizable()
            .await
            .map_err(|e| match e {
                RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f)) => {
                    ClientError::NotLeader {
                        group: g,
                        leader: f.leader_node,
                    }
                }
                // One round of heartbeats that a majority did not answer in time (a busy
                // machine, a dial still under way) is not an answer for the client: it is
                // "no leader confirmed now", which the caller retries until its deadline.
                RaftError::APIError(openraft::error::CheckIsLeaderError::QuorumNotEnough(q)) => {
                    ClientError::NoLeader {
                        group: g,
                        reason: format!("the leader could not confirm its lead with a quorum: {q}"),
                    }
                }
                other_err => other(other_err),
            })?;
        // ensure_linearizable waits for the read index to be applied here.
        debug!(group = %g, read_index = ?read_log_id, "linearizable read");
        group.sm.get_raw(key).map_err(other)
    }

    async fn local_add_learner(
        &self,
        g: GroupId,
        id: NodeId,
        node: RaftNode,
    ) -> Result<(), ClientError> {
        let group = self.group(g)?;
        self.wake(&group, "membership change");
        group
            .raft
            .add_learner(id, node, false)
            .await
            .map_err(|e| write_error(g, e))?;
        Ok(())
    }

    async fn local_set_voters(&self, g: GroupId, voters: Vec<NodeId>) -> Result<(), ClientError> {
        let group = self.group(g)?;
        self.wake(&group, "membership change");
        let set: BTreeSet<NodeId> = voters.into_iter().collect();
        if set.is_empty() {
            return Err(other("a group needs at least one voter"));
        }
        let metrics = group.raft.metrics().borrow().clone();
        let known: BTreeSet<NodeId> = metrics
            .membership_config
            .nodes()
            .map(|(id, _)| *id)
            .collect();
        if let Some(unknown) = set.iter().find(|id| !known.contains(id)) {
            return Err(other(format!(
                "node {unknown} is not a member of group {g}: add it as a learner first"
            )));
        }
        // Members dropped from the voters are removed from the group altogether.
        group
            .raft
            .change_membership(ChangeMembers::ReplaceAllVoters(set), false)
            .await
            .map_err(|e| write_error(g, e))?;
        Ok(())
    }

    async fn local_remove(&self, g: GroupId, id: NodeId) -> Result<(), ClientError> {
        let group = self.group(g)?;
        self.wake(&group, "membership change");
        let metrics = group.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let change = if voters.contains(&id) {
            let rest: BTreeSet<NodeId> = voters.iter().copied().filter(|v| *v != id).collect();
            if rest.is_empty() {
                return Err(other(format!(
                    "node {id} is the last voter of group {g}: a group needs at least one"
                )));
            }
            ChangeMembers::ReplaceAllVoters(rest)
        } else if membership.learner_ids().any(|l| l == id) {
            ChangeMembers::RemoveNodes([id].into())
        } else {
            return Err(other(format!("node {id} is not a member of group {g}")));
        };
        group
            .raft
            .change_membership(change, false)
            .await
            .map_err(|e| write_error(g, e))?;
        Ok(())
    }

    /// This member's own view of group `g`.
    pub fn local_status(&self, g: GroupId) -> Result<MemberStatus, ClientError> {
        let group = self.group(g)?;
        let m = group.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let state = match m.state {
            ServerState::Leader => "Leader",
            ServerState::Follower => "Follower",
            ServerState::Candidate => "Candidate",
            ServerState::Learner => "Learner",
            ServerState::Shutdown => "Shutdown",
        };
        Ok(MemberStatus {
            node_id: self.inner.me,
            peer_id: self.inner.node.peer_id.clone(),
            state: state.to_string(),
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index,
            committed_index: group.log.committed().ok().flatten().map(|l| l.index),
            applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            nodes: membership
                .nodes()
                .map(|(id, n)| (*id, n.peer_id.clone()))
                .collect(),
        })
    }

    /// Every member's own view of group `g`: this node's directly, the others' over the
    /// network (an unreachable member is reported with the reason).
    pub async fn status(
        &self,
        g: GroupId,
    ) -> Result<Vec<(NodeId, Result<MemberStatus, String>)>, ClientError> {
        if matches!(self.group(g), Err(ClientError::UnknownGroup(_))) {
            return self.remote_status(g).await;
        }
        let mine = self.local_status(g)?;
        let mut out = vec![(self.inner.me, Ok(mine.clone()))];
        let membership = group_membership(&*self.group(g)?);
        let asks = membership
            .into_iter()
            .filter(|(id, _)| *id != self.inner.me)
            .map(|(id, node)| async move {
                let r = match tokio::time::timeout(
                    Duration::from_secs(3),
                    call(&self.inner.transport, &node, &RpcRequest::Status(g)),
                )
                .await
                {
                    Ok(Ok(RpcResponse::Status(Ok(s)))) => Ok(s),
                    Ok(Ok(RpcResponse::Status(Err(e)))) => Err(e.to_string()),
                    Ok(Ok(other)) => Err(format!("unexpected answer {other:?}")),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err("no answer within 3 s".to_string()),
                };
                (id, r)
            });
        out.extend(futures::future::join_all(asks).await);
        Ok(out)
    }

    /// [`Consensus::status`] of a group not hosted here: the first replica the directory
    /// names that answers, then every member that one knows of.
    async fn remote_status(
        &self,
        g: GroupId,
    ) -> Result<Vec<(NodeId, Result<MemberStatus, String>)>, ClientError> {
        let candidates = self.remote_candidates(g);
        if candidates.is_empty() {
            return Err(ClientError::UnknownGroup(g));
        }
        let mut tried = crate::reader::Tried::default();
        let mut first = None;
        for node in &candidates {
            match self.status_of(g, node).await {
                Ok(s) => {
                    first = Some(s);
                    break;
                }
                Err(e) => tried.note(format!("{}: {e}", node.peer_id)),
            }
        }
        let Some(first) = first else {
            return Err(ClientError::NoLeader {
                group: g,
                reason: format!(
                    "group {g} is not hosted on this node and no replica of it answered a status request; tried {}",
                    tried.summary()
                ),
            });
        };
        let asks = first
            .nodes
            .iter()
            .filter(|(id, _)| *id != first.node_id)
            .map(|(id, peer)| {
                let node = candidates
                    .iter()
                    .find(|n| n.peer_id == *peer)
                    .cloned()
                    .unwrap_or_else(|| RaftNode {
                        peer_id: peer.clone(),
                        addrs: Vec::new(),
                    });
                async move {
                    (
                        *id,
                        self.status_of(g, &node).await.map_err(|e| e.to_string()),
                    )
                }
            })
            .collect::<Vec<_>>();
        let rest = futures::future::join_all(asks).await;
        let mut out = vec![(first.node_id, Ok(first))];
        out.extend(rest);
        Ok(out)
    }

    /// What `node` says of group `g` (its own view, over the network; this node's own view
    /// if `node` is this node), whether or not this node hosts `g` or is a member of it: for
    /// a node that asks the replicas of a group it does not host (yet) or may no longer be
    /// a member of. A member whose membership of `g` leaves this node out answers
    /// [`ClientError::Refused`] (only members may ask), one that does not host `g`
    /// [`ClientError::UnknownGroup`]; no answer within 3 s is [`ClientError::Other`].
    pub async fn status_of(
        &self,
        g: GroupId,
        node: &RaftNode,
    ) -> Result<MemberStatus, ClientError> {
        if node.peer_id == self.inner.node.peer_id {
            return self.local_status(g);
        }
        match tokio::time::timeout(
            Duration::from_secs(3),
            call(&self.inner.transport, node, &RpcRequest::Status(g)),
        )
        .await
        {
            Ok(Ok(RpcResponse::Status(r))) => r,
            Ok(Ok(other_answer)) => Err(other(format!(
                "{node} answered a status request with {other_answer:?}"
            ))),
            Ok(Err(e)) => Err(other(format!("{node} unreachable: {e}"))),
            Err(_) => Err(other(format!("{node} did not answer within 3 s"))),
        }
    }

    /// Runs `req` on the group's leader: here if this node leads, else forwarded. Retries
    /// while there is no leader or leadership moves, until the client timeout.
    async fn on_leader(&self, g: GroupId, req: RpcRequest) -> Result<RpcResponse, ClientError> {
        let group = match self.group(g) {
            Ok(group) => group,
            Err(ClientError::UnknownGroup(_)) => return self.on_remote_leader(g, req).await,
            Err(e) => return Err(e),
        };
        let deadline = Instant::now() + self.inner.settings.client_timeout;
        let mut last_error = String::from("no leader elected yet");
        loop {
            let m = group.raft.metrics().borrow().clone();
            if m.membership_config.nodes().next().is_none() {
                // A shard group is formed by its first replica moments after the shard
                // map names it: a write that comes first waits for it, as for a leader.
                if crate::routing::shard_of_group(g).is_none() || Instant::now() >= deadline {
                    return Err(ClientError::NotInitialized(g));
                }
                let mut rx = group.raft.metrics();
                let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
                continue;
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            let answer = match m.current_leader {
                Some(l) if l == self.inner.me => {
                    match tokio::time::timeout(remaining, Box::pin(self.serve(clone_client(&req))))
                        .await
                    {
                        Ok(a) => Some(a),
                        Err(_) => {
                            return Err(ClientError::NoLeader {
                                group: g,
                                reason: format!(
                                    "not committed within {:?}: no quorum answered (the write may still commit later)",
                                    self.inner.settings.client_timeout
                                ),
                            });
                        }
                    }
                }
                Some(l) => match m.membership_config.membership().get_node(&l) {
                    Some(node) => match tokio::time::timeout(
                        remaining,
                        call(&self.inner.transport, node, &req),
                    )
                    .await
                    {
                        Ok(Ok(a)) => Some(a),
                        Ok(Err(e)) => {
                            last_error = format!("leader {} unreachable: {e}", node.peer_id);
                            None
                        }
                        Err(_) => {
                            last_error = format!("leader {} did not answer in time", node.peer_id);
                            None
                        }
                    },
                    None => None,
                },
                None => None,
            };
            if let Some(a) = answer {
                match not_leader(&a) {
                    Some(reason) => last_error = reason,
                    None => return Ok(a),
                }
            }
            if Instant::now() >= deadline {
                return Err(ClientError::NoLeader {
                    group: g,
                    reason: last_error,
                });
            }
            // Wait for the metrics to change (a new leader, a new term), at most a little.
            let mut rx = group.raft.metrics();
            let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
        }
    }

    /// Sets where the replicas of groups this node does not host are: `d(g)` names
    /// candidate replicas of `g`, the preferred (its leader, if known) first, and may name
    /// none. Client operations ([`Consensus::write`], [`Consensus::read`], ...) and
    /// [`Consensus::reader`] on a group not hosted here go to them. While it names none
    /// (until set), they fail at once with [`ClientError::UnknownGroup`], as before.
    pub fn set_directory(&self, d: crate::reader::Directory) {
        *self
            .inner
            .directory
            .write()
            .unwrap_or_else(|p| p.into_inner()) = d;
    }

    /// A reader of group `g`'s topic logs: this node's replica if it hosts `g`, else a
    /// replica the directory names, over the transport (shared with every other reader of
    /// `g` on this node). [`ClientError::UnknownGroup`] when `g` is not hosted here and the
    /// directory names no replica of it.
    pub fn reader(&self, g: GroupId) -> Result<crate::reader::GroupReader, ClientError> {
        if let Ok(group) = self.group(g) {
            return Ok(crate::reader::GroupReader::local(group.sm.clone(), g));
        }
        let mut remotes = self.inner.remotes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = remotes.get(&g).and_then(std::sync::Weak::upgrade) {
            return Ok(crate::reader::GroupReader::remote(r));
        }
        if self.remote_candidates(g).is_empty() {
            return Err(ClientError::UnknownGroup(g));
        }
        let r = Arc::new(crate::reader::Remote::new(
            g,
            self.inner.node.peer_id.clone(),
            Arc::new(crate::reader::TransportCaller(self.inner.transport.clone())),
            self.inner.directory.clone(),
            self.inner.settings.client_timeout,
            self.inner.metrics.remote.clone(),
        ));
        // Bounded by the groups there are; the dead entries of readers gone go here.
        remotes.retain(|_, w| w.strong_count() > 0);
        remotes.insert(g, Arc::downgrade(&r));
        Ok(crate::reader::GroupReader::remote(r))
    }

    /// Whether `from` is a member (voter or learner) of the metadata group as this node
    /// knows it.
    fn is_metadata_member(&self, from: NodeId) -> bool {
        self.group(GroupId::METADATA)
            .map(|m| {
                m.raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .get_node(&from)
                    .is_some()
            })
            .unwrap_or(false)
    }

    /// Where to send an operation on group `g`, which is not hosted here: its last known
    /// leader first, then the directory's candidates; never this node.
    fn remote_candidates(&self, g: GroupId) -> Vec<RaftNode> {
        let d = self
            .inner
            .directory
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let known = self.known_leaders().get(&g).cloned();
        let mut out: Vec<RaftNode> = Vec::new();
        for n in known.into_iter().chain(d(g)) {
            if n.peer_id != self.inner.node.peer_id && !out.iter().any(|o| o.peer_id == n.peer_id) {
                out.push(n);
            }
        }
        out
    }

    fn known_leaders(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<GroupId, RaftNode>> {
        self.inner
            .known_leaders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn learn_leader(&self, g: GroupId, leader: &RaftNode) {
        let mut known = self.known_leaders();
        if known.len() >= MAX_KNOWN_LEADERS && !known.contains_key(&g) {
            // Relearned on the next redirect; bounded however many groups are asked.
            known.clear();
        }
        known.insert(g, leader.clone());
    }

    fn forget_leader(&self, g: GroupId, failed: &RaftNode) {
        let mut known = self.known_leaders();
        if known.get(&g).is_some_and(|l| l.peer_id == failed.peer_id) {
            known.remove(&g);
        }
    }

    /// Runs client operation `req` on the leader of group `g`, which this node does not
    /// host: sends it to the candidates ([`Consensus::remote_candidates`]); a "not the
    /// leader" answer naming the leader sends it there next, a replica that does not host
    /// the group, has no leader or does not answer passes to the next candidate. Retries
    /// with a growing pause until the client timeout, then [`ClientError::NoLeader`] naming
    /// what was tried.
    async fn on_remote_leader(
        &self,
        g: GroupId,
        req: RpcRequest,
    ) -> Result<RpcResponse, ClientError> {
        // Not hosted, and nowhere else known: as before there was a directory.
        if self.remote_candidates(g).is_empty() {
            return Err(ClientError::UnknownGroup(g));
        }
        let timeout = self.inner.settings.client_timeout;
        let deadline = Instant::now() + timeout;
        let kind = kind_of(&req);
        let mut tried = crate::reader::Tried::default();
        let mut backoff = Duration::from_millis(20);
        loop {
            let mut queue: std::collections::VecDeque<RaftNode> = self.remote_candidates(g).into();
            if queue.is_empty() {
                tried.note("the directory names no replica".to_string());
            }
            let mut asked: BTreeSet<String> = BTreeSet::new();
            while let Some(node) = queue.pop_front() {
                if !asked.insert(node.peer_id.clone()) {
                    continue;
                }
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    break;
                }
                let answer =
                    tokio::time::timeout(remaining, call(&self.inner.transport, &node, &req)).await;
                let a = match answer {
                    Ok(Ok(a)) => a,
                    Ok(Err(e)) => {
                        tried.note(format!("{}: {e}", node.peer_id));
                        self.forget_leader(g, &node);
                        continue;
                    }
                    Err(_) => {
                        tried.note(format!("{}: no answer in time", node.peer_id));
                        self.forget_leader(g, &node);
                        continue;
                    }
                };
                match remote_verdict(&a) {
                    RemoteVerdict::Done => {
                        if matches!(a, RpcResponse::Write(Ok(_)) | RpcResponse::Read(Ok(_))) {
                            // Only the leader commits writes and confirms reads.
                            self.learn_leader(g, &node);
                        }
                        crate::reader::count(&self.inner.metrics.remote, kind, "ok");
                        return Ok(a);
                    }
                    RemoteVerdict::Redirect(leader, why) => {
                        tried.note(format!("{}: {why}", node.peer_id));
                        // This node does not host the group: naming it is stale news.
                        if leader.peer_id != self.inner.node.peer_id {
                            self.learn_leader(g, &leader);
                            queue.push_front(leader);
                        }
                    }
                    RemoteVerdict::Next(why) => {
                        tried.note(format!("{}: {why}", node.peer_id));
                        self.forget_leader(g, &node);
                    }
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                crate::reader::count(&self.inner.metrics.remote, kind, "failed");
                return Err(ClientError::NoLeader {
                    group: g,
                    reason: format!(
                        "group {g} is not hosted on this node and no replica of it took the {kind} within {timeout:?} (the client timeout); tried {}",
                        tried.summary()
                    ),
                });
            }
            crate::reader::count(&self.inner.metrics.remote, kind, "retried");
            tokio::time::sleep(backoff.min(remaining)).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// [`Consensus::write_batched`] on a group not hosted here: queued on this node's
    /// batcher of the group (started on the first write, ended when idle), which forwards
    /// what is queued as one batch at a time, so one publisher's writes keep their order.
    /// [`Consensus::queue_write`] for a group this node does not host: into this node's
    /// batcher for it, which forwards a batch at a time.
    async fn queue_remote(&self, g: GroupId, req: Request) -> Result<Queued, ClientError> {
        if self.remote_candidates(g).is_empty() {
            return Err(ClientError::UnknownGroup(g));
        }
        let (tx, rx) = oneshot::channel();
        let mut pending = (req, tx);
        // A batcher that just went idle refuses the request: the second try starts anew.
        for _ in 0..2 {
            let queue = self.remote_batcher(g);
            match queue.send(pending).await {
                Ok(()) => {
                    return Ok(Box::pin(async move {
                        rx.await.map_err(|_| {
                            other("the node shut down before the write was answered")
                        })?
                    }));
                }
                Err(mpsc::error::SendError(p)) => pending = p,
            }
        }
        // Written before this returns, so it keeps its place before what is queued next.
        let answer = self.write(g, pending.0).await;
        Ok(Box::pin(futures::future::ready(answer)))
    }

    /// The queue of this node's batcher for group `g` (not hosted here), started if none
    /// runs.
    fn remote_batcher(&self, g: GroupId) -> mpsc::Sender<Pending> {
        let mut batchers = self
            .inner
            .remote_batchers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((_, tx, task)) = batchers.get(&g)
            && !tx.is_closed()
            && !task.is_finished()
        {
            return tx.clone();
        }
        let generation = self
            .inner
            .remote_batcher_seq
            .fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(MAX_BATCH_REQUESTS * 4);
        let task = tokio::spawn(remote_batch_loop(self.clone(), g, generation, rx));
        batchers.insert(g, (generation, tx.clone(), task));
        tx
    }

    /// Forgets remote batcher `generation` of group `g` (it went idle), unless a newer one
    /// took its place.
    fn drop_remote_batcher(&self, g: GroupId, generation: u64) {
        let mut batchers = self
            .inner
            .remote_batchers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if batchers.get(&g).is_some_and(|(n, ..)| *n == generation) {
            batchers.remove(&g);
        }
    }

    /// Writes through the group's leader; the answer comes after commit and apply.
    pub async fn write(&self, g: GroupId, req: Request) -> Result<Response, ClientError> {
        check_entry_size(&req)?;
        let started = Instant::now();
        self.inner
            .metrics
            .proposals
            .get_or_create(&group_label(g))
            .inc();
        let r = match self.on_leader(g, RpcRequest::Write(g, req)).await? {
            RpcResponse::Write(r) => r,
            other_answer => Err(other(format!("unexpected answer {other_answer:?}"))),
        };
        if r.is_ok() {
            self.inner
                .metrics
                .commit_seconds
                .get_or_create(&group_label(g))
                .observe(started.elapsed().as_secs_f64());
        }
        r
    }

    /// Writes an operation that is safe to repeat (it carries no request id).
    pub async fn write_op(&self, g: GroupId, op: Op) -> Result<Response, ClientError> {
        self.write(g, Request { id: None, op }).await
    }

    /// Writes like [`Consensus::write`], but shares one Raft entry with the other requests
    /// queued for the group at the same moment (group commit): for the many small writes of
    /// publishers, whose throughput is bounded by Raft round trips and log flushes.
    pub async fn write_batched(&self, g: GroupId, req: Request) -> Result<Response, ClientError> {
        self.queue_write(g, req).await?.await
    }

    /// [`Consensus::write_batched`] in two steps: returns once the request is queued for its
    /// group's batch (waiting for queue space), with its answer to await. Requests queued one
    /// after another by one caller are proposed in that order while the group's leader
    /// stays, however their answers are awaited: how a publish stream keeps its order with
    /// many publishes in flight.
    pub async fn queue_write(&self, g: GroupId, req: Request) -> Result<Queued, ClientError> {
        check_entry_size(&req)?;
        let queue = match self.group(g) {
            Ok(group) => group.batcher.clone(),
            // Not hosted here: batched on this node, forwarded a batch at a time.
            Err(ClientError::UnknownGroup(_)) => return self.queue_remote(g, req).await,
            Err(e) => return Err(e),
        };
        let (tx, rx) = oneshot::channel();
        queue
            .send((req, tx))
            .await
            .map_err(|_| other("the group is shutting down"))?;
        Ok(Box::pin(async move {
            rx.await
                .map_err(|_| other("the group shut down before the write was answered"))?
        }))
    }

    /// Reads client key `key`: linearizably through the leader's read index, or from this
    /// node's state machine (which may lag) when `linearizable` is false.
    pub async fn read(
        &self,
        g: GroupId,
        key: &UserKey,
        linearizable: bool,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        self.read_key(g, key.as_str().to_string(), linearizable)
            .await
    }

    /// Reads the record of `table` named by `parts`, decoded: linearizably through the
    /// leader's read index, or from this node's state machine (which may lag) when
    /// `linearizable` is false.
    pub async fn read_record<S: Shape, C: Codec>(
        &self,
        g: GroupId,
        table: &Table<S, C>,
        parts: S::Ref<'_>,
        linearizable: bool,
    ) -> Result<Option<C::Value>, ClientError> {
        let key = table.key(parts);
        match self.read_key(g, key.clone(), linearizable).await? {
            Some(b) => table.decode(&b).map(Some).map_err(|e| {
                other(format!(
                    "the stored {} under {key:?} does not decode: {e}",
                    table.what()
                ))
            }),
            None => Ok(None),
        }
    }

    async fn read_key(
        &self,
        g: GroupId,
        key: String,
        linearizable: bool,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        if !linearizable {
            match self.group(g) {
                Ok(group) => return group.sm.get_raw(&key).map_err(other),
                // Not hosted here: no local replica to read, so a replica's leader answers.
                Err(ClientError::UnknownGroup(_)) => {}
                Err(e) => return Err(e),
            }
        }
        match self.on_leader(g, RpcRequest::Read(g, key)).await? {
            RpcResponse::Read(r) => r,
            other_answer => Err(other(format!("unexpected answer {other_answer:?}"))),
        }
    }

    /// Adds a learner to group `g` (through the leader).
    pub async fn add_learner(
        &self,
        g: GroupId,
        id: NodeId,
        node: RaftNode,
    ) -> Result<(), ClientError> {
        membership_answer(
            self.on_leader(g, RpcRequest::AddLearner(g, id, node))
                .await?,
        )
    }

    /// Makes exactly `voters` the voters of group `g` (through the leader); voters left out
    /// leave the group.
    pub async fn set_voters(&self, g: GroupId, voters: Vec<NodeId>) -> Result<(), ClientError> {
        membership_answer(self.on_leader(g, RpcRequest::SetVoters(g, voters)).await?)
    }

    /// Removes a node from group `g` for good (through the leader).
    pub async fn remove(&self, g: GroupId, id: NodeId) -> Result<(), ClientError> {
        membership_answer(self.on_leader(g, RpcRequest::Remove(g, id)).await?)
    }

    /// Stops every group.
    pub async fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::Relaxed);
        if let Some(t) = self
            .inner
            .liveness_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            t.abort();
        }
        for (_, (_, _, task)) in self
            .inner
            .remote_batchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            task.abort();
        }
        for group in self.hosted() {
            if let Err(e) = group.raft.shutdown().await {
                warn!(group = %group.id, error = %e, "Raft group did not stop cleanly");
            }
            group.abort_tasks();
        }
        self.inner.watermark_task.abort();
        if let Err(e) = self.inner.watermark.write(false) {
            warn!(error = %e, "cannot write the Raft watermark");
        }
    }
}

/// Refuses a request too large to be one Raft entry: it could never be replicated (see
/// [`crate::network::MAX_ENTRY_BYTES`]).
fn check_entry_size(req: &Request) -> Result<(), ClientError> {
    let bytes = req.weight();
    if bytes > MAX_ENTRY_BYTES {
        return Err(ClientError::TooLarge {
            what: "the request".into(),
            bytes,
            limit: MAX_ENTRY_BYTES,
        });
    }
    Ok(())
}

/// Sends the group's heartbeats while this node leads it and it is active: every
/// `heartbeat`, and at once when the applied index moves (a commit), so followers learn of
/// it without waiting for the next beat. openraft's own beat runs only at the RPC timeout
/// (see [`Settings`]). A group that proposed nothing for [`Settings::quiesce_after`] is
/// offered to go quiet ([`Consensus::try_quiesce`]); while it is quiet this task sleeps
/// until it wakes, so a quiet group costs no timer here.
async fn heartbeat_loop<T: Transport>(c: Consensus<T>, group: Arc<Group>) {
    let every = c.inner.settings.heartbeat;
    let quiesce_after = c.inner.settings.quiesce_after;
    let mut rx = group.raft.metrics();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut applied, mut last_index) = {
        let m = rx.borrow();
        (m.last_applied, m.last_log_index)
    };
    let mut busy_at = Instant::now();
    let mut epoch = group.epoch.load(Ordering::SeqCst);
    loop {
        if matches!(*group.quiet(), Quiet::Leading { .. }) {
            group.woken.notified().await;
            busy_at = Instant::now();
            tick.reset();
            continue;
        }
        let beat = tokio::select! {
            _ = tick.tick() => rx.borrow().state == ServerState::Leader,
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let m = rx.borrow_and_update();
                let moved = m.last_applied != applied;
                applied = m.last_applied;
                if m.last_log_index != last_index {
                    last_index = m.last_log_index;
                    busy_at = Instant::now();
                }
                moved && m.state == ServerState::Leader
            }
        };
        let now_epoch = group.epoch.load(Ordering::SeqCst);
        if now_epoch != epoch {
            epoch = now_epoch;
            busy_at = Instant::now();
        }
        if beat {
            // A beat for a commit counts as the idle one too.
            tick.reset();
            if let Err(e) = group.raft.trigger().heartbeat().await {
                debug!(group = %group.id, error = %e, "heartbeat driver stops: the group stopped");
                return;
            }
        }
        if let Some(after) = quiesce_after
            && busy_at.elapsed() >= after
            && rx.borrow().state == ServerState::Leader
        {
            // The next offer, if this one is refused, comes no sooner than `after` later.
            busy_at = Instant::now();
            c.try_quiesce(&group).await;
        }
    }
}

/// The node's one liveness signal for all its groups (see [`crate::quiet`]): every
/// heartbeat interval it sends each peer that shares a group with it one
/// [`RpcRequest::Alive`] naming the groups it leads and those it follows quietly, whatever
/// their number; and it wakes each group it follows quietly whose leader has not said it
/// leads it for that group's patience (the leader lease plus a random election timeout), so
/// elections run as without quiescence.
async fn liveness_loop<T: Transport>(c: Consensus<T>) {
    let me = c.inner.me;
    let rpc_timeout = c.inner.settings.rpc_timeout;
    let mut tick = tokio::time::interval(c.inner.settings.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let mut leading = Vec::new();
        let mut quiet = Vec::new();
        let mut silent = Vec::new();
        let mut peers: BTreeMap<NodeId, RaftNode> = BTreeMap::new();
        for group in c.hosted() {
            {
                let m = group.raft.metrics();
                let m = m.borrow();
                // A group whose Raft stopped leads nothing, whatever its last metrics say:
                // its quiet members must wake and elect another leader.
                if m.current_leader == Some(me)
                    && m.state == ServerState::Leader
                    && m.running_state.is_ok()
                {
                    leading.push(group.id);
                }
                for (id, n) in m.membership_config.membership().nodes() {
                    if *id != me {
                        peers.entry(*id).or_insert_with(|| n.clone());
                    }
                }
            }
            if let Quiet::Following {
                confirmed,
                patience,
                leader,
                ..
            } = &*group.quiet()
            {
                if now.duration_since(*confirmed) > *patience {
                    silent.push((group.clone(), *leader, now.duration_since(*confirmed)));
                } else {
                    quiet.push(group.id);
                }
            }
        }
        for (group, leader, silence) in silent {
            info!(group = %group.id, leader, ?silence, "the leader of a quiescent group was not heard leading it: waking it for an election");
            c.wake(&group, "leader silent");
        }
        let Ok(body) = wire::encode(&RpcRequest::Alive { leading, quiet }) else {
            continue;
        };
        for node in peers.into_values() {
            let transport = c.inner.transport.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(rpc_timeout, transport.call(&node, body)).await;
            });
        }
    }
}

fn group_membership(group: &Group) -> Vec<(NodeId, RaftNode)> {
    let m = group.raft.metrics().borrow().clone();
    m.membership_config
        .membership()
        .nodes()
        .map(|(id, n)| (*id, n.clone()))
        .collect()
}

fn membership_answer(a: RpcResponse) -> Result<(), ClientError> {
    match a {
        RpcResponse::Membership(r) => r,
        other_answer => Err(other(format!("unexpected answer {other_answer:?}"))),
    }
}

/// Client requests are cheap to copy; Raft's own never go through `on_leader`.
fn clone_client(req: &RpcRequest) -> RpcRequest {
    match req {
        RpcRequest::Write(g, r) => RpcRequest::Write(*g, r.clone()),
        RpcRequest::Read(g, k) => RpcRequest::Read(*g, k.clone()),
        RpcRequest::AddLearner(g, id, n) => RpcRequest::AddLearner(*g, *id, n.clone()),
        RpcRequest::SetVoters(g, v) => RpcRequest::SetVoters(*g, v.clone()),
        RpcRequest::Status(g) => RpcRequest::Status(*g),
        RpcRequest::Remove(g, id) => RpcRequest::Remove(*g, *id),
        RpcRequest::LogRead(g, q) => RpcRequest::LogRead(*g, q.clone()),
        RpcRequest::Append(g, _)
        | RpcRequest::Vote(g, _)
        | RpcRequest::Snapshot(g, _)
        | RpcRequest::Quiesce(g, ..)
        | RpcRequest::TakeLead(g, _) => RpcRequest::Status(*g),
        RpcRequest::Alive { .. } => RpcRequest::Status(GroupId::METADATA),
    }
}

/// What a remote write or read does with a replica's answer.
enum RemoteVerdict {
    /// The answer is the client's (success, or an error no other replica would mend).
    Done,
    /// Send it to this leader next (why the replica did not take it).
    Redirect(RaftNode, String),
    /// Try the next candidate (why the replica did not take it).
    Next(String),
}

fn remote_verdict(a: &RpcResponse) -> RemoteVerdict {
    let e = match a {
        RpcResponse::Write(Err(e))
        | RpcResponse::Read(Err(e))
        | RpcResponse::Membership(Err(e))
        | RpcResponse::Status(Err(e)) => e,
        _ => return RemoteVerdict::Done,
    };
    match e {
        ClientError::NotLeader {
            leader: Some(l), ..
        } => RemoteVerdict::Redirect(l.clone(), e.to_string()),
        ClientError::NotLeader { leader: None, .. }
        | ClientError::NoLeader { .. }
        | ClientError::UnknownGroup(_)
        | ClientError::NotInitialized(_) => RemoteVerdict::Next(e.to_string()),
        _ => RemoteVerdict::Done,
    }
}

/// The kind of a log query, as `canal_raft_log_reads_total` counts it.
fn log_query_kind(q: &crate::rpc::LogQuery) -> &'static str {
    use crate::rpc::LogQuery;
    match q {
        LogQuery::Topics { .. } => "topics",
        LogQuery::Meta { .. } => "meta",
        LogQuery::Events { .. } => "events",
        LogQuery::OffsetAt { .. } => "offset_at",
        LogQuery::SubscriptionCursor { .. } => "subscription_cursor",
        LogQuery::Changes { .. } => "changes",
    }
}

/// If the answer says "not the leader" (or "no leader"), why; the caller retries.
fn not_leader(a: &RpcResponse) -> Option<String> {
    let e = match a {
        RpcResponse::Write(Err(e))
        | RpcResponse::Read(Err(e))
        | RpcResponse::Membership(Err(e)) => e,
        _ => return None,
    };
    match e {
        ClientError::NotLeader { .. } | ClientError::NoLeader { .. } => Some(e.to_string()),
        _ => None,
    }
}

fn watch_metrics(
    group: GroupId,
    mut rx: tokio::sync::watch::Receiver<RaftMetrics<NodeId, RaftNode>>,
    metrics: Metrics,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (mut term, mut snapshot) = {
            let m = rx.borrow();
            (m.current_term, m.snapshot)
        };
        while rx.changed().await.is_ok() {
            let m = rx.borrow().clone();
            if m.current_term > term {
                metrics.elections.get_or_create(&group_label(group)).inc();
                info!(group = %group, term = m.current_term, leader = ?m.current_leader, "new term");
                term = m.current_term;
            }
            if m.snapshot != snapshot {
                metrics.snapshots.get_or_create(&group_label(group)).inc();
                snapshot = m.snapshot;
            }
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::mem::{MemNet, MemTransport};
    use openraft::Vote;
    use openraft::raft::{AppendEntriesRequest, VoteRequest};

    fn node(id: NodeId) -> RaftNode {
        RaftNode {
            peer_id: format!("n{id}"),
            addrs: vec![],
        }
    }

    fn put(key: &str, value: &[u8]) -> Request {
        Request {
            id: None,
            op: Op::Put {
                key: key.into(),
                value: value.to_vec(),
            },
        }
    }

    struct Net {
        _dirs: Vec<tempfile::TempDir>,
        nodes: MemNet,
    }

    impl Net {
        fn get(&self, id: NodeId) -> Consensus<MemTransport> {
            self.nodes.get(&node(id).peer_id).unwrap()
        }
    }

    /// Starts nodes `ids` in memory, with fast timings; none is formed.
    async fn start(ids: &[NodeId]) -> Net {
        let nodes = MemNet::default();
        let mut dirs = Vec::new();
        for &id in ids {
            let dir = tempfile::tempdir().unwrap();
            let db = RaftDb::open(&dir.path().join("raft")).unwrap();
            let c = Consensus::start(
                &db,
                id,
                node(id),
                &[GroupId::METADATA],
                Settings::with_election_timeout(Duration::from_millis(200)),
                nodes.transport(id),
                &mut Registry::default(),
            )
            .await
            .unwrap();
            nodes.insert(&node(id).peer_id, c);
            dirs.push(dir);
        }
        Net { _dirs: dirs, nodes }
    }

    async fn formed(ids: &[NodeId], outsiders: &[NodeId]) -> Net {
        let all: Vec<NodeId> = ids.iter().chain(outsiders).copied().collect();
        let net = start(&all).await;
        let members: BTreeMap<NodeId, RaftNode> = ids.iter().map(|&i| (i, node(i))).collect();
        net.get(ids[0]).initialize(members).await.unwrap();
        net
    }

    async fn leader_of(net: &Net, via: NodeId) -> NodeId {
        let c = net.get(via);
        let mut rx = c.group(GroupId::METADATA).unwrap().raft.metrics();
        let m = tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|m| m.current_leader.is_some()),
        )
        .await
        .unwrap()
        .unwrap();
        m.current_leader.unwrap()
    }

    fn append(term: u64, leader: NodeId) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(term, leader),
            prev_log_id: None,
            leader_commit: None,
            entries: vec![],
        }
    }

    fn refused(h: &Handled) -> ClientError {
        match wire::decode::<RpcResponse>(&h.answer).unwrap() {
            RpcResponse::Status(Err(e))
            | RpcResponse::Write(Err(e))
            | RpcResponse::Read(Err(e))
            | RpcResponse::Membership(Err(e)) => e,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn admit_follows_the_rules() {
        let g = GroupId::METADATA;
        // Anyone may speak Raft to a group with no membership yet, but only as itself.
        assert!(admit(&RpcRequest::Append(g, append(1, 7)), 7, None, false).is_ok());
        let forged = admit(&RpcRequest::Append(g, append(1, 7)), 8, None, false).unwrap_err();
        assert!(forged.ban_worthy, "{forged:?}");
        // A member naming another leader is forged.
        let e = admit(&RpcRequest::Append(g, append(1, 7)), 8, Some(true), false).unwrap_err();
        assert_eq!(e.kind, "append");
        assert!(
            e.ban_worthy && e.detail.contains("names leader node 7"),
            "{e:?}"
        );
        let vote = VoteRequest::new(Vote::new(2, 7), None);
        let e = admit(&RpcRequest::Vote(g, vote.clone()), 8, Some(true), false).unwrap_err();
        assert!(e.ban_worthy && e.detail.contains("candidate"), "{e:?}");
        assert!(admit(&RpcRequest::Vote(g, vote.clone()), 7, Some(true), false).is_ok());
        // Only the leader a quiesce names may send it.
        let quiesce = RpcRequest::Quiesce(g, Vote::new_committed(2, 7), None);
        let e = admit(&quiesce, 8, Some(true), false).unwrap_err();
        assert!(e.ban_worthy && e.kind == "quiesce", "{e:?}");
        assert!(admit(&quiesce, 7, Some(true), false).is_ok());
        assert!(
            !admit(&quiesce, 7, Some(false), false)
                .unwrap_err()
                .ban_worthy
        );
        // Only the leader a hand-off names may ask a member to stand.
        let take = RpcRequest::TakeLead(g, Vote::new_committed(2, 7));
        let e = admit(&take, 8, Some(true), false).unwrap_err();
        assert!(e.ban_worthy && e.kind == "take_lead", "{e:?}");
        assert!(admit(&take, 7, Some(true), false).is_ok());
        // A non-member is refused, but not banned: it may be a leader we do not know yet.
        for req in [
            RpcRequest::Append(g, append(1, 7)),
            RpcRequest::Vote(g, vote),
            RpcRequest::Write(g, put("k", b"v")),
            RpcRequest::Read(g, "k".into()),
            RpcRequest::Remove(g, 1),
            RpcRequest::Status(g),
        ] {
            let kind = kind_of(&req);
            let e = admit(&req, 7, Some(false), false).unwrap_err();
            assert!(!e.ban_worthy, "{e:?}");
            assert_eq!(e.kind, kind);
            assert!(e.detail.contains("not a member"), "{e:?}");
            assert!(admit(&req, 7, Some(true), false).is_ok(), "{kind}");
        }
    }

    #[test]
    fn admit_lets_metadata_members_forward_client_operations_only() {
        let g = GroupId(5);
        let log_read = RpcRequest::LogRead(g, crate::rpc::LogQuery::Meta { topic: "t".into() });
        // Client operations forwarded by a cluster member that is no replica of the group.
        for req in [
            RpcRequest::Write(g, put("k", b"v")),
            RpcRequest::Read(g, "k".into()),
            RpcRequest::Status(g),
            log_read,
        ] {
            let kind = kind_of(&req);
            assert!(admit(&req, 7, Some(false), true).is_ok(), "{kind}");
            let e = admit(&req, 7, Some(false), false).unwrap_err();
            assert!(!e.ban_worthy, "{e:?}");
            assert!(e.detail.contains("or of the metadata group"), "{e:?}");
        }
        // Raft and membership changes stay with the group's members.
        let vote = VoteRequest::new(Vote::new(2, 7), None);
        for req in [
            RpcRequest::Append(g, append(1, 7)),
            RpcRequest::Vote(g, vote),
            RpcRequest::Snapshot(
                g,
                openraft::raft::InstallSnapshotRequest {
                    vote: Vote::new_committed(1, 7),
                    meta: Default::default(),
                    offset: 0,
                    data: vec![],
                    done: true,
                },
            ),
            RpcRequest::Quiesce(g, Vote::new_committed(2, 7), None),
            RpcRequest::AddLearner(g, 7, node(7)),
            RpcRequest::SetVoters(g, vec![7]),
            RpcRequest::Remove(g, 1),
        ] {
            let kind = kind_of(&req);
            let e = admit(&req, 7, Some(false), true).unwrap_err();
            assert!(e.detail.contains("only members may"), "{kind}: {e:?}");
        }
        // A group with no membership here yet: as before, anyone.
        assert!(admit(&RpcRequest::Status(g), 7, None, false).is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_members_speak_raft_and_a_legit_cluster_replicates() {
        let net = formed(&[1, 2, 3], &[9]).await;
        let leader = leader_of(&net, 1).await;
        let follower = [1, 2, 3].into_iter().find(|i| *i != leader).unwrap();
        for i in [1, 2, 3] {
            assert_eq!(leader_of(&net, i).await, leader);
        }

        // A legit cluster replicates, writes forwarded through a follower included.
        net.get(follower)
            .write(GroupId::METADATA, put("a", b"1"))
            .await
            .unwrap();
        for i in [1, 2, 3] {
            let sm = net.get(i).state_machine(GroupId::METADATA).unwrap();
            wait(|| sm.get(&UserKey::new("a").unwrap()).unwrap() == Some(b"1".to_vec())).await;
        }

        let l = net.get(leader);
        let f = net.get(follower);
        let term = l.metrics(GroupId::METADATA).unwrap().current_term;
        let g = GroupId::METADATA;
        let body = |r: &RpcRequest| wire::encode(r).unwrap();

        // A non-member's write, append and vote are refused, counted, not ban-worthy.
        let h = l
            .handle(9, &body(&RpcRequest::Write(g, put("evil", b"x"))))
            .await;
        assert!(matches!(refused(&h), ClientError::Refused { .. }), "{h:?}");
        assert!(!h.offence.as_ref().unwrap().ban_worthy);
        let h = f
            .handle(9, &body(&RpcRequest::Append(g, append(term + 5, 9))))
            .await;
        assert!(refused(&h).to_string().contains("not a member"), "{h:?}");
        let h = f
            .handle(
                9,
                &body(&RpcRequest::Vote(
                    g,
                    VoteRequest::new(Vote::new(term + 5, 9), None),
                )),
            )
            .await;
        assert_eq!(h.offence.as_ref().unwrap().kind, "vote");
        // The outsider's own forwarding reaches the leader and is refused the same way.
        let outsider = net.get(9);
        let e = call(
            &outsider.inner.transport,
            &node(leader),
            &RpcRequest::Write(g, put("evil", b"y")),
        )
        .await
        .unwrap();
        assert!(matches!(
            e,
            RpcResponse::Write(Err(ClientError::Refused { .. }))
        ));

        // A member that names another node as the leader is forged: ban-worthy.
        let h = f
            .handle(
                follower,
                &body(&RpcRequest::Append(g, append(term, leader))),
            )
            .await;
        let o = h.offence.clone().unwrap();
        assert!(o.ban_worthy && o.kind == "append", "{o:?}");
        // Bytes that are no request are ban-worthy too.
        let h = f.handle(leader, b"\x01\xff\xff\xff\xff\xff").await;
        assert_eq!(
            h.offence.as_ref().map(|o| (o.kind, o.ban_worthy)),
            Some(("decode", true))
        );

        // Nothing of that changed the term, the leader or the data.
        let m = f.metrics(g).unwrap();
        assert_eq!(m.current_leader, Some(leader));
        assert_eq!(m.current_term, term);
        for i in [1, 2, 3] {
            let sm = net.get(i).state_machine(g).unwrap();
            assert_eq!(sm.get(&UserKey::new("evil").unwrap()).unwrap(), None);
        }
        // And the cluster still commits.
        net.get(follower).write(g, put("b", b"2")).await.unwrap();
        assert!(l.health().is_ok());
    }

    fn answered(
        rx: oneshot::Receiver<Result<Response, ClientError>>,
    ) -> Result<Response, ClientError> {
        futures::FutureExt::now_or_never(rx).unwrap().unwrap()
    }

    #[test]
    fn a_batch_merges_forwarded_batches_and_answers_each_as_it_came() {
        let (tx1, rx1) = oneshot::channel();
        let (tx2, rx2) = oneshot::channel();
        let (tx3, rx3) = oneshot::channel();
        let batch = Request {
            id: None,
            op: Op::Batch(vec![put("b1", b"1"), put("b2", b"2")]),
        };
        let (req, waiters) = one_entry(vec![
            (put("a", b"1"), tx1),
            (batch, tx2),
            (put("c", b"3"), tx3),
        ])
        .unwrap();
        let Op::Batch(reqs) = &req.op else {
            panic!("not a batch: {req:?}")
        };
        let keys: Vec<_> = reqs
            .iter()
            .map(|r| match &r.op {
                Op::Put { key, .. } => key.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(keys, ["a", "b1", "b2", "c"], "merged flat, in order");
        let answer = |i: u64| Response {
            index: 7,
            offset: Some(i),
            ..Default::default()
        };
        answer_entry(
            waiters,
            Ok(Response {
                index: 7,
                batch: (0..4).map(answer).collect(),
                ..Default::default()
            }),
        );
        assert_eq!(answered(rx1).unwrap(), answer(0));
        let b = answered(rx2).unwrap();
        assert_eq!((b.index, b.batch), (7, vec![answer(1), answer(2)]));
        assert_eq!(answered(rx3).unwrap(), answer(3));
    }

    #[test]
    fn one_request_is_proposed_as_itself_and_a_short_answer_fails_every_waiter() {
        let (tx, rx) = oneshot::channel();
        let (req, waiters) = one_entry(vec![(put("a", b"1"), tx)]).unwrap();
        assert!(matches!(req.op, Op::Put { .. }), "{req:?}");
        answer_entry(waiters, Ok(Response::default()));
        assert!(answered(rx).is_ok());
        // A batch with an id is not a batcher's: kept whole (the state machine refuses it).
        let odd = Request {
            id: Some("x".into()),
            op: Op::Batch(vec![put("b", b"2")]),
        };
        let ((tx1, rx1), (tx2, rx2)) = (oneshot::channel(), oneshot::channel());
        let (req, waiters) = one_entry(vec![(odd, tx1), (put("c", b"3"), tx2)]).unwrap();
        assert!(matches!(&req.op, Op::Batch(r) if r.len() == 2), "{req:?}");
        answer_entry(
            waiters,
            Ok(Response {
                batch: vec![Response::default()],
                ..Default::default()
            }),
        );
        for rx in [rx1, rx2] {
            let e = answered(rx).unwrap_err();
            assert!(e.to_string().contains("answered with 1 answers"), "{e}");
        }
        assert!(one_entry(vec![]).is_none());
    }

    /// A write another member forwards joins the leader's batches and is answered as the
    /// batch it came as; one forwarded to a follower is answered with the leader to ask,
    /// not forwarded on (two members each taking the other for the leader would pass it
    /// back and forth).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwarded_writes_join_the_leaders_batches_and_a_follower_sends_them_back() {
        let all = [1, 2, 3];
        let net = formed(&all, &[]).await;
        let g = GroupId::METADATA;
        let leader = agreed_leader(&net, &all, g).await;
        let f = all.into_iter().find(|i| *i != leader).unwrap();
        wait(|| net.get(f).metrics(g).unwrap().current_leader == Some(leader)).await;
        let forwarded = |n: u32| {
            let reqs = (0..n)
                .map(|i| publish("t/f", format!("f{n}-{i}").as_bytes()))
                .collect();
            wire::encode(&RpcRequest::Write(
                g,
                Request {
                    id: None,
                    op: Op::Batch(reqs),
                },
            ))
            .unwrap()
        };
        let answer_of = |h: Handled| match wire::decode::<RpcResponse>(&h.answer).unwrap() {
            RpcResponse::Write(r) => r,
            other => panic!("{other:?}"),
        };
        // To a follower: sent back, naming the leader; nothing is written.
        let h = net.get(f).dispatch(leader, &forwarded(2)).await.await;
        match answer_of(h) {
            Err(ClientError::NotLeader {
                leader: Some(l), ..
            }) => assert_eq!(l, node(leader)),
            other => panic!("not sent back to the leader: {other:?}"),
        }
        // To the leader, many at once, with its own writes: each answered as it came, in
        // the order sent, in fewer entries than forwards.
        let c = net.get(leader);
        let before = c.metrics(g).unwrap().last_log_index.unwrap_or(0);
        let mut answers = Vec::new();
        let mut own = Vec::new();
        for n in 1..=40 {
            answers.push(c.dispatch(f, &forwarded(n % 3 + 1)).await);
            own.push(c.queue_write(g, publish("t/f", b"own")).await.unwrap());
        }
        let mut offsets = Vec::new();
        for (n, a) in (1..=40).zip(answers) {
            let r = answer_of(a.await).unwrap();
            assert_eq!(
                r.batch.len() as u32,
                n % 3 + 1,
                "answered as the batch it came as"
            );
            offsets.extend(r.batch.iter().map(|b| b.offset.unwrap()));
        }
        for w in own {
            assert!(w.await.unwrap().offset.is_some());
        }
        assert!(
            offsets.windows(2).all(|o| o[0] < o[1]),
            "in the order sent: {offsets:?}"
        );
        let entries = c.metrics(g).unwrap().last_log_index.unwrap() - before;
        assert!(entries < 40, "80 writes took {entries} entries");
        let stored = c
            .state_machine(g)
            .unwrap()
            .events("t/f", 0, usize::MAX)
            .unwrap();
        assert_eq!(stored.len(), offsets.len() + 40, "every write once");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_too_large_for_one_entry_is_refused_before_it_is_proposed() {
        let net = formed(&[1], &[]).await;
        leader_of(&net, 1).await;
        let c = net.get(1);
        let e = c
            .write(GroupId::METADATA, put("big", &vec![0; MAX_ENTRY_BYTES + 1]))
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains("MAX_ENTRY_BYTES"), "{e}");
        let e = c
            .write_batched(GroupId::METADATA, put("big", &vec![0; MAX_ENTRY_BYTES + 1]))
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::TooLarge { .. }), "{e}");
        c.write(GroupId::METADATA, put("ok", b"1")).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_group_is_unhealthy_unless_the_node_shuts_down() {
        let net = formed(&[1], &[]).await;
        leader_of(&net, 1).await;
        let c = net.get(1);
        assert!(c.health().is_ok());
        c.group(GroupId::METADATA)
            .unwrap()
            .raft
            .shutdown()
            .await
            .unwrap();
        let e = c.health().unwrap_err();
        assert!(e.contains("metadata"), "{e}");
        c.shutdown().await;
        assert!(c.health().is_ok());
    }

    #[test]
    fn timings_derive_from_the_election_timeout() {
        let d = Settings::default();
        assert_eq!(d.rpc_timeout, Duration::from_millis(400));
        assert_eq!(
            d.election_timeout,
            (Duration::from_millis(600), Duration::from_millis(1200))
        );
        assert_eq!(d.heartbeat, Duration::from_millis(150));
        let fast = Settings::with_election_timeout(Duration::from_millis(200));
        assert_eq!(fast.rpc_timeout, Duration::from_millis(133));
        assert_eq!(fast.heartbeat, Duration::from_millis(50));
        assert!(fast.check().is_ok() && d.check().is_ok());
        let mut bad = d.clone();
        bad.rpc_timeout = Duration::from_millis(600);
        assert!(bad.check().unwrap_err().contains("RPC timeout"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn describe_and_is_leader_agree_with_the_elected_leader() {
        let net = formed(&[1, 2, 3], &[9]).await;
        let leader = leader_of(&net, 1).await;
        let g = GroupId::METADATA;
        // Every member learns the leader; only the leader says it leads.
        for i in [1, 2, 3] {
            let c = net.get(i);
            wait(|| c.describe(g).is_ok_and(|v| v.leader.is_some())).await;
            let view = c.describe(g).unwrap();
            assert_eq!(view.group, g);
            assert_eq!(view.leader, Some(node(leader)));
            assert_eq!(view.voters, vec![node(1), node(2), node(3)]);
            assert!(view.learners.is_empty());
            assert_eq!(c.is_leader(g), i == leader, "member {i}");
        }
        // Typed reads of internal records and reads of client keys, through the leader from
        // a follower.
        let follower = net.get([1, 2, 3].into_iter().find(|i| *i != leader).unwrap());
        let settings = canal_proto::settings::TopicSettings {
            max_payload_bytes: 9,
            ..Default::default()
        };
        follower
            .write_op(
                g,
                Op::Internal {
                    key: crate::InternalKey::Settings("t".into()),
                    value: Some(crate::keys::SETTINGS.encode(&settings).unwrap()),
                },
            )
            .await
            .unwrap();
        follower
            .write_op(g, UserKey::new("k").unwrap().put(b"v".to_vec()))
            .await
            .unwrap();
        let read = follower
            .read_record(g, &crate::keys::SETTINGS, "t", true)
            .await
            .unwrap();
        assert_eq!(read, Some(settings));
        let missing = follower
            .read_record(g, &crate::keys::SETTINGS, "u", true)
            .await
            .unwrap();
        assert_eq!(missing, None);
        let v = follower
            .read(g, &UserKey::new("k").unwrap(), true)
            .await
            .unwrap();
        assert_eq!(v, Some(b"v".to_vec()));
        // An outsider knows no leader and leads nothing; an unknown group is not described.
        let outsider = net.get(9);
        assert!(!outsider.is_leader(g));
        assert_eq!(outsider.describe(g).unwrap().leader, None);
        assert!(!net.get(leader).is_leader(GroupId(7)));
        assert!(matches!(
            net.get(leader).describe(GroupId(7)),
            Err(ClientError::UnknownGroup(GroupId(7)))
        ));
    }

    /// The leader of `g` once every one of `ids` names the same one, within 10 s.
    async fn agreed_leader(net: &Net, ids: &[NodeId], g: GroupId) -> NodeId {
        agreed_leader_not(net, ids, g, None).await
    }

    /// [`agreed_leader`], waiting for one other than `not`.
    async fn agreed_leader_not(
        net: &Net,
        ids: &[NodeId],
        g: GroupId,
        not: Option<NodeId>,
    ) -> NodeId {
        let mut agreed = None;
        wait(|| {
            let leaders: Vec<Option<NodeId>> = ids
                .iter()
                .map(|&i| net.get(i).metrics(g).ok().and_then(|m| m.current_leader))
                .collect();
            agreed =
                leaders[0].filter(|l| leaders.iter().all(|x| *x == Some(*l)) && Some(*l) != not);
            agreed.is_some()
        })
        .await;
        agreed.unwrap()
    }

    fn has(net: &Net, id: NodeId, g: GroupId, key: &str, value: &[u8]) -> bool {
        net.get(id)
            .state_machine(g)
            .ok()
            .and_then(|sm| sm.get(&UserKey::new(key).unwrap()).ok().flatten())
            .as_deref()
            == Some(value)
    }

    fn gauge(c: &Consensus<MemTransport>, state: &str) -> i64 {
        c.inner
            .metrics
            .groups
            .get_or_create(&vec![("state".to_string(), state.to_string())])
            .get()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_opens_closes_and_reopens_at_run_time_while_others_serve() {
        let net = formed(&[1, 2, 3], &[]).await;
        leader_of(&net, 1).await;
        let g = GroupId(5);
        let all = [1, 2, 3];
        for i in all {
            let c = net.get(i);
            c.open_group(g).await.unwrap();
            // Idempotent.
            c.open_group(g).await.unwrap();
            assert_eq!(c.groups(), vec![GroupId::METADATA, g]);
        }
        let members: BTreeMap<NodeId, RaftNode> = all.iter().map(|&i| (i, node(i))).collect();
        net.get(1).initialize_group(g, members).await.unwrap();
        let leader = agreed_leader(&net, &all, g).await;
        net.get(1).write(g, put("k1", b"1")).await.unwrap();
        for i in all {
            wait(|| has(&net, i, g, "k1", b"1")).await;
        }

        // Close it on its leader: the other two elect, and writes commit with 2 of 3.
        let closed = net.get(leader);
        closed.close_group(g, false).await.unwrap();
        assert_eq!(closed.groups(), vec![GroupId::METADATA]);
        let rest: Vec<NodeId> = all.into_iter().filter(|i| *i != leader).collect();
        let new_leader = agreed_leader_not(&net, &rest, g, Some(leader)).await;
        net.get(rest[0]).write(g, put("k2", b"2")).await.unwrap();
        // The metadata group kept serving on every member, the closing one included.
        closed
            .write(GroupId::METADATA, put("m", b"1"))
            .await
            .unwrap();

        // Raft for a closed group is answered "not hosted here", no offence of the sender.
        let term = net.get(new_leader).metrics(g).unwrap().current_term;
        let body = wire::encode(&RpcRequest::Append(g, append(term, new_leader))).unwrap();
        let h = closed.handle(new_leader, &body).await;
        assert!(h.offence.is_none(), "{h:?}");
        let e = refused(&h);
        assert_eq!(e, ClientError::UnknownGroup(g));
        assert!(e.to_string().contains("not hosted"), "{e}");
        assert!(matches!(
            closed.write(g, put("x", b"x")).await,
            Err(ClientError::UnknownGroup(_))
        ));

        // Reopened (not purged), it catches up from where it stopped.
        closed.open_group(g).await.unwrap();
        wait(|| has(&net, leader, g, "k2", b"2")).await;
        assert!(has(&net, leader, g, "k1", b"1"));
        agreed_leader(&net, &all, g).await;

        // Removed from the group, closed and purged, a reopened member starts empty and is
        // added back as a new replica that catches up.
        let l = agreed_leader(&net, &all, g).await;
        let gone = all.into_iter().find(|i| *i != l).unwrap();
        net.get(l).remove(g, gone).await.unwrap();
        let c = net.get(gone);
        c.close_group(g, true).await.unwrap();
        c.open_group(g).await.unwrap();
        assert!(!has(&net, gone, g, "k1", b"1"));
        assert!(c.describe(g).unwrap().voters.is_empty());
        net.get(l).add_learner(g, gone, node(gone)).await.unwrap();
        net.get(l).set_voters(g, all.to_vec()).await.unwrap();
        net.get(l).write(g, put("k3", b"3")).await.unwrap();
        for i in all {
            wait(|| has(&net, i, g, "k3", b"3") && has(&net, i, g, "k1", b"1")).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_closed_and_reopened_under_writes_loses_no_acknowledged_write() {
        let all = [1, 2, 3];
        let net = formed(&all, &[]).await;
        leader_of(&net, 1).await;
        let g = GroupId(6);
        for i in all {
            net.get(i).open_group(g).await.unwrap();
        }
        let members: BTreeMap<NodeId, RaftNode> = all.iter().map(|&i| (i, node(i))).collect();
        net.get(2).initialize_group(g, members).await.unwrap();
        let leader = agreed_leader(&net, &all, g).await;
        let follower = all.into_iter().find(|i| *i != leader).unwrap();
        // Writes to the group and to the metadata group go on while a follower closes and
        // reopens the group again and again (the leader's appends keep reaching it closed).
        let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = {
            let c = net.get(leader);
            let acked = acked.clone();
            tokio::spawn(async move {
                for n in 0..80 {
                    let key = format!("k{n}");
                    if c.write(g, put(&key, b"v")).await.is_ok() {
                        acked.lock().unwrap().push(key);
                    }
                    c.write(GroupId::METADATA, put(&format!("m{n}"), b"v"))
                        .await
                        .unwrap();
                }
            })
        };
        let f = net.get(follower);
        let progress = || acked.lock().unwrap().len();
        for round in 0..4 {
            let before = progress();
            f.close_group(g, false).await.unwrap();
            assert!(!f.groups().contains(&g));
            wait(|| progress() >= before + 5 || writer.is_finished()).await;
            f.open_group(g).await.unwrap();
            wait(|| progress() >= before + 10 || writer.is_finished()).await;
            assert!(f.health().is_ok(), "round {round}");
        }
        writer.await.unwrap();
        let acked = acked.lock().unwrap().clone();
        assert_eq!(acked.len(), 80, "every write commits with 2 of 3 up");
        for i in all {
            wait(|| {
                acked.iter().all(|k| has(&net, i, g, k, b"v"))
                    && has(&net, i, GroupId::METADATA, "m79", b"v")
            })
            .await;
        }
    }

    /// Starts `ids` formed, with every group quiescing after `quiesce_after` of idleness.
    async fn formed_quiet(ids: &[NodeId]) -> Net {
        let net = formed(ids, &[]).await;
        let g = GroupId::METADATA;
        let leader = agreed_leader(&net, ids, g).await;
        net.get(leader).write(g, put("warm", b"1")).await.unwrap();
        for &i in ids {
            wait(|| net.get(i).is_quiescent(g)).await;
        }
        net
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_group_goes_quiet_sends_no_heartbeats_and_wakes_on_a_write() {
        let all = [1, 2, 3];
        let net = formed_quiet(&all).await;
        let g = GroupId::METADATA;
        let leader = agreed_leader(&net, &all, g).await;
        for i in all {
            let c = net.get(i);
            assert_eq!((gauge(&c, "quiescent"), gauge(&c, "active")), (1, 0));
        }
        let term = net.get(leader).metrics(g).unwrap().current_term;
        // Over a window of several election timeouts: no appends at all, no election, and
        // the per-peer liveness signal only (3 nodes x 2 peers every 50 ms).
        let (appends, votes, alive) = (
            net.nodes.sent("append"),
            net.nodes.sent("vote"),
            net.nodes.sent("alive"),
        );
        let window = Duration::from_millis(1500);
        // A measurement window, not a wait for a condition.
        tokio::time::sleep(window).await;
        assert_eq!(net.nodes.sent("append") - appends, 0);
        assert_eq!(net.nodes.sent("vote") - votes, 0);
        let beats = net.nodes.sent("alive") - alive;
        assert!(
            beats > 0 && beats <= 6 * 40,
            "{beats} liveness messages in {window:?}"
        );
        for i in all {
            assert!(net.get(i).is_quiescent(g), "member {i} woke while idle");
            assert_eq!(net.get(i).metrics(g).unwrap().current_term, term);
        }

        // A write through a follower wakes the group and commits on every member; then it
        // goes quiet again.
        let follower = all.into_iter().find(|i| *i != leader).unwrap();
        net.get(follower).write(g, put("a", b"1")).await.unwrap();
        assert!(!net.get(leader).is_quiescent(g));
        for i in all {
            wait(|| has(&net, i, g, "a", b"1")).await;
        }
        for i in all {
            wait(|| net.get(i).is_quiescent(g)).await;
        }
        assert_eq!(net.get(leader).metrics(g).unwrap().current_term, term);
        // A linearizable read on a quiet group works too.
        let v = net
            .get(follower)
            .read(g, &UserKey::new("a").unwrap(), true)
            .await
            .unwrap();
        assert_eq!(v.as_deref(), Some(&b"1"[..]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_quiescent_groups_leader_fails_over_within_the_election_bound() {
        let all = [1, 2, 3];
        let net = formed_quiet(&all).await;
        let g = GroupId::METADATA;
        let leader = agreed_leader(&net, &all, g).await;
        let rest: Vec<NodeId> = all.into_iter().filter(|i| *i != leader).collect();
        // Killed: unreachable, and sending nothing any more.
        let dead = net.nodes.remove(&node(leader).peer_id).unwrap();
        dead.shutdown().await;
        let killed = Instant::now();
        agreed_leader_not(&net, &rest, g, Some(leader)).await;
        let took = killed.elapsed();
        // Without quiescence a follower stands after the leader lease (the longest election
        // timeout) plus its election timeout, seen at openraft's tick; quiescence adds at
        // most one liveness interval. Doubled for a loaded test machine.
        let s = Settings::with_election_timeout(Duration::from_millis(200));
        let bound = s.election_timeout.1 * 2 + s.rpc_timeout * 3 / 2 + s.heartbeat;
        assert!(
            took < bound * 2,
            "failover took {took:?}, the bound is {bound:?}"
        );
        eprintln!("quiescent failover took {took:?} (bound {bound:?})");
        net.get(rest[0]).write(g, put("after", b"1")).await.unwrap();
        for i in &rest {
            wait(|| has(&net, *i, g, "after", b"1")).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_member_back_with_the_group_wakes_its_quiet_leader_before_it_would_stand() {
        let all = [1, 2, 3];
        let net = formed_quiet(&all).await;
        let g = GroupId::METADATA;
        let leader = agreed_leader(&net, &all, g).await;
        let term = net.get(leader).metrics(g).unwrap().current_term;
        let back = all.into_iter().find(|i| *i != leader).unwrap();
        // Closed and reopened (as after a restart): active, its election timer running.
        let c = net.get(back);
        c.close_group(g, false).await.unwrap();
        c.open_group(g).await.unwrap();
        assert!(!c.is_quiescent(g));
        // Its liveness signal does not list the group as quiet: the leader wakes and
        // heartbeats it before its timer runs out, so nobody stands, and all go quiet again.
        for i in all {
            wait(|| net.get(i).is_quiescent(g)).await;
        }
        for i in all {
            assert_eq!(
                net.get(i).metrics(g).unwrap().current_term,
                term,
                "member {i}"
            );
        }
        assert_eq!(agreed_leader(&net, &all, g).await, leader);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partitioned_follower_of_a_quiescent_group_is_not_stuck() {
        let all = [1, 2, 3];
        let net = formed_quiet(&all).await;
        let g = GroupId::METADATA;
        let leader = agreed_leader(&net, &all, g).await;
        let cut = all.into_iter().find(|i| *i != leader).unwrap();
        let term = net.get(cut).metrics(g).unwrap().current_term;
        net.nodes.cut(cut, true);
        // It stops hearing its leader, wakes and stands for election (in vain, alone).
        wait(|| !net.get(cut).is_quiescent(g)).await;
        wait(|| net.get(cut).metrics(g).unwrap().current_term > term).await;
        // The other two go on: a write wakes them, commits with 2 of 3, and the group goes
        // quiet again without the member that does not answer.
        let rest: Vec<NodeId> = all.into_iter().filter(|i| *i != cut).collect();
        net.get(leader).write(g, put("cut", b"1")).await.unwrap();
        for &i in &rest {
            wait(|| has(&net, i, g, "cut", b"1") && net.get(i).is_quiescent(g)).await;
        }
        // Healed, the group has one leader again and everyone, the cut member included,
        // takes new writes.
        net.nodes.cut(cut, false);
        let l = agreed_leader(&net, &all, g).await;
        net.get(l).write(g, put("healed", b"1")).await.unwrap();
        for i in all {
            wait(|| has(&net, i, g, "healed", b"1")).await;
        }
    }

    /// A busy group's lead goes to the voter it is handed to; writes through every member
    /// wait meanwhile and go on under the new leader, each acknowledged write in the log
    /// once, each writer's in its order, on every member.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_groups_lead_is_handed_on_and_every_write_lands_once_in_order() {
        let all = [1, 2, 3];
        let net = formed(&all, &[]).await;
        let g = GroupId::METADATA;
        let leader = agreed_leader(&net, &all, g).await;
        let to = all.into_iter().find(|i| *i != leader).unwrap();
        let term = net.get(leader).metrics(g).unwrap().current_term;
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let writers: Vec<_> = all
            .iter()
            .map(|&w| {
                let (c, stop, acked) = (net.get(w), stop.clone(), acked.clone());
                tokio::spawn(async move {
                    let mut n = 0u32;
                    while !stop.load(Ordering::SeqCst) {
                        let mut req = publish("t/h", format!("{w}-{n}").as_bytes());
                        req.id = Some(format!("{w}-{n}"));
                        // A hand-off delays a write; it fails none.
                        c.write_batched(g, req).await.unwrap();
                        acked.lock().unwrap().push(format!("{w}-{n}"));
                        n += 1;
                    }
                })
            })
            .collect();
        let count = || acked.lock().unwrap().len();
        wait(|| count() >= 30).await;
        assert!(!net.get(leader).is_quiescent(g), "the group is busy");
        // Refused: to itself, to a node of no group, from a follower.
        assert!(net.get(leader).hand_off(g, leader).await.is_err());
        assert!(net.get(leader).hand_off(g, 99).await.is_err());
        assert!(matches!(
            net.get(to).hand_off(g, leader).await,
            Err(ClientError::NotLeader { .. })
        ));
        // A member asked to stand at a vote it does not know (an old leader's) does not.
        let stale = Vote::new_committed(0, leader);
        assert!(net.get(to).take_lead(g, stale).await.is_err());
        assert_eq!(net.get(to).metrics(g).unwrap().current_term, term);
        net.get(leader).hand_off(g, to).await.unwrap();
        assert_eq!(agreed_leader(&net, &all, g).await, to);
        assert!(net.get(to).metrics(g).unwrap().current_term > term);
        let after = count();
        wait(|| count() >= after + 30).await;
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.await.unwrap();
        }
        let acked = acked.lock().unwrap().clone();
        let mut want = acked.clone();
        want.sort();
        for i in all {
            wait(|| {
                net.get(i)
                    .state_machine(g)
                    .unwrap()
                    .events("t/h", 0, usize::MAX)
                    .unwrap()
                    .len()
                    >= acked.len()
            })
            .await;
            let logged: Vec<String> = net
                .get(i)
                .state_machine(g)
                .unwrap()
                .events("t/h", 0, usize::MAX)
                .unwrap()
                .into_iter()
                .map(|e| String::from_utf8(e.payload).unwrap())
                .collect();
            let mut sorted = logged.clone();
            sorted.sort();
            assert_eq!(sorted, want, "member {i}: every write once");
            for w in all {
                let mine: Vec<u32> = logged
                    .iter()
                    .filter_map(|p| p.strip_prefix(&format!("{w}-")))
                    .map(|n| n.parse().unwrap())
                    .collect();
                assert!(
                    mine.windows(2).all(|p| p[0] + 1 == p[1]),
                    "member {i}: writer {w} out of order"
                );
            }
        }
    }

    /// A write started where no leader is known yet is done before `start_write` returns,
    /// so the caller's next write cannot overtake it (a publisher's order through a
    /// follower that was just looking for its leader).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_started_without_a_known_leader_is_done_before_the_next_starts() {
        let all = [1, 2, 3];
        let net = formed(&all, &[]).await;
        let g = GroupId::METADATA;
        let leader = leader_of(&net, 1).await;
        let f = all.into_iter().find(|i| *i != leader).unwrap();
        wait(|| net.get(f).metrics(g).unwrap().current_leader == Some(leader)).await;
        net.nodes.cut(f, true);
        // Alone, it stands for election in vain and knows no leader.
        wait(|| net.get(f).metrics(g).unwrap().current_leader.is_none()).await;
        // Healed once the write has begun looking for the leader (it counts a proposal).
        let proposals = move |c: &Consensus<MemTransport>| {
            c.inner
                .metrics
                .proposals
                .get_or_create(&group_label(g))
                .get()
        };
        let before = proposals(&net.get(f));
        let healer = {
            let (nodes, c) = (net.nodes.clone(), net.get(f));
            tokio::spawn(async move {
                wait(|| proposals(&c) > before).await;
                nodes.cut(f, false);
            })
        };
        let first = net.get(f).start_write(g, put("order", b"first")).await;
        healer.await.unwrap();
        let first = futures::FutureExt::now_or_never(first)
            .expect("answered by the time start_write returned")
            .unwrap();
        let second = net.get(f).start_write(g, put("order", b"second")).await;
        let second = second.await.unwrap();
        assert!(second.index > first.index, "{first:?} then {second:?}");
        for i in all {
            wait(|| has(&net, i, g, "order", b"second")).await;
        }
    }

    async fn wait(mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ok() {
            assert!(Instant::now() < deadline, "condition not met within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn publish(topic: &str, payload: &[u8]) -> Request {
        Request {
            id: None,
            op: Op::Publish(crate::topics::PublishOp {
                topic: topic.into(),
                id: None,
                headers: vec![],
                payload: payload.to_vec(),
                retention: Default::default(),
            }),
        }
    }

    /// Five nodes, the metadata group on all of them and node 9 outside it; data group
    /// `g` on 1, 2 and 3 only, and every node's directory naming those three.
    async fn remote_cluster(g: GroupId) -> Net {
        let net = formed(&[1, 2, 3, 4, 5], &[9]).await;
        leader_of(&net, 1).await;
        let replicas = [1, 2, 3];
        for i in replicas {
            net.get(i).open_group(g).await.unwrap();
        }
        let members: BTreeMap<NodeId, RaftNode> = replicas.iter().map(|&i| (i, node(i))).collect();
        net.get(1).initialize_group(g, members).await.unwrap();
        agreed_leader(&net, &replicas, g).await;
        for i in [1, 2, 3, 4, 5, 9] {
            net.get(i).set_directory(Arc::new(move |asked| {
                if asked == g {
                    replicas.iter().map(|&r| node(r)).collect()
                } else {
                    Vec::new()
                }
            }));
        }
        net
    }

    /// The next wake of `w`, which must come within `within`.
    async fn woken(w: &mut crate::reader::GroupWatch, within: Duration) -> crate::store::Wake {
        tokio::time::timeout(within, w.next())
            .await
            .expect("no change notice in time")
            .expect("the watch ended")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_that_does_not_host_a_group_writes_and_reads_it_through_its_replicas() {
        let g = GroupId(5);
        let net = remote_cluster(g).await;
        let outside = net.get(4);
        assert!(!outside.groups().contains(&g));

        // Plain, batched and repeat-safe writes commit on the replicas.
        outside.write(g, put("a", b"1")).await.unwrap();
        let batched = (0..20).map(|i| {
            let c = outside.clone();
            async move { c.write_batched(g, put(&format!("b{i}"), b"2")).await }
        });
        for r in futures::future::join_all(batched).await {
            r.unwrap();
        }
        outside
            .write_op(
                g,
                Op::Add {
                    key: "n".into(),
                    delta: 3,
                },
            )
            .await
            .unwrap();
        for i in [1, 2, 3] {
            wait(|| has(&net, i, g, "a", b"1") && has(&net, i, g, "b19", b"2")).await;
        }
        // Linearizable (and, with no local replica, any) reads go to the leader.
        for lin in [true, false] {
            let v = outside
                .read(g, &UserKey::new("n").unwrap(), lin)
                .await
                .unwrap();
            assert_eq!(v.as_deref(), Some(&b"3"[..]));
        }
        // Status asks the replicas.
        let status = outside.status(g).await.unwrap();
        assert_eq!(status.len(), 3, "{status:?}");
        assert!(status.iter().all(|(_, s)| s.is_ok()), "{status:?}");

        // Topic logs read remotely, topics, metas, events, offsets and cursors.
        for i in 0..5u8 {
            outside
                .write_batched(g, publish("t/a", &[i]))
                .await
                .unwrap();
        }
        outside.write(g, publish("t/b", b"x")).await.unwrap();
        outside
            .write_op(
                g,
                Op::Ack {
                    subscription: "s".into(),
                    topic: "t/a".into(),
                    offset: 2,
                },
            )
            .await
            .unwrap();
        let reader = outside.reader(g).unwrap();
        assert!(!reader.is_local());
        assert_eq!(reader.group(), g);
        let local = net.get(1).reader(g).unwrap();
        assert!(local.is_local());
        // A replica's reader and the remote one agree (the remote one may lag a moment).
        let want = local.topics().await.unwrap();
        assert_eq!(want.len(), 2);
        let deadline = Instant::now() + Duration::from_secs(10);
        while reader.topics().await.unwrap() != want {
            assert!(Instant::now() < deadline, "the remote topics never matched");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let meta = reader.topic_meta("t/a").await.unwrap().unwrap();
        assert_eq!((meta.first, meta.next), (0, 5));
        assert_eq!(reader.topic_meta("t/none").await.unwrap(), None);
        let events = reader.events("t/a", 1, 3).await.unwrap();
        let offsets: Vec<u64> = events.iter().map(|e| e.offset).collect();
        assert_eq!(offsets, vec![1, 2, 3]);
        assert_eq!(events[0].payload, vec![1]);
        assert_eq!(reader.events("t/a", 0, 1000).await.unwrap().len(), 5);
        assert_eq!(reader.offset_at("t/a", 0).await.unwrap(), 0);
        assert_eq!(reader.offset_at("t/a", u64::MAX).await.unwrap(), 5);
        assert_eq!(
            reader.subscription_cursor("s", "t/a").await.unwrap(),
            local.subscription_cursor("s", "t/a").await.unwrap()
        );
        assert!(
            reader
                .subscription_cursor("s", "t/a")
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(reader.subscription_cursor("s", "t/b").await.unwrap(), None);

        // The watch: first "anything" (it starts), then the topic of a new publish within
        // a second; readers of one group share one poll loop (a watch that joins it after
        // it started is told only of what comes after).
        let mut w = reader.watch_changes();
        let mut w2 = outside.reader(g).unwrap().watch_changes();
        assert_eq!(
            woken(&mut w, Duration::from_secs(5)).await,
            crate::store::Wake::Everything
        );
        net.get(2).write(g, publish("t/c", b"new")).await.unwrap();
        let published = Instant::now();
        let wake = woken(&mut w, Duration::from_secs(1)).await;
        assert!(published.elapsed() < Duration::from_secs(1));
        assert_eq!(
            wake,
            crate::store::Wake::Topics(["t/c".to_string()].into_iter().collect())
        );
        // Told of the same publish: by its topic, or within the "anything" of the start
        // if it joined before the start was told (queued notices coalesce into it).
        let wake2 = woken(&mut w2, Duration::from_secs(1)).await;
        assert!(
            wake2 == wake || wake2 == crate::store::Wake::Everything,
            "{wake2:?}"
        );
        // Idle: nothing is told, and the loop long-polls instead of spinning.
        let sent = net.nodes.sent("log_read");
        assert!(
            tokio::time::timeout(Duration::from_millis(1500), w.next())
                .await
                .is_err()
        );
        assert!(
            net.nodes.sent("log_read") - sent <= 2,
            "{} log reads while idle",
            net.nodes.sent("log_read") - sent
        );
        drop((w, w2));

        // A node outside the metadata group is refused, directly and through its own
        // forwarding.
        let outsider = net.get(9);
        let e = outsider.write(g, put("evil", b"x")).await.unwrap_err();
        assert!(matches!(e, ClientError::Refused { .. }), "{e}");
        let a = call(
            &outsider.inner.transport,
            &node(1),
            &RpcRequest::LogRead(
                g,
                crate::rpc::LogQuery::Meta {
                    topic: "t/a".into(),
                },
            ),
        )
        .await
        .unwrap();
        assert!(
            matches!(a, RpcResponse::LogRead(Err(ClientError::Refused { .. }))),
            "{a:?}"
        );
        assert!(matches!(
            outsider.reader(g).unwrap().topics().await,
            Err(crate::store::ReadError::NoReplica { .. })
        ));
        // A group nobody names is unknown.
        assert!(matches!(
            outside.reader(GroupId(77)),
            Err(ClientError::UnknownGroup(GroupId(77)))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_remote_reader_moves_on_when_its_replica_dies_and_sees_every_event_once() {
        let g = GroupId(5);
        let net = remote_cluster(g).await;
        let outside = net.get(4);
        let topic = "t/x";
        for i in 0..10u32 {
            outside
                .write_batched(g, publish(topic, &i.to_be_bytes()))
                .await
                .unwrap();
        }
        let reader = outside.reader(g).unwrap();
        let mut w = reader.watch_changes();
        let mut next = 0u64;
        let mut got: Vec<u32> = Vec::new();
        let drain = |next: &mut u64, got: &mut Vec<u32>, page: Vec<crate::topics::StoredEvent>| {
            for e in page {
                assert_eq!(e.offset, *next, "offsets in order, each once");
                *next += 1;
                got.push(u32::from_be_bytes(e.payload.as_slice().try_into().unwrap()));
            }
        };
        loop {
            let page = reader.events(topic, next, 4).await.unwrap();
            if page.is_empty() {
                break;
            }
            drain(&mut next, &mut got, page);
        }
        assert_eq!(got.len(), 10);
        let dead = reader.replica().unwrap();
        // Killed: unreachable, and sending nothing any more.
        let c = net.nodes.remove(&dead).unwrap();
        c.shutdown().await;
        let publisher = {
            let c = outside.clone();
            tokio::spawn(async move {
                for i in 10..40u32 {
                    c.write_batched(g, publish(topic, &i.to_be_bytes()))
                        .await
                        .unwrap();
                }
            })
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while got.len() < 40 {
            assert!(Instant::now() < deadline, "only {} of 40 events", got.len());
            // Woken by the watch only (no polling): it must follow the move.
            woken(&mut w, Duration::from_secs(15)).await;
            loop {
                let page = reader.events(topic, next, 7).await.unwrap();
                if page.is_empty() {
                    break;
                }
                drain(&mut next, &mut got, page);
            }
        }
        publisher.await.unwrap();
        assert_eq!(got, (0..40).collect::<Vec<u32>>());
        assert_ne!(reader.replica().unwrap(), dead);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_remote_watch_backs_off_while_every_replica_is_down_and_resumes_after() {
        let g = GroupId(5);
        let net = remote_cluster(g).await;
        let outside = net.get(4);
        let reader = outside.reader(g).unwrap();
        let mut w = reader.watch_changes();
        assert_eq!(
            woken(&mut w, Duration::from_secs(5)).await,
            crate::store::Wake::Everything
        );
        for i in [1, 2, 3] {
            net.nodes.cut(i, true);
        }
        // Reads fail after the client timeout, naming the group.
        let e = tokio::time::timeout(Duration::from_secs(20), reader.topic_meta("t"))
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(e, crate::store::ReadError::NoReplica { group, .. } if group == g),
            "{e}"
        );
        // The watch loop keeps trying, but with a growing pause: no spin.
        let sent = net.nodes.sent("log_read");
        let window = Duration::from_secs(3);
        // A measurement window, not a wait for a condition.
        tokio::time::sleep(window).await;
        let polls = net.nodes.sent("log_read") - sent;
        assert!(polls > 0 && polls < 20, "{polls} log reads in {window:?}");
        for i in [1, 2, 3] {
            net.nodes.cut(i, false);
        }
        // Healed: the watch tells "anything" (it found a replica again), then new topics.
        assert_eq!(
            woken(&mut w, Duration::from_secs(10)).await,
            crate::store::Wake::Everything
        );
        outside.write(g, publish("t/healed", b"1")).await.unwrap();
        assert_eq!(
            woken(&mut w, Duration::from_secs(2)).await,
            crate::store::Wake::Topics(["t/healed".to_string()].into_iter().collect())
        );
    }
}
