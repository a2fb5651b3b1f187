//! Shard groups hosted per the committed shard map (issue 14): every node opens the Raft
//! groups ([`shard_group`]) of the shards it is a replica of, the shard's first
//! replica forms a new group with the map's replicas as voters, and when a later epoch
//! changes a shard's replicas the group's leader moves them one step at a time.
//!
//! ```text
//!   every node, every LOOK_EVERY, from its replica of the committed map and the local
//!   Raft metrics of each shard group (no plan kept in memory: a restart resumes):
//!     a replica, not hosting      -> open the group
//!     first replica, no membership, no other replica formed -> form (map's replicas vote)
//!     leader of the group         -> at most one membership change:
//!         a wanted learner caught up (matched index within CATCH_UP_SLACK) -> promote
//!         a learner no longer wanted                         -> remove
//!         a wanted replica not a member                      -> add as learner
//!         a voter no longer wanted (followers first)         -> remove
//!     no replica, hosting         -> close with purge once it is no member any more
//! ```
//!
//! Topics live in these groups ([`canal_consensus::Route::topic`]); every node runs the job.
//! It also keeps the directory of where each shard group's replicas are ([`directory`]),
//! through which a node reaches the groups it does not host.
//!
//! Leadership: openraft 0.9 has no leader transfer. A leader that leaves a shard removes
//! itself last, and the rest elect; a shard's preferred leader stands for the lead of its
//! group when the group is idle and led by another (members refuse votes within a busy
//! leader's lease).

use crate::shard_map;
use canal_consensus::routing::{shard_group, shard_of_group};
use canal_consensus::{ClientError, Consensus, GroupId, NodeId, RaftNode, Transport};
use canal_proto::api::ShardGroupStatus;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

/// How often the job looks at the map and the groups.
pub const LOOK_EVERY: Duration = Duration::from_millis(500);
/// The most groups one round opens: opening creates storage and starts a Raft, so a map of
/// thousands of shards is taken a slice at a time.
pub const MAX_OPENS_PER_ROUND: usize = 32;
/// The most formations, membership changes and closes one round makes, over all groups
/// (each waits for a commit or an answer): one round stays short whatever the map.
pub const MAX_CHANGES_PER_ROUND: usize = 16;
/// A learner is caught up when its matched log index is at most this far behind the
/// leader's last index (the membership job's rule for the metadata group).
pub const CATCH_UP_SLACK: u64 = 100;

/// How long a preferred leader waits between two campaigns for one group's lead.
pub const CAMPAIGN_EVERY: Duration = Duration::from_secs(30);
/// How many leader leases ([`Consensus::leader_lease`]) a group must have been quiet here
/// before its preferred leader campaigns for it: longer than a hand-off's quiet pause
/// (about one lease), so the two never meet.
pub const IDLE_LEASES: u32 = 2;
/// The most campaigns one round starts: elections of many groups at once would all wait
/// on the same links.
pub const MAX_CAMPAIGNS_PER_ROUND: usize = 2;

/// The label of `canal_shard_group_moves_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StepLabel {
    /// `form`, `add_learner`, `promote`, `remove`, `finish_joint`, `close`, `campaign`,
    /// `hand_off` or `hand_off_failed`.
    pub step: String,
}

/// The job's metrics.
#[derive(Clone, Default)]
pub struct ShardGroupMetrics {
    /// `canal_shard_groups_hosted`: shard groups this node hosts now.
    pub hosted: Gauge,
    /// `canal_shard_group_moves_total{step}`: steps this node took (as leader, former or
    /// member) that succeeded.
    pub moves: Family<StepLabel, Counter>,
    /// `canal_shard_group_deferred_total{limit}`: times a round left work to a later one
    /// because it reached `MAX_OPENS_PER_ROUND` (once per group not opened) or
    /// `MAX_CHANGES_PER_ROUND` (once per round cut short).
    pub deferred: Family<LimitLabel, Counter>,
}

/// The label of `canal_shard_group_deferred_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LimitLabel {
    /// The limit reached.
    pub limit: String,
}

impl ShardGroupMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &mut Registry) -> ShardGroupMetrics {
        let m = ShardGroupMetrics::default();
        registry.register(
            "canal_shard_groups_hosted",
            "Shard groups (one Raft group per shard of the committed map) this node hosts now",
            m.hosted.clone(),
        );
        registry.register(
            "canal_shard_group_moves",
            "Steps this node took on shard groups, by step (form, add_learner, promote, remove, finish_joint, close, campaign, hand_off, hand_off_failed)",
            m.moves.clone(),
        );
        registry.register(
            "canal_shard_group_deferred",
            "Times a shard groups round left work to a later one because it reached a limit: MAX_OPENS_PER_ROUND (32; once per group not opened) or MAX_CHANGES_PER_ROUND (16; once per round cut short)",
            m.deferred.clone(),
        );
        m
    }

    fn cut(&self, limit: &str) {
        self.deferred
            .get_or_create(&LimitLabel {
                limit: limit.to_string(),
            })
            .inc();
    }

    fn count(&self, step: &str) {
        self.moves
            .get_or_create(&StepLabel {
                step: step.to_string(),
            })
            .inc();
    }
}

/// One shard group as this node's Raft metrics show it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Local {
    /// Whether this node hosts the group.
    pub hosted: bool,
    /// Its voters (both halves of a joint configuration).
    pub voters: BTreeSet<NodeId>,
    /// Its learners.
    pub learners: BTreeSet<NodeId>,
    /// While the membership is joint: the voters it is changing to.
    pub joint_target: Option<BTreeSet<NodeId>>,
    /// The leader this node knows.
    pub leader: Option<NodeId>,
    /// This node's last log index.
    pub last_index: u64,
    /// On the leader: each member's matched log index.
    pub matched: BTreeMap<NodeId, u64>,
}

impl Local {
    /// Whether the group has a membership here.
    pub fn formed(&self) -> bool {
        !self.voters.is_empty() || !self.learners.is_empty()
    }

    fn is_member(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }
}

/// What this node does next for one shard's group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do here now.
    Nothing,
    /// Open the group (this node is a replica and does not host it).
    Open,
    /// Form the group with these voters, if no other replica has a membership for it.
    Form(Vec<NodeId>),
    /// As leader: add this replica as a learner.
    AddLearner(NodeId),
    /// As leader: make these the voters (a caught-up learner promoted).
    Promote(Vec<NodeId>),
    /// As leader: remove this member (a learner, or a voter no longer wanted).
    Remove(NodeId),
    /// As leader: finish a joint membership left behind (a leader changed mid-change).
    FinishJoint(Vec<NodeId>),
    /// Close the group and purge it: this node is no replica and no member.
    Close,
    /// This node is no replica but its membership still names it: ask the other members
    /// whether they have left it out, and close once a majority of them has.
    ConfirmRemoved,
    /// A step under way that must finish first (a learner catching up).
    Wait(&'static str),
}

/// Whether the membership step `action`, which this node's leader answered with an error,
/// shows in group `local` all the same: a membership change whose answer was lost (a
/// timeout, or the leader stepping down as it committed, as a leader removing itself does)
/// may still have committed, and the next round then finds nothing to do. `None` for
/// what is no membership step.
pub fn took_effect(action: &Action, local: &Local) -> Option<bool> {
    let voters_are = |voters: &[NodeId]| {
        local.joint_target.is_none()
            && local
                .voters
                .iter()
                .copied()
                .eq(voters.iter().copied().collect::<BTreeSet<NodeId>>())
    };
    match action {
        Action::AddLearner(id) => Some(local.is_member(*id)),
        Action::Promote(voters) | Action::FinishJoint(voters) => Some(voters_are(voters)),
        Action::Remove(id) => Some(local.formed() && !local.is_member(*id)),
        _ => None,
    }
}

/// The next action for shard group `local` on node `me`, whose committed replicas are
/// `wanted` (the preferred leader first). One membership change at a time: what is under
/// way finishes before the next starts; a crash between two rounds loses nothing, since the
/// next round decides from the state again.
pub fn decide(me: NodeId, wanted: &[NodeId], local: &Local) -> Action {
    let is_replica = wanted.contains(&me);
    if !local.hosted {
        return if is_replica {
            Action::Open
        } else {
            Action::Nothing
        };
    }
    if !local.formed() {
        return match wanted.first() {
            Some(first) if *first == me => Action::Form(wanted.to_vec()),
            // Wait to be added by the group's leader.
            _ if is_replica => Action::Nothing,
            // Opened for an earlier map and never formed: nothing in it to keep.
            _ => Action::Close,
        };
    }
    if !local.is_member(me) {
        // Its own membership leaves it out: a former leader that removed itself (its
        // metrics may still name it the leader), or a member told of its removal. A
        // replica left out waits to be added back.
        return if is_replica {
            Action::Nothing
        } else {
            Action::Close
        };
    }
    if local.leader == Some(me) {
        return leader_step(me, wanted, local);
    }
    if is_replica {
        Action::Nothing
    } else {
        Action::ConfirmRemoved
    }
}

/// [`decide`] on the group's leader.
fn leader_step(me: NodeId, wanted: &[NodeId], local: &Local) -> Action {
    if let Some(target) = &local.joint_target {
        return Action::FinishJoint(target.iter().copied().collect());
    }
    let wanted_set: BTreeSet<NodeId> = wanted.iter().copied().collect();
    let caught_up = |id: &NodeId| {
        local
            .matched
            .get(id)
            .is_some_and(|m| m.saturating_add(CATCH_UP_SLACK) >= local.last_index)
    };
    if let Some(l) = local.learners.iter().find(|l| wanted_set.contains(l)) {
        if caught_up(l) {
            let mut voters = local.voters.clone();
            voters.insert(*l);
            return Action::Promote(voters.into_iter().collect());
        }
        return Action::Wait("a new replica is catching up as a learner");
    }
    if let Some(l) = local.learners.iter().find(|l| !wanted_set.contains(l)) {
        return Action::Remove(*l);
    }
    if let Some(m) = wanted.iter().find(|w| !local.is_member(**w)) {
        return Action::AddLearner(*m);
    }
    if local.voters.len() > 1 {
        let mut extra: Vec<NodeId> = local
            .voters
            .iter()
            .copied()
            .filter(|v| !wanted_set.contains(v))
            .collect();
        // Followers leave first; the leader removes itself last (it steps down once that
        // commits, and the rest elect).
        extra.sort_by_key(|v| *v == me);
        if let Some(x) = extra.first() {
            return Action::Remove(*x);
        }
    }
    Action::Nothing
}

/// Whether group `local` has the map's membership: `wanted` are its voters, with no
/// learner and no joint configuration, so no move is under way that a change of leader
/// would interrupt.
fn settled_as(wanted: &[NodeId], local: &Local) -> bool {
    local.joint_target.is_none()
        && local.learners.is_empty()
        && local
            .voters
            .iter()
            .copied()
            .eq(wanted.iter().copied().collect::<BTreeSet<NodeId>>())
}

/// Whether this node, the preferred leader of a shard (first in its replicas `wanted`),
/// should stand for the lead of its group `local` now: a voter following another leader,
/// the membership the map's (a move under way finishes first: an election in its middle
/// fails the step the leader was taking), and the group idle (`quiet`), where a campaign
/// is granted and costs no write its latency.
pub fn should_campaign(me: NodeId, wanted: &[NodeId], local: &Local, quiet: bool) -> bool {
    local.hosted
        && quiet
        && wanted.first() == Some(&me)
        && settled_as(wanted, local)
        && local.leader.is_some_and(|l| l != me)
}

/// Whether this node, leading the busy (not `quiet`) group `local` of a shard whose
/// replicas are `wanted` (the preferred leader first), should hand the lead to that
/// preferred leader now, and to whom: the membership is the map's (no change under way, no
/// learner), and the preferred leader is a voter that has caught up. An idle group needs
/// no hand-off: its preferred leader campaigns for it ([`should_campaign`]).
pub fn should_hand_off(
    me: NodeId,
    wanted: &[NodeId],
    local: &Local,
    quiet: bool,
) -> Option<NodeId> {
    let to = *wanted.first()?;
    let caught_up = local
        .matched
        .get(&to)
        .is_some_and(|m| m.saturating_add(CATCH_UP_SLACK) >= local.last_index);
    (local.hosted
        && !quiet
        && to != me
        && local.leader == Some(me)
        && settled_as(wanted, local)
        && caught_up)
        .then_some(to)
}

/// Shard `g`'s group as this node's local Raft metrics show it.
pub fn local_of<T: Transport>(consensus: &Consensus<T>, g: GroupId) -> Local {
    consensus
        .with_metrics(g, |m| {
            let membership = m.membership_config.membership();
            let joint = membership.get_joint_config();
            Local {
                hosted: true,
                voters: membership.voter_ids().collect(),
                learners: membership.learner_ids().collect(),
                joint_target: (joint.len() > 1).then(|| joint.last().cloned().unwrap_or_default()),
                leader: m.current_leader,
                last_index: m.last_log_index.unwrap_or(0),
                matched: m
                    .replication
                    .as_ref()
                    .map(|r| {
                        r.iter()
                            .map(|(id, l)| (*id, l.map_or(0, |l| l.index)))
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .unwrap_or_default()
}

/// Shard `shard`'s group as this node sees it, for `GET /v1/cluster/shards`.
pub fn status<T: Transport>(consensus: &Consensus<T>, shard: u32) -> ShardGroupStatus {
    let g = shard_group(shard);
    let Ok(s) = consensus.local_status(g) else {
        return ShardGroupStatus {
            group: g.to_string(),
            state: "not hosted here".into(),
            leader: None,
            voters: Vec::new(),
            learners: Vec::new(),
        };
    };
    let peer = |id: NodeId| {
        s.nodes
            .iter()
            .find(|(n, _)| *n == id)
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| format!("node {id}"))
    };
    let state = if s.nodes.is_empty() {
        "not formed"
    } else if consensus.is_quiescent(g) {
        "quiescent"
    } else {
        "active"
    };
    ShardGroupStatus {
        group: g.to_string(),
        state: state.into(),
        leader: s.leader.map(peer),
        voters: s.voters.iter().map(|v| peer(*v)).collect(),
        learners: s.learners.iter().map(|v| peer(*v)).collect(),
    }
}

/// Where each shard group's replicas are, as the committed map names them (preferred leader
/// first) with their addresses: what [`directory`] answers. Rebuilt by the job when the
/// map's epoch or the cluster's members change.
#[derive(Default)]
pub struct Directory {
    /// The map's epoch and the members it was built from.
    built_from: Option<(u64, Vec<NodeId>)>,
    replicas: BTreeMap<GroupId, Vec<RaftNode>>,
}

/// A [`Directory`] the job keeps and the consensus layer asks.
pub type SharedDirectory = Arc<std::sync::RwLock<Directory>>;

/// The consensus layer's directory ([`Consensus::set_directory`]) over `d`: the replicas of
/// a shard group not hosted here, so its writes and reads reach them.
pub fn directory(d: SharedDirectory) -> canal_consensus::Directory {
    Arc::new(move |g: GroupId| {
        d.read()
            .unwrap_or_else(|p| p.into_inner())
            .replicas
            .get(&g)
            .cloned()
            .unwrap_or_default()
    })
}

/// The Raft nodes of the cluster (the metadata group's members), by node id: where a shard
/// group's replicas are reached.
fn cluster_nodes<T: Transport>(consensus: &Consensus<T>) -> BTreeMap<NodeId, RaftNode> {
    consensus
        .with_metrics(GroupId::METADATA, |m| {
            m.membership_config
                .membership()
                .nodes()
                .map(|(id, n)| (*id, n.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// What another replica or member answers this node's status request for a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// It hosts the group with no membership.
    Empty,
    /// It has a membership for the group that names this node (it answered).
    Member,
    /// It has a membership for the group that leaves this node out (its view does not
    /// name this node, or it refused the question).
    LeftOut,
    /// No view: it does not host the group, or did not answer.
    Unknown,
}

/// Whether a group may be formed by its first replica, given what the `others` of its
/// `replicas` replicas said and what the replicas of the previous map that are no replicas
/// now (`earlier`) said: none has a membership (a group of the shard exists: it adds this
/// node instead), and with this node a majority of the replicas host it empty (so the new
/// group can elect).
pub fn may_form(replicas: usize, others: &[Peer], earlier: &[Peer]) -> bool {
    let formed = |p: &Peer| matches!(p, Peer::Member | Peer::LeftOut);
    let empty = others.iter().filter(|p| **p == Peer::Empty).count();
    !others.iter().chain(earlier).any(formed) && empty + 1 > replicas / 2
}

/// Whether this node, no replica of a group but still a member in its own view, is removed:
/// a majority of the other members it knows have a membership that leaves it out.
pub fn removed_by(others: &[Peer]) -> bool {
    let out = others.iter().filter(|p| **p == Peer::LeftOut).count();
    !others.is_empty() && out > others.len() / 2
}

/// The shard groups job, a [`canal_worker::Worker`]: see the module.
pub struct ShardGroupsJob<T: Transport> {
    consensus: Consensus<T>,
    metrics: ShardGroupMetrics,
    tick: tokio::time::Interval,
    /// Where the next round starts among the groups, so a round cut short by its bounds
    /// leaves the rest first in line (fairness only: no decision depends on it).
    next: usize,
    /// When this node last stood for each group's lead (a rate limit only).
    campaigned: BTreeMap<GroupId, std::time::Instant>,
    /// Since when this node has seen each group it should lead quiet, for the groups it is
    /// the preferred leader of: a campaign waits for [`IDLE_LEASES`] leases of it.
    quiet_since: BTreeMap<GroupId, std::time::Instant>,
    /// When this node last began handing each group's lead on (a rate limit only).
    handed: BTreeMap<GroupId, std::time::Instant>,
    /// The hand-off under way, if any: one at a time, since each holds its group's
    /// writes for about a leader lease.
    handing: Option<tokio::task::JoinHandle<()>>,
    /// Where every shard group's replicas are, for the consensus layer.
    directory: SharedDirectory,
    /// Membership steps whose answer was an error, by group: counted once a later round
    /// sees they took effect ([`took_effect`]), so each step that happened counts once.
    unanswered: BTreeMap<GroupId, (&'static str, Action)>,
}

impl<T: Transport> ShardGroupsJob<T> {
    /// The job, not started yet ([`canal_worker::spawn`] starts it).
    pub fn new(consensus: Consensus<T>, metrics: ShardGroupMetrics) -> Self {
        ShardGroupsJob {
            consensus,
            metrics,
            tick: canal_worker::ticker(LOOK_EVERY),
            next: 0,
            campaigned: BTreeMap::new(),
            quiet_since: BTreeMap::new(),
            handed: BTreeMap::new(),
            handing: None,
            directory: SharedDirectory::default(),
            unanswered: BTreeMap::new(),
        }
    }

    /// The directory this job keeps ([`directory`] turns it into the consensus layer's).
    pub fn shared_directory(&self) -> SharedDirectory {
        self.directory.clone()
    }

    /// Rebuilds the directory if the map's epoch or the members changed since.
    fn refresh_directory(
        &self,
        map: &canal_proto::shards::ShardMap,
        nodes: &BTreeMap<NodeId, RaftNode>,
        wanted: &BTreeMap<GroupId, Vec<NodeId>>,
    ) {
        let key = (map.epoch, nodes.keys().copied().collect::<Vec<_>>());
        let stale = self
            .directory
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .built_from
            .as_ref()
            != Some(&key);
        if !stale {
            return;
        }
        let replicas = wanted
            .iter()
            .map(|(g, ids)| {
                (
                    *g,
                    ids.iter().filter_map(|id| nodes.get(id).cloned()).collect(),
                )
            })
            .collect();
        *self.directory.write().unwrap_or_else(|p| p.into_inner()) = Directory {
            built_from: Some(key),
            replicas,
        };
    }

    /// What `node` says of group `g` to this node.
    async fn ask(&self, g: GroupId, node: &RaftNode) -> Peer {
        let me = self.consensus.node_id();
        match self.consensus.status_of(g, node).await {
            Ok(s) if s.nodes.is_empty() => Peer::Empty,
            // Any member of the cluster may ask a member for its view (status is a client
            // operation): the view itself says whether this node is still in it.
            Ok(s) if s.nodes.iter().any(|(id, _)| *id == me) => Peer::Member,
            Ok(_) => Peer::LeftOut,
            Err(ClientError::Refused { .. }) => Peer::LeftOut,
            Err(_) => Peer::Unknown,
        }
    }

    /// What each of `ids` but this node says of `g`, asked at once.
    async fn ask_all(
        &self,
        g: GroupId,
        ids: impl Iterator<Item = NodeId>,
        nodes: &BTreeMap<NodeId, RaftNode>,
    ) -> Vec<Peer> {
        let me = self.consensus.node_id();
        let asks = ids.filter(|id| *id != me).map(|id| async move {
            match nodes.get(&id) {
                Some(n) => self.ask(g, n).await,
                None => Peer::Unknown,
            }
        });
        futures::future::join_all(asks).await
    }

    /// Takes `action` for shard group `g`, whose replicas in the previous map were
    /// `earlier`; `true` if it counted against the round's changes.
    async fn take(
        &mut self,
        g: GroupId,
        action: Action,
        earlier: &[NodeId],
        nodes: &BTreeMap<NodeId, RaftNode>,
    ) -> bool {
        let c = &self.consensus;
        let tried = action.clone();
        let (step, result) = match action {
            Action::Nothing | Action::Open | Action::Wait(_) => return false,
            Action::Form(voters) => {
                let others = self.ask_all(g, voters.iter().copied(), nodes).await;
                let gone = earlier.iter().filter(|e| !voters.contains(e)).copied();
                let before = self.ask_all(g, gone, nodes).await;
                if !may_form(voters.len(), &others, &before) {
                    debug!(group = %g, ?others, ?before, "not forming the shard group: a replica has one, or too few host it yet");
                    return true;
                }
                let members: Option<BTreeMap<NodeId, RaftNode>> = voters
                    .iter()
                    .map(|v| nodes.get(v).map(|n| (*v, n.clone())))
                    .collect();
                let Some(members) = members else {
                    debug!(group = %g, "a replica of the shard is no cluster member yet");
                    return true;
                };
                ("form", c.initialize_group(g, members).await)
            }
            Action::AddLearner(id) => {
                let Some(node) = nodes.get(&id) else {
                    debug!(group = %g, node = id, "the new replica is no cluster member yet");
                    return true;
                };
                ("add_learner", c.add_learner(g, id, node.clone()).await)
            }
            Action::Promote(voters) => ("promote", c.set_voters(g, voters).await),
            Action::FinishJoint(voters) => ("finish_joint", c.set_voters(g, voters).await),
            Action::Remove(id) => ("remove", c.remove(g, id).await),
            Action::ConfirmRemoved => {
                let local = local_of(c, g);
                let ids = local.voters.iter().chain(&local.learners).copied();
                let others = self.ask_all(g, ids, nodes).await;
                if !removed_by(&others) {
                    return true;
                }
                ("close", self.close(g).await)
            }
            Action::Close => ("close", self.close(g).await),
        };
        match result {
            Ok(()) => {
                info!(group = %g, step, "shard group step done");
                self.metrics.count(step);
                self.unanswered.remove(&g);
            }
            Err(e) => {
                info!(group = %g, step, error = %e, "shard group step failed; the next round decides again");
                if took_effect(&tried, &Local::default()).is_some() {
                    self.unanswered.insert(g, (step, tried));
                }
            }
        }
        true
    }

    /// Counts the step left unanswered for `g` if it shows in `local` now. It is kept while
    /// the next action is the same step (it may still commit, or its retry be answered),
    /// and forgotten once the next action is another.
    fn confirm_unanswered(&mut self, g: GroupId, local: &Local, next: &Action) {
        let Some((step, tried)) = self.unanswered.remove(&g) else {
            return;
        };
        let me = self.consensus.node_id();
        // Still the leader, or the leader that removed itself: no other node took the step.
        let ours = local.leader == Some(me) || tried == Action::Remove(me);
        if ours && took_effect(&tried, local) == Some(true) {
            info!(group = %g, step, "a shard group step answered with an error took effect");
            self.metrics.count(step);
        } else if *next == tried {
            self.unanswered.insert(g, (step, tried));
        }
    }

    async fn close(&self, g: GroupId) -> Result<(), ClientError> {
        self.consensus
            .close_group(g, true)
            .await
            .map_err(|e| ClientError::Other(e.to_string()))
    }

    /// One round: every shard of the committed map, and every hosted shard group the map
    /// does not name, decided and acted on within the round's bounds.
    pub async fn round(&mut self) {
        let Some(map) = shard_map::committed(&self.consensus) else {
            return;
        };
        let me = self.consensus.node_id();
        let nodes = cluster_nodes(&self.consensus);
        let by_peer: BTreeMap<&str, NodeId> = nodes
            .iter()
            .map(|(id, n)| (n.peer_id.as_str(), *id))
            .collect();
        let ids_of = |replicas: &[String]| -> Vec<NodeId> {
            replicas
                .iter()
                .filter_map(|p| match by_peer.get(p.as_str()) {
                    Some(id) => Some(*id),
                    // A replica the metadata group does not know is reached by nobody;
                    // computed from the peer id all the same, so a node knows itself.
                    None => p
                        .parse::<libp2p::PeerId>()
                        .ok()
                        .map(|p| crate::cluster::node_id(&p)),
                })
                .collect()
        };
        let mut wanted: BTreeMap<GroupId, Vec<NodeId>> = BTreeMap::new();
        for a in &map.assignments {
            wanted.insert(shard_group(a.shard), ids_of(&a.replicas));
        }
        self.refresh_directory(&map, &nodes, &wanted);
        let previous = shard_map::previous(&self.consensus);
        let earlier = |g: GroupId| -> Vec<NodeId> {
            match (&previous, shard_of_group(g)) {
                (Some(p), Some(s)) => ids_of(p.replicas(s)),
                _ => Vec::new(),
            }
        };
        // Hosted shard groups the map does not name keep no replica here.
        for g in self.consensus.groups() {
            if shard_of_group(g).is_some() {
                wanted.entry(g).or_default();
            }
        }
        let (mut opens, mut changes) = (0usize, 0usize);
        let mut deferred_opens = false;
        let wanted: Vec<(GroupId, Vec<NodeId>)> = wanted.into_iter().collect();
        let start = self.next % wanted.len().max(1);
        self.next = start;
        for (k, (g, ids)) in wanted
            .iter()
            .cycle()
            .skip(start)
            .take(wanted.len())
            .enumerate()
        {
            if changes >= MAX_CHANGES_PER_ROUND {
                self.metrics.cut("MAX_CHANGES_PER_ROUND");
                self.next = start + k;
                break;
            }
            let local = local_of(&self.consensus, *g);
            let next = decide(me, ids, &local);
            self.confirm_unanswered(*g, &local, &next);
            match next {
                Action::Open => {
                    if opens >= MAX_OPENS_PER_ROUND {
                        self.metrics.cut("MAX_OPENS_PER_ROUND");
                        deferred_opens = true;
                        continue;
                    }
                    opens += 1;
                    if let Err(e) = self.consensus.open_group(*g).await {
                        deferred_opens = true;
                        warn!(group = %g, error = %e, "cannot open the shard group");
                    }
                }
                action => {
                    if self.take(*g, action, &earlier(*g), &nodes).await {
                        changes += 1;
                    }
                }
            }
        }
        // The shard count is fixed with the first map. Once this node has opened the
        // groups the map gives it (the first time), it routes by it: a client's first
        // publish or subscription does not find its group missing here.
        if !deferred_opens && changes < MAX_CHANGES_PER_ROUND {
            self.consensus.learn_shard_count(map.shards);
        }
        self.campaign(me, &wanted).await;
        self.hand_off(me, &wanted);
        let hosted = self
            .consensus
            .groups()
            .into_iter()
            .filter(|g| shard_of_group(*g).is_some())
            .count();
        self.metrics.hosted.set(hosted as i64);
    }

    /// Leadership spread: where this node is a shard's preferred leader and the idle group
    /// is led by another, it stands for the lead (at most [`MAX_CAMPAIGNS_PER_ROUND`] a
    /// round, once per [`CAMPAIGN_EVERY`] a group).
    async fn campaign(&mut self, me: NodeId, wanted: &[(GroupId, Vec<NodeId>)]) {
        let mut started = 0;
        self.campaigned
            .retain(|_, at| at.elapsed() < CAMPAIGN_EVERY);
        // Idle means quiet for longer than a hand-off keeps its group quiet: a hand-off to
        // this node goes quiet for about a lease before it asks this node to stand, and a
        // campaign meanwhile (refused: the lease holds) wakes the group and fails it.
        let now = std::time::Instant::now();
        let idle_after = self.consensus.leader_lease() * IDLE_LEASES;
        let mut idle = BTreeSet::new();
        let preferred = |ids: &Vec<NodeId>| ids.first() == Some(&me);
        for (g, _) in wanted.iter().filter(|(_, ids)| preferred(ids)) {
            if !self.consensus.is_quiescent(*g) {
                self.quiet_since.remove(g);
            } else if now.duration_since(*self.quiet_since.entry(*g).or_insert(now)) >= idle_after {
                idle.insert(*g);
            }
        }
        self.quiet_since
            .retain(|g, _| wanted.iter().any(|(w, ids)| w == g && preferred(ids)));
        for (g, ids) in wanted {
            if started >= MAX_CAMPAIGNS_PER_ROUND {
                break;
            }
            if ids.first() != Some(&me) || self.campaigned.contains_key(g) {
                continue;
            }
            let local = local_of(&self.consensus, *g);
            if !should_campaign(me, ids, &local, idle.contains(g)) {
                continue;
            }
            self.campaigned.insert(*g, std::time::Instant::now());
            started += 1;
            match self.consensus.campaign(*g).await {
                Ok(()) => {
                    self.metrics.count("campaign");
                    info!(group = %g, leader = ?local.leader, "standing for the lead of an idle shard group this node should lead");
                }
                Err(e) => debug!(group = %g, error = %e, "cannot stand for the lead"),
            }
        }
    }
}

impl<T: Transport> ShardGroupsJob<T> {
    /// Leadership spread for busy groups: where this node leads a busy group whose shard
    /// prefers another leader, it hands the lead over ([`Consensus::hand_off`]), one group
    /// at a time, each at most once per [`CAMPAIGN_EVERY`].
    fn hand_off(&mut self, me: NodeId, wanted: &[(GroupId, Vec<NodeId>)]) {
        if self.handing.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        self.handing = None;
        self.handed.retain(|_, at| at.elapsed() < CAMPAIGN_EVERY);
        for (g, ids) in wanted {
            if self.handed.contains_key(g) {
                continue;
            }
            let local = local_of(&self.consensus, *g);
            let Some(to) = should_hand_off(me, ids, &local, self.consensus.is_quiescent(*g)) else {
                continue;
            };
            self.handed.insert(*g, std::time::Instant::now());
            let (consensus, metrics, g) = (self.consensus.clone(), self.metrics.clone(), *g);
            self.handing = Some(tokio::spawn(async move {
                match consensus.hand_off(g, to).await {
                    Ok(()) => metrics.count("hand_off"),
                    Err(e) => {
                        metrics.count("hand_off_failed");
                        info!(group = %g, to, error = %e, "handing the lead of a busy shard group on failed; the group goes on under its leader");
                    }
                }
            }));
            return;
        }
    }
}

impl<T: Transport> Drop for ShardGroupsJob<T> {
    fn drop(&mut self) {
        // A hand-off holds its group's writes: it ends with the job, not after it.
        if let Some(h) = self.handing.take() {
            h.abort();
        }
    }
}

impl<T: Transport> canal_worker::Worker for ShardGroupsJob<T> {
    fn name(&self) -> &'static str {
        "shard-groups"
    }

    async fn wait(&mut self) {
        self.tick.tick().await;
    }

    async fn work(&mut self) -> canal_worker::Flow {
        self.round().await;
        canal_worker::Flow::Continue
    }
}

#[cfg(test)]
#[path = "shard_groups_tests.rs"]
mod tests;
