//! Property tests of [`decide`] and [`should_replace`] over random peer tables.

use crate::tests::candidate;
use crate::*;
use canal_proto::caps::{Gpu, GpuSource};
use canal_proto::function::Requirements;
use proptest::prelude::*;
use std::collections::BTreeMap;

const GIB: u64 = 1 << 30;
const TIERS: [&str; 3] = ["edge", "cloud", "device"];
const ZONES: [&str; 2] = ["eu", "us"];

/// One random peer: (alive, tier, zone, GPU sizes, declared, cpu, queue, running, cores,
/// rtt, measured exec ms).
type PeerSpec = (
    bool,
    usize,
    Option<usize>,
    Vec<u64>,
    bool,
    f32,
    u64,
    u64,
    u32,
    Option<f64>,
    Option<f64>,
);

fn peer_spec() -> impl Strategy<Value = PeerSpec> {
    (
        prop::bool::weighted(0.8),
        0..TIERS.len(),
        prop::option::of(0..ZONES.len()),
        prop::collection::vec(prop::sample::select(vec![8u64, 16, 24, 80]), 0..3),
        any::<bool>(),
        0.0f32..100.0,
        0..20u64,
        0..8u64,
        1..16u32,
        prop::option::of(0.0f64..200.0),
        prop::option::of(0.1f64..50.0),
    )
}

/// A table of up to 8 peers with distinct ids and distance ranks, and their estimates.
fn world() -> impl Strategy<Value = (Vec<Candidate>, Estimates)> {
    prop::collection::vec(peer_spec(), 0..8)
        .prop_flat_map(|specs| {
            let n = specs.len();
            (
                Just(specs),
                Just((0..n).collect::<Vec<usize>>()).prop_shuffle(),
            )
        })
        .prop_map(|(specs, ranks)| {
            let mut est = Estimates::new();
            let cands = specs
                .into_iter()
                .zip(ranks)
                .enumerate()
                .map(|(i, (s, rank))| {
                    let id = format!("p{i}");
                    let (alive, tier, zone, gpus, declared, cpu, queue, running, cores, rtt, exec) =
                        s;
                    let mut c = candidate(&id, rank, TIERS[tier]);
                    c.alive = alive;
                    if let Some(z) = zone {
                        c.caps.labels.insert("zone".into(), ZONES[z].into());
                    }
                    let gpus: Vec<Gpu> = gpus
                        .into_iter()
                        .map(|g| Gpu {
                            model: "X".into(),
                            memory_bytes: g * GIB,
                            source: if declared {
                                GpuSource::Declared
                            } else {
                                GpuSource::Detected
                            },
                        })
                        .collect();
                    if declared {
                        c.caps.gpus_declared = gpus;
                    } else {
                        c.caps.gpus_detected = gpus;
                    }
                    c.caps.load.cpu_percent = cpu;
                    c.caps.load.queue_len = queue;
                    c.caps.load.running_invocations = running;
                    c.caps.cpu_cores = cores;
                    c.rtt_ms = rtt;
                    if let Some(ms) = exec {
                        est.observe("f", &id, ms);
                    }
                    c
                })
                .collect();
            (cands, est)
        })
}

fn requirements() -> impl Strategy<Value = Requirements> {
    (
        any::<bool>(),
        prop::option::of(prop::sample::select(vec![8u64, 16, 24, 80])),
        prop::option::of(0..TIERS.len()),
        prop::option::of(0..ZONES.len()),
        0..5u32,
        any::<bool>(),
    )
        .prop_map(|(gpu, mem, tier, zone, replicas, hard)| Requirements {
            gpu,
            gpu_memory_bytes: mem.map(|g| g * GIB),
            tier: tier.map(|t| TIERS[t].to_string()),
            labels: zone
                .map(|z| BTreeMap::from([("zone".to_string(), ZONES[z].to_string())]))
                .unwrap_or_default(),
            replicas,
            hard,
        })
}

fn policy() -> impl Strategy<Value = Policy> {
    prop::sample::select(Policy::ALL.to_vec())
}

/// An independent reading of the constraints.
fn meets(req: &Requirements, c: &Candidate) -> bool {
    let gpus: Vec<u64> = c.caps.gpus().map(|g| g.memory_bytes).collect();
    let need = req.gpu_memory_bytes.filter(|&b| b > 0);
    (!(req.gpu || need.is_some()) || !gpus.is_empty())
        && need.is_none_or(|b| gpus.iter().any(|&g| g >= b))
        && req.tier.as_ref().is_none_or(|t| *t == c.caps.tier)
        && req
            .labels
            .iter()
            .all(|(k, v)| c.caps.labels.get(k) == Some(v))
}

/// An independent reading of the hysteresis rule.
fn beats(policy: Policy, challenger: &Verdict, incumbent: &Verdict) -> bool {
    let (cu, iu) = (challenger.unmet.len(), incumbent.unmet.len());
    if cu != iu {
        return cu < iu;
    }
    let (c, i) = (
        challenger.score.unwrap_or(f64::INFINITY),
        incumbent.score.unwrap_or(f64::INFINITY),
    );
    let (ratio, abs) = match policy {
        Policy::Latency => (LATENCY_MARGIN_RATIO, LATENCY_MARGIN_MS),
        Policy::LeastLoaded => (LOAD_MARGIN_RATIO, LOAD_MARGIN_POINTS),
        _ => (0.0, 0.0),
    };
    i - c > abs && i - c > ratio * i
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decisions_keep_their_invariants(
        (cands, est) in world(),
        req in requirements(),
        policy in policy(),
    ) {
        let d = decide(&req, policy, "f", &cands, &est, None);
        let want = req.replicas.max(1) as usize;
        let fits = |c: &Candidate| c.alive && (!req.hard || meets(&req, c));
        let fitting = cands.iter().filter(|c| fits(c)).count();

        // Chosen: distinct live peers meeting the hard constraints, as many as can be.
        let mut distinct = d.chosen.clone();
        distinct.sort();
        distinct.dedup();
        prop_assert_eq!(distinct.len(), d.chosen.len());
        for p in &d.chosen {
            let c = cands.iter().find(|c| &c.peer_id == p);
            prop_assert!(c.is_some_and(&fits), "{} does not fit", p);
        }
        prop_assert_eq!(d.chosen.len(), want.min(fitting));
        prop_assert_eq!(d.unplaceable.is_some(), fitting == 0);
        prop_assert_eq!(d.shortfall.is_some(), fitting > 0 && fitting < want);

        // One verdict per candidate; the chosen verdicts are exactly `chosen`, in order.
        prop_assert_eq!(d.verdicts.len(), cands.len());
        for c in &cands {
            let n = d.verdicts.iter().filter(|v| v.peer_id == c.peer_id).count();
            prop_assert_eq!(n, 1);
            let v = d.verdicts.iter().find(|v| v.peer_id == c.peer_id);
            prop_assert_eq!(v.map(|v| v.rejected), Some(!fits(c)));
        }
        let chosen: Vec<&str> = d
            .verdicts
            .iter()
            .filter(|v| v.chosen)
            .map(|v| v.peer_id.as_str())
            .collect();
        prop_assert_eq!(chosen, d.chosen.iter().map(String::as_str).collect::<Vec<_>>());
        for v in &d.verdicts {
            let prefix = if v.chosen { "chosen: " } else if v.rejected { "rejected: " } else { "not chosen: " };
            prop_assert!(v.reason.starts_with(prefix), "{:?}", v);
        }
        // A hard decision has no fallback; a preferred one misses nothing it could have met.
        if req.hard {
            prop_assert!(d.fallback.is_none());
            prop_assert!(d.verdicts.iter().all(|v| v.unmet.is_empty()));
        }
    }

    #[test]
    fn decisions_do_not_depend_on_candidate_order(
        ((cands, est), shuffled) in world().prop_flat_map(|(c, e)| {
            let s = Just(c.clone()).prop_shuffle();
            (Just((c, e)), s)
        }),
        req in requirements(),
        policy in policy(),
    ) {
        let d = decide(&req, policy, "f", &cands, &est, None);
        prop_assert_eq!(&decide(&req, policy, "f", &shuffled, &est, None), &d);
        // With a previous decision too.
        let again = decide(&req, policy, "f", &cands, &est, Some(&d));
        prop_assert_eq!(decide(&req, policy, "f", &shuffled, &est, Some(&d)), again);
    }

    #[test]
    fn latency_picks_the_lowest_prediction(
        (cands, est) in world(),
        req in requirements(),
    ) {
        let d = decide(&req, Policy::Latency, "f", &cands, &est, None);
        let live: Vec<&Verdict> = d.verdicts.iter().filter(|v| !v.rejected).collect();
        // Every prediction is queue + exec + network, computed independently here.
        let slowest = live
            .iter()
            .filter_map(|v| cands.iter().find(|c| c.peer_id == v.peer_id)?.rtt_ms)
            .fold(0.0, f64::max);
        for v in &live {
            let c = cands.iter().find(|c| c.peer_id == v.peer_id).unwrap();
            let exec = est
                .exec_ms("f", &c.peer_id)
                .or(est.mean_exec_ms("f"))
                .unwrap_or(DEFAULT_EXEC_MS);
            let events = (c.caps.load.queue_len + c.caps.load.running_invocations) as f64;
            let queue = events * exec / f64::from(c.caps.cpu_cores.max(1));
            let network = c.rtt_ms.unwrap_or(slowest + UNKNOWN_RTT_PENALTY_MS);
            let p = v.predicted_ms.unwrap();
            prop_assert!((p - (queue + exec + network)).abs() < 1e-9, "{} vs {}", p, queue + exec + network);
        }
        if let Some(first) = d.verdicts.first().filter(|v| v.chosen) {
            for v in &live {
                let key = |v: &Verdict| (v.unmet.len(), v.predicted_ms.unwrap());
                prop_assert!(key(first) <= key(v), "{:?} before {:?}", first, v);
            }
        }
    }

    #[test]
    fn hysteresis_keeps_a_choice_unless_beaten_by_the_margin(
        (cands, est) in world(),
        req in requirements(),
        measured in prop::bool::ANY,
        drift in prop::collection::vec((-30.0f32..30.0, prop::option::of(0.1f64..50.0), prop::bool::weighted(0.9)), 8),
    ) {
        let policy = if measured { Policy::Latency } else { Policy::LeastLoaded };
        let req = Requirements { replicas: 1, ..req };
        let prev = decide(&req, policy, "f", &cands, &est, None);
        // The measurements drift; some peers go away.
        let mut cands2 = cands.clone();
        let mut est2 = est.clone();
        for (c, (cpu, exec, alive)) in cands2.iter_mut().zip(&drift) {
            c.caps.load.cpu_percent = (c.caps.load.cpu_percent + cpu).clamp(0.0, 100.0);
            if let Some(ms) = exec {
                est2.observe("f", &c.peer_id, *ms);
            }
            c.alive &= alive;
        }
        let fresh = decide(&req, policy, "f", &cands2, &est2, None);
        let next = decide(&req, policy, "f", &cands2, &est2, Some(&prev));
        // should_replace agrees with what decide does.
        prop_assert_eq!(should_replace(&prev, &fresh), next.chosen != prev.chosen);
        let live: Vec<&Verdict> = next.verdicts.iter().filter(|v| !v.rejected).collect();
        if let Some(p) = prev.chosen.first() {
            let incumbent = live.iter().find(|v| &v.peer_id == p);
            if let Some(inc) = incumbent {
                let beaten = live.iter().any(|v| v.peer_id != *p && beats(policy, v, inc));
                if !beaten {
                    prop_assert_eq!(&next.chosen, &prev.chosen);
                }
            }
        }
        // Whatever was chosen is not beaten by the margin.
        if let Some(c) = next.chosen.first() {
            let chosen = live.iter().find(|v| &v.peer_id == c).unwrap();
            for v in &live {
                prop_assert!(!beats(policy, v, chosen), "{:?} beats {:?}", v, chosen);
            }
        }
    }

    #[test]
    fn should_replace_agrees_with_decide_for_any_two_tables(
        (a, est_a) in world(),
        (b, est_b) in world(),
        req in requirements(),
        policy in policy(),
    ) {
        let prev = decide(&req, policy, "f", &a, &est_a, None);
        let fresh = decide(&req, policy, "f", &b, &est_b, None);
        let next = decide(&req, policy, "f", &b, &est_b, Some(&prev));
        prop_assert_eq!(should_replace(&prev, &fresh), next.chosen != prev.chosen);
        prop_assert_eq!(next.chosen.len(), fresh.chosen.len());
    }
}
