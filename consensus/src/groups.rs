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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
    }
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
        | RpcRequest::Status(g) => *g,
    }
}

/// Whether `from` may send `req`, judged against this node's membership of the request's
/// group: `sender_is_member` is `None` while the group has no membership here (not formed,
/// or waiting to be added), when anyone may speak Raft to it (the node's admission rules
/// decide who may connect at all).
///
/// - Append and InstallSnapshot only from the leader they name, Vote only from the
///   candidate it names (anything else is forged: ban-worthy), and only from a member.
/// - Forwarded client operations only from members.
pub fn admit(
    req: &RpcRequest,
    from: NodeId,
    sender_is_member: Option<bool>,
) -> Result<(), Offence> {
    let kind = kind_of(req);
    let named = match req {
        RpcRequest::Append(_, r) => Some(r.vote.leader_id().voted_for()),
        RpcRequest::Snapshot(_, r) => Some(r.vote.leader_id().voted_for()),
        RpcRequest::Vote(_, r) => Some(r.vote.leader_id().voted_for()),
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
    if sender_is_member == Some(false) {
        return Err(Offence {
            kind,
            detail: format!(
                "node {from} is not a member (voter or learner) of group {} here: only members may send a {kind}",
                group_of(req)
            ),
            ban_worthy: false,
        });
    }
    Ok(())
}

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

struct Group {
    raft: Raft<TypeConfig>,
    sm: StateMachine,
    log: LogStore,
}

#[derive(Clone)]
struct Metrics {
    commit_seconds: Family<Vec<(String, String)>, Histogram>,
    proposals: Family<Vec<(String, String)>, Counter>,
    elections: Family<Vec<(String, String)>, Counter>,
    snapshots: Family<Vec<(String, String)>, Counter>,
    refused: Family<Vec<(String, String)>, Counter>,
    stopped: Family<Vec<(String, String)>, Gauge>,
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
    groups: BTreeMap<GroupId, Group>,
    settings: Settings,
    metrics: Metrics,
    watermark: Arc<crate::store::Watermark>,
    watermark_task: tokio::task::JoinHandle<()>,
    /// Set by [`Consensus::shutdown`]: a stopped group is then expected, not a fault.
    shutting_down: AtomicBool,
    /// When a refusal was last logged, per sender and kind (logged at most once a minute).
    refusals_logged: std::sync::Mutex<std::collections::HashMap<(NodeId, &'static str), Instant>>,
    /// Where [`Consensus::write_batched`] queues requests, per group.
    batchers: BTreeMap<GroupId, mpsc::Sender<Pending>>,
    batch_tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// A request waiting for its batch, and where its answer goes.
type Pending = (Request, oneshot::Sender<Result<Response, ClientError>>);

/// The most requests one batch carries.
const MAX_BATCH_REQUESTS: usize = 1024;
/// A batch stops growing at about this many bytes.
const MAX_BATCH_BYTES: usize = 8 << 20;
/// How many batches of a group may be committing at once.
const BATCHES_IN_FLIGHT: usize = 4;

/// Group commit: takes the requests queued for a group, as many as are waiting (up to the
/// limits), and proposes them as one entry; up to [`BATCHES_IN_FLIGHT`] entries commit at
/// once, proposed in queue order ([`Consensus::start_write`]). Under light load a batch is one request and adds no wait; under heavy load one
/// Raft round trip, one log flush and one forward carry hundreds of writes.
async fn batch_loop<T: Transport>(c: Consensus<T>, g: GroupId, mut rx: mpsc::Receiver<Pending>) {
    let inflight = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    // A request that would have taken its batch over the byte limit starts the next one, so
    // a batch is never over MAX_BATCH_BYTES unless it is one request alone.
    let mut carried: Option<Pending> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            return;
        };
        // Gathered after the permit: what arrives while batches are in flight joins this one.
        let mut bytes = first.0.weight();
        let mut items = vec![first];
        while items.len() < MAX_BATCH_REQUESTS {
            match rx.try_recv() {
                Ok(p) if bytes + p.0.weight() > MAX_BATCH_BYTES => {
                    carried = Some(p);
                    break;
                }
                Ok(p) => {
                    bytes += p.0.weight();
                    items.push(p);
                }
                Err(_) => break,
            }
        }
        // Proposed here, in the loop, before the next batch is gathered: batches reach the
        // leader's log in the order their requests were queued (only their answers are
        // awaited concurrently), so one publisher's events get offsets in send order.
        if items.len() == 1 {
            if let Some((req, tx)) = items.pop() {
                let answer = c.start_write(g, req).await;
                tokio::spawn(async move {
                    let _permit = permit;
                    let _ = tx.send(answer.await);
                });
            }
            continue;
        }
        let n = items.len();
        let (reqs, txs): (Vec<Request>, Vec<_>) = items.into_iter().unzip();
        let answer = c
            .start_write(
                g,
                Request {
                    id: None,
                    op: Op::Batch(reqs),
                },
            )
            .await;
        tokio::spawn(async move {
            let _permit = permit;
            match answer.await {
                Ok(r) if r.batch.len() == n => {
                    for (tx, r) in txs.into_iter().zip(r.batch) {
                        let _ = tx.send(Ok(r));
                    }
                }
                Ok(r) => {
                    let e = other(format!(
                        "a batch of {n} requests was answered with {} answers",
                        r.batch.len()
                    ));
                    for tx in txs {
                        let _ = tx.send(Err(e.clone()));
                    }
                }
                Err(e) => {
                    for tx in txs {
                        let _ = tx.send(Err(e.clone()));
                    }
                }
            }
        });
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
        let mut map = BTreeMap::new();
        let mut heartbeats = Vec::new();
        for &group in groups {
            let config =
                Arc::new(
                    config
                        .clone()
                        .validate()
                        .map_err(|e| ConsensusError::Start {
                            group,
                            reason: e.to_string(),
                        })?,
                );
            let (log, sm) = db.group(group)?;
            let network = Network {
                group,
                transport: transport.clone(),
            };
            let raft = Raft::new(me, config, network, log.clone(), sm.clone())
                .await
                .map_err(|e| ConsensusError::Start {
                    group,
                    reason: e.to_string(),
                })?;
            watch_metrics(group, raft.metrics(), metrics.clone());
            heartbeats.push(tokio::spawn(heartbeat_loop(
                group,
                raft.clone(),
                settings.heartbeat,
            )));
            map.insert(group, Group { raft, sm, log });
        }
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
        info!(node_id = me, groups = ?groups, "Raft groups started");
        let mut batchers = BTreeMap::new();
        let mut queues = Vec::new();
        for &g in groups {
            let (tx, rx) = mpsc::channel(MAX_BATCH_REQUESTS * 4);
            batchers.insert(g, tx);
            queues.push((g, rx));
        }
        let c = Consensus {
            inner: Arc::new(Inner {
                me,
                node,
                transport,
                groups: map,
                settings,
                metrics,
                watermark,
                watermark_task,
                shutting_down: AtomicBool::new(false),
                refusals_logged: std::sync::Mutex::new(std::collections::HashMap::new()),
                batchers,
                batch_tasks: std::sync::Mutex::new(Vec::new()),
            }),
        };
        let tasks = queues
            .into_iter()
            .map(|(g, rx)| tokio::spawn(batch_loop(c.clone(), g, rx)))
            .chain(heartbeats)
            .collect();
        *c.inner
            .batch_tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = tasks;
        Ok(c)
    }

    fn group(&self, g: GroupId) -> Result<&Group, ClientError> {
        self.inner
            .groups
            .get(&g)
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

    /// This member's node id.
    pub fn node_id(&self) -> NodeId {
        self.inner.me
    }

    /// The groups this node hosts.
    pub fn groups(&self) -> Vec<GroupId> {
        self.inner.groups.keys().copied().collect()
    }

    /// Whether the metadata group has a membership on this node (it was formed, or this node
    /// was added to it).
    pub fn is_member(&self) -> bool {
        self.inner
            .groups
            .get(&GroupId::METADATA)
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

    /// Forms every group with `members` as its voters. Only the first formation succeeds; on
    /// a node whose groups already have a membership it is an error and changes nothing.
    pub async fn initialize(&self, members: BTreeMap<NodeId, RaftNode>) -> Result<(), ClientError> {
        for (g, group) in &self.inner.groups {
            group
                .raft
                .initialize(members.clone())
                .await
                .map_err(|e| other(format!("group {g}: {e}")))?;
        }
        info!(members = ?members.values().map(|n| n.peer_id.clone()).collect::<Vec<_>>(), "Raft groups formed");
        Ok(())
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
        let g = group_of(&req);
        if let Some(group) = self.inner.groups.get(&g) {
            let sender_is_member = {
                let m = group.raft.metrics();
                let m = m.borrow();
                let mut nodes = m.membership_config.membership().nodes().peekable();
                nodes
                    .peek()
                    .is_some()
                    .then(|| nodes.any(|(id, _)| *id == from))
            };
            if let Err(offence) = admit(&req, from, sender_is_member) {
                return ready(self.refuse(from, &g.to_string(), Some(&req), offence));
            }
        }
        let answer = |response: RpcResponse| Handled {
            answer: wire::encode(&response).unwrap_or_default(),
            offence: None,
        };
        if let RpcRequest::Write(g, r) = req {
            let proposed = match check_entry_size(&r) {
                Ok(()) => self.propose(g, r).await,
                Err(e) => Err(e),
            };
            return match proposed {
                Ok(committed) => {
                    Box::pin(async move { answer(RpcResponse::Write(committed.await)) })
                }
                Err(e) => ready(answer(RpcResponse::Write(Err(e)))),
            };
        }
        let c = self.clone();
        Box::pin(async move { answer(c.serve(req).await) })
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
            _ => RpcResponse::Status(Err(e)),
        };
        Handled {
            answer: wire::encode(&response).unwrap_or_default(),
            offence: Some(offence),
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
        for (g, group) in &self.inner.groups {
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
                Ok(group) => RpcResponse::Append(group.raft.append_entries(r).await),
                Err(e) => RpcResponse::Status(Err(e)),
            },
            RpcRequest::Vote(g, r) => match self.group(g) {
                Ok(group) => RpcResponse::Vote(group.raft.vote(r).await),
                Err(e) => RpcResponse::Status(Err(e)),
            },
            RpcRequest::Snapshot(g, r) => match self.group(g) {
                Ok(group) => RpcResponse::Snapshot(group.raft.install_snapshot(r).await),
                Err(e) => RpcResponse::Status(Err(e)),
            },
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
    /// leader stays. When the first try cannot be made or the leader moved, the answer
    /// comes from [`Consensus::write`]'s retries instead (order is then not kept).
    pub async fn start_write(
        &self,
        g: GroupId,
        req: Request,
    ) -> futures::future::BoxFuture<'static, Result<Response, ClientError>> {
        let c = self.clone();
        let retry = move |req: Request| -> futures::future::BoxFuture<'static, Result<Response, ClientError>> {
            Box::pin(async move { c.write(g, req).await })
        };
        let Ok(group) = self.group(g) else {
            return retry(req);
        };
        if check_entry_size(&req).is_err() {
            return retry(req);
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
                Err(_) => retry(req),
            },
            (Some(_), Some(node)) => {
                let Ok(body) = wire::encode(&RpcRequest::Write(g, req.clone())) else {
                    return retry(req);
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
                    Err(_) => retry(req),
                }
            }
            _ => retry(req),
        }
    }

    async fn local_read(&self, g: GroupId, key: &str) -> Result<Option<Vec<u8>>, ClientError> {
        let group = self.group(g)?;
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
        group
            .raft
            .add_learner(id, node, false)
            .await
            .map_err(|e| write_error(g, e))?;
        Ok(())
    }

    async fn local_set_voters(&self, g: GroupId, voters: Vec<NodeId>) -> Result<(), ClientError> {
        let group = self.group(g)?;
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
        let mine = self.local_status(g)?;
        let mut out = vec![(self.inner.me, Ok(mine.clone()))];
        let membership = group_membership(self.group(g)?);
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

    /// Runs `req` on the group's leader: here if this node leads, else forwarded. Retries
    /// while there is no leader or leadership moves, until the client timeout.
    async fn on_leader(&self, g: GroupId, req: RpcRequest) -> Result<RpcResponse, ClientError> {
        let group = self.group(g)?;
        let deadline = Instant::now() + self.inner.settings.client_timeout;
        let mut last_error = String::from("no leader elected yet");
        loop {
            let m = group.raft.metrics().borrow().clone();
            if m.membership_config.nodes().next().is_none() {
                return Err(ClientError::NotInitialized(g));
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
        check_entry_size(&req)?;
        let queue = self
            .inner
            .batchers
            .get(&g)
            .ok_or(ClientError::UnknownGroup(g))?;
        let (tx, rx) = oneshot::channel();
        queue
            .send((req, tx))
            .await
            .map_err(|_| other("the group is shutting down"))?;
        rx.await
            .map_err(|_| other("the group shut down before the write was answered"))?
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
            return self.group(g)?.sm.get_raw(&key).map_err(other);
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
        for (g, group) in &self.inner.groups {
            if let Err(e) = group.raft.shutdown().await {
                warn!(group = %g, error = %e, "Raft group did not stop cleanly");
            }
        }
        self.inner.watermark_task.abort();
        for t in self
            .inner
            .batch_tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
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

/// Sends the group's heartbeats while this node leads it: every `every`, and at once when
/// the applied index moves (a commit), so followers learn of it without waiting for the
/// next beat. openraft's own beat runs only at the RPC timeout (see [`Settings`]).
async fn heartbeat_loop(group: GroupId, raft: Raft<TypeConfig>, every: Duration) {
    let mut rx = raft.metrics();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut applied = rx.borrow().last_applied;
    loop {
        let beat = tokio::select! {
            _ = tick.tick() => rx.borrow().state == ServerState::Leader,
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let m = rx.borrow_and_update();
                let moved = m.last_applied != applied;
                applied = m.last_applied;
                moved && m.state == ServerState::Leader
            }
        };
        if beat {
            // A beat for a commit counts as the idle one too.
            tick.reset();
            if let Err(e) = raft.trigger().heartbeat().await {
                debug!(group = %group, error = %e, "heartbeat driver stops: the group stopped");
                return;
            }
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
        RpcRequest::Append(g, _) | RpcRequest::Vote(g, _) | RpcRequest::Snapshot(g, _) => {
            RpcRequest::Status(*g)
        }
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
) {
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
    });
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
        assert!(admit(&RpcRequest::Append(g, append(1, 7)), 7, None).is_ok());
        let forged = admit(&RpcRequest::Append(g, append(1, 7)), 8, None).unwrap_err();
        assert!(forged.ban_worthy, "{forged:?}");
        // A member naming another leader is forged.
        let e = admit(&RpcRequest::Append(g, append(1, 7)), 8, Some(true)).unwrap_err();
        assert_eq!(e.kind, "append");
        assert!(
            e.ban_worthy && e.detail.contains("names leader node 7"),
            "{e:?}"
        );
        let vote = VoteRequest::new(Vote::new(2, 7), None);
        let e = admit(&RpcRequest::Vote(g, vote.clone()), 8, Some(true)).unwrap_err();
        assert!(e.ban_worthy && e.detail.contains("candidate"), "{e:?}");
        assert!(admit(&RpcRequest::Vote(g, vote.clone()), 7, Some(true)).is_ok());
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
            let e = admit(&req, 7, Some(false)).unwrap_err();
            assert!(!e.ban_worthy, "{e:?}");
            assert_eq!(e.kind, kind);
            assert!(e.detail.contains("not a member"), "{e:?}");
            assert!(admit(&req, 7, Some(true)).is_ok(), "{kind}");
        }
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

    async fn wait(mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ok() {
            assert!(Instant::now() < deadline, "condition not met within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
