use super::*;
use crate::testkit::{self, Cluster};
use canal_consensus::{InternalKey, Op, Request, UserKey};
use canal_proto::shards::{SHARD_MAP_FORMAT, ShardMap, ShardReplicas};

fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
    ids.iter().copied().collect()
}

fn led_by(leader: NodeId, voters: &[NodeId], learners: &[NodeId]) -> Local {
    Local {
        hosted: true,
        voters: set(voters),
        learners: set(learners),
        joint_target: None,
        leader: Some(leader),
        last_index: 500,
        matched: voters.iter().chain(learners).map(|id| (*id, 500)).collect(),
    }
}

/// Applies a leader's membership change to `local` as Raft would once it commits.
fn apply(local: &mut Local, action: &Action) {
    match action {
        Action::AddLearner(id) => {
            local.learners.insert(*id);
            local.matched.insert(*id, 0);
        }
        Action::Promote(voters) | Action::FinishJoint(voters) => {
            local.voters = voters.iter().copied().collect();
            local.learners.retain(|l| !local.voters.contains(l));
            local.joint_target = None;
        }
        Action::Remove(id) => {
            local.voters.remove(id);
            local.learners.remove(id);
            local.matched.remove(id);
        }
        other => panic!("{other:?} is no membership change"),
    }
}

#[test]
fn a_replica_opens_the_first_forms_and_a_stranger_keeps_out() {
    let wanted = [1, 2, 3];
    let none = Local::default();
    assert_eq!(decide(2, &wanted, &none), Action::Open);
    assert_eq!(decide(9, &wanted, &none), Action::Nothing);
    let empty = Local {
        hosted: true,
        ..Local::default()
    };
    assert_eq!(decide(1, &wanted, &empty), Action::Form(vec![1, 2, 3]));
    // Only the first replica forms; the others wait for its leader.
    assert_eq!(decide(2, &wanted, &empty), Action::Nothing);
    // Opened for an earlier map, never formed, no replica now: closed.
    assert_eq!(decide(9, &wanted, &empty), Action::Close);
    // A follower that is a replica does nothing.
    let following = Local {
        leader: Some(1),
        ..led_by(1, &[1, 2, 3], &[])
    };
    assert_eq!(decide(2, &wanted, &following), Action::Nothing);
    // The leader of a group that matches the map does nothing.
    assert_eq!(decide(1, &wanted, &following), Action::Nothing);
}

#[test]
fn a_replaced_replica_is_added_caught_up_promoted_then_the_old_one_removed() {
    // Shard moves from {1, 2, 3} to {2, 3, 4}, led by 2.
    let wanted = [2, 3, 4];
    let mut g = led_by(2, &[1, 2, 3], &[]);
    assert_eq!(decide(2, &wanted, &g), Action::AddLearner(4));
    apply(&mut g, &Action::AddLearner(4));
    // Behind: no promotion, and nothing else starts meanwhile.
    g.matched.insert(4, 500 - CATCH_UP_SLACK - 1);
    assert!(matches!(decide(2, &wanted, &g), Action::Wait(_)));
    g.matched.insert(4, 500 - CATCH_UP_SLACK);
    assert_eq!(decide(2, &wanted, &g), Action::Promote(vec![1, 2, 3, 4]));
    apply(&mut g, &Action::Promote(vec![1, 2, 3, 4]));
    assert_eq!(decide(2, &wanted, &g), Action::Remove(1));
    apply(&mut g, &Action::Remove(1));
    assert_eq!(decide(2, &wanted, &g), Action::Nothing);
    // Only the leader moves: a follower of the same state does nothing.
    let mut follower = g.clone();
    follower.leader = Some(2);
    assert_eq!(decide(3, &wanted, &follower), Action::Nothing);
}

#[test]
fn followers_leave_before_the_leader_and_the_last_voter_stays() {
    let mut g = led_by(1, &[1, 2, 3], &[]);
    // {1, 2, 3} -> {3, 4, 5}: both new ones first, then 2, and the leader 1 last.
    let wanted = [3, 4, 5];
    let mut steps = Vec::new();
    for _ in 0..20 {
        let a = decide(1, &wanted, &g);
        if a == Action::Nothing {
            break;
        }
        apply(&mut g, &a);
        if let Action::AddLearner(id) = a {
            g.matched.insert(id, 500);
        }
        steps.push(a);
        if !g.voters.contains(&1) {
            break;
        }
    }
    assert_eq!(
        steps,
        vec![
            Action::AddLearner(4),
            Action::Promote(vec![1, 2, 3, 4]),
            Action::AddLearner(5),
            Action::Promote(vec![1, 2, 3, 4, 5]),
            Action::Remove(2),
            Action::Remove(1),
        ]
    );
    assert_eq!(g.voters, set(&[3, 4, 5]));
    // A map that names nobody: the leader keeps itself, the last replica of the data.
    let alone = led_by(7, &[7], &[]);
    assert_eq!(decide(7, &[], &alone), Action::Nothing);
}

#[test]
fn a_stale_learner_goes_and_a_leftover_joint_membership_is_finished() {
    let g = led_by(1, &[1, 2, 3], &[8]);
    assert_eq!(decide(1, &[1, 2, 3], &g), Action::Remove(8));
    let joint = Local {
        joint_target: Some(set(&[1, 2, 4])),
        ..led_by(1, &[1, 2, 3, 4], &[])
    };
    assert_eq!(
        decide(1, &[1, 2, 4], &joint),
        Action::FinishJoint(vec![1, 2, 4])
    );
}

#[test]
fn a_removed_member_confirms_before_it_closes() {
    let mut g = led_by(2, &[1, 2, 3], &[]);
    // 1 is no replica any more, but its own view still names it.
    assert_eq!(decide(1, &[2, 3, 4], &g), Action::ConfirmRemoved);
    g.voters.remove(&1);
    assert_eq!(decide(1, &[2, 3, 4], &g), Action::Close);
    // A former leader that removed itself may still be named the leader in its metrics.
    let former = led_by(1, &[2, 3, 4], &[]);
    assert_eq!(decide(1, &[2, 3, 4], &former), Action::Close);
    use Peer::*;
    assert!(removed_by(&[LeftOut, LeftOut, Member]));
    assert!(!removed_by(&[LeftOut, Member, Unknown]));
    assert!(!removed_by(&[Unknown, Unknown]));
    assert!(!removed_by(&[]));
    // Formation: nobody formed, and a majority (with the former) hosts it empty.
    assert!(may_form(3, &[Empty, Empty], &[]));
    assert!(may_form(3, &[Empty, Unknown], &[Unknown]));
    assert!(!may_form(3, &[Unknown, Unknown], &[]));
    assert!(!may_form(3, &[Empty, Member], &[]));
    assert!(!may_form(3, &[Empty, LeftOut], &[]));
    assert!(may_form(1, &[], &[]));
    // Every replica new, but a replica of the previous map still has the group: it is
    // moved, not formed afresh.
    assert!(!may_form(3, &[Empty, Empty], &[Member]));
    assert!(!may_form(3, &[Empty, Empty], &[Unknown, LeftOut]));
}

#[test]
fn any_change_of_replicas_converges_one_change_at_a_time() {
    // Every move from one set of three replicas out of six to another, led by its first.
    let sets: Vec<Vec<NodeId>> = (1..=6u64)
        .flat_map(|a| (a + 1..=6).flat_map(move |b| (b + 1..=6).map(move |c| vec![a, b, c])))
        .collect();
    for from in &sets {
        for to in &sets {
            let mut g = led_by(from[0], from, &[]);
            let mut leader = from[0];
            for round in 0.. {
                assert!(round < 20, "{from:?} -> {to:?} does not converge");
                let a = decide(leader, to, &g);
                if a == Action::Nothing {
                    break;
                }
                let before = g.voters.len();
                apply(&mut g, &a);
                if let Action::AddLearner(id) = a {
                    g.matched.insert(id, 500);
                }
                // One voter more or less per step, never none.
                assert!(g.voters.len().abs_diff(before) <= 1 && !g.voters.is_empty());
                if !g.voters.contains(&leader) {
                    leader = *g.voters.iter().next().expect("a voter");
                    g.leader = Some(leader);
                }
            }
            assert_eq!(g.voters, set(to), "{from:?} -> {to:?}");
            assert!(g.learners.is_empty());
        }
    }
}

/// Commits a shard map of `epoch` giving each shard the replicas `replicas(shard)`.
async fn commit_map(
    c: &Consensus<testkit::MemTransport>,
    epoch: u64,
    shards: u32,
    replicas: impl Fn(u32) -> Vec<String>,
) {
    let map = ShardMap {
        format: SHARD_MAP_FORMAT,
        epoch,
        shards,
        replication: 3,
        spread: None,
        assignments: (0..shards)
            .map(|s| ShardReplicas {
                shard: s,
                replicas: replicas(s),
                shortfall: None,
            })
            .collect(),
        notes: Vec::new(),
    };
    let r = c
        .write_op(
            GroupId::METADATA,
            Op::Internal {
                key: InternalKey::ShardMap,
                value: Some(map.encode().expect("the map encodes")),
            },
        )
        .await
        .expect("the map commits");
    assert!(r.refused.is_none(), "{:?}", r.refused);
}

/// Starts a shard groups job on every member, each with metrics of its own.
fn start_jobs(m: &[testkit::Member]) -> (Vec<ShardGroupMetrics>, Vec<canal_worker::WorkerHandle>) {
    let metrics: Vec<ShardGroupMetrics> = m.iter().map(|_| ShardGroupMetrics::default()).collect();
    let jobs = m
        .iter()
        .zip(&metrics)
        .map(|(member, metrics)| {
            canal_worker::spawn(ShardGroupsJob::new(
                member.consensus.clone(),
                metrics.clone(),
            ))
        })
        .collect();
    (metrics, jobs)
}

fn voters_of(c: &Consensus<testkit::MemTransport>, g: GroupId) -> BTreeSet<NodeId> {
    local_of(c, g).voters
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_form_per_map_and_a_replica_moves_to_a_fourth_node() {
    let cluster = Cluster::formed(4).await;
    let m = &cluster.members;
    let peer = |i: usize| m[i].peer.to_base58();
    let id = |i: usize| m[i].consensus.node_id();
    let leader = cluster.leader(GroupId::METADATA).await;
    let shards = 4;
    // Epoch 1: every shard on members 0-2, the preferred leader turning round.
    commit_map(&m[leader].consensus, 1, shards, |s| {
        (0..3).map(|k| peer((s as usize + k) % 3)).collect()
    })
    .await;
    let (metrics, jobs) = start_jobs(m);
    let three = set(&[id(0), id(1), id(2)]);
    for s in 0..shards {
        let g = shard_group(s);
        testkit::until(
            "every shard group formed with a leader on its three replicas",
            Duration::from_secs(30),
            || {
                (0..3).all(|i| {
                    voters_of(&m[i].consensus, g) == three
                        && m[i]
                            .consensus
                            .metrics(g)
                            .is_ok_and(|x| x.current_leader.is_some())
                })
            },
        )
        .await;
        assert!(
            !m[3].consensus.groups().contains(&g),
            "member 3 is no replica"
        );
    }
    let formed: u64 = metrics
        .iter()
        .map(|x| {
            x.moves
                .get_or_create(&StepLabel {
                    step: "form".into(),
                })
                .get()
        })
        .sum();
    assert_eq!(formed, shards as u64, "each group formed once");
    testkit::until("the hosted gauge", Duration::from_secs(5), || {
        (0..3).all(|i| metrics[i].hosted.get() == shards as i64) && metrics[3].hosted.get() == 0
    })
    .await;
    // Something in shard 0's group before the move, for the new replica to catch up on.
    let g = shard_group(0);
    m[0].consensus
        .write(
            g,
            Request {
                id: None,
                op: Op::Put {
                    key: "k".into(),
                    value: b"v".to_vec(),
                },
            },
        )
        .await
        .expect("a write to the shard group");

    // Epoch 2: shard 0 leaves member 0 for member 3.
    commit_map(&m[leader].consensus, 2, shards, |s| {
        if s == 0 {
            vec![peer(1), peer(2), peer(3)]
        } else {
            (0..3).map(|k| peer((s as usize + k) % 3)).collect()
        }
    })
    .await;
    let moved = set(&[id(1), id(2), id(3)]);
    testkit::until(
        "shard 0's group moved to members 1-3 and closed on member 0",
        Duration::from_secs(30),
        || {
            (1..4).all(|i| voters_of(&m[i].consensus, g) == moved)
                && !m[0].consensus.groups().contains(&g)
        },
    )
    .await;
    let key = UserKey::new("k").expect("a key");
    testkit::until("the new replica caught up", Duration::from_secs(10), || {
        m[3].consensus
            .state_machine(g)
            .ok()
            .and_then(|sm| sm.get(&key).ok().flatten())
            .as_deref()
            == Some(&b"v"[..])
    })
    .await;
    let step = |s: &str| -> u64 {
        metrics
            .iter()
            .map(|x| x.moves.get_or_create(&StepLabel { step: s.into() }).get())
            .sum()
    };
    // The close is counted once its purge is done, just after the group is gone.
    testkit::until("the close counted", Duration::from_secs(5), || {
        step("close") == 1
    })
    .await;
    assert_eq!(
        (
            step("add_learner"),
            step("promote"),
            step("remove"),
            step("close")
        ),
        (1, 1, 1, 1)
    );
    // The other shards did not move.
    for s in 1..shards {
        assert_eq!(voters_of(&m[1].consensus, shard_group(s)), three);
    }
    let shown = status(&m[3].consensus, 0);
    assert_eq!(shown.voters.len(), 3);
    assert!(shown.voters.contains(&peer(3)) && shown.leader.is_some());
    assert_eq!(status(&m[0].consensus, 0).state, "not hosted here");

    // Epoch 3: shard 1 leaves a follower for member 3, and every job stops mid-move (as in
    // a crash) once the learner is added; new jobs, knowing nothing of the move, finish it
    // from the state.
    let g1 = shard_group(1);
    let l1 = m[0]
        .consensus
        .metrics(g1)
        .ok()
        .and_then(|x| x.current_leader)
        .and_then(|l| (0..3).find(|i| id(*i) == l))
        .expect("shard 1's group has a leader among its replicas");
    let gone = (0..3).find(|i| *i != l1).expect("a follower");
    let after: Vec<usize> = (0..4).filter(|i| *i != gone).collect();
    let after_ids: BTreeSet<NodeId> = after.iter().map(|i| id(*i)).collect();
    // The follower closes only once the others have left it out: it asks them.
    let closed = |ms: &[ShardGroupMetrics]| {
        ms[gone]
            .moves
            .get_or_create(&StepLabel {
                step: "close".into(),
            })
            .get()
    };
    let closed_before = closed(&metrics);
    commit_map(&m[leader].consensus, 3, shards, |s| match s {
        0 => vec![peer(1), peer(2), peer(3)],
        1 => after.iter().map(|i| peer(*i)).collect(),
        _ => (0..3).map(|k| peer((s as usize + k) % 3)).collect(),
    })
    .await;
    testkit::until("the learner added", Duration::from_secs(20), || {
        local_of(&m[l1].consensus, g1).learners.contains(&id(3))
            || voters_of(&m[l1].consensus, g1).contains(&id(3))
    })
    .await;
    for j in jobs {
        assert!(j.shutdown(Duration::from_secs(5)).await);
    }
    let again: Vec<ShardGroupMetrics> = m.iter().map(|_| ShardGroupMetrics::default()).collect();
    let jobs: Vec<canal_worker::WorkerHandle> = m
        .iter()
        .zip(&again)
        .map(|(member, metrics)| {
            canal_worker::spawn(ShardGroupsJob::new(
                member.consensus.clone(),
                metrics.clone(),
            ))
        })
        .collect();
    testkit::until(
        "shard 1's group moved off the follower, which closed it",
        Duration::from_secs(30),
        || {
            after
                .iter()
                .all(|i| voters_of(&m[*i].consensus, g1) == after_ids)
                && !m[gone].consensus.groups().contains(&g1)
        },
    )
    .await;
    testkit::until(
        "the follower's close counted",
        Duration::from_secs(5),
        || closed(&metrics) + closed(&again) == closed_before + 1,
    )
    .await;
    testkit::until("the hosted gauges", Duration::from_secs(5), || {
        again[3].hosted.get() == 2 && again[gone].hosted.get() < shards as i64
    })
    .await;
    for j in jobs {
        assert!(j.shutdown(Duration::from_secs(5)).await);
    }
    cluster.shutdown().await;
}

#[test]
fn a_preferred_leader_campaigns_only_for_an_idle_group_led_by_another() {
    let wanted = [1, 2, 3];
    let led_by = |leader: NodeId| Local {
        hosted: true,
        voters: [1, 2, 3].into(),
        leader: Some(leader),
        ..Local::default()
    };
    assert!(should_campaign(1, &wanted, &led_by(2), true));
    // Busy: members would refuse the vote within the leader's lease.
    assert!(!should_campaign(1, &wanted, &led_by(2), false));
    // Already the leader, or no leader known (an election is under way anyway).
    assert!(!should_campaign(1, &wanted, &led_by(1), true));
    assert!(!should_campaign(
        1,
        &wanted,
        &Local {
            leader: None,
            ..led_by(2)
        },
        true
    ));
    // Not the preferred leader.
    assert!(!should_campaign(2, &wanted, &led_by(3), true));
    // A learner cannot lead.
    assert!(!should_campaign(4, &[4, 2, 3], &led_by(2), true));
    // A move under way finishes first: a joint configuration, a learner catching up, a
    // replica still to go or still to come. An election in its middle fails the step.
    let joint = Local {
        joint_target: Some([1, 2, 4].into()),
        ..led_by(2)
    };
    assert!(!should_campaign(1, &wanted, &joint, true));
    let learning = Local {
        learners: [4].into(),
        ..led_by(2)
    };
    assert!(!should_campaign(1, &wanted, &learning, true));
    assert!(!should_campaign(1, &[1, 2], &led_by(2), true));
    assert!(!should_campaign(1, &[1, 2, 3, 4], &led_by(2), true));
    assert!(!should_campaign(
        1,
        &wanted,
        &Local {
            hosted: false,
            ..led_by(2)
        },
        true
    ));
}

#[test]
fn a_busy_groups_leader_hands_the_lead_to_its_caught_up_preferred_leader() {
    let wanted = [2, 1, 3];
    let busy = false;
    assert_eq!(
        should_hand_off(1, &wanted, &led_by(1, &[1, 2, 3], &[]), busy),
        Some(2)
    );
    // Idle: the preferred leader campaigns for it itself.
    assert_eq!(
        should_hand_off(1, &wanted, &led_by(1, &[1, 2, 3], &[]), true),
        None
    );
    // Already led by the preferred leader, or by another node than this one.
    assert_eq!(
        should_hand_off(2, &wanted, &led_by(2, &[1, 2, 3], &[]), busy),
        None
    );
    assert_eq!(
        should_hand_off(1, &wanted, &led_by(3, &[1, 2, 3], &[]), busy),
        None
    );
    // The membership is not the map's yet: a learner catching up, a replica still to go,
    // the preferred leader not a voter yet, or a joint configuration.
    assert_eq!(
        should_hand_off(1, &wanted, &led_by(1, &[1, 2, 3], &[4]), busy),
        None
    );
    assert_eq!(
        should_hand_off(1, &wanted, &led_by(1, &[1, 2, 3, 4], &[]), busy),
        None
    );
    assert_eq!(
        should_hand_off(1, &wanted, &led_by(1, &[1, 3], &[2]), busy),
        None
    );
    let mut joint = led_by(1, &[1, 2, 3], &[]);
    joint.joint_target = Some(set(&[1, 2, 3]));
    assert_eq!(should_hand_off(1, &wanted, &joint, busy), None);
    // The preferred leader lags: it could not win, and the group's writes would wait.
    let mut lagging = led_by(1, &[1, 2, 3], &[]);
    lagging.matched.insert(2, 500 - CATCH_UP_SLACK - 1);
    assert_eq!(should_hand_off(1, &wanted, &lagging, busy), None);
    lagging.matched.insert(2, 500 - CATCH_UP_SLACK);
    assert_eq!(should_hand_off(1, &wanted, &lagging, busy), Some(2));
    // Not hosted, or no replicas wanted.
    assert_eq!(should_hand_off(1, &wanted, &Local::default(), busy), None);
    assert_eq!(
        should_hand_off(1, &[], &led_by(1, &[1, 2, 3], &[]), busy),
        None
    );
}

/// A busy shard group's lead goes to the leader its map prefers, under a steady load of
/// writes through another member, none of which fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_groups_lead_moves_to_its_preferred_leader_under_load() {
    let cluster = Cluster::formed(3).await;
    let m = &cluster.members;
    let peer = |i: usize| m[i].peer.to_base58();
    let leader = cluster.leader(GroupId::METADATA).await;
    commit_map(&m[leader].consensus, 1, 1, |_| (0..3).map(peer).collect()).await;
    let (metrics, jobs) = start_jobs(m);
    let g = shard_group(0);
    let lead_of = |i: usize| {
        m[i].consensus
            .metrics(g)
            .ok()
            .and_then(|x| x.current_leader)
    };
    testkit::until("shard 0's group led", Duration::from_secs(30), || {
        (0..3).all(|i| lead_of(i).is_some() && lead_of(i) == lead_of(0))
    })
    .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let (c, stop, acked) = (m[2].consensus.clone(), stop.clone(), acked.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let req = Request {
                    id: Some(format!("w-{n}")),
                    op: Op::Put {
                        key: format!("k{n}"),
                        value: b"v".to_vec(),
                    },
                };
                c.write_batched(g, req)
                    .await
                    .expect("a hand-off fails no write");
                acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                n += 1;
            }
        })
    };
    let writes = || acked.load(std::sync::atomic::Ordering::SeqCst);
    testkit::until("writes under way", Duration::from_secs(10), || {
        writes() >= 20
    })
    .await;
    // The map now prefers a member that does not lead: the busy group's lead moves there.
    let now = lead_of(0).expect("a leader");
    let preferred = (0..3)
        .find(|i| m[*i].consensus.node_id() != now)
        .expect("a follower");
    let old = (0..3)
        .find(|i| m[*i].consensus.node_id() == now)
        .expect("the leader");
    let mut order = vec![preferred];
    order.extend((0..3).filter(|i| *i != preferred));
    commit_map(&m[leader].consensus, 2, 1, |_| {
        order.iter().map(|i| peer(*i)).collect()
    })
    .await;
    let want = Some(m[preferred].consensus.node_id());
    testkit::until(
        "the lead on the preferred leader",
        Duration::from_secs(30),
        || (0..3).all(|i| lead_of(i) == want),
    )
    .await;
    assert!(!m[preferred].consensus.is_quiescent(g), "moved while busy");
    let steps = |step: &str| {
        metrics[old]
            .moves
            .get_or_create(&StepLabel { step: step.into() })
            .get()
    };
    // Counted once the old leader has seen the new one lead.
    testkit::until("the hand-off counted", Duration::from_secs(10), || {
        steps("hand_off") == 1
    })
    .await;
    assert_eq!(steps("hand_off_failed"), 0);
    let before = writes();
    testkit::until("writes go on", Duration::from_secs(10), || {
        writes() >= before + 20
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.await.expect("the writer");
    for j in jobs {
        assert!(j.shutdown(Duration::from_secs(5)).await);
    }
    cluster.shutdown().await;
}

#[test]
fn a_membership_step_answered_with_an_error_is_seen_to_have_taken_effect() {
    let local = |voters: &[NodeId], learners: &[NodeId]| Local {
        hosted: true,
        voters: voters.iter().copied().collect(),
        learners: learners.iter().copied().collect(),
        leader: Some(1),
        ..Local::default()
    };
    let before = local(&[1, 2, 3], &[]);
    let learning = local(&[1, 2, 3], &[4]);
    let promoted = local(&[1, 2, 3, 4], &[]);
    let removed = local(&[1, 2, 4], &[]);
    assert_eq!(took_effect(&Action::AddLearner(4), &before), Some(false));
    assert_eq!(took_effect(&Action::AddLearner(4), &learning), Some(true));
    assert_eq!(took_effect(&Action::AddLearner(4), &promoted), Some(true));
    let to = Action::Promote(vec![1, 2, 3, 4]);
    assert_eq!(took_effect(&to, &learning), Some(false));
    assert_eq!(took_effect(&to, &promoted), Some(true));
    let mut joint = promoted.clone();
    joint.joint_target = Some([1, 2, 3, 4].into());
    assert_eq!(took_effect(&to, &joint), Some(false));
    assert_eq!(took_effect(&Action::Remove(3), &promoted), Some(false));
    assert_eq!(took_effect(&Action::Remove(3), &removed), Some(true));
    // A group with no membership here says nothing of a removal.
    assert_eq!(
        took_effect(&Action::Remove(3), &Local::default()),
        Some(false)
    );
    // Not membership steps.
    assert_eq!(took_effect(&Action::Close, &removed), None);
    assert_eq!(took_effect(&Action::Form(vec![1, 2, 3]), &removed), None);
}
