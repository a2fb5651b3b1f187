//! The shard map on a running node: the metadata leader computes it from the Raft members and
//! the peer table ([`canal_placement::shards::compute`]) and commits it as the metadata
//! record `\x01D/map` ([`canal_consensus::InternalKey::ShardMap`]); every node reads its
//! replica's copy for `GET /v1/cluster/shards` and `locate`.
//!
//! ```text
//!   metadata leader, every LOOK_EVERY:
//!     members (voters + learners) + peer table (tier, labels; a member out of it for
//!     DOWN_AFTER is down)
//!       ─ unchanged for SETTLE, and MIN_BETWEEN since the last commit? ─>
//!     compute(policy, peers, committed map) ─ other replicas? ─> commit epoch + 1
//!   every node: canal_shard_map_epoch, canal_shard_map_moves from its replica's map
//! ```
//!
//! The map moves no data: every topic's log stays in the data group `routing::group_of`
//! names (data group 1) until routing by shard lands, and the moves between two maps
//! ([`canal_placement::shards::plan_moves`]) are shown. With `--shard-groups on`,
//! [`crate::shard_groups`] hosts each shard's own (still empty) group on the map's replicas
//! and moves its replicas as the map changes.
//!
//! The shard count is fixed when the cluster is created: the first map takes this node's
//! `--shards`, and every later map keeps the committed count (the apply refuses another), so
//! a node started with a different value says so in its log and uses the committed one.

use crate::placement::PeerSource;
use canal_consensus::keys::{SHARD_MAP, SHARD_MAP_CURRENT, SHARD_MAP_PREVIOUS};
use canal_consensus::{Consensus, GroupId, InternalKey, Op, Transport};
use canal_dht::PeerView;
use canal_dht::topology::peer_key;
use canal_placement::shards::{Move, ShardError, ShardPeer, ShardPolicy, compute, plan_moves};
use canal_proto::Capabilities;
use canal_proto::api::{ClusterShards, ShardLoad, ShardMove, ShardRow};
use canal_proto::shards::ShardMap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How often the job looks at the members and the peer table.
pub const LOOK_EVERY: Duration = Duration::from_secs(1);
/// How long what the map is computed from must stay the same before a new map is
/// committed: a peer that flaps faster never moves the map.
pub const SETTLE: Duration = Duration::from_secs(3);
/// The least time between two maps this leader commits: a peer that flaps slower moves the
/// map at most this often.
pub const MIN_BETWEEN: Duration = Duration::from_secs(5);
/// How long a job waits after it starts before it decides: long enough for the peer table
/// to hold every live peer (a record every few seconds; a silent peer leaves it after
/// 10 s), so a leader that has just started does not take its members for gone.
pub const WARM_UP: Duration = Duration::from_secs(10);
/// How long the inputs of the cluster's first map must stay the same: the first map waits
/// for no [`WARM_UP`] (no data can be written before it exists) but for every member of the
/// metadata group to be in the peer table, so no member's tier and labels are missing.
pub const FIRST_SETTLE: Duration = Duration::from_secs(1);
/// How long a member must be missing from the peer table before the map counts it down and
/// places its replicas elsewhere: a restart or a short partition moves nothing (compare
/// CockroachDB's `server.time_until_store_dead`).
pub const DOWN_AFTER: Duration = Duration::from_secs(30);
/// The label replicas of a shard are spread over, when peers carry it.
pub const SPREAD_LABEL: &str = "zone";

/// The map's metrics.
#[derive(Clone, Default)]
pub struct ShardMapMetrics {
    /// `canal_shard_map_epoch`: the epoch of the map in this node's replica (0: none yet).
    pub epoch: Gauge,
    /// `canal_shard_map_changes_total`: maps this node committed as the metadata leader.
    pub changes: Counter,
    /// `canal_shard_map_moves`: the planned (not executed) steps from the previous map to
    /// the committed one.
    pub moves: Gauge,
}

impl ShardMapMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &mut Registry) -> ShardMapMetrics {
        let m = ShardMapMetrics::default();
        registry.register(
            "canal_shard_map_epoch",
            "Epoch of the shard map committed in the metadata group, as this node's replica holds it (0: none yet)",
            m.epoch.clone(),
        );
        registry.register(
            "canal_shard_map_changes",
            "Shard maps this node committed as the metadata leader",
            m.changes.clone(),
        );
        registry.register(
            "canal_shard_map_moves",
            "Replica moves from the previous shard map to the committed one (the shard groups' leaders make them one at a time)",
            m.moves.clone(),
        );
        m
    }
}

/// A map stored under `name` in this node's replica; `None` when there is none or it does
/// not decode (the apply only stores maps that do).
fn stored<T: Transport>(consensus: &Consensus<T>, name: &str) -> Option<ShardMap> {
    let sm = consensus.state_machine(GroupId::METADATA).ok()?;
    let bytes = sm.record(&SHARD_MAP, name).ok()??;
    ShardMap::decode(&bytes).ok()
}

/// The committed shard map, from this node's replica of the metadata group.
pub fn committed<T: Transport>(consensus: &Consensus<T>) -> Option<ShardMap> {
    stored(consensus, SHARD_MAP_CURRENT)
}

/// The map the committed one replaced, from this node's replica.
pub fn previous<T: Transport>(consensus: &Consensus<T>) -> Option<ShardMap> {
    stored(consensus, SHARD_MAP_PREVIOUS)
}

/// What the map is computed from, of one peer: its id, tier and labels (the constraints and
/// the spread read nothing else; load and memory change all the time and would keep the
/// input from ever settling).
fn placement_caps(caps: &Capabilities) -> Capabilities {
    Capabilities {
        peer_id: caps.peer_id.clone(),
        tier: caps.tier.clone(),
        labels: caps.labels.clone(),
        ..Capabilities::default()
    }
}

/// The peers the map is computed from: every Raft member of the metadata group, alive unless
/// it is in `down`, with the tier and labels of its latest record in the peer table (`seen`
/// keeps them for a member that has left the table). Sorted by id; a member whose id does
/// not parse is left out.
pub fn shard_peers(
    members: &[String],
    table: &[PeerView],
    down: &BTreeSet<String>,
    seen: &mut BTreeMap<String, Capabilities>,
) -> Vec<ShardPeer> {
    for v in table {
        seen.insert(v.peer_id.to_base58(), placement_caps(&v.caps));
    }
    // Only members are remembered: a peer removed for good leaves no trace.
    seen.retain(|id, _| members.contains(id));
    let mut out: Vec<ShardPeer> = members
        .iter()
        .filter_map(|id| {
            let peer: libp2p::PeerId = id.parse().ok()?;
            let caps = seen.get(id).cloned().unwrap_or_else(|| Capabilities {
                peer_id: id.clone(),
                ..Capabilities::default()
            });
            Some(ShardPeer::new(
                id.clone(),
                peer_key(&peer),
                caps,
                !down.contains(id),
            ))
        })
        .collect();
    out.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
    out.dedup_by(|a, b| a.peer_id == b.peer_id);
    out
}

/// The members that have been missing from the peer table for `down_after` or longer at
/// `now`: `present` says when each was last in it, and a member never seen counts from
/// `started`, when the job began to watch. Updates `present` from `table` and forgets
/// peers that are no members.
pub fn down_members(
    members: &[String],
    table: &[PeerView],
    present: &mut BTreeMap<String, Instant>,
    started: Instant,
    now: Instant,
    down_after: Duration,
) -> BTreeSet<String> {
    for v in table {
        present.insert(v.peer_id.to_base58(), now);
    }
    present.retain(|id, _| members.contains(id));
    members
        .iter()
        .filter(|id| {
            let last = present.get(*id).copied().unwrap_or(started);
            now.saturating_duration_since(last) >= down_after
        })
        .cloned()
        .collect()
}

/// The policy for `peers`: `shards` shards, K = `replication` or the number of live peers
/// when fewer (at least 1), spread over [`SPREAD_LABEL`] when a live peer carries it.
pub fn policy_for(shards: u32, replication: usize, peers: &[ShardPeer]) -> ShardPolicy {
    let live = peers.iter().filter(|p| p.alive).count();
    let zoned = peers
        .iter()
        .any(|p| p.alive && p.caps.labels.contains_key(SPREAD_LABEL));
    ShardPolicy {
        shards,
        replication: replication.min(live).max(1),
        spread: zoned.then(|| SPREAD_LABEL.to_string()),
        ..ShardPolicy::default()
    }
}

/// The map to commit after `current` for `peers`: `None` when the replicas would stay as
/// they are (a changed note alone is no new map); otherwise the new map at `current`'s
/// epoch + 1 (1 for the first).
pub fn next_map(
    policy: &ShardPolicy,
    peers: &[ShardPeer],
    current: Option<&ShardMap>,
) -> Result<Option<ShardMap>, ShardError> {
    let plan = compute(policy, peers, current)?;
    let mut map = plan.map;
    match current {
        Some(c)
            if c.shards == map.shards
                && c.replication == map.replication
                && c.spread == map.spread
                && c.assignments.len() == map.assignments.len()
                && c.assignments
                    .iter()
                    .zip(&map.assignments)
                    .all(|(a, b)| a.replicas == b.replicas) =>
        {
            Ok(None)
        }
        Some(c) => {
            map.epoch = c.epoch.saturating_add(1);
            Ok(Some(map))
        }
        None => {
            map.epoch = 1;
            Ok(Some(map))
        }
    }
}

/// A planned step as the API shows it.
fn show_move(m: &Move) -> ShardMove {
    let (step, peer, to) = match m {
        Move::AddLearner { peer, .. } => ("add_learner", peer, None),
        Move::Promote { peer, .. } => ("promote", peer, None),
        Move::TransferLeader { from, to, .. } => ("transfer_leader", from, Some(to.clone())),
        Move::Remove { peer, .. } => ("remove", peer, None),
    };
    ShardMove {
        shard: m.shard(),
        step: step.to_string(),
        peer: peer.clone(),
        to,
    }
}

/// `GET /v1/cluster/shards` from a committed map, the one it replaced, and the leader of a
/// group as the answering node knows it.
pub fn view(
    map: Option<&ShardMap>,
    previous: Option<&ShardMap>,
    group_leader: &dyn Fn(GroupId) -> Option<String>,
) -> ClusterShards {
    let Some(map) = map else {
        return ClusterShards {
            epoch: 0,
            shards: 0,
            replication: 0,
            spread: None,
            rows: Vec::new(),
            peers: Vec::new(),
            notes: vec![
                "no shard map is committed yet: the metadata leader commits one once the cluster has formed".into(),
            ],
            moves_from: None,
            moves: Vec::new(),
        };
    };
    // Many shards share a group: its leader is asked for once.
    let mut leaders: BTreeMap<GroupId, Option<String>> = BTreeMap::new();
    let mut loads: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for a in &map.assignments {
        for (i, p) in a.replicas.iter().enumerate() {
            let l = loads.entry(p.as_str()).or_default();
            l.0 += 1;
            if i == 0 {
                l.1 += 1;
            }
        }
    }
    ClusterShards {
        epoch: map.epoch,
        shards: map.shards,
        replication: map.replication,
        spread: map.spread.clone(),
        rows: map
            .assignments
            .iter()
            .map(|a| {
                let group = serving_group(a.shard);
                ShardRow {
                    shard: a.shard,
                    replicas: a.replicas.clone(),
                    shortfall: a.shortfall.clone(),
                    served_by: group.to_string(),
                    group_leader: leaders
                        .entry(group)
                        .or_insert_with(|| group_leader(group))
                        .clone(),
                    shard_group: None,
                }
            })
            .collect(),
        peers: loads
            .into_iter()
            .map(|(p, (replicas, leaders))| ShardLoad {
                peer_id: p.to_string(),
                replicas,
                leaders,
            })
            .collect(),
        notes: map.notes.clone(),
        moves_from: previous.map(|p| p.epoch),
        moves: previous
            .map(|p| plan_moves(p, map).iter().map(show_move).collect())
            .unwrap_or_default(),
    }
}

/// The group that holds the logs of `shard`'s topics: its shard group. (A test checks that
/// this agrees with the route of the topics, so a change of routing cannot leave this
/// answer behind.)
pub fn serving_group(shard: u32) -> GroupId {
    canal_consensus::routing::shard_group(shard)
}

/// Whether a round at `now` may commit a map: the job has run for [`WARM_UP`], its inputs
/// have not changed since `settled_since` for [`SETTLE`], and its last commit is
/// [`MIN_BETWEEN`] ago. Inputs that change faster than SETTLE never commit; slower, at most
/// one map per MIN_BETWEEN.
pub fn may_commit(
    now: Instant,
    started: Instant,
    settled_since: Instant,
    last_commit: Option<Instant>,
) -> bool {
    now.saturating_duration_since(started) >= WARM_UP
        && now.saturating_duration_since(settled_since) >= SETTLE
        && last_commit.is_none_or(|t| now.saturating_duration_since(t) >= MIN_BETWEEN)
}

/// What the job remembers between rounds.
struct Seen {
    /// The inputs of the last round, and since when they have not changed.
    inputs: Vec<ShardPeer>,
    since: Instant,
    /// When this node last committed a map.
    last_commit: Option<Instant>,
    /// Tier and labels of members, as last seen in the peer table.
    caps: BTreeMap<String, Capabilities>,
    /// When each member was last in the peer table.
    present: BTreeMap<String, Instant>,
    /// The epoch the moves gauge was computed for.
    moves_epoch: Option<u64>,
    /// Whether the log said that the cluster's shard count is not this node's `--shards`.
    told_shards: bool,
}

/// The shard map job, a [`canal_worker::Worker`]: see the module.
pub struct ShardMapJob<T: Transport> {
    consensus: Consensus<T>,
    peers: Arc<dyn PeerSource>,
    /// This node's `--shards`: the count of the first map, if this node commits it.
    shards: u32,
    /// This node's `--replication-factor` (K).
    replication: usize,
    metrics: ShardMapMetrics,
    started: Instant,
    /// [`DOWN_AFTER`], shorter in tests.
    down_after: Duration,
    seen: Seen,
    tick: tokio::time::Interval,
}

impl<T: Transport> ShardMapJob<T> {
    /// The job, not started yet ([`canal_worker::spawn`] starts it).
    pub fn new(
        consensus: Consensus<T>,
        peers: Arc<dyn PeerSource>,
        shards: u32,
        replication: usize,
        metrics: ShardMapMetrics,
    ) -> Self {
        ShardMapJob {
            consensus,
            peers,
            shards,
            replication,
            metrics,
            started: Instant::now(),
            down_after: DOWN_AFTER,
            seen: Seen {
                inputs: Vec::new(),
                since: Instant::now(),
                last_commit: None,
                caps: BTreeMap::new(),
                present: BTreeMap::new(),
                moves_epoch: None,
                told_shards: false,
            },
            tick: canal_worker::ticker(LOOK_EVERY),
        }
    }

    /// Keeps the gauges at this node's replica's map, and says once when the cluster's shard
    /// count is not this node's `--shards`.
    fn observe(&mut self, current: Option<&ShardMap>) {
        let Some(map) = current else {
            return;
        };
        self.metrics.epoch.set(map.epoch as i64);
        if self.seen.moves_epoch != Some(map.epoch) {
            let moves = previous(&self.consensus).map_or(0, |p| plan_moves(&p, map).len());
            self.metrics.moves.set(moves as i64);
            self.seen.moves_epoch = Some(map.epoch);
        }
        if map.shards != self.shards && !self.seen.told_shards {
            warn!(
                configured = self.shards,
                cluster = map.shards,
                "this node was started with --shards {}, but the cluster has {} shards, fixed when it was created: using {}",
                self.shards,
                map.shards,
                map.shards
            );
            self.seen.told_shards = true;
        }
    }

    /// One round on the metadata leader: commits a new map when the inputs have settled and
    /// the replicas would change.
    async fn decide(&mut self, current: Option<ShardMap>) {
        let Ok(status) = self.consensus.local_status(GroupId::METADATA) else {
            return;
        };
        let members: Vec<String> = status.nodes.iter().map(|(_, p)| p.clone()).collect();
        let table = self.peers.peers();
        let now = Instant::now();
        let down = down_members(
            &members,
            &table,
            &mut self.seen.present,
            self.started,
            now,
            self.down_after,
        );
        let inputs = shard_peers(&members, &table, &down, &mut self.seen.caps);
        if inputs != self.seen.inputs {
            self.seen.inputs = inputs;
            self.seen.since = now;
            return;
        }
        let first_ready = current.is_none()
            && now.saturating_duration_since(self.seen.since) >= FIRST_SETTLE
            && members
                .iter()
                .all(|m| table.iter().any(|p| p.peer_id.to_base58() == *m));
        if !(first_ready || may_commit(now, self.started, self.seen.since, self.seen.last_commit))
            || !inputs.iter().any(|p| p.alive)
        {
            return;
        }
        let shards = current.as_ref().map_or(self.shards, |m| m.shards);
        let policy = policy_for(shards, self.replication, &inputs);
        let map = match next_map(&policy, &inputs, current.as_ref()) {
            Ok(Some(map)) => map,
            Ok(None) => return,
            Err(e) => {
                warn!(error = %e, "the shard map cannot be computed");
                return;
            }
        };
        let bytes = match map.encode() {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "the shard map does not encode");
                return;
            }
        };
        self.seen.last_commit = Some(now);
        let written = self
            .consensus
            .write_op(
                GroupId::METADATA,
                Op::Internal {
                    key: InternalKey::ShardMap,
                    value: Some(bytes),
                },
            )
            .await;
        match written {
            Ok(r) if r.refused.is_none() => {
                self.metrics.changes.inc();
                let moves = current.as_ref().map_or(0, |c| plan_moves(c, &map).len());
                let moved = current
                    .as_ref()
                    .map(|c| canal_placement::shards::movement(c, &map));
                info!(
                    epoch = map.epoch,
                    shards = map.shards,
                    replication = map.replication,
                    spread = ?map.spread,
                    peers = inputs.iter().filter(|p| p.alive).count(),
                    added = moved.map_or(0, |m| m.added),
                    removed = moved.map_or(0, |m| m.removed),
                    lower_bound = moved.map_or(0, |m| m.lower_bound),
                    leader_changes = moved.map_or(0, |m| m.leader_changes),
                    moves,
                    "shard map committed; each shard group's leader moves its replicas one at a time"
                );
            }
            Ok(r) => {
                info!(epoch = map.epoch, why = ?r.refused, "shard map refused; the next round computes from the committed one");
            }
            Err(e) => {
                info!(epoch = map.epoch, error = %e, "shard map not committed; the next round tries again");
            }
        }
    }
}

impl<T: Transport> canal_worker::Worker for ShardMapJob<T> {
    fn name(&self) -> &'static str {
        "shard-map"
    }

    async fn wait(&mut self) {
        self.tick.tick().await;
    }

    async fn work(&mut self) -> canal_worker::Flow {
        let current = committed(&self.consensus);
        self.observe(current.as_ref());
        if self.consensus.is_leader(GroupId::METADATA) {
            self.decide(current).await;
        }
        canal_worker::Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{self, Cluster, FixedPeers};
    use libp2p::PeerId;

    fn view_of(p: PeerId, labels: &[(&str, &str)]) -> PeerView {
        PeerView {
            peer_id: p,
            caps: Capabilities {
                peer_id: p.to_base58(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                cpu_cores: 8,
                ..Capabilities::default()
            },
            is_self: false,
            connected: true,
            last_seen: Duration::ZERO,
            rtt: None,
        }
    }

    #[test]
    fn peers_are_the_members_with_their_last_labels_and_down_only_after_the_grace() {
        let ids: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
        let members: Vec<String> = ids.iter().map(|p| p.to_base58()).collect();
        let mut seen = BTreeMap::new();
        let mut present = BTreeMap::new();
        let stranger = PeerId::random();
        let table = vec![
            view_of(ids[0], &[("zone", "a")]),
            view_of(ids[1], &[("zone", "b")]),
            view_of(stranger, &[]),
        ];
        let t0 = Instant::now();
        let grace = Duration::from_secs(30);
        // Member 2 was never in the table: it is down only once the job has watched for
        // the grace.
        let down = down_members(&members, &table, &mut present, t0, t0, grace);
        assert!(down.is_empty(), "{down:?}");
        assert!(!present.contains_key(&stranger.to_base58()));
        let later = t0 + grace;
        let down = down_members(&members, &table, &mut present, t0, later, grace);
        assert_eq!(down, BTreeSet::from([members[2].clone()]));
        let peers = shard_peers(&members, &table, &down, &mut seen);
        assert_eq!(peers.len(), 3, "members only: {peers:?}");
        assert!(peers.windows(2).all(|w| w[0].peer_id < w[1].peer_id));
        let by = |peers: &[ShardPeer], id: &str| {
            peers
                .iter()
                .find(|p| p.peer_id == id)
                .cloned()
                .unwrap_or_else(|| panic!("{id} is missing"))
        };
        assert!(by(&peers, &members[0]).alive && by(&peers, &members[1]).alive);
        assert!(!by(&peers, &members[2]).alive);
        // Load is not an input: only the id, tier and labels are kept.
        assert_eq!(by(&peers, &members[0]).caps.cpu_cores, 0);
        assert_eq!(by(&peers, &members[0]).caps.labels["zone"], "a");
        // Member 0 leaves the table: alive for the grace, then down, its labels kept.
        let t1 = later + Duration::from_secs(1);
        let gone = &table[1..];
        let down = down_members(&members, gone, &mut present, t0, t1, grace);
        assert!(!down.contains(&members[0]));
        let down = down_members(&members, gone, &mut present, t0, later + grace, grace);
        assert!(down.contains(&members[0]), "{down:?}");
        let peers = shard_peers(&members, gone, &down, &mut seen);
        let zero = by(&peers, &members[0]);
        assert!(!zero.alive);
        assert_eq!(zero.caps.labels["zone"], "a");
        assert!(!seen.contains_key(&stranger.to_base58()));
    }

    #[test]
    fn the_serving_group_is_the_group_routing_gives_the_shards_topics() {
        for i in 0..512 {
            let topic = canal_proto::Topic::new(&format!("t/{i}")).expect("a topic");
            let shard =
                canal_proto::keyspace::shard_of(&canal_proto::keyspace::topic_key(&topic), 64);
            assert_eq!(
                serving_group(shard),
                canal_consensus::Route::Sharded { shards: 64 }.topic(topic.as_str()),
                "{topic} of shard {shard}"
            );
        }
    }

    #[test]
    fn flapping_inputs_never_commit_and_settled_ones_at_most_every_min_between() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // Warming up, then settled: the first commit.
        assert!(!may_commit(at(5), t0, t0, None));
        assert!(may_commit(at(10), t0, t0, None));
        // Inputs that changed a second ago have not settled.
        assert!(!may_commit(at(20), t0, at(19), None));
        // A peer flapping every two seconds: no round of a minute may commit.
        assert!((20..80).all(|s| !may_commit(at(s), t0, at(s - s % 2), Some(at(10)))));
        // Settled, but a map was committed two seconds ago.
        assert!(!may_commit(at(30), t0, at(20), Some(at(28))));
        assert!(may_commit(at(33), t0, at(20), Some(at(28))));
    }

    #[test]
    fn k_follows_the_live_peers_and_the_spread_the_zone_label() {
        let ids: Vec<PeerId> = (0..2).map(|_| PeerId::random()).collect();
        let members: Vec<String> = ids.iter().map(|p| p.to_base58()).collect();
        let none = BTreeSet::new();
        let plain = shard_peers(
            &members,
            &[view_of(ids[0], &[]), view_of(ids[1], &[])],
            &none,
            &mut BTreeMap::new(),
        );
        let p = policy_for(64, 3, &plain);
        assert_eq!((p.shards, p.replication, p.spread), (64, 2, None));
        let zoned = shard_peers(
            &members,
            &[view_of(ids[0], &[("zone", "z1")])],
            &BTreeSet::from([members[1].clone()]),
            &mut BTreeMap::new(),
        );
        let p = policy_for(64, 3, &zoned);
        assert_eq!((p.replication, p.spread.as_deref()), (1, Some("zone")));
        assert_eq!(policy_for(8, 3, &[]).replication, 1);
    }

    #[test]
    fn a_new_map_comes_only_when_the_replicas_change_and_at_the_next_epoch() {
        let ids: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        let members: Vec<String> = ids.iter().map(|p| p.to_base58()).collect();
        let table: Vec<PeerView> = ids.iter().map(|p| view_of(*p, &[])).collect();
        let none = BTreeSet::new();
        let three = shard_peers(&members[..3], &table, &none, &mut BTreeMap::new());
        let policy = policy_for(64, 3, &three);
        let first = next_map(&policy, &three, None)
            .expect("computes")
            .expect("a first map");
        assert_eq!((first.epoch, first.shards, first.replication), (1, 64, 3));
        assert!(first.assignments.iter().all(|a| a.replicas.len() == 3));
        // The same peers: no new map.
        assert_eq!(
            next_map(&policy, &three, Some(&first)).expect("computes"),
            None
        );
        // A fourth: the next epoch, with about a quarter of the replicas on it.
        let four = shard_peers(&members, &table, &none, &mut BTreeMap::new());
        let second = next_map(&policy_for(64, 3, &four), &four, Some(&first))
            .expect("computes")
            .expect("a second map");
        assert_eq!(second.epoch, 2);
        let on_new = second
            .assignments
            .iter()
            .filter(|a| a.replicas.contains(&members[3]))
            .count();
        assert_eq!(on_new, 48, "64 × 3 / 4 replicas on the new peer");
        // The shown view: every row served by its shard's group, and the planned moves.
        let v = view(Some(&second), Some(&first), &|g| {
            Some(format!("leader of {g}"))
        });
        assert_eq!((v.epoch, v.rows.len(), v.moves_from), (2, 64, Some(1)));
        assert!(
            v.rows
                .iter()
                .all(|r| r.served_by == format!("shard-{}", r.shard)
                    && r.group_leader.as_deref() == Some(&format!("leader of shard-{}", r.shard)))
        );
        let adds = v.moves.iter().filter(|m| m.step == "add_learner").count();
        assert_eq!(adds, 48);
        assert!(
            v.moves
                .iter()
                .all(|m| m.step != "add_learner" || m.peer == members[3])
        );
        let load: usize = v.peers.iter().map(|p| p.replicas).sum();
        assert_eq!(load, 192);
        assert_eq!(v.peers.iter().map(|p| p.leaders).sum::<usize>(), 64);
        assert!(view(None, None, &|_| None).rows.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_metadata_leader_commits_the_map_and_a_new_epoch_when_a_member_goes() {
        let cluster = Cluster::formed(3).await;
        let leader = cluster.leader(GroupId::METADATA).await;
        let all: Vec<PeerId> = cluster.members.iter().map(|m| m.peer).collect();
        let peers = FixedPeers::of(&all);
        let metrics = ShardMapMetrics::default();
        let consensus = cluster.members[leader].consensus.clone();
        let mut job = ShardMapJob::new(consensus.clone(), peers.clone(), 16, 3, metrics.clone());
        // No waiting for the peer table in a test: it is fixed.
        job.started = Instant::now() - WARM_UP;
        job.down_after = Duration::from_secs(1);
        let handle = canal_worker::spawn(job);
        testkit::until("the first map", Duration::from_secs(20), || {
            committed(&consensus).is_some()
        })
        .await;
        let first = committed(&consensus).expect("a map");
        assert_eq!((first.epoch, first.shards, first.replication), (1, 16, 3));
        assert_eq!(metrics.changes.get(), 1);
        // Every member's replica holds it.
        for m in &cluster.members {
            testkit::until(
                "every replica to hold the map",
                Duration::from_secs(10),
                || committed(&m.consensus).is_some_and(|c| c.epoch == 1),
            )
            .await;
        }
        // A member leaves the peer table: once it has been gone for the grace, the next
        // epoch leaves it out, K drops to the two live peers.
        let gone = all[(leader + 1) % 3].to_base58();
        peers.remove(&gone);
        testkit::until("the second map", Duration::from_secs(30), || {
            committed(&consensus).is_some_and(|c| c.epoch == 2)
        })
        .await;
        let second = committed(&consensus).expect("a map");
        assert_eq!(second.replication, 2);
        assert!(
            second
                .assignments
                .iter()
                .all(|a| !a.replicas.contains(&gone))
        );
        assert_eq!(previous(&consensus), Some(first));
        testkit::until("the epoch gauge", Duration::from_secs(5), || {
            metrics.epoch.get() == 2
        })
        .await;
        assert!(metrics.moves.get() > 0);
        assert!(handle.shutdown(Duration::from_secs(5)).await);
        cluster.shutdown().await;
    }
}
