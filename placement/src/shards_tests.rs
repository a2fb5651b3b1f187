//! Tests of the shard map: constraints, balance, determinism, movement, and the move plan.

use super::*;
use canal_proto::keyspace::peer_key_of_bytes;
use proptest::prelude::*;
use std::collections::BTreeMap;

pub(super) fn peer(id: &str, zone: Option<&str>, tier: &str, host: Option<&str>) -> ShardPeer {
    let mut caps = Capabilities {
        peer_id: id.into(),
        tier: tier.into(),
        ..Capabilities::default()
    };
    if let Some(z) = zone {
        caps.labels.insert("zone".into(), z.into());
    }
    if let Some(h) = host {
        caps.labels.insert(HOST_LABEL.into(), h.into());
    }
    ShardPeer::new(id, peer_key_of_bytes(id.as_bytes()), caps, true)
}

fn zoned(n: usize, zones: usize) -> Vec<ShardPeer> {
    (0..n)
        .map(|i| {
            let z = format!("z{}", i % zones);
            peer(&format!("peer-{i:03}"), Some(&z), "cloud", None)
        })
        .collect()
}

fn policy(shards: u32, k: usize, spread: bool) -> ShardPolicy {
    ShardPolicy {
        shards,
        replication: k,
        spread: spread.then(|| "zone".to_string()),
        ..ShardPolicy::default()
    }
}

fn plan(p: &ShardPolicy, peers: &[ShardPeer], prev: Option<&ShardMap>) -> ShardPlan {
    compute(p, peers, prev).unwrap_or_else(|e| panic!("{e}"))
}

/// Every hard constraint of `plan`, and that a shard short of K says why. Returns the
/// violations, empty when there are none.
pub(super) fn violations(
    policy: &ShardPolicy,
    peers: &[ShardPeer],
    plan: &ShardPlan,
) -> Vec<String> {
    let mut out = Vec::new();
    let by_id: BTreeMap<&str, &ShardPeer> = peers.iter().map(|p| (p.peer_id.as_str(), p)).collect();
    let zone = |p: &ShardPeer| {
        policy
            .spread
            .as_ref()
            .map(|l| p.caps.labels.get(l).cloned().unwrap_or_default())
            .unwrap_or_default()
    };
    let eligible: Vec<&ShardPeer> = plan
        .peers
        .iter()
        .filter(|s| s.excluded.is_none())
        .filter_map(|s| by_id.get(s.peer_id.as_str()).copied())
        .collect();
    let zones: BTreeSet<String> = eligible.iter().map(|p| zone(p)).collect();
    let per_zone = policy.replication.div_ceil(zones.len().max(1));
    if let Err(e) = plan.map.validate() {
        out.push(format!("invalid map: {e}"));
    }
    for a in &plan.map.assignments {
        let mut hosts = BTreeSet::new();
        let mut in_zone: BTreeMap<String, usize> = BTreeMap::new();
        for id in &a.replicas {
            let Some(p) = by_id.get(id.as_str()) else {
                out.push(format!("shard {}: unknown peer {id}", a.shard));
                continue;
            };
            if !p.alive || p.weight == 0 {
                out.push(format!("shard {}: {id} is not usable", a.shard));
            }
            if let Some(t) = &policy.requirements.tier
                && policy.requirements.hard
                && p.caps.tier != *t
            {
                out.push(format!("shard {}: {id} is not in tier {t}", a.shard));
            }
            if !hosts.insert(p.host.clone()) {
                out.push(format!(
                    "shard {}: two replicas on host {}",
                    a.shard, p.host
                ));
            }
            *in_zone.entry(zone(p)).or_default() += 1;
        }
        if let Some((z, c)) = in_zone.iter().find(|(_, c)| **c > per_zone) {
            out.push(format!(
                "shard {}: {c} replicas in zone {z:?}, at most {per_zone}",
                a.shard
            ));
        }
        match &a.shortfall {
            None if a.replicas.len() < policy.replication => out.push(format!(
                "shard {}: {} replicas and no shortfall",
                a.shard,
                a.replicas.len()
            )),
            Some(s) if a.replicas.len() >= policy.replication => {
                out.push(format!("shard {}: full but says {s}", a.shard))
            }
            Some(s) if !s.contains(" of ") || !s.contains(':') => out.push(format!(
                "shard {}: shortfall names no constraint: {s}",
                a.shard
            )),
            _ => {}
        }
    }
    out
}

/// Balance: a peer holds its target unless a note names it; with no spread and every peer
/// on its own host, the target is within one of the weighted share; leaders are within one
/// of their share unless a note says some lead more. Returns what is off.
fn unbalanced(policy: &ShardPolicy, peers: &[ShardPeer], plan: &ShardPlan) -> Vec<String> {
    let mut out = Vec::new();
    let held: Vec<&PeerShare> = plan.peers.iter().filter(|s| s.excluded.is_none()).collect();
    let over_note = plan
        .map
        .notes
        .iter()
        .find(|n| n.contains("more replicas than their target"));
    for s in &held {
        if s.replicas > s.target && !over_note.is_some_and(|n| n.contains(&s.peer_id)) {
            out.push(format!(
                "{} holds {} for {} and no note says why",
                s.peer_id, s.replicas, s.target
            ));
        }
    }
    let weight = |id: &str| {
        peers
            .iter()
            .find(|p| p.peer_id == id)
            .map(|p| u64::from(p.weight))
            .unwrap_or(0)
    };
    let own_hosts = held.iter().map(|s| &s.host).collect::<BTreeSet<_>>().len() == held.len();
    let total: usize = held.iter().map(|s| s.replicas).sum();
    let w: u64 = held.iter().map(|s| weight(&s.peer_id)).sum();
    let shards = policy.shards as usize;
    let share = |s: &PeerShare, of: usize| of as f64 * weight(&s.peer_id) as f64 / w.max(1) as f64;
    if policy.spread.is_none() && own_hosts && held.iter().all(|s| share(s, total) <= shards as f64)
    {
        for s in &held {
            let fair = share(s, total);
            if (s.target as f64 - fair).abs() >= 1.0 {
                out.push(format!(
                    "{}: target {} for a share of {fair:.2}",
                    s.peer_id, s.target
                ));
            }
        }
    }
    let placed = plan
        .map
        .assignments
        .iter()
        .filter(|a| !a.replicas.is_empty())
        .count();
    let leader_note = plan
        .map
        .notes
        .iter()
        .any(|n| n.contains("lead more shards"));
    let holders: Vec<&&PeerShare> = held.iter().filter(|s| s.replicas > 0).collect();
    let hw: u64 = holders.iter().map(|s| weight(&s.peer_id)).sum();
    for s in holders {
        let fair =
            (placed as f64 * weight(&s.peer_id) as f64 / hw.max(1) as f64).min(s.replicas as f64);
        if s.leaders as f64 >= fair + 1.0 && !leader_note {
            out.push(format!(
                "{} leads {} for a share of {fair:.2}",
                s.peer_id, s.leaders
            ));
        }
    }
    out
}

fn loads(map: &ShardMap) -> BTreeMap<String, (usize, usize)> {
    let mut out: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for a in &map.assignments {
        for (i, p) in a.replicas.iter().enumerate() {
            let e = out.entry(p.clone()).or_default();
            e.0 += 1;
            if i == 0 {
                e.1 += 1;
            }
        }
    }
    out
}

/// A group as the moves leave it: its voters and its leader.
pub(super) type Group = (BTreeSet<String>, Option<String>);

/// Runs `moves` on `old`'s groups, checking every step is legal, and returns the groups
/// (replicas as sets, and the leader) at the end.
pub(super) fn run_moves(old: &ShardMap, moves: &[Move]) -> Result<Vec<Group>, String> {
    let shards = old.assignments.len().max(
        moves
            .iter()
            .map(|m| m.shard() as usize + 1)
            .max()
            .unwrap_or(0),
    );
    let mut groups: Vec<(BTreeSet<String>, BTreeSet<String>, Option<String>)> = (0..shards)
        .map(|s| {
            let r = old.replicas(s as u32);
            (
                r.iter().cloned().collect(),
                BTreeSet::new(),
                r.first().cloned(),
            )
        })
        .collect();
    for m in moves {
        let g = &mut groups[m.shard() as usize];
        match m {
            Move::AddLearner { peer, .. } => {
                if g.0.contains(peer) || !g.1.insert(peer.clone()) {
                    return Err(format!("{m:?}: already a member"));
                }
            }
            Move::Promote { peer, .. } => {
                if !g.1.remove(peer) {
                    return Err(format!("{m:?}: not a learner"));
                }
                g.0.insert(peer.clone());
            }
            Move::TransferLeader { from, to, .. } => {
                if g.2.as_ref() != Some(from) || !g.0.contains(to) {
                    return Err(format!("{m:?}: leader is {:?}", g.2));
                }
                g.2 = Some(to.clone());
            }
            Move::Remove { peer, .. } => {
                if g.2.as_ref() == Some(peer) {
                    return Err(format!("{m:?}: removes the leader"));
                }
                if !g.0.remove(peer) {
                    return Err(format!("{m:?}: not a voter"));
                }
            }
        }
        if !g.1.is_empty() && g.1.len() > 1 {
            return Err(format!("{m:?}: two changes at once"));
        }
        if g.2.is_none() {
            g.2 = g.0.iter().next().cloned();
        }
    }
    Ok(groups.into_iter().map(|(v, _, l)| (v, l)).collect())
}

pub(super) fn check_moves(old: &ShardMap, new: &ShardMap) -> Result<(), String> {
    let moves = plan_moves(old, new);
    let end = run_moves(old, &moves)?;
    for (s, (voters, leader)) in end.iter().enumerate() {
        let want: BTreeSet<String> = new.replicas(s as u32).iter().cloned().collect();
        if want.is_empty() {
            let had = !old.replicas(s as u32).is_empty();
            if had && voters.len() != 1 {
                return Err(format!(
                    "shard {s}: has no new replica and keeps {voters:?}"
                ));
            }
            continue;
        }
        if *voters != want {
            return Err(format!("shard {s}: ends with {voters:?}, wants {want:?}"));
        }
        if !want.is_empty() && leader.as_deref() != new.leader(s as u32) {
            return Err(format!(
                "shard {s}: leader {leader:?}, wants {:?}",
                new.leader(s as u32)
            ));
        }
    }
    let m = movement(old, new);
    let adds = moves
        .iter()
        .filter(|m| matches!(m, Move::AddLearner { .. }))
        .count();
    if adds != m.added {
        return Err(format!("{adds} learners added, {} replicas moved", m.added));
    }
    let removes = moves
        .iter()
        .filter(|m| matches!(m, Move::Remove { .. }))
        .count();
    if removes > m.removed {
        return Err(format!(
            "{removes} replicas removed, {} leave the map",
            m.removed
        ));
    }
    Ok(())
}

#[test]
fn apportion_is_proportional_capped_and_sticky() {
    assert_eq!(
        apportion(10, &[1, 1, 1], &[10, 10, 10], &[0, 0, 0]),
        vec![4, 3, 3]
    );
    assert_eq!(
        apportion(10, &[1, 1, 1], &[10, 10, 10], &[0, 5, 0]),
        vec![3, 4, 3]
    );
    assert_eq!(
        apportion(10, &[1, 1, 1], &[10, 10, 10], &[3, 3, 4]),
        vec![3, 3, 4]
    );
    assert_eq!(
        apportion(10, &[1, 1, 2], &[10, 10, 10], &[0, 0, 0]),
        vec![3, 2, 5]
    );
    assert_eq!(
        apportion(10, &[1, 1, 8], &[10, 10, 4], &[0, 0, 0]),
        vec![3, 3, 4]
    );
    assert_eq!(apportion(10, &[1, 0], &[4, 10], &[0, 0]), vec![4, 0]);
    assert_eq!(apportion(0, &[1], &[4], &[0]), vec![0]);
}

#[test]
fn a_bad_policy_is_refused_naming_the_range() {
    let peers = zoned(3, 1);
    let e = compute(&policy(0, 3, false), &peers, None).unwrap_err();
    assert_eq!(e.to_string(), "shard count 0 is out of range: 1 to 65536");
    let e = compute(&policy(4, 17, false), &peers, None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "replication factor 17 is out of range: 1 to 16"
    );
    let mut p = policy(4, 3, false);
    p.spread = Some(String::new());
    assert_eq!(compute(&p, &peers, None).unwrap_err(), ShardError::Spread);
}

#[test]
fn every_shard_gets_k_replicas_one_per_zone_balanced() {
    let peers = zoned(12, 3);
    let p = policy(64, 3, true);
    let out = plan(&p, &peers, None);
    assert_eq!(violations(&p, &peers, &out), Vec::<String>::new());
    let l = loads(&out.map);
    assert_eq!(l.len(), 12);
    for (id, (replicas, leaders)) in &l {
        assert_eq!(*replicas, 16, "{id}: 192 replicas over 12 peers");
        assert!((5..=6).contains(leaders), "{id} leads {leaders} of 64");
    }
    for a in &out.map.assignments {
        assert_eq!(a.replicas.len(), 3);
        assert_eq!(a.shortfall, None);
    }
    assert_eq!(out.map.epoch, 1);
    assert!(out.map.notes.is_empty(), "{:?}", out.map.notes);
}

#[test]
fn the_map_prefers_the_dht_home() {
    let peers = zoned(20, 1);
    let p = policy(64, 3, false);
    let out = plan(&p, &peers, None);
    let mut home = 0;
    for a in &out.map.assignments {
        let key = shard_key(a.shard);
        let mut all: Vec<(Key, &str)> = peers
            .iter()
            .map(|p| (distance(&p.key, &key), p.peer_id.as_str()))
            .collect();
        all.sort();
        home += a
            .replicas
            .iter()
            .filter(|r| all[..3].iter().any(|(_, id)| id == *r))
            .count();
    }
    // 192 replicas; balance moves some off the home, most stay.
    assert!(
        home >= 192 * 6 / 10,
        "only {home} of 192 replicas are home peers"
    );
}

#[test]
fn the_same_peers_in_any_order_give_the_same_map_and_a_recompute_moves_nothing() {
    let mut peers = zoned(17, 3);
    let p = policy(100, 3, true);
    let a = plan(&p, &peers, None);
    peers.reverse();
    peers.swap(2, 9);
    let b = plan(&p, &peers, None);
    assert_eq!(a, b);
    let again = plan(&p, &peers, Some(&a.map));
    assert_eq!(
        again.map, a.map,
        "a recompute with nothing changed keeps the map and its epoch"
    );
    assert!(plan_moves(&a.map, &again.map).is_empty());
}

#[test]
fn a_join_moves_about_one_nth_of_the_replicas() {
    let peers = zoned(30, 3);
    let p = policy(256, 3, true);
    let before = plan(&p, &peers, None);
    let mut joined = peers.clone();
    joined.push(peer("peer-new", Some("z1"), "cloud", None));
    let after = plan(&p, &joined, Some(&before.map));
    assert_eq!(violations(&p, &joined, &after), Vec::<String>::new());
    let m = movement(&before.map, &after.map);
    let total = 256 * 3;
    // The newcomer takes its zone's share (256 replicas over 11 peers, about 23), and
    // nothing else moves.
    let new_load = loads(&after.map).get("peer-new").map(|l| l.0).unwrap_or(0);
    assert!((23..=24).contains(&new_load), "newcomer holds {new_load}");
    assert_eq!(m.added, new_load);
    assert_eq!(m.added, m.lower_bound);
    assert!(m.added <= 2 * total / 31, "{m:?}");
    // The newcomer leads its share (256 / 31, about 8) and few other leaders change.
    let new_leads = loads(&after.map).get("peer-new").map(|l| l.1).unwrap_or(0);
    assert!((8..=9).contains(&new_leads), "newcomer leads {new_leads}");
    assert!(m.leader_changes <= 3 * new_leads, "{m:?}");
    assert_eq!(after.map.epoch, 2);
    check_moves(&before.map, &after.map).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn a_leave_moves_only_the_leaving_peers_replicas() {
    let peers = zoned(30, 3);
    let p = policy(256, 3, true);
    let before = plan(&p, &peers, None);
    let gone = "peer-007";
    let left: Vec<ShardPeer> = peers
        .iter()
        .filter(|p| p.peer_id != gone)
        .cloned()
        .collect();
    let after = plan(&p, &left, Some(&before.map));
    assert_eq!(violations(&p, &left, &after), Vec::<String>::new());
    let (held, led) = loads(&before.map)[gone];
    let m = movement(&before.map, &after.map);
    assert_eq!(m.added, held, "{m:?}");
    assert!(m.leader_changes <= 3 * led, "{m:?}, it led {led}");
    assert_eq!(m.lower_bound, held);
    for (a, b) in before.map.assignments.iter().zip(&after.map.assignments) {
        for r in a.replicas.iter().filter(|r| *r != gone) {
            assert!(
                b.replicas.contains(r),
                "shard {}: {r} moved though it stayed",
                a.shard
            );
        }
    }
    check_moves(&before.map, &after.map).unwrap_or_else(|e| panic!("{e}"));
    // The same when the peer is still known but dead.
    let mut dead = peers.clone();
    if let Some(d) = dead.iter_mut().find(|p| p.peer_id == gone) {
        d.alive = false;
    }
    let after_dead = plan(&p, &dead, Some(&before.map));
    assert_eq!(after_dead.map, after.map);
    let share = after_dead.peers.iter().find(|s| s.peer_id == gone);
    assert_eq!(
        share.and_then(|s| s.excluded.clone()).as_deref(),
        Some("not alive")
    );
}

#[test]
fn never_two_replicas_on_one_host_and_the_shortfall_says_so() {
    let peers: Vec<ShardPeer> = (0..6)
        .map(|i| {
            peer(
                &format!("p{i}"),
                None,
                "cloud",
                Some(if i < 3 { "host-a" } else { "host-b" }),
            )
        })
        .collect();
    let p = policy(8, 3, false);
    let out = plan(&p, &peers, None);
    assert_eq!(violations(&p, &peers, &out), Vec::<String>::new());
    for a in &out.map.assignments {
        assert_eq!(a.replicas.len(), 2);
        assert_eq!(
            a.shortfall.as_deref(),
            Some(
                "2 of 3 replicas placed: the 6 eligible peers run on 2 hosts, and no two replicas of a shard share a host"
            )
        );
    }
}

#[test]
fn tier_and_labels_exclude_peers_and_name_the_requirement() {
    let peers = vec![
        peer("c1", Some("a"), "cloud", None),
        peer("c2", Some("b"), "cloud", None),
        peer("e1", Some("a"), "edge", None),
    ];
    let mut p = policy(4, 2, true);
    p.requirements.tier = Some("cloud".into());
    let out = plan(&p, &peers, None);
    assert_eq!(violations(&p, &peers, &out), Vec::<String>::new());
    let e1 = out.peers.iter().find(|s| s.peer_id == "e1");
    assert_eq!(
        e1.and_then(|s| s.excluded.clone()).as_deref(),
        Some("tier edge, cloud required")
    );
    assert!(out.map.assignments.iter().all(|a| a.replicas.len() == 2));

    p.requirements.tier = Some("gpu-farm".into());
    let none = plan(&p, &peers, None);
    assert_eq!(
        none.map.assignments[0].shortfall.as_deref(),
        Some("0 of 2 replicas placed: no live peer is in tier gpu-farm")
    );
    // Preferred, it is relaxed and the map says so.
    p.requirements.hard = false;
    let relaxed = plan(&p, &peers, None);
    assert!(
        relaxed
            .map
            .assignments
            .iter()
            .all(|a| a.replicas.len() == 2)
    );
    assert_eq!(
        relaxed.map.notes[0],
        "relaxed the preferred tier gpu-farm: no live peer meets it"
    );
}

#[test]
fn an_uneven_zone_is_loaded_as_the_spread_demands_and_a_note_says_why() {
    let mut peers = vec![peer("solo", Some("a"), "cloud", None)];
    peers.extend((0..10).map(|i| {
        peer(
            &format!("b{i}"),
            Some(if i < 5 { "b" } else { "c" }),
            "cloud",
            None,
        )
    }));
    let p = policy(40, 3, true);
    let out = plan(&p, &peers, None);
    assert_eq!(violations(&p, &peers, &out), Vec::<String>::new());
    assert_eq!(
        loads(&out.map)["solo"].0,
        40,
        "one zone a replica of every shard"
    );
    assert!(
        out.map.notes.iter().any(
            |n| n.starts_with("zone a holds 40 replicas, 40.0 per unit of weight against 10.9")
        ),
        "{:?}",
        out.map.notes
    );
    // Two zones, K = 3: at most two in a zone.
    let two: Vec<ShardPeer> = zoned(8, 2);
    let out = plan(&p, &two, None);
    assert_eq!(violations(&p, &two, &out), Vec::<String>::new());
    // Zones too thin for K.
    let thin = vec![
        peer("x", Some("a"), "cloud", None),
        peer("y", Some("b"), "cloud", None),
        peer("y2", Some("b"), "cloud", None),
        peer("y3", Some("b"), "cloud", None),
    ];
    let mut p4 = policy(4, 4, true);
    p4.replication = 4;
    let out = plan(&p4, &thin, None);
    assert_eq!(violations(&p4, &thin, &out), Vec::<String>::new());
    assert_eq!(
        out.map.assignments[0].shortfall.as_deref(),
        Some(
            "3 of 4 replicas placed: spread over zone: at most 2 replicas of a shard in one of the 2 zones, and zone a has 1 host"
        )
    );
}

#[test]
fn weight_buys_a_larger_share() {
    let mut peers = zoned(4, 1);
    peers[0].weight = 2;
    let p = policy(50, 2, false);
    let out = plan(&p, &peers, None);
    let l = loads(&out.map);
    assert_eq!(l["peer-000"].0, 40);
    assert_eq!(l["peer-001"].0, 20);
    peers[1].weight = 0;
    let out = plan(&p, &peers, None);
    assert_eq!(loads(&out.map).get("peer-001"), None);
}

#[test]
fn moves_add_promote_then_remove_and_never_remove_a_leader() {
    let peers = zoned(9, 3);
    let p = policy(32, 3, true);
    let before = plan(&p, &peers, None);
    // Replace two peers at once.
    let mut next: Vec<ShardPeer> = peers
        .iter()
        .filter(|p| p.peer_id != "peer-000" && p.peer_id != "peer-004")
        .cloned()
        .collect();
    next.push(peer("peer-100", Some("z0"), "cloud", None));
    next.push(peer("peer-101", Some("z1"), "cloud", None));
    let after = plan(&p, &next, Some(&before.map));
    check_moves(&before.map, &after.map).unwrap_or_else(|e| panic!("{e}"));
    let moves = plan_moves(&before.map, &after.map);
    for s in 0..32u32 {
        let mine: Vec<&Move> = moves.iter().filter(|m| m.shard() == s).collect();
        for w in mine.windows(2) {
            if let Move::AddLearner { peer, .. } = w[0] {
                assert_eq!(
                    w[1],
                    &Move::Promote {
                        shard: s,
                        peer: peer.clone()
                    }
                );
            }
        }
    }
    // A shard count change: every shard starts afresh.
    let more = plan(&policy(40, 3, true), &next, Some(&after.map));
    assert!(more.map.notes.iter().any(|n| n.contains("computed afresh")));
    check_moves(&after.map, &more.map).unwrap_or_else(|e| panic!("{e}"));
}

// ---- properties ----

/// (alive, zone or none, tier, host group or none, weight)
type Spec = (bool, Option<u8>, u8, Option<u8>, u32);

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop::bool::weighted(0.9),
        prop::option::weighted(0.9, 0u8..4),
        0u8..3,
        prop::option::weighted(0.2, 0u8..3),
        prop::sample::select(vec![0u32, 1, 1, 1, 1, 2, 3]),
    )
}

fn build(specs: &[Spec], base: usize) -> Vec<ShardPeer> {
    specs
        .iter()
        .enumerate()
        .map(|(i, &(alive, zone, tier, host, weight))| {
            let id = format!("p{:03}", base + i);
            let z = zone.map(|z| format!("z{z}"));
            let h = host.map(|h| format!("h{h}"));
            let mut p = peer(
                &id,
                z.as_deref(),
                ["cloud", "edge", "core"][tier as usize],
                h.as_deref(),
            );
            p.alive = alive;
            p.weight = weight;
            p
        })
        .collect()
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 1_000,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x05ad_0014),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn every_map_keeps_the_constraints_or_says_why(
        specs in prop::collection::vec(spec(), 0..24),
        shards in 1u32..48,
        k in 1usize..5,
        spread in any::<bool>(),
        tier in prop::option::weighted(0.3, 0u8..3),
        hard in prop::bool::weighted(0.8),
    ) {
        let peers = build(&specs, 0);
        let mut p = policy(shards, k, spread);
        p.requirements.tier = tier.map(|t| ["cloud", "edge", "core"][t as usize].to_string());
        p.requirements.hard = hard;
        let out = plan(&p, &peers, None);
        let v = violations(&p, &peers, &out);
        prop_assert!(v.is_empty(), "{v:?}");
        let b = unbalanced(&p, &peers, &out);
        prop_assert!(b.is_empty(), "{b:?}");
        // Shuffled input, same map.
        let mut rev = peers.clone();
        rev.reverse();
        prop_assert_eq!(&plan(&p, &rev, None), &out);
        // Recomputing changes nothing.
        let again = plan(&p, &peers, Some(&out.map));
        prop_assert_eq!(&again.map.assignments, &out.map.assignments);
    }

    #[test]
    fn a_join_or_a_leave_moves_within_a_factor_of_the_least(
        specs in prop::collection::vec(spec(), 1..24),
        extra in spec(),
        shards in 1u32..48,
        k in 1usize..4,
        spread in any::<bool>(),
        leave in any::<prop::sample::Index>(),
    ) {
        let peers = build(&specs, 0);
        let p = policy(shards, k, spread);
        let before = plan(&p, &peers, None);
        let mut joined = peers.clone();
        joined.extend(build(&[extra], 500));
        let mut left = peers.clone();
        left.remove(leave.index(left.len()));
        for next in [joined, left] {
            let after = plan(&p, &next, Some(&before.map));
            let v = violations(&p, &next, &after);
            prop_assert!(v.is_empty(), "{v:?}");
            let m = movement(&before.map, &after.map);
            prop_assert!(
                m.added <= 2 * m.lower_bound + k,
                "{m:?} for {} shards, K {k}", shards
            );
            if let Err(e) = check_moves(&before.map, &after.map) {
                prop_assert!(false, "{e}");
            }
        }
    }
}
