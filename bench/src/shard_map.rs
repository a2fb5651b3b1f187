//! `canal bench shards`: the shard map at scale, computed in this process with no I/O.
//!
//! Simulated peers (ids `sim-peer-NNN`, Kademlia keys the SHA-256 of the id, as for real
//! peers' id bytes) spread round-robin over zones and tiers, each on a host of its own
//! unless `peers_per_host` says otherwise. The map is computed afresh, then again after one
//! peer joins and, from the first map, after one peer leaves. Reported: replicas and leaders
//! per peer (min/median/max against the even share), the replicas each change moves
//! against the lower bound ([`canal_placement::shards::movement`]), the rebalancing steps
//! planned, and the time each computation took. The same moves run on real Raft groups
//! over the in-memory transport in `canal-node`'s shard simulation (docs/simulation.md).

use anyhow::bail;
use canal_placement::shards::{
    Movement, ShardPeer, ShardPlan, ShardPolicy, compute, movement, plan_moves,
};
use canal_proto::caps::Capabilities;
use canal_proto::keyspace::{distance, peer_key_of_bytes, shard_key};
use std::time::{Duration, Instant};

/// What `canal bench shards` simulates.
#[derive(Debug, Clone)]
pub struct ShardsBench {
    /// Peers before the join and the leave.
    pub peers: usize,
    /// Shards in the topic space.
    pub shards: u32,
    /// K, replicas per shard.
    pub replication: usize,
    /// Zones (the `zone` label the replicas are spread over); 0 spreads over none.
    pub zones: usize,
    /// Tiers the peers are given round-robin (all may hold replicas unless `tier` is set).
    pub tiers: Vec<String>,
    /// Only peers of this tier hold replicas.
    pub tier: Option<String>,
    /// Peers sharing one host (1: every peer on its own).
    pub peers_per_host: usize,
}

impl Default for ShardsBench {
    fn default() -> Self {
        ShardsBench {
            peers: 100,
            shards: 1000,
            replication: 3,
            zones: 3,
            tiers: vec!["cloud".into(), "edge".into(), "core".into()],
            tier: None,
            peers_per_host: 1,
        }
    }
}

fn sim_peer(i: usize, opts: &ShardsBench) -> ShardPeer {
    let id = format!("sim-peer-{i:03}");
    let mut caps = Capabilities {
        peer_id: id.clone(),
        tier: opts
            .tiers
            .get(i % opts.tiers.len().max(1))
            .cloned()
            .unwrap_or_default(),
        ..Capabilities::default()
    };
    if opts.zones > 0 {
        caps.labels
            .insert("zone".into(), format!("zone-{}", i % opts.zones));
    }
    if opts.peers_per_host > 1 {
        // Hosts stay within a zone: consecutive peers of one zone share one.
        let zone = i % opts.zones.max(1);
        let nth = i / opts.zones.max(1);
        caps.labels.insert(
            canal_placement::shards::HOST_LABEL.into(),
            format!("host-{zone}-{}", nth / opts.peers_per_host),
        );
    }
    ShardPeer::new(id.clone(), peer_key_of_bytes(id.as_bytes()), caps, true)
}

/// min, median and max of `v`.
fn spread(mut v: Vec<usize>) -> (usize, usize, usize) {
    v.sort_unstable();
    match (v.first(), v.get(v.len() / 2), v.last()) {
        (Some(&a), Some(&b), Some(&c)) => (a, b, c),
        _ => (0, 0, 0),
    }
}

fn summary(name: &str, plan: &ShardPlan, took: Duration) -> serde_json::Value {
    let held: Vec<&canal_proto::shards::PeerShare> =
        plan.peers.iter().filter(|p| p.excluded.is_none()).collect();
    let replicas = spread(held.iter().map(|p| p.replicas).collect());
    let leaders = spread(held.iter().map(|p| p.leaders).collect());
    let total: usize = held.iter().map(|p| p.replicas).sum();
    let share = total as f64 / held.len().max(1) as f64;
    let short = plan
        .map
        .assignments
        .iter()
        .filter(|a| a.shortfall.is_some())
        .count();
    eprintln!(
        "{name:>7}: {} peers hold {total} replicas of {} shards in {:.1} ms; replicas per peer min/median/max {}/{}/{} (share {share:.1}); leaders {}/{}/{} (share {:.1}); {short} shards short of K",
        held.len(),
        plan.map.shards,
        took.as_secs_f64() * 1000.0,
        replicas.0,
        replicas.1,
        replicas.2,
        leaders.0,
        leaders.1,
        leaders.2,
        f64::from(plan.map.shards) / held.len().max(1) as f64,
    );
    for note in &plan.map.notes {
        eprintln!("         note: {note}");
    }
    serde_json::json!({
        "peers": held.len(), "shards": plan.map.shards, "replicas": total,
        "replicas_per_peer": { "min": replicas.0, "median": replicas.1, "max": replicas.2, "share": share },
        "leaders_per_peer": { "min": leaders.0, "median": leaders.1, "max": leaders.2 },
        "shards_short": short, "compute_ms": took.as_secs_f64() * 1000.0, "notes": plan.map.notes,
    })
}

fn moved(name: &str, m: Movement, steps: usize, minimum_note: &str) -> serde_json::Value {
    let ratio = m.added as f64 / m.lower_bound.max(1) as f64;
    eprintln!(
        "{name:>7}: {} replicas moved, the minimum is {} ({minimum_note}): {ratio:.2}x; {} removed, {} preferred leaders changed, {steps} rebalancing steps",
        m.added, m.lower_bound, m.removed, m.leader_changes,
    );
    serde_json::json!({
        "moved": m.added, "minimum": m.lower_bound, "removed": m.removed,
        "leader_changes": m.leader_changes, "steps": steps, "ratio": ratio,
    })
}

/// The fraction of `plan`'s replicas that are among their shard's K closest eligible peers.
fn home_fraction(plan: &ShardPlan, peers: &[ShardPeer]) -> f64 {
    let eligible: Vec<&ShardPeer> = peers
        .iter()
        .filter(|p| {
            plan.peers
                .iter()
                .any(|s| s.peer_id == p.peer_id && s.excluded.is_none())
        })
        .collect();
    let (mut home, mut all) = (0usize, 0usize);
    for a in &plan.map.assignments {
        let key = shard_key(a.shard);
        let mut by_distance: Vec<([u8; 32], &str)> = eligible
            .iter()
            .map(|p| (distance(&p.key, &key), p.peer_id.as_str()))
            .collect();
        by_distance.sort();
        by_distance.truncate(plan.map.replication);
        all += a.replicas.len();
        home += a
            .replicas
            .iter()
            .filter(|r| by_distance.iter().any(|(_, id)| id == r))
            .count();
    }
    home as f64 / all.max(1) as f64
}

/// `canal bench shards`: computes the map for `opts`, then after a join and after a leave,
/// and prints balance, movement against the minimum, and compute times (JSON with `json`).
pub fn run(opts: ShardsBench, json: bool) -> anyhow::Result<()> {
    let report = simulate(opts)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// The simulation of [`run`]: prints its lines to stderr and returns the report.
pub(crate) fn simulate(opts: ShardsBench) -> anyhow::Result<serde_json::Value> {
    if opts.peers == 0 || opts.peers_per_host == 0 {
        bail!("--peers and --peers-per-host must be at least 1");
    }
    let policy = ShardPolicy {
        shards: opts.shards,
        replication: opts.replication,
        spread: (opts.zones > 0).then(|| "zone".to_string()),
        requirements: canal_proto::function::Requirements {
            tier: opts.tier.clone(),
            hard: true,
            ..Default::default()
        },
    };
    let peers: Vec<ShardPeer> = (0..opts.peers).map(|i| sim_peer(i, &opts)).collect();
    eprintln!(
        "simulating {} peers ({} zones, tiers {}{}), {} shards, K = {}",
        opts.peers,
        opts.zones,
        opts.tiers.join("/"),
        opts.tier
            .as_ref()
            .map(|t| format!(", replicas only on tier {t}"))
            .unwrap_or_default(),
        opts.shards,
        opts.replication
    );

    let started = Instant::now();
    let base = compute(&policy, &peers, None)?;
    let mut first = summary("fresh", &base, started.elapsed());
    let home = home_fraction(&base, &peers);
    eprintln!(
        "         {:.0}% of the replicas are on their shard's DHT home (the K eligible peers closest to the shard key)",
        home * 100.0
    );
    first["dht_home_fraction"] = serde_json::json!(home);

    // The newcomer is the next simulated peer that may hold replicas.
    let eligible = |p: &ShardPeer| opts.tier.as_ref().is_none_or(|t| p.caps.tier == *t);
    let Some(newcomer) = (opts.peers..opts.peers + opts.tiers.len().max(1))
        .map(|i| sim_peer(i, &opts))
        .find(|p| eligible(p))
    else {
        bail!("no tier of --tiers is --tier: no peer may hold replicas");
    };
    let mut joined = peers.clone();
    joined.push(newcomer);
    let started = Instant::now();
    let after_join = compute(&policy, &joined, Some(&base.map))?;
    let join_took = started.elapsed();
    let join_summary = summary("join", &after_join, join_took);
    let newcomer = after_join
        .peers
        .iter()
        .filter(|p| p.excluded.is_none())
        .map(|p| p.replicas)
        .next_back()
        .unwrap_or_default();
    let join_moves = moved(
        "join",
        movement(&base.map, &after_join.map),
        plan_moves(&base.map, &after_join.map).len(),
        &format!("what the newcomer must receive: it holds {newcomer}"),
    );

    // The peer that leaves is the one the first map loads most.
    let gone = base
        .peers
        .iter()
        .filter(|p| p.excluded.is_none())
        .max_by_key(|p| (p.replicas, std::cmp::Reverse(p.peer_id.clone())))
        .map(|p| (p.peer_id.clone(), p.replicas));
    let Some((gone, held)) = gone else {
        bail!("no peer holds a replica: nothing to leave");
    };
    let left: Vec<ShardPeer> = peers
        .iter()
        .filter(|p| p.peer_id != gone)
        .cloned()
        .collect();
    let started = Instant::now();
    let after_leave = compute(&policy, &left, Some(&base.map))?;
    let leave_summary = summary("leave", &after_leave, started.elapsed());
    let leave_moves = moved(
        "leave",
        movement(&base.map, &after_leave.map),
        plan_moves(&base.map, &after_leave.map).len(),
        &format!("the replicas {gone} held: {held}"),
    );
    Ok(serde_json::json!({
        "peers": opts.peers, "shards": opts.shards, "replication": opts.replication,
        "zones": opts.zones,
        "fresh": first,
        "join": { "map": join_summary, "movement": join_moves },
        "leave": { "map": leave_summary, "movement": leave_moves, "peer": gone },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_simulation_balances_and_moves_the_minimum() {
        let opts = ShardsBench {
            peers: 12,
            shards: 64,
            ..ShardsBench::default()
        };
        let r = simulate(opts).unwrap_or_else(|e| panic!("{e}"));
        let per_peer = &r["fresh"]["replicas_per_peer"];
        assert_eq!(
            (per_peer["min"].as_u64(), per_peer["max"].as_u64()),
            (Some(16), Some(16))
        );
        assert_eq!(r["fresh"]["shards_short"].as_u64(), Some(0));
        for change in ["join", "leave"] {
            let m = &r[change]["movement"];
            assert!(m["moved"].as_u64() > Some(0), "{change}: {m}");
            assert_eq!(m["moved"], m["minimum"], "{change}: {m}");
        }
        assert!(
            simulate(ShardsBench {
                peers: 0,
                ..ShardsBench::default()
            },)
            .is_err()
        );
    }
}
