//! The Raft groups a node takes part in, and the client operations on them: writes and
//! linearizable reads forwarded to the leader, membership changes, status.
//!
//! ```text
//!   write(g, req) ──> leader known? ──yes, me──> raft.client_write ──> Response
//!                         │          └─yes, other─> RPC Write ──> (its client_write)
//!                         └─no──> wait for an election (bounded), retry
//! ```

use crate::network::{Network, Transport, call};
use crate::rpc::{ClientError, MemberStatus, RpcRequest, RpcResponse};
use crate::store::{LogStore, RaftDb, StateMachine, StoreError};
use crate::types::{GroupId, NodeId, Op, RaftNode, Request, Response, TypeConfig};
use canal_proto::wire;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Raft, RaftMetrics, ServerState, SnapshotPolicy};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

/// Timing and log-compaction settings shared by all groups of a node.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Leader heartbeat interval.
    pub heartbeat: Duration,
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

impl Default for Settings {
    fn default() -> Self {
        Settings {
            // openraft waits out a leader lease (the election timeout's maximum) on top of the
            // election timeout before it votes again, so a failover takes about 2-3x the
            // timeout: these keep it under a second.
            heartbeat: Duration::from_millis(50),
            election_timeout: (Duration::from_millis(200), Duration::from_millis(400)),
            snapshot_every: 5000,
            keep_behind_snapshot: 1000,
            client_timeout: Duration::from_secs(10),
            clock_offset_ms: 0,
        }
    }
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
}

fn group_label(g: GroupId) -> Vec<(String, String)> {
    vec![("group".to_string(), g.to_string())]
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
/// once. Under light load a batch is one request and adds no wait; under heavy load one
/// Raft round trip, one log flush and one forward carry hundreds of writes.
async fn batch_loop<T: Transport>(c: Consensus<T>, g: GroupId, mut rx: mpsc::Receiver<Pending>) {
    let inflight = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            return;
        };
        // Gathered after the permit: what arrives while batches are in flight joins this one.
        let mut bytes = first.0.weight();
        let mut items = vec![first];
        while items.len() < MAX_BATCH_REQUESTS && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.0.weight();
                    items.push(p);
                }
                Err(_) => break,
            }
        }
        let c = c.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if items.len() == 1 {
                if let Some((req, tx)) = items.pop() {
                    let _ = tx.send(c.write(g, req).await);
                }
                return;
            }
            let n = items.len();
            let (reqs, txs): (Vec<Request>, Vec<_>) = items.into_iter().unzip();
            let answer = c
                .write(
                    g,
                    Request {
                        id: None,
                        op: Op::Batch(reqs),
                    },
                )
                .await;
            match answer {
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
        };
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
        let config = openraft::Config {
            cluster_name: "canal".into(),
            heartbeat_interval: settings.heartbeat.as_millis() as u64,
            election_timeout_min: settings.election_timeout.0.as_millis() as u64,
            election_timeout_max: settings.election_timeout.1.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(settings.snapshot_every),
            max_in_snapshot_log_to_keep: settings.keep_behind_snapshot,
            ..Default::default()
        };
        let mut map = BTreeMap::new();
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
                batchers,
                batch_tasks: std::sync::Mutex::new(Vec::new()),
            }),
        };
        let tasks = queues
            .into_iter()
            .map(|(g, rx)| tokio::spawn(batch_loop(c.clone(), g, rx)))
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

    /// Answers a request from another peer (bytes in, bytes out).
    pub async fn handle(&self, body: &[u8]) -> Vec<u8> {
        let response = match wire::decode::<RpcRequest>(body) {
            Ok(req) => self.serve(req).await,
            Err(e) => RpcResponse::Status(Err(other(format!("undecodable request: {e}")))),
        };
        wire::encode(&response).unwrap_or_default()
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
            RpcRequest::Write(g, r) => RpcResponse::Write(self.local_write(g, r).await),
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
        let group = self.group(g)?;
        // Stamped here, on the leader, just before proposing: the state machine's clock is
        // the leader's, whichever node accepted the request.
        let proposal = crate::types::Proposal {
            time_ms: self.now_ms(),
            request: req,
        };
        let r = group
            .raft
            .client_write(proposal)
            .await
            .map_err(|e| write_error(g, e))?;
        Ok(r.data)
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
                other_err => other(other_err),
            })?;
        // ensure_linearizable waits for the read index to be applied here.
        debug!(group = %g, read_index = ?read_log_id, "linearizable read");
        group.sm.get(key).map_err(other)
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

    /// Reads `key`: linearizably through the leader's read index, or from this node's state
    /// machine (which may lag) when `linearizable` is false.
    pub async fn read(
        &self,
        g: GroupId,
        key: &str,
        linearizable: bool,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        if !linearizable {
            return self.group(g)?.sm.get(key).map_err(other);
        }
        match self
            .on_leader(g, RpcRequest::Read(g, key.to_string()))
            .await?
        {
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
