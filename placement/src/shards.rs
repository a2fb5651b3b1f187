//! The shard map: every shard's K replicas, placed by the same constraints functions have,
//! balanced, and moved as little as possible when peers come and go.
//!
//! [`compute`] is pure: the peers (id, Kademlia key, capability record, liveness, host,
//! weight), the [`ShardPolicy`] and the previous map in, a [`ShardPlan`] out. Peers are
//! sorted by id first and nothing reads a clock or a random source, so every node that knows
//! the same peers computes the same map.
//!
//! ```text
//!  peers ──► eligible (alive, weight > 0, tier/labels met; else `excluded`, and why)
//!              │
//!              ▼
//!  zones (the spread label) ─► per shard at most ceil(K / zones) replicas in one zone,
//!              │               and never two on one host: K' = what that allows (<= K;
//!              │               a shortfall names the constraint)
//!              ▼
//!  zone totals  = S × K' split by zone weight, capped by what the spread allows
//!  peer targets = a zone's total split by host weight, then peer weight (water-filling,
//!                 largest remainder; ties go to the peer that held more before)
//!              │
//!              ▼
//!  keep   the previous replicas that still fit (a zone or peer over its total drops its
//!         replicas farthest from the shard key)
//!  fill   each hole with the closest peer (XOR distance to the shard key) under target;
//!         a hole nobody under target can take is freed by one swap, else over target
//!         (and a note says so)
//!              │
//!              ▼
//!  leaders: one replica per shard, spread in proportion to weight (b-matching with
//!           augmenting paths), the previous leader kept where it fits; leader first,
//!           then the other replicas closest first
//! ```
//!
//! With no previous map the replicas are the closest peers that the balance allows — the
//! DHT home where it is balanced. [`plan_moves`] turns two maps into the one-replica-at-a-time
//! steps a rebalancer runs, and [`movement`] compares their count with the lower bound.

// Shards and peers are indices into several parallel tables here; a range loop reads best.
#![allow(clippy::needless_range_loop)]

use crate::constraint::{Constraint, headline};
use canal_proto::caps::Capabilities;
use canal_proto::function::Requirements;
use canal_proto::keyspace::{DEFAULT_REPLICATION, DEFAULT_SHARDS, Key, distance, shard_key};
use canal_proto::shards::{
    MAX_NOTE_BYTES, MAX_NOTES, MAX_REPLICATION, MAX_SHARDS, PeerShare, SHARD_MAP_FORMAT, ShardMap,
    ShardReplicas,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The capability label that names a peer's host when several peers share one machine.
pub const HOST_LABEL: &str = "host";

/// One peer as the shard map sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardPeer {
    /// The peer id (base58).
    pub peer_id: String,
    /// Its Kademlia key (`canal_dht::topology::peer_key`).
    pub key: Key,
    /// Its latest capability record (tier and labels are read).
    pub caps: Capabilities,
    /// Whether its record is fresh; a peer that is not holds no replica.
    pub alive: bool,
    /// The machine it runs on: no two replicas of one shard share a host.
    pub host: String,
    /// Its capacity relative to the others (1 for an ordinary peer); 0 holds nothing.
    pub weight: u32,
}

impl ShardPeer {
    /// A peer of weight 1 whose host is its [`HOST_LABEL`] label, or else its own id (each
    /// peer its own machine: on a loopback testnet every node shares one address, so the
    /// address cannot say which peers share a machine).
    pub fn new(peer_id: impl Into<String>, key: Key, caps: Capabilities, alive: bool) -> Self {
        let peer_id = peer_id.into();
        let host = caps
            .labels
            .get(HOST_LABEL)
            .filter(|h| !h.is_empty())
            .cloned()
            .unwrap_or_else(|| peer_id.clone());
        ShardPeer {
            peer_id,
            key,
            caps,
            alive,
            host,
            weight: 1,
        }
    }
}

/// What the map is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPolicy {
    /// How many shards (1 to [`MAX_SHARDS`]).
    pub shards: u32,
    /// K, replicas per shard (1 to [`MAX_REPLICATION`]).
    pub replication: usize,
    /// Which peers may hold replicas (tier, labels, GPU), as for functions; `hard: false`
    /// relaxes a constraint no live peer meets. `replicas` is not read: K is `replication`.
    pub requirements: Requirements,
    /// The failure-domain label (`zone`) replicas of a shard are spread over: at most
    /// ceil(K / zones) of them in one zone. Peers without the label count as one zone.
    pub spread: Option<String>,
}

impl Default for ShardPolicy {
    fn default() -> Self {
        ShardPolicy {
            shards: DEFAULT_SHARDS,
            replication: DEFAULT_REPLICATION,
            requirements: Requirements {
                hard: true,
                ..Requirements::default()
            },
            spread: None,
        }
    }
}

/// A policy the map cannot be computed for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    /// The shard count is out of range.
    #[error("shard count {0} is out of range: 1 to {MAX_SHARDS}")]
    Shards(u32),
    /// K is out of range.
    #[error("replication factor {0} is out of range: 1 to {MAX_REPLICATION}")]
    Replication(usize),
    /// The spread label is empty.
    #[error("the spread label is empty: name a label such as zone, or spread over none")]
    Spread,
}

/// The answer of [`compute`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPlan {
    /// The new map.
    pub map: ShardMap,
    /// Every peer given, by id: what it holds and its target, or why it holds nothing.
    pub peers: Vec<PeerShare>,
}

/// An eligible peer, by index into the sorted eligible list.
struct Peer<'a> {
    id: &'a str,
    key: Key,
    zone: usize,
    host: usize,
    weight: u64,
}

/// The state of one computation.
struct Solver<'a> {
    peers: Vec<Peer<'a>>,
    keys: Vec<Key>,
    /// Per shard, its replicas (eligible peer indices), unordered until the end.
    rep: Vec<Vec<usize>>,
    /// Per shard, the previous replicas still eligible, in the previous order.
    prev: Vec<Vec<usize>>,
    notes: Vec<String>,
}

impl Solver<'_> {
    fn dist(&self, p: usize, s: usize) -> Key {
        distance(&self.peers[p].key, &self.keys[s])
    }

    fn fits(&self, p: usize, s: usize) -> bool {
        let host = self.peers[p].host;
        !self.rep[s]
            .iter()
            .any(|&q| q == p || self.peers[q].host == host)
    }

    fn in_zone(&self, s: usize, z: usize) -> usize {
        self.rep[s]
            .iter()
            .filter(|&&q| self.peers[q].zone == z)
            .count()
    }
}

/// Splits `total` over items in proportion to `weights`, none over its cap (water-filling),
/// the units left after the floors going by largest remainder, ties to an item whose
/// `prefer` (what it held before) is above its floor, so rounding does not move replicas,
/// then to the lower index.
/// Gives out less than `total` only when the caps hold less.
fn apportion(total: u64, weights: &[u64], caps: &[u64], prefer: &[u64]) -> Vec<u64> {
    let mut out = vec![0u64; weights.len()];
    let mut active: Vec<usize> = (0..weights.len())
        .filter(|&i| weights[i] > 0 && caps[i] > 0)
        .collect();
    let mut remaining = total;
    loop {
        let w: u128 = active.iter().map(|&i| u128::from(weights[i])).sum();
        if w == 0 || remaining == 0 {
            return out;
        }
        let over: Vec<usize> = active
            .iter()
            .copied()
            .filter(|&i| u128::from(remaining) * u128::from(weights[i]) > u128::from(caps[i]) * w)
            .collect();
        if over.is_empty() {
            let mut rems = Vec::with_capacity(active.len());
            let mut given = 0u64;
            for &i in &active {
                let num = u128::from(remaining) * u128::from(weights[i]);
                out[i] = (num / w) as u64;
                given += out[i];
                rems.push((num % w, i));
            }
            let mut left = remaining - given;
            // Among equal remainders the unit goes where it was before: to an item that
            // held more than its floor.
            let above = |i: usize| prefer[i] > out[i];
            rems.sort_by(|a, b| {
                b.0.cmp(&a.0)
                    .then(above(b.1).cmp(&above(a.1)))
                    .then(a.1.cmp(&b.1))
            });
            for (_, i) in rems {
                if left == 0 {
                    break;
                }
                if out[i] < caps[i] {
                    out[i] += 1;
                    left -= 1;
                }
            }
            return out;
        }
        for i in over {
            out[i] = caps[i];
            remaining -= caps[i];
            active.retain(|&j| j != i);
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Computes the shard map for `peers` under `policy`, keeping what it can of `previous`
/// (ignored when its shard count differs: every topic's shard changes then anyway).
///
/// Hard constraints always hold: no shard has two replicas on one host or more than
/// ceil(K / zones) in one zone, and only alive peers of weight > 0 meeting the requirements
/// hold replicas. A shard with fewer than K replicas says why in its `shortfall`; a peer
/// over its target is named in the map's notes. Deterministic: the order of `peers` does not
/// matter (duplicate records of one id: the alive one, then the first, is used).
pub fn compute(
    policy: &ShardPolicy,
    peers: &[ShardPeer],
    previous: Option<&ShardMap>,
) -> Result<ShardPlan, ShardError> {
    if !(1..=MAX_SHARDS).contains(&policy.shards) {
        return Err(ShardError::Shards(policy.shards));
    }
    if !(1..=MAX_REPLICATION).contains(&policy.replication) {
        return Err(ShardError::Replication(policy.replication));
    }
    if policy.spread.as_deref() == Some("") {
        return Err(ShardError::Spread);
    }
    let shards = policy.shards as usize;
    let k = policy.replication;
    let mut notes = Vec::new();

    // Eligibility, in id order.
    let mut sorted: Vec<&ShardPeer> = peers.iter().collect();
    sorted.sort_by(|a, b| a.peer_id.cmp(&b.peer_id).then(b.alive.cmp(&a.alive)));
    let constraints = Constraint::of(&policy.requirements);
    let hard = policy.requirements.hard;
    let usable = |p: &ShardPeer| p.alive && p.weight > 0;
    // Preferred constraints no usable peer meets are relaxed, as for functions.
    let relaxed: Vec<usize> = if hard {
        Vec::new()
    } else {
        (0..constraints.len())
            .filter(|&c| {
                !sorted
                    .iter()
                    .any(|p| usable(p) && constraints[c].miss(&p.caps, "").is_none())
            })
            .collect()
    };
    if !relaxed.is_empty() {
        let names: Vec<String> = relaxed.iter().map(|&c| constraints[c].noun()).collect();
        notes.push(format!(
            "relaxed the preferred {}: no live peer meets it",
            names.join(", ")
        ));
    }
    let word = if hard { "required" } else { "preferred" };
    let mut excluded: BTreeMap<usize, String> = BTreeMap::new();
    let mut chosen: Vec<usize> = Vec::new();
    for (i, p) in sorted.iter().enumerate() {
        let why = if i > 0 && sorted[i - 1].peer_id == p.peer_id {
            Some("a duplicate record of this peer id".to_string())
        } else if !p.alive {
            Some("not alive".to_string())
        } else if p.weight == 0 {
            Some("weight 0".to_string())
        } else {
            constraints
                .iter()
                .enumerate()
                .filter(|(c, _)| !relaxed.contains(c))
                .find_map(|(_, c)| c.miss(&p.caps, word))
        };
        match why {
            Some(w) => {
                excluded.insert(i, w);
            }
            None => chosen.push(i),
        }
    }

    // Zones and hosts, by name.
    let zone_of = |p: &ShardPeer| -> String {
        match &policy.spread {
            Some(label) => p.caps.labels.get(label).cloned().unwrap_or_default(),
            None => String::new(),
        }
    };
    let zone_names: Vec<String> = chosen
        .iter()
        .map(|&i| zone_of(sorted[i]))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let host_names: Vec<String> = chosen
        .iter()
        .map(|&i| sorted[i].host.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if let Some(label) = &policy.spread {
        let unlabelled = chosen
            .iter()
            .filter(|&&i| !sorted[i].caps.labels.contains_key(label))
            .count();
        if unlabelled > 0 {
            notes.push(format!(
                "{unlabelled} eligible peer{} without label {label}: they count as one zone",
                if unlabelled == 1 { " is" } else { "s are" }
            ));
        }
    }
    let index_of = |names: &[String], n: &str| names.binary_search_by(|x| x.as_str().cmp(n));
    let solver_peers: Vec<Peer<'_>> = chosen
        .iter()
        .map(|&i| {
            let p = sorted[i];
            Peer {
                id: &p.peer_id,
                key: p.key,
                zone: index_of(&zone_names, &zone_of(p)).unwrap_or(0),
                host: index_of(&host_names, &p.host).unwrap_or(0),
                weight: u64::from(p.weight),
            }
        })
        .collect();
    let by_id: BTreeMap<&str, usize> = solver_peers
        .iter()
        .enumerate()
        .map(|(i, p)| (p.id, i))
        .collect();
    let previous = previous.filter(|m| {
        let same = m.shards == policy.shards && m.assignments.len() == shards;
        if !same {
            notes.push(format!(
                "the previous map has {} shards, this one {}: computed afresh",
                m.shards, policy.shards
            ));
        }
        same
    });
    let prev: Vec<Vec<usize>> = (0..shards)
        .map(|s| match previous {
            Some(m) => m.assignments[s]
                .replicas
                .iter()
                .filter_map(|id| by_id.get(id.as_str()).copied())
                .collect(),
            None => Vec::new(),
        })
        .collect();
    let mut sv = Solver {
        peers: solver_peers,
        keys: (0..policy.shards).map(shard_key).collect(),
        rep: vec![Vec::new(); shards],
        prev,
        notes,
    };

    let zn = zone_names.len();
    let mut zone_hosts = vec![BTreeSet::new(); zn];
    for p in &sv.peers {
        zone_hosts[p.zone].insert(p.host);
    }
    let per_zone = if zn == 0 { 0 } else { k.div_ceil(zn) };
    let m: Vec<usize> = zone_hosts.iter().map(|h| per_zone.min(h.len())).collect();
    let k_eff = k.min(m.iter().sum()).min(host_names.len());
    let shortfall = (k_eff < k).then(|| {
        let why = if sv.peers.is_empty() {
            let shown: Vec<Constraint> = constraints
                .iter()
                .enumerate()
                .filter(|(c, _)| !relaxed.contains(c))
                .map(|(_, c)| c.clone())
                .collect();
            headline(&shown)
        } else if host_names.len() == k_eff {
            format!(
                "the {} eligible peer{} run on {} host{}, and no two replicas of a shard share a host",
                sv.peers.len(),
                plural(sv.peers.len()),
                host_names.len(),
                plural(host_names.len())
            )
        } else {
            let label = policy.spread.as_deref().unwrap_or("zone");
            let thin: Vec<String> = (0..zn)
                .filter(|&z| m[z] < per_zone)
                .map(|z| {
                    format!(
                        "{} has {} host{}",
                        show_zone(&zone_names[z]),
                        m[z],
                        plural(m[z])
                    )
                })
                .collect();
            format!(
                "spread over {label}: at most {per_zone} replica{} of a shard in one of the {zn} zone{}, and {}",
                plural(per_zone),
                plural(zn),
                thin.join(", ")
            )
        };
        format!("{k_eff} of {k} replicas placed: {why}")
    });

    // Previous replicas that still fit the zone and host limits, closest first.
    for s in 0..shards {
        let mut cands = sv.prev[s].clone();
        cands.sort_by_key(|&p| sv.dist(p, s));
        for p in cands {
            if sv.rep[s].len() < k_eff
                && sv.fits(p, s)
                && sv.in_zone(s, sv.peers[p].zone) < m[sv.peers[p].zone]
            {
                sv.rep[s].push(p);
            }
        }
    }

    // Zone totals.
    let total = (shards * k_eff) as u64;
    let mut zone_weight = vec![0u64; zn];
    for p in &sv.peers {
        zone_weight[p.zone] += p.weight;
    }
    let zone_caps: Vec<u64> = m.iter().map(|&x| (shards * x) as u64).collect();
    let zone_prev: Vec<u64> = (0..zn)
        .map(|z| (0..shards).map(|s| sv.in_zone(s, z) as u64).sum())
        .collect();
    let zone_total = apportion(total, &zone_weight, &zone_caps, &zone_prev);
    let all_weight: u64 = zone_weight.iter().sum();
    // A zone whose peers carry a replica or more per unit of weight above or below the
    // cluster's is the spread's doing: say so.
    let per_weight = total as f64 / all_weight.max(1) as f64;
    for z in 0..zn {
        let here = zone_total[z] as f64 / zone_weight[z].max(1) as f64;
        if (here - per_weight).abs() >= 1.0 {
            sv.notes.push(format!(
                "{} holds {} replicas, {here:.1} per unit of weight against {per_weight:.1} in the cluster: at most {} replica{} of a shard in one zone",
                show_zone(&zone_names[z]),
                zone_total[z],
                m[z],
                plural(m[z])
            ));
        }
    }

    // Level 1: how many replicas of each shard each zone holds.
    let (n, used) = spread_over_zones(&mut sv, &m, &zone_total, &zone_prev, k_eff);

    // Level 2: which peers of each zone.
    let mut target = vec![0u64; sv.peers.len()];
    let mut over_target = false;
    for z in 0..zn {
        over_target |= place_zone(&mut sv, z, &n, used[z], &mut target);
    }
    if over_target {
        let over: Vec<String> = (0..sv.peers.len())
            .filter(|&p| load(&sv, p) > target[p])
            .map(|p| format!("{} ({} for {})", sv.peers[p].id, load(&sv, p), target[p]))
            .collect();
        sv.notes.push(format!(
            "{} peer{} hold more replicas than their target, as the host and zone limits left no other choice: {}",
            over.len(),
            plural(over.len()),
            over.join(", ")
        ));
    }

    // Leaders.
    let leaders = choose_leaders(&mut sv);

    let mut assignments = Vec::with_capacity(shards);
    for s in 0..shards {
        let mut order = sv.rep[s].clone();
        order.sort_by_key(|&p| (leaders[s] != Some(p), sv.dist(p, s)));
        let placed = order.len();
        let shortfall = if placed < k_eff {
            Some(format!(
                "{placed} of {k} replicas placed: no eligible peer is left on a host this shard does not use, within the spread"
            ))
        } else if placed < k {
            shortfall.clone()
        } else {
            None
        };
        assignments.push(ShardReplicas {
            shard: s as u32,
            replicas: order.iter().map(|&p| sv.peers[p].id.to_string()).collect(),
            shortfall,
        });
    }

    let mut leads = vec![0usize; sv.peers.len()];
    for p in leaders.iter().flatten() {
        leads[*p] += 1;
    }
    let mut shares: Vec<PeerShare> = Vec::with_capacity(sorted.len());
    let mut next = 0;
    for (i, p) in sorted.iter().enumerate() {
        let (replicas, leaders, target, excluded) = match excluded.get(&i) {
            Some(why) => (0, 0, 0, Some(why.clone())),
            None => {
                let e = next;
                next += 1;
                (load(&sv, e) as usize, leads[e], target[e] as usize, None)
            }
        };
        shares.push(PeerShare {
            peer_id: p.peer_id.clone(),
            zone: zone_of(p),
            host: p.host.clone(),
            replicas,
            leaders,
            target,
            excluded,
        });
    }

    let mut notes = sv.notes;
    notes.truncate(MAX_NOTES);
    for note in &mut notes {
        if note.len() > MAX_NOTE_BYTES {
            let mut cut = MAX_NOTE_BYTES - 3;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
            note.push('…');
        }
    }
    let epoch = match previous {
        None => 1,
        Some(prev)
            if prev.replication == k
                && prev.spread == policy.spread
                && prev
                    .assignments
                    .iter()
                    .zip(&assignments)
                    .all(|(a, b)| a.replicas == b.replicas) =>
        {
            prev.epoch
        }
        Some(prev) => prev.epoch.saturating_add(1),
    };
    Ok(ShardPlan {
        map: ShardMap {
            format: SHARD_MAP_FORMAT,
            epoch,
            shards: policy.shards,
            replication: k,
            spread: policy.spread.clone(),
            assignments,
            notes,
        },
        peers: shares,
    })
}

/// Level 1 of [`compute`]: how many replicas of each shard each zone holds (`n[shard][zone]`,
/// at most `m[zone]`, `k_eff` per shard), and each zone's count (`used`, its total unless a
/// note says the spread left no choice). Drops kept replicas a zone has no room for.
fn spread_over_zones(
    sv: &mut Solver<'_>,
    m: &[usize],
    zone_total: &[u64],
    zone_prev: &[u64],
    k_eff: usize,
) -> (Vec<Vec<usize>>, Vec<u64>) {
    let shards = sv.rep.len();
    let zn = m.len();
    let mut n: Vec<Vec<usize>> = (0..shards)
        .map(|s| (0..zn).map(|z| sv.in_zone(s, z)).collect())
        .collect();
    let mut used: Vec<u64> = zone_prev.to_vec();
    let mut reserve: Vec<u64> = (0..zn)
        .map(|z| zone_total[z].saturating_sub(used[z]))
        .collect();
    for z in 0..zn {
        if used[z] <= zone_total[z] {
            continue;
        }
        let mut held: Vec<(Key, usize, usize)> = (0..shards)
            .flat_map(|s| sv.rep[s].iter().map(move |&p| (s, p)))
            .filter(|&(_, p)| sv.peers[p].zone == z)
            .map(|(s, p)| (sv.dist(p, s), s, p))
            .collect();
        held.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        // Units leave from the peers the zone's new total puts over their target first, so
        // that the peers do not have to even out afterwards.
        let mut excess = vec![0i64; sv.peers.len()];
        for (p, t) in zone_targets(sv, z, zone_total[z], shards as u64) {
            excess[p] = load(sv, p) as i64 - t as i64;
        }
        // And from shards that can take the unit in a zone with room, so that no other
        // shard has to move to make room for them.
        for pass in 0..4 {
            for &(_, s, p) in &held {
                if used[z] <= zone_total[z] {
                    break;
                }
                if !sv.rep[s].contains(&p) || (pass % 2 == 0 && excess[p] <= 0) {
                    continue;
                }
                let to = (0..zn).find(|&b| b != z && n[s][b] < m[b] && reserve[b] > 0);
                if pass < 2 && to.is_none() {
                    continue;
                }
                if let Some(b) = to {
                    reserve[b] -= 1;
                }
                sv.rep[s].retain(|&q| q != p);
                excess[p] -= 1;
                n[s][z] -= 1;
                used[z] -= 1;
            }
        }
    }
    let zone_best: Vec<Vec<Key>> = (0..shards)
        .map(|s| {
            let mut best = vec![[0xff; 32]; zn];
            for (p, peer) in sv.peers.iter().enumerate() {
                let d = sv.dist(p, s);
                if d < best[peer.zone] {
                    best[peer.zone] = d;
                }
            }
            best
        })
        .collect();
    let mut zone_overflow = false;
    for s in 0..shards {
        while n[s].iter().sum::<usize>() < k_eff {
            let open = (0..zn)
                .filter(|&z| n[s][z] < m[z] && used[z] < zone_total[z])
                .min_by(|&a, &b| {
                    n[s][a]
                        .cmp(&n[s][b])
                        .then(zone_best[s][a].cmp(&zone_best[s][b]))
                });
            if let Some(z) = open {
                n[s][z] += 1;
                used[z] += 1;
                continue;
            }
            // A zone this shard may still use is full: free a place by moving units added
            // in this fill (no kept replica stands on them, so moving them costs nothing)
            // along the shortest chain of zones that ends in one with room.
            if let Some(path) = zone_chain(sv, s, &n, m, &used, zone_total) {
                if let Some(&(_, room, _)) = path.first() {
                    used[room] += 1;
                }
                for (x, to, from) in path {
                    n[x][to] += 1;
                    if let Some(a) = from {
                        n[x][a] -= 1;
                    }
                }
                continue;
            }
            // Else move another shard's unit, kept or not, from such a zone to one with room.
            let mut swap = None;
            'search: for pass in 0..2 {
                for a in (0..zn).filter(|&a| n[s][a] < m[a]) {
                    for s2 in (0..shards).filter(|&s2| s2 != s && n[s2][a] > 0) {
                        let kept = sv.in_zone(s2, a);
                        if pass == 0 && n[s2][a] <= kept {
                            continue;
                        }
                        if let Some(b) =
                            (0..zn).find(|&b| b != a && n[s2][b] < m[b] && used[b] < zone_total[b])
                        {
                            swap = Some((a, s2, b));
                            break 'search;
                        }
                    }
                }
            }
            if let Some((a, s2, b)) = swap {
                if n[s2][a] <= sv.in_zone(s2, a) {
                    // The unit was a kept replica: drop the farthest one.
                    if let Some(&p) = sv.rep[s2]
                        .iter()
                        .filter(|&&p| sv.peers[p].zone == a)
                        .max_by_key(|&&p| sv.dist(p, s2))
                    {
                        sv.rep[s2].retain(|&q| q != p);
                    }
                }
                n[s2][a] -= 1;
                n[s2][b] += 1;
                used[b] += 1;
                n[s][a] += 1;
                continue;
            }
            let Some(z) = (0..zn)
                .filter(|&z| n[s][z] < m[z])
                .min_by_key(|&z| (used[z] as i64 - zone_total[z] as i64, z))
            else {
                // No zone may take another replica of this shard.
                break;
            };
            n[s][z] += 1;
            used[z] += 1;
            zone_overflow = true;
        }
    }
    if zone_overflow {
        sv.notes
            .push("some zones hold more than their total: the spread left no other choice".into());
    }

    (n, used)
}

/// The shortest chain of zones that frees a place for one more unit of shard `s`, as
/// `(shard, zone it gains, zone it gives up)` steps: the first gains in the zone with room,
/// the last is `s` itself (giving up nothing). Only units no kept replica stands on move;
/// `None` if there is no such chain.
fn zone_chain(
    sv: &Solver<'_>,
    s: usize,
    n: &[Vec<usize>],
    m: &[usize],
    used: &[u64],
    total: &[u64],
) -> Option<Vec<(usize, usize, Option<usize>)>> {
    let zn = m.len();
    // parent[b] = (the shard that would gain a unit in b, the zone it gives up).
    let mut parent: Vec<Option<(usize, Option<usize>)>> = vec![None; zn];
    let mut queue = std::collections::VecDeque::new();
    for a in (0..zn).filter(|&a| n[s][a] < m[a]) {
        parent[a] = Some((s, None));
        queue.push_back(a);
    }
    let found = loop {
        let a = queue.pop_front()?;
        if used[a] < total[a] {
            break a;
        }
        for s2 in (0..n.len()).filter(|&s2| s2 != s && n[s2][a] > sv.in_zone(s2, a)) {
            for b in 0..zn {
                if parent[b].is_none() && n[s2][b] < m[b] {
                    parent[b] = Some((s2, Some(a)));
                    queue.push_back(b);
                }
            }
        }
    };
    let mut path = Vec::new();
    let mut cur = found;
    while let Some((x, from)) = parent[cur] {
        path.push((x, cur, from));
        match from {
            None => break,
            Some(a) => cur = a,
        }
    }
    // A shard twice on the chain could break its own spread: not worth the risk.
    let shards: BTreeSet<usize> = path.iter().map(|p| p.0).collect();
    (shards.len() == path.len()).then_some(path)
}

fn show_zone(z: &str) -> String {
    if z.is_empty() {
        "zone (none)".into()
    } else {
        format!("zone {z}")
    }
}

fn load(sv: &Solver<'_>, p: usize) -> u64 {
    sv.rep.iter().filter(|r| r.contains(&p)).count() as u64
}

/// The targets of zone `z`'s peers for `total` replicas, none over `cap`: split by host
/// weight, then within a host by peer weight, ties to where the replicas were.
fn zone_targets(sv: &Solver<'_>, z: usize, total: u64, cap: u64) -> Vec<(usize, u64)> {
    let members: Vec<usize> = (0..sv.peers.len())
        .filter(|&p| sv.peers[p].zone == z)
        .collect();
    let mut out = Vec::with_capacity(members.len());
    // Previous loads, so that rounding keeps replicas where they are.
    let mut prev_load = vec![0u64; sv.peers.len()];
    for r in &sv.prev {
        for &p in r {
            prev_load[p] += 1;
        }
    }
    let hosts: Vec<usize> = members
        .iter()
        .map(|&p| sv.peers[p].host)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let host_weight: Vec<u64> = hosts
        .iter()
        .map(|&h| {
            members
                .iter()
                .filter(|&&p| sv.peers[p].host == h)
                .map(|&p| sv.peers[p].weight)
                .sum()
        })
        .collect();
    let host_prev: Vec<u64> = hosts
        .iter()
        .map(|&h| {
            members
                .iter()
                .filter(|&&p| sv.peers[p].host == h)
                .map(|&p| prev_load[p])
                .sum()
        })
        .collect();
    let host_total = apportion(total, &host_weight, &vec![cap; hosts.len()], &host_prev);
    for (hi, &h) in hosts.iter().enumerate() {
        let on: Vec<usize> = members
            .iter()
            .copied()
            .filter(|&p| sv.peers[p].host == h)
            .collect();
        let w: Vec<u64> = on.iter().map(|&p| sv.peers[p].weight).collect();
        let pr: Vec<u64> = on.iter().map(|&p| prev_load[p]).collect();
        let t = apportion(host_total[hi], &w, &vec![cap; on.len()], &pr);
        out.extend(on.iter().copied().zip(t));
    }
    out
}

/// Places zone `z`'s replicas on its peers: targets, keep, fill, swap, overflow. Returns
/// whether some peer went over its target.
fn place_zone(
    sv: &mut Solver<'_>,
    z: usize,
    n: &[Vec<usize>],
    total: u64,
    target: &mut [u64],
) -> bool {
    let shards = sv.rep.len();
    let members: Vec<usize> = (0..sv.peers.len())
        .filter(|&p| sv.peers[p].zone == z)
        .collect();
    let wanted = (0..shards).filter(|&s| n[s][z] > 0).count() as u64;
    for (p, t) in zone_targets(sv, z, total, wanted) {
        target[p] = t;
    }

    // A peer over its target gives up its kept replicas farthest from their shard keys.
    for &p in &members {
        let mut held: Vec<(Key, usize)> = (0..shards)
            .filter(|&s| sv.rep[s].contains(&p))
            .map(|s| (sv.dist(p, s), s))
            .collect();
        if held.len() as u64 <= target[p] {
            continue;
        }
        held.sort_by(|a, b| b.cmp(a));
        let extra = held.len() - target[p] as usize;
        for &(_, s) in held.iter().take(extra) {
            sv.rep[s].retain(|&q| q != p);
        }
    }

    let mut need: Vec<usize> = (0..shards).map(|s| n[s][z] - sv.in_zone(s, z)).collect();
    let mut room: Vec<u64> = vec![0; sv.peers.len()];
    for &p in &members {
        room[p] = target[p].saturating_sub(load(sv, p));
    }
    let mut pairs: Vec<(Key, usize, usize)> = Vec::new();
    for s in (0..shards).filter(|&s| need[s] > 0) {
        for &p in members.iter().filter(|&&p| room[p] > 0) {
            pairs.push((sv.dist(p, s), s, p));
        }
    }
    pairs.sort();
    for (_, s, p) in pairs {
        if need[s] > 0 && room[p] > 0 && sv.fits(p, s) {
            sv.rep[s].push(p);
            need[s] -= 1;
            room[p] -= 1;
        }
    }

    let mut over = false;
    for s in 0..shards {
        while need[s] > 0 {
            if swap_in(sv, s, &members, &mut room) {
                need[s] -= 1;
                continue;
            }
            let fallback = members
                .iter()
                .copied()
                .filter(|&p| sv.fits(p, s))
                .min_by_key(|&p| (load(sv, p) as i64 - target[p] as i64, sv.dist(p, s)));
            match fallback {
                Some(p) => {
                    sv.rep[s].push(p);
                    over = true;
                }
                None => break,
            }
            need[s] -= 1;
        }
    }
    over
}

/// Frees a place for shard `s` on a peer with no room: a peer `p` that may hold `s` hands
/// one of its other shards to a peer `q` with room that may hold that one. Prefers handing
/// over a replica that was not kept from the previous map.
fn swap_in(sv: &mut Solver<'_>, s: usize, members: &[usize], room: &mut [u64]) -> bool {
    let shards = sv.rep.len();
    let mut takers: Vec<usize> = members.iter().copied().filter(|&q| room[q] > 0).collect();
    takers.sort_by_key(|&q| sv.dist(q, s));
    let mut givers: Vec<usize> = members.iter().copied().filter(|&p| sv.fits(p, s)).collect();
    givers.sort_by_key(|&p| sv.dist(p, s));
    for pass in 0..2 {
        for &p in &givers {
            for s2 in (0..shards).filter(|&s2| s2 != s && sv.rep[s2].contains(&p)) {
                let kept = sv.prev[s2].contains(&p);
                if (pass == 0) == kept {
                    continue;
                }
                for &q in &takers {
                    let host = sv.peers[q].host;
                    let ok = !sv.rep[s2]
                        .iter()
                        .any(|&o| o != p && (o == q || sv.peers[o].host == host));
                    if ok {
                        for slot in sv.rep[s2].iter_mut() {
                            if *slot == p {
                                *slot = q;
                            }
                        }
                        sv.rep[s].push(p);
                        room[q] -= 1;
                        return true;
                    }
                }
            }
        }
    }
    false
}

/// One leader per shard among its replicas, each peer leading in proportion to its weight
/// (never more shards than it holds): the previous leader where it fits, else the closest
/// replica with room, else by augmenting paths; over a target only when nothing else fits.
fn choose_leaders(sv: &mut Solver<'_>) -> Vec<Option<usize>> {
    let shards = sv.rep.len();
    let np = sv.peers.len();
    let holds: Vec<u64> = (0..np).map(|p| load(sv, p)).collect();
    let placed = (0..shards).filter(|&s| !sv.rep[s].is_empty()).count() as u64;
    let weights: Vec<u64> = (0..np)
        .map(|p| if holds[p] > 0 { sv.peers[p].weight } else { 0 })
        .collect();
    let mut prev_leads = vec![0u64; np];
    for r in &sv.prev {
        if let Some(&p) = r.first() {
            prev_leads[p] += 1;
        }
    }
    let cap = apportion(placed, &weights, &holds, &prev_leads);
    let mut leader: Vec<Option<usize>> = vec![None; shards];
    let mut count = vec![0u64; np];
    for s in 0..shards {
        if let Some(&p) = sv.prev[s].first()
            && sv.rep[s].contains(&p)
            && count[p] < cap[p]
        {
            leader[s] = Some(p);
            count[p] += 1;
        }
    }
    let mut options: Vec<Vec<usize>> = sv.rep.clone();
    for (s, o) in options.iter_mut().enumerate() {
        o.sort_by_key(|&p| distance(&sv.peers[p].key, &sv.keys[s]));
    }
    // The closest replica with room, then augmenting paths for the shards left.
    for s in 0..shards {
        if leader[s].is_none()
            && let Some(&p) = options[s].iter().find(|&&p| count[p] < cap[p])
        {
            leader[s] = Some(p);
            count[p] += 1;
        }
    }
    let mut over = false;
    for s in 0..shards {
        if leader[s].is_some() || options[s].is_empty() {
            continue;
        }
        if !augment(s, &options, &cap, &mut count, &mut leader)
            && let Some(&p) = options[s]
                .iter()
                .min_by_key(|&&p| (count[p] as i64 - cap[p] as i64, p))
        {
            leader[s] = Some(p);
            count[p] += 1;
            over = true;
        }
    }
    if over {
        sv.notes
            .push("some peers lead more shards than their share: their shards' replicas left no other choice".into());
    }
    leader
}

/// The shortest augmenting path for shard `s` (breadth first, so the fewest shards change
/// leader): a replica with room takes it, or a replica hands one of the shards it leads to
/// one of that shard's replicas with room, and so on.
fn augment(
    s: usize,
    options: &[Vec<usize>],
    cap: &[u64],
    count: &mut [u64],
    leader: &mut [Option<usize>],
) -> bool {
    let np = cap.len();
    // parent[q] = (the shard q would lead, the peer it takes it from).
    let mut parent: Vec<Option<(usize, Option<usize>)>> = vec![None; np];
    let mut queue = std::collections::VecDeque::new();
    for &p in &options[s] {
        if parent[p].is_none() {
            parent[p] = Some((s, None));
            queue.push_back(p);
        }
    }
    while let Some(p) = queue.pop_front() {
        if count[p] < cap[p] {
            let mut cur = p;
            while let Some((sh, from)) = parent[cur] {
                leader[sh] = Some(cur);
                count[cur] += 1;
                match from {
                    None => break,
                    Some(q) => {
                        count[q] -= 1;
                        cur = q;
                    }
                }
            }
            return true;
        }
        for s2 in (0..leader.len()).filter(|&s2| s2 != s && leader[s2] == Some(p)) {
            for &q in &options[s2] {
                if parent[q].is_none() {
                    parent[q] = Some((s2, Some(p)));
                    queue.push_back(q);
                }
            }
        }
    }
    false
}

/// One step of a rebalancing, in the order [`plan_moves`] gives them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Move {
    /// Add `peer` to the shard's group as a learner, and wait until it has caught up.
    AddLearner {
        /// The shard.
        shard: u32,
        /// The new replica.
        peer: String,
    },
    /// Make the caught-up learner `peer` a voter.
    Promote {
        /// The shard.
        shard: u32,
        /// The new voter.
        peer: String,
    },
    /// Move the shard's leadership from `from` to `to` (both voters).
    TransferLeader {
        /// The shard.
        shard: u32,
        /// The leader now.
        from: String,
        /// The leader after.
        to: String,
    },
    /// Remove `peer` from the shard's group (never its leader: a transfer comes first).
    Remove {
        /// The shard.
        shard: u32,
        /// The replica leaving.
        peer: String,
    },
}

impl Move {
    /// The shard the step is for.
    pub fn shard(&self) -> u32 {
        match self {
            Move::AddLearner { shard, .. }
            | Move::Promote { shard, .. }
            | Move::TransferLeader { shard, .. }
            | Move::Remove { shard, .. } => *shard,
        }
    }
}

/// The steps from `old` to `new`, one replica at a time per shard: for each replica that
/// changes, add the new peer as a learner, promote it, transfer leadership away from the
/// peer leaving if it leads, then remove it. Round `r` holds every shard's `r`-th change
/// (shards in order), so no shard has more than one change under way and peers' work is
/// spread; the last round moves leadership to each shard's new preferred leader. A shard
/// beyond one map's shard count is treated as having no replicas there. A shard the new map
/// leaves with no replica keeps its last one (removing it would lose the shard's data).
pub fn plan_moves(old: &ShardMap, new: &ShardMap) -> Vec<Move> {
    let shards = old.assignments.len().max(new.assignments.len());
    let replicas = |m: &ShardMap, s: usize| -> Vec<String> {
        m.assignments
            .get(s)
            .map(|a| a.replicas.clone())
            .unwrap_or_default()
    };
    let mut rounds: Vec<Vec<Move>> = Vec::new();
    let mut last: Vec<Move> = Vec::new();
    for s in 0..shards {
        let shard = s as u32;
        let before = replicas(old, s);
        let after = replicas(new, s);
        let adds: Vec<&String> = after.iter().filter(|p| !before.contains(p)).collect();
        let mut removes: Vec<&String> = before.iter().filter(|p| !after.contains(p)).collect();
        // Followers leave first, so the leader moves only when it has to.
        removes.sort_by_key(|p| before.first() == Some(*p));
        let mut voters = before.clone();
        let mut leader = before.first().cloned();
        for r in 0..adds.len().max(removes.len()) {
            let mut steps = Vec::new();
            if let Some(&a) = adds.get(r) {
                steps.push(Move::AddLearner {
                    shard,
                    peer: a.clone(),
                });
                steps.push(Move::Promote {
                    shard,
                    peer: a.clone(),
                });
                voters.push(a.clone());
            }
            if let Some(&gone) = removes.get(r) {
                if voters.len() <= 1 {
                    // The last replica stays: removing it would lose the shard's data.
                    continue;
                }
                if leader.as_ref() == Some(gone) {
                    let to = after
                        .iter()
                        .find(|p| *p != gone && voters.contains(p))
                        .or_else(|| voters.iter().find(|p| *p != gone))
                        .cloned();
                    if let Some(to) = to {
                        steps.push(Move::TransferLeader {
                            shard,
                            from: gone.clone(),
                            to: to.clone(),
                        });
                        leader = Some(to);
                    } else {
                        leader = None;
                    }
                }
                steps.push(Move::Remove {
                    shard,
                    peer: gone.clone(),
                });
                voters.retain(|p| p != gone);
            }
            if rounds.len() <= r {
                rounds.push(Vec::new());
            }
            rounds[r].extend(steps);
        }
        if leader.is_none() {
            leader = voters.first().cloned();
        }
        if let (Some(from), Some(to)) = (leader, after.first())
            && from != *to
        {
            last.push(Move::TransferLeader {
                shard,
                from,
                to: to.clone(),
            });
        }
    }
    rounds.into_iter().flatten().chain(last).collect()
}

/// How much a change of map moves, against the least it could.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Movement {
    /// Replicas added (a peer holds a shard in the new map it did not hold in the old).
    pub added: usize,
    /// Replicas removed.
    pub removed: usize,
    /// The least any map with the new map's replicas per peer must add: the sum over peers
    /// of what they gain. A leaving peer's replicas are counted here, through the peers that
    /// take them.
    pub lower_bound: usize,
    /// Shards whose preferred leader changes.
    pub leader_changes: usize,
}

/// Compares two maps: [`Movement`].
pub fn movement(old: &ShardMap, new: &ShardMap) -> Movement {
    let shards = old.assignments.len().max(new.assignments.len());
    let empty: Vec<String> = Vec::new();
    let get = |m: &'_ ShardMap, s: usize| -> Vec<String> {
        m.assignments
            .get(s)
            .map(|a| a.replicas.clone())
            .unwrap_or_else(|| empty.clone())
    };
    let mut loads: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let (mut added, mut removed, mut leader_changes) = (0, 0, 0);
    for s in 0..shards {
        let a = get(old, s);
        let b = get(new, s);
        added += b.iter().filter(|p| !a.contains(p)).count();
        removed += a.iter().filter(|p| !b.contains(p)).count();
        if a.first() != b.first() {
            leader_changes += 1;
        }
        for p in a {
            loads.entry(p).or_default().0 += 1;
        }
        for p in b {
            loads.entry(p).or_default().1 += 1;
        }
    }
    Movement {
        added,
        removed,
        lower_bound: loads.values().map(|(o, n)| n.saturating_sub(*o)).sum(),
        leader_changes,
    }
}

#[cfg(test)]
#[path = "shards_tests.rs"]
mod tests;
