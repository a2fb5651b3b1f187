//! Table-driven tests of [`decide`] and [`should_replace`], and the helpers the other
//! modules' tests share.

use crate::*;
use canal_proto::caps::{Capabilities, Gpu, GpuSource, Load};
use canal_proto::function::Requirements;
use std::collections::BTreeMap;

const GIB: u64 = 1 << 30;

/// A live-looking record: 1 core, idle, detected GPUs of the given sizes in GiB.
pub(crate) fn caps(peer: &str, tier: &str, gpus_gib: &[u64]) -> Capabilities {
    Capabilities {
        peer_id: peer.into(),
        version: "0.1.0".into(),
        listen_addrs: Vec::new(),
        api_addr: None,
        mqtt_addr: None,
        tier: tier.into(),
        labels: BTreeMap::new(),
        cpu_cores: 1,
        memory_total_bytes: 8 * GIB,
        memory_available_bytes: 4 * GIB,
        gpus_detected: gpus_gib
            .iter()
            .map(|&g| Gpu {
                model: "A10G".into(),
                memory_bytes: g * GIB,
                source: GpuSource::Detected,
            })
            .collect(),
        gpus_declared: Vec::new(),
        load: Load::default(),
        raft_member: true,
        forms_cluster: false,
        interest: Vec::new(),
        seq: 1,
        measured_at_ms: 1_000,
    }
}

/// A live candidate with no GPU, no labels, no load and no measured round trip.
pub(crate) fn candidate(peer: &str, rank: usize, tier: &str) -> Candidate {
    Candidate {
        peer_id: peer.into(),
        caps: caps(peer, tier, &[]),
        alive: true,
        distance_rank: rank,
        rtt_ms: None,
    }
}

fn req() -> Requirements {
    Requirements {
        replicas: 1,
        hard: true,
        ..Requirements::default()
    }
}

fn run(req: &Requirements, policy: Policy, cands: &[Candidate]) -> Decision {
    decide(req, policy, "f", cands, &Estimates::new(), None)
}

fn reason<'a>(d: &'a Decision, peer: &str) -> &'a str {
    let v: Vec<&Verdict> = d.verdicts.iter().filter(|v| v.peer_id == peer).collect();
    assert_eq!(v.len(), 1, "{peer} in {d:#?}");
    &v[0].reason
}

fn with<F: FnOnce(&mut Candidate)>(mut c: Candidate, f: F) -> Candidate {
    f(&mut c);
    c
}

#[test]
fn each_rejection_reason_reads_as_documented() {
    let gpu = Requirements { gpu: true, ..req() };
    let gpu16 = Requirements {
        gpu: true,
        gpu_memory_bytes: Some(16 * GIB),
        ..req()
    };
    let edge = Requirements {
        tier: Some("edge".into()),
        ..req()
    };
    let eu = Requirements {
        labels: BTreeMap::from([("zone".into(), "eu".into())]),
        ..req()
    };
    let gpu_edge = Requirements {
        gpu: true,
        tier: Some("edge".into()),
        ..req()
    };
    let base = || candidate("p", 0, "cloud");
    let cases: Vec<(&str, Requirements, Candidate, &str)> = vec![
        (
            "dead",
            req(),
            with(base(), |c| c.alive = false),
            "rejected: not reachable (no fresh capability record)",
        ),
        ("no gpu", gpu.clone(), base(), "rejected: no GPU"),
        (
            "small gpu",
            gpu16.clone(),
            with(base(), |c| c.caps = caps("p", "cloud", &[8])),
            "rejected: GPU memory 8 GiB < 16 GiB required",
        ),
        (
            "largest gpu counts",
            gpu16.clone(),
            with(base(), |c| c.caps = caps("p", "cloud", &[8, 12])),
            "rejected: GPU memory 12 GiB < 16 GiB required",
        ),
        (
            "memory without a gpu",
            gpu16.clone(),
            base(),
            "rejected: no GPU",
        ),
        (
            "tier",
            edge.clone(),
            base(),
            "rejected: tier cloud, edge required",
        ),
        (
            "label differs",
            eu.clone(),
            with(base(), |c| {
                c.caps.labels.insert("zone".into(), "us".into());
            }),
            "rejected: label zone=us, zone=eu required",
        ),
        (
            "label missing",
            eu.clone(),
            base(),
            "rejected: no label zone, zone=eu required",
        ),
        (
            "two misses",
            gpu_edge,
            base(),
            "rejected: no GPU; tier cloud, edge required",
        ),
        (
            "dead beats every constraint",
            gpu.clone(),
            with(base(), |c| c.alive = false),
            "rejected: not reachable (no fresh capability record)",
        ),
        (
            "a declared gpu counts",
            gpu16,
            with(base(), |c| {
                c.caps.gpus_declared = vec![Gpu::parse_declared("H100:80GiB").unwrap()]
            }),
            "chosen: closest to the key (rank 0)",
        ),
    ];
    for (name, req, cand, want) in cases {
        let d = run(&req, Policy::Topology, &[cand]);
        assert_eq!(reason(&d, "p"), want, "{name}");
        assert_eq!(
            d.verdicts[0].rejected,
            want.starts_with("rejected"),
            "{name}"
        );
    }
}

#[test]
fn unplaceable_says_what_was_required_and_why_each_peer_fell() {
    let gpu = Requirements { gpu: true, ..req() };
    let gpu16 = Requirements {
        gpu_memory_bytes: Some(16 * GIB),
        ..gpu.clone()
    };
    let edge_eu = Requirements {
        tier: Some("edge".into()),
        labels: BTreeMap::from([("zone".into(), "eu".into())]),
        ..req()
    };
    let dead = |id: &str| with(candidate(id, 0, "cloud"), |c| c.alive = false);
    let cases: Vec<(Requirements, Vec<Candidate>, &str)> = vec![
        (
            gpu.clone(),
            vec![
                candidate("a", 0, "cloud"),
                candidate("b", 1, "edge"),
                dead("c"),
            ],
            "no live peer has a GPU: 3 peers considered (2 without a GPU, 1 not reachable)",
        ),
        (
            gpu16,
            vec![
                with(candidate("a", 0, "cloud"), |c| {
                    c.caps = caps("a", "cloud", &[8])
                }),
                candidate("b", 1, "cloud"),
            ],
            "no live peer has a GPU with at least 16 GiB: 2 peers considered (1 without a GPU, 1 with too little GPU memory)",
        ),
        (
            edge_eu,
            vec![candidate("a", 0, "cloud"), candidate("b", 1, "edge")],
            "no live peer meets every requirement (tier edge, label zone=eu): 2 peers considered (1 in another tier, 1 without label zone=eu)",
        ),
        (
            gpu,
            vec![candidate("a", 0, "cloud")],
            "no live peer has a GPU: 1 peer considered (1 without a GPU)",
        ),
        (req(), vec![], "no live peer: 0 peers considered"),
        (
            Requirements {
                tier: Some("edge".into()),
                hard: false,
                ..req()
            },
            vec![dead("a"), dead("b")],
            "no live peer: 2 peers considered (2 not reachable)",
        ),
    ];
    for (req, cands, want) in cases {
        let d = run(&req, Policy::Topology, &cands);
        assert_eq!(d.unplaceable.as_deref(), Some(want));
        assert!(d.chosen.is_empty());
        assert_eq!(d.verdicts.len(), cands.len());
        assert!(d.verdicts.iter().all(|v| v.rejected && !v.chosen));
    }
}

#[test]
fn topology_takes_the_closest_to_the_key() {
    let cands = [
        candidate("a", 2, "edge"),
        candidate("b", 1, "edge"),
        candidate("c", 0, "edge"),
    ];
    let d = run(
        &Requirements {
            replicas: 2,
            ..req()
        },
        Policy::Topology,
        &cands,
    );
    assert_eq!(d.chosen, ["c", "b"]);
    assert_eq!(reason(&d, "c"), "chosen: closest to the key (rank 0)");
    assert_eq!(
        reason(&d, "b"),
        "chosen: rank 1 from the key (replica 2 of 2)"
    );
    assert_eq!(
        reason(&d, "a"),
        "not chosen: rank 2, farther than the chosen peers (up to rank 1)"
    );
    assert_eq!(
        d.verdicts
            .iter()
            .map(|v| v.peer_id.as_str())
            .collect::<Vec<_>>(),
        ["c", "b", "a"]
    );
    assert_eq!((d.unplaceable, d.fallback, d.shortfall), (None, None, None));
}

#[test]
fn spread_goes_round_robin_over_tiers() {
    let cands = [
        candidate("e0", 0, "edge"),
        candidate("e1", 1, "edge"),
        candidate("c2", 2, "cloud"),
        candidate("c3", 3, "cloud"),
        candidate("d4", 4, "device"),
    ];
    for (replicas, want) in [
        (1, vec!["e0"]),
        (2, vec!["e0", "c2"]),
        (3, vec!["e0", "c2", "d4"]),
        (5, vec!["e0", "c2", "d4", "e1", "c3"]),
    ] {
        let d = run(&Requirements { replicas, ..req() }, Policy::Spread, &cands);
        assert_eq!(d.chosen, want, "replicas {replicas}");
        if replicas == 3 {
            assert_eq!(
                reason(&d, "c2"),
                "chosen: spread to tier cloud (rank 2), replica 2 of 3"
            );
            assert_eq!(
                reason(&d, "e1"),
                "not chosen: rank 1 in tier edge; the 3 replicas already cover tiers cloud, device, edge"
            );
        }
    }
}

#[test]
fn least_loaded_ranks_by_the_load_score_then_the_rank() {
    let load = |id: &str, rank, cpu: f32, queue, cores| {
        with(candidate(id, rank, "edge"), |c| {
            c.caps.load.cpu_percent = cpu;
            c.caps.load.queue_len = queue;
            c.caps.cpu_cores = cores;
        })
    };
    let cands = [
        load("a", 0, 50.0, 0, 1), // 50
        load("b", 2, 10.0, 4, 2), // 10 + 10 × 4 / 2 = 30
        load("c", 1, 30.0, 0, 1), // 30, closer than b
        load("d", 3, 5.0, 0, 1),  // 5
    ];
    let d = run(
        &Requirements {
            replicas: 4,
            ..req()
        },
        Policy::LeastLoaded,
        &cands,
    );
    assert_eq!(d.chosen, ["d", "c", "b", "a"]);
    assert_eq!(
        d.verdicts.iter().map(|v| v.score).collect::<Vec<_>>(),
        [Some(5.0), Some(30.0), Some(30.0), Some(50.0)]
    );
    let d = run(&req(), Policy::LeastLoaded, &cands);
    assert_eq!(
        reason(&d, "d"),
        "chosen: load score 5.0 (cpu 5%, 0 queued, 0 running on 1 core)"
    );
    assert_eq!(
        reason(&d, "a"),
        "not chosen: load score 50.0, chosen peer 5.0"
    );
}

#[test]
fn latency_predicts_queue_plus_exec_plus_network() {
    let mut est = Estimates::new();
    est.observe("f", "a", 2.2);
    est.observe("f", "b", 2.1);
    est.observe("f", "d", 1.0);
    let rtt =
        |id: &str, rank, rtt: Option<f64>| with(candidate(id, rank, "edge"), |c| c.rtt_ms = rtt);
    let cands = [
        rtt("a", 3, Some(1.0)),  // 0 + 2.2 + 1.0 = 3.2
        rtt("b", 0, Some(40.0)), // 0 + 2.1 + 40 = 42.1
        rtt("c", 1, None),       // 0 + mean 1.77 + (40 + 10) = 51.77
        with(rtt("d", 2, Some(0.1)), |c| c.caps.load.queue_len = 10), // 10 + 1 + 0.1
    ];
    let d = decide(&req(), Policy::Latency, "f", &cands, &est, None);
    assert_eq!(d.chosen, ["a"]);
    assert_eq!(
        reason(&d, "a"),
        "chosen: predicted 3.2 ms = queue 0.0 + exec 2.2 + network 1.0"
    );
    assert_eq!(
        reason(&d, "b"),
        "not chosen: predicted 42.1 ms, chosen peer 3.2 ms"
    );
    assert_eq!(
        reason(&d, "c"),
        "not chosen: predicted 51.8 ms, chosen peer 3.2 ms; exec: no measurement yet (mean of 3 peers); network: no round trip measured (penalty)"
    );
    assert_eq!(
        reason(&d, "d"),
        "not chosen: predicted 11.1 ms, chosen peer 3.2 ms"
    );
    let order: Vec<&str> = d.verdicts.iter().map(|v| v.peer_id.as_str()).collect();
    assert_eq!(order, ["a", "d", "b", "c"]);
    assert!(d.verdicts.iter().all(|v| v.predicted_ms == v.score));

    // Unmeasured everywhere: the default execution time, and the network decides.
    let d = decide(&req(), Policy::Latency, "g", &cands, &est, None);
    assert_eq!(d.chosen, ["a"]);
    assert!(reason(&d, "a").contains("exec 1.0 (no measurement yet: default)"));
}

#[test]
fn preferred_constraints_fall_back_and_say_so() {
    let pref_edge = Requirements {
        tier: Some("edge".into()),
        hard: false,
        ..req()
    };
    // Nobody is on the edge: relaxed, chosen by the policy among the live peers.
    let clouds = [
        candidate("a", 1, "cloud"),
        candidate("b", 0, "cloud"),
        with(candidate("c", 2, "edge"), |c| c.alive = false),
    ];
    let d = run(&pref_edge, Policy::Topology, &clouds);
    assert_eq!(d.chosen, ["b"]);
    assert_eq!(d.unplaceable, None);
    assert_eq!(
        d.fallback.as_deref(),
        Some(
            "preferred tier edge met by no live peer: relaxed, chosen by topology among 2 live peers"
        )
    );
    assert_eq!(reason(&d, "b"), "chosen: closest to the key (rank 0)");
    assert!(d.verdicts.iter().all(|v| v.unmet.is_empty()));
    // The same as a hard constraint: unplaceable.
    let hard = run(
        &Requirements {
            hard: true,
            ..pref_edge.clone()
        },
        Policy::Topology,
        &clouds,
    );
    assert!(hard.chosen.is_empty());
    assert_eq!(
        hard.unplaceable.as_deref(),
        Some(
            "no live peer is in tier edge: 3 peers considered (2 in another tier, 1 not reachable)"
        )
    );

    // One edge peer, far from the key: it comes first whatever its rank.
    let mixed = [
        candidate("a", 0, "cloud"),
        candidate("b", 1, "cloud"),
        candidate("e", 5, "edge"),
    ];
    let d = run(&pref_edge, Policy::Topology, &mixed);
    assert_eq!(d.chosen, ["e"]);
    assert_eq!(d.fallback, None);
    assert_eq!(
        reason(&d, "a"),
        "not chosen: misses a preference: tier cloud, edge preferred"
    );
    let a = d.verdicts.iter().find(|v| v.peer_id == "a").unwrap();
    assert_eq!(a.unmet, ["tier edge"]);

    // Two replicas, one edge peer: the second misses the preference, and the decision says so.
    let d = run(
        &Requirements {
            replicas: 2,
            ..pref_edge
        },
        Policy::Topology,
        &mixed,
    );
    assert_eq!(d.chosen, ["e", "a"]);
    assert_eq!(
        d.fallback.as_deref(),
        Some(
            "1 of 2 chosen peers misses a preference (tier edge): too few live peers meet them all"
        )
    );
    assert_eq!(
        reason(&d, "a"),
        "chosen: rank 0 from the key (replica 2 of 2); misses a preference: tier cloud, edge preferred"
    );

    // A GPU memory minimum nobody meets is relaxed; a GPU is still preferred.
    let pref_gpu = Requirements {
        gpu: true,
        gpu_memory_bytes: Some(16 * GIB),
        hard: false,
        ..req()
    };
    let gpus = [
        candidate("a", 0, "cloud"),
        with(candidate("b", 1, "cloud"), |c| {
            c.caps = caps("b", "cloud", &[8])
        }),
    ];
    let d = run(&pref_gpu, Policy::Topology, &gpus);
    assert_eq!(d.chosen, ["b"]);
    assert_eq!(
        d.fallback.as_deref(),
        Some(
            "preferred a GPU with at least 16 GiB met by no live peer: relaxed, chosen by topology among 2 live peers"
        )
    );
    assert_eq!(reason(&d, "a"), "not chosen: misses a preference: no GPU");
}

#[test]
fn replicas_take_distinct_peers_and_say_when_too_few_fit() {
    let gpu = Requirements {
        gpu: true,
        replicas: 3,
        ..req()
    };
    let cands = [
        with(candidate("a", 0, "cloud"), |c| {
            c.caps = caps("a", "cloud", &[24])
        }),
        candidate("b", 1, "cloud"),
        with(candidate("c", 2, "cloud"), |c| {
            c.caps = caps("c", "cloud", &[24])
        }),
    ];
    let d = run(&gpu, Policy::Topology, &cands);
    assert_eq!(d.chosen, ["a", "c"]);
    assert_eq!(d.unplaceable, None);
    assert_eq!(
        d.shortfall.as_deref(),
        Some("2 of 3 replicas placed: only 2 live peers meet the requirements")
    );
    let one = [
        candidate("a", 0, "cloud"),
        with(candidate("b", 1, "cloud"), |c| c.alive = false),
    ];
    let d = run(
        &Requirements {
            replicas: 3,
            ..req()
        },
        Policy::Spread,
        &one,
    );
    assert_eq!(d.chosen, ["a"]);
    assert_eq!(
        d.shortfall.as_deref(),
        Some("1 of 3 replicas placed: only 1 live peer")
    );
    // Zero replicas reads as one.
    let d = run(
        &Requirements {
            replicas: 0,
            ..req()
        },
        Policy::Topology,
        &cands,
    );
    assert_eq!((d.replicas, d.chosen.len()), (1, 1));
}

#[test]
fn ties_break_by_rank_then_peer_id_and_duplicates_use_the_newest_record() {
    let cands = [
        candidate("c", 0, "edge"),
        candidate("a", 0, "edge"),
        candidate("b", 0, "edge"),
    ];
    for policy in Policy::ALL {
        let d = run(
            &Requirements {
                replicas: 3,
                ..req()
            },
            policy,
            &cands,
        );
        assert_eq!(d.chosen, ["a", "b", "c"], "{policy}");
    }
    let old = with(candidate("a", 0, "edge"), |c| c.alive = false);
    let new = with(candidate("a", 0, "edge"), |c| c.caps.seq = 2);
    for cands in [[old.clone(), new.clone()], [new, old]] {
        let d = run(&req(), Policy::Topology, &cands);
        assert_eq!(d.chosen, ["a"]);
        assert_eq!(d.verdicts.len(), 2);
        assert_eq!(
            d.verdicts[1].reason,
            "rejected: duplicate record for this peer (a newer one is used)"
        );
    }
}

/// Three idle peers where `f` ran in `ms`, each with a 0 ms round trip.
fn latency_setup(ms: [f64; 3]) -> (Vec<Candidate>, Estimates) {
    let mut est = Estimates::new();
    let cands = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, id)| {
            est.observe("f", id, ms[i]);
            with(candidate(id, i, "edge"), |c| c.rtt_ms = Some(0.0))
        })
        .collect();
    (cands, est)
}

#[test]
fn hysteresis_keeps_a_latency_choice_within_the_margin() {
    let (cands, est) = latency_setup([3.0, 5.0, 9.0]);
    let prev = decide(&req(), Policy::Latency, "f", &cands, &est, None);
    assert_eq!(prev.chosen, ["a"]);
    // (a now, b now, kept): b must win by more than 2 ms and more than 20 % of a.
    for (a, b, kept) in [
        (3.0, 1.5, true),    // 1.5 ms better: under 2 ms
        (3.0, 0.9, false),   // 2.1 ms and 70 % better
        (100.0, 85.0, true), // 15 ms better but only 15 %
        (100.0, 79.0, false),
        (10.0, 7.9, false),
        (10.0, 8.1, true),
    ] {
        let (cands, est) = latency_setup([a, b, 500.0]);
        let gain: f64 = a - b;
        let expect_kept = !(gain > LATENCY_MARGIN_MS && gain > LATENCY_MARGIN_RATIO * a);
        assert_eq!(expect_kept, kept, "the table agrees with the constants");
        let next = decide(&req(), Policy::Latency, "f", &cands, &est, Some(&prev));
        let fresh = decide(&req(), Policy::Latency, "f", &cands, &est, None);
        assert_eq!(fresh.chosen, ["b"], "{a} {b}");
        let want: &[&str] = if expect_kept { &["a"] } else { &["b"] };
        assert_eq!(next.chosen, want, "{a} {b}");
        assert_eq!(should_replace(&prev, &fresh), !expect_kept, "{a} {b}");
    }
    // The texts of a kept choice.
    let (cands, est) = latency_setup([3.0, 1.5, 9.0]);
    let next = decide(&req(), Policy::Latency, "f", &cands, &est, Some(&prev));
    assert_eq!(
        reason(&next, "a"),
        "chosen: kept, predicted 3.0 ms = queue 0.0 + exec 3.0 + network 0.0; no peer is faster by the margin (20% and 2 ms)"
    );
    assert_eq!(
        reason(&next, "b"),
        "not chosen: predicted 1.5 ms, not faster than the kept peers' 3.0 ms by the margin (20% and 2 ms)"
    );
}

#[test]
fn hysteresis_table() {
    let (cands, est) = latency_setup([3.0, 5.0, 9.0]);
    let three = Requirements {
        replicas: 3,
        ..req()
    };
    let two = Requirements {
        replicas: 2,
        ..req()
    };
    let prev3 = decide(&three, Policy::Latency, "f", &cands, &est, None);
    assert_eq!(prev3.chosen, ["a", "b", "c"]);

    // A chosen peer dies: only it is replaced, the others keep their places.
    let mut more = cands.clone();
    more.push(with(candidate("d", 3, "edge"), |c| c.rtt_ms = Some(0.0)));
    let mut est_d = est.clone();
    est_d.observe("f", "d", 4.0);
    more[1].alive = false;
    let next = decide(&three, Policy::Latency, "f", &more, &est_d, Some(&prev3));
    assert_eq!(next.chosen, ["a", "c", "d"]);

    // Fewer replicas wanted: the worst one goes.
    let next = decide(&two, Policy::Latency, "f", &cands, &est, Some(&prev3));
    assert_eq!(next.chosen, ["a", "b"]);

    // A better peer appears, far better: it takes the worst slot.
    let mut est_fast = est.clone();
    est_fast.observe("f", "d", 0.5);
    let mut with_d = cands.clone();
    with_d.push(more[3].clone());
    let next = decide(
        &three,
        Policy::Latency,
        "f",
        &with_d,
        &est_fast,
        Some(&prev3),
    );
    assert_eq!(next.chosen, ["a", "b", "d"]);

    // Least-loaded: within 20 % and 10 points nothing moves.
    let load = |id: &str, rank, cpu: f32| {
        with(candidate(id, rank, "edge"), |c| {
            c.caps.load.cpu_percent = cpu
        })
    };
    let prev = run(
        &req(),
        Policy::LeastLoaded,
        &[load("a", 0, 20.0), load("b", 1, 40.0)],
    );
    assert_eq!(prev.chosen, ["a"]);
    for (a, b, kept) in [(30.0, 21.0, true), (60.0, 49.0, true), (60.0, 47.0, false)] {
        let cands = [load("a", 0, a), load("b", 1, b)];
        let next = decide(
            &req(),
            Policy::LeastLoaded,
            "f",
            &cands,
            &Estimates::new(),
            Some(&prev),
        );
        assert_eq!(next.chosen == ["a"], kept, "{a} {b}");
    }

    // Topology follows membership at once: a closer peer takes over.
    let prev = run(&req(), Policy::Topology, &[candidate("a", 0, "edge")]);
    let cands = [candidate("a", 1, "edge"), candidate("z", 0, "edge")];
    let fresh = run(&req(), Policy::Topology, &cands);
    let next = decide(
        &req(),
        Policy::Topology,
        "f",
        &cands,
        &Estimates::new(),
        Some(&prev),
    );
    assert_eq!(next.chosen, ["z"]);
    assert!(should_replace(&prev, &fresh));

    // Another policy: the fresh choice.
    let next = decide(
        &req(),
        Policy::Latency,
        "f",
        &cands,
        &Estimates::new(),
        Some(&prev),
    );
    assert_eq!(next.policy, Policy::Latency);

    // A peer that meets a preference nobody met before wins at once, margin or not.
    let pref = Requirements {
        tier: Some("gpu-rack".into()),
        hard: false,
        ..req()
    };
    let (cands, est) = latency_setup([3.0, 5.0, 9.0]);
    let prev = decide(&pref, Policy::Latency, "f", &cands, &est, None);
    assert_eq!(prev.chosen, ["a"]);
    assert!(prev.fallback.is_some());
    let mut rack = cands.clone();
    rack[2].caps.tier = "gpu-rack".into();
    let next = decide(&pref, Policy::Latency, "f", &rack, &est, Some(&prev));
    assert_eq!(next.chosen, ["c"]);
    assert_eq!(next.fallback, None);
}

#[test]
fn a_decision_survives_serde() {
    let d = run(
        &Requirements {
            replicas: 2,
            ..req()
        },
        Policy::Spread,
        &[candidate("a", 0, "edge"), candidate("b", 1, "cloud")],
    );
    let json = serde_json::to_string(&d).unwrap();
    assert_eq!(serde_json::from_str::<Decision>(&json).unwrap(), d);
    assert!(json.contains("\"policy\":\"spread\""));
}
