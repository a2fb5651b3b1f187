//! Shard groups hosted per the committed map: formed on the first
//! nodes, moved replica by replica when a node joins.

use crate::{BIN, canal, stderr};
use canal_proto::api::{ClusterShards, ShardGroupStatus};
use canal_testnet::{NodeOptions, Testnet, wait_for};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

fn options() -> NodeOptions {
    NodeOptions {
        extra_args: ["--bootstrap-expect", "3", "--shards", "8"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ..Default::default()
    }
}

/// Node `i`'s `/v1/cluster/shards` once `ok` holds for it, or why not (the last answer).
async fn shards_where(
    net: &Testnet,
    i: usize,
    what: &str,
    ok: impl Fn(&ClusterShards) -> Result<(), String>,
) -> ClusterShards {
    let api = net.api(i).unwrap();
    let ok = &ok;
    wait_for(what, Duration::from_secs(120), || {
        let api = api.clone();
        async move {
            let m: ClusterShards = api
                .get("/v1/cluster/shards")
                .await
                .map_err(|e| e.to_string())?;
            ok(&m).map(|()| m)
        }
    })
    .await
    .unwrap()
}

/// Whether `g` is a hosted group with a leader and exactly `voters` and no learner.
fn settled(g: Option<&ShardGroupStatus>, voters: &BTreeSet<String>) -> Result<(), String> {
    let Some(g) = g else {
        return Err("no shard group shown".into());
    };
    let got: BTreeSet<String> = g.voters.iter().cloned().collect();
    if (g.state == "active" || g.state == "quiescent")
        && g.leader.as_ref().is_some_and(|l| voters.contains(l))
        && &got == voters
        && g.learners.is_empty()
    {
        Ok(())
    } else {
        Err(format!("{g:?}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_groups_form_on_three_nodes_and_move_replicas_to_a_fourth() {
    let started = Instant::now();
    let mut net = Testnet::start(BIN, 3, |_| options()).await.unwrap();
    let ids: BTreeSet<String> = (0..3)
        .map(|i| net.node(i).info().unwrap().peer_id.clone())
        .collect();

    // Every node hosts all 8 shard groups (K = 3 of 3), each formed with a leader.
    shards_where(&net, 0, "a first shard map", |m| {
        (m.epoch >= 1).then_some(()).ok_or("no map yet".into())
    })
    .await;
    let mapped = Instant::now();
    let mut first = None;
    for i in 0..3 {
        first = Some(
            shards_where(&net, i, "8 shard groups formed with leaders", |m| {
                if m.rows.len() != 8 {
                    return Err(format!("epoch {}, {} rows", m.epoch, m.rows.len()));
                }
                m.rows
                    .iter()
                    .try_for_each(|r| settled(r.shard_group.as_ref(), &ids))
            })
            .await,
        );
    }
    let first = first.unwrap();
    eprintln!(
        "8 shard groups formed on 3 nodes {:?} after the first map ({:?} after the testnet started)",
        mapped.elapsed(),
        started.elapsed()
    );
    assert!(
        first
            .rows
            .iter()
            .all(|r| r.served_by == format!("shard-{}", r.shard))
    );
    let api0 = net.api(0).unwrap();
    assert_eq!(
        api0.metric_sum("canal_shard_groups_hosted").await.unwrap(),
        8.0
    );
    let formed = {
        let mut n = 0.0;
        for i in 0..3 {
            n += net
                .api(i)
                .unwrap()
                .metric_sum("canal_shard_group_moves_total{step=\"form\"}")
                .await
                .unwrap();
        }
        n
    };
    assert_eq!(formed, 8.0, "each group formed once");

    // A fourth node joins: the map gives it about a quarter of the replicas, and the
    // groups move them: learner, caught up, promoted, the old replica removed and closed.
    let four = net
        .add_node(NodeOptions {
            bootstrap_from_first: true,
            ..options()
        })
        .await
        .unwrap();
    let new_id = net.node(four).info().unwrap().peer_id.clone();
    let joined = Instant::now();
    let second = shards_where(&net, four, "a map with the fourth peer", |m| {
        if m.epoch > first.epoch && m.peers.iter().any(|p| p.peer_id == new_id) {
            Ok(())
        } else {
            Err(format!("epoch {}", m.epoch))
        }
    })
    .await;
    let on_new: Vec<u32> = second
        .rows
        .iter()
        .filter(|r| r.replicas.contains(&new_id))
        .map(|r| r.shard)
        .collect();
    assert!(!on_new.is_empty(), "{second:?}");
    let rows = second.rows.clone();
    for i in 0..4 {
        let me = net.node(i).info().unwrap().peer_id.clone();
        shards_where(&net, i, "every shard group on the map's replicas", |m| {
            rows.iter().try_for_each(|want| {
                let got = m
                    .rows
                    .iter()
                    .find(|r| r.shard == want.shard)
                    .ok_or("a shard is missing")?;
                let replicas: BTreeSet<String> = want.replicas.iter().cloned().collect();
                if replicas.contains(&me) {
                    settled(got.shard_group.as_ref(), &replicas)
                        .map_err(|e| format!("shard {}: {e}", want.shard))
                } else {
                    // Removed and closed.
                    match got.shard_group.as_ref().map(|g| g.state.as_str()) {
                        Some("not hosted here") => Ok(()),
                        other => Err(format!("shard {} still hosted: {other:?}", want.shard)),
                    }
                }
            })
        })
        .await;
    }
    eprintln!(
        "{} replicas moved to the fourth node {:?} after it joined",
        on_new.len(),
        joined.elapsed()
    );
    let api4 = net.api(four).unwrap();
    assert_eq!(
        api4.metric_sum("canal_shard_groups_hosted").await.unwrap(),
        on_new.len() as f64
    );
    let mut steps = [0.0; 4];
    for i in 0..4 {
        let api = net.api(i).unwrap();
        for (k, step) in ["add_learner", "promote", "remove", "close"]
            .iter()
            .enumerate()
        {
            steps[k] += api
                .metric_sum(&format!("canal_shard_group_moves_total{{step=\"{step}\"}}"))
                .await
                .unwrap();
        }
    }
    let n = on_new.len() as f64;
    assert_eq!(steps, [n, n, n, n], "add_learner, promote, remove, close");

    // `canal cluster shards` on the new node shows its groups with it among the voters.
    let api_url = net.node(four).info().unwrap().api.clone();
    let out = canal(&["--api", &api_url, "cluster", "shards"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for s in &on_new {
        assert!(
            text.lines().any(|l| l.contains(&format!("shard-{s} "))
                && l.contains("voters")
                && l.contains(new_id.as_str())),
            "shard {s}:\n{text}"
        );
    }
    assert!(text.contains("not hosted here"), "{text}");
}

/// The node indices of `net` whose peer ids are in `peers`.
fn nodes_of(net: &Testnet, peers: &[String]) -> Vec<usize> {
    (0..net.len())
        .filter(|i| {
            net.node(*i)
                .info()
                .is_ok_and(|n| peers.contains(&n.peer_id))
        })
        .collect()
}

/// The shards once every shard group has a leader (as a node hosting it sees it: a node
/// shows the leader of the groups it hosts only), with the leaders filled in from them.
async fn every_shard_led(net: &Testnet, _via: usize) -> ClusterShards {
    let apis: Vec<canal_testnet::Api> =
        net.running().iter().map(|&i| net.api(i).unwrap()).collect();
    wait_for(
        "every shard group with a leader",
        Duration::from_secs(120),
        || {
            let apis = apis.clone();
            async move {
                let mut merged: Option<ClusterShards> = None;
                for api in &apis {
                    let m: ClusterShards = api
                        .get("/v1/cluster/shards")
                        .await
                        .map_err(|e| e.to_string())?;
                    match merged.as_mut() {
                        None => merged = Some(m),
                        Some(all) => {
                            if all.epoch != m.epoch {
                                return Err(format!("epochs {} and {}", all.epoch, m.epoch));
                            }
                            for (row, other) in all.rows.iter_mut().zip(m.rows) {
                                if row.group_leader.is_none() {
                                    row.group_leader = other.group_leader;
                                }
                            }
                        }
                    }
                }
                let all = merged.ok_or("no node")?;
                match all.rows.iter().find(|r| r.group_leader.is_none()) {
                    None if all.epoch >= 1 => Ok(all),
                    None => Err("no map yet".into()),
                    Some(r) => Err(format!("shard {} has no leader", r.shard)),
                }
            }
        },
    )
    .await
    .unwrap()
}

/// Waits until every shard's group is led by its preferred leader (its first replica):
/// busy groups by a hand-off from their leader, idle ones by the preferred leader's
/// campaign.
async fn every_shard_led_by_its_preferred_leader(net: &Testnet) {
    wait_for(
        "every shard group led by its preferred leader",
        Duration::from_secs(120),
        || async {
            let m = every_shard_led(net, 0).await;
            let off: Vec<String> = m
                .rows
                .iter()
                .filter(|r| r.group_leader.as_ref() != r.replicas.first())
                .map(|r| format!("shard {}", r.shard))
                .collect();
            if off.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "not led by their preferred leader: {}",
                    off.join(", ")
                ))
            }
        },
    )
    .await
    .unwrap();
}

/// Five nodes, three replicas a shard: the shards' groups are led by different peers, a
/// node that hosts no replica of a topic's group publishes to it and subscribes to it,
/// `locate` names where each topic's log is, and kill -9 of the leader of some groups
/// loses no acknowledged event: wildcard subscribers on other nodes get each once, in
/// order, and every group's replicas end with the same state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_spread_the_shards_and_kill_9_of_a_leader_loses_nothing() {
    use crate::pubsub::{check_delivery, publish_until_acked, sub};
    const N: usize = 320;
    const TOPICS: usize = 16;
    let mut net = crate::raft::cluster(5, &[]).await;
    let map = every_shard_led(&net, 0).await;
    let leaders: BTreeSet<String> = map
        .rows
        .iter()
        .filter_map(|r| r.group_leader.clone())
        .collect();
    assert!(
        leaders.len() >= 3,
        "the shards' groups are led by {leaders:?}"
    );
    for r in &map.rows {
        assert_eq!(r.replicas.len(), 3, "{r:?}");
    }

    // `locate` tells where each topic's log is: its shard's group, on the map's replicas.
    let topic = |i: usize| format!("five/{}", i % TOPICS);
    let mut not_hosting = None;
    for k in 0..TOPICS {
        let l: canal_proto::api::Locate = net
            .api(k % 5)
            .unwrap()
            .get(&format!("/v1/topics/{}/locate", topic(k)))
            .await
            .unwrap();
        let row = &map.rows[l.shard as usize];
        assert_eq!(l.group, format!("shard-{}", l.shard));
        let voters: BTreeSet<&String> = l.voters.iter().collect();
        assert_eq!(voters, row.replicas.iter().collect(), "{l:?}");
        assert!(
            l.leader.as_ref().is_some_and(|p| row.replicas.contains(p)),
            "{l:?}"
        );
        if let Some(i) = (0..5).find(|i| !nodes_of(&net, &row.replicas).contains(i)) {
            not_hosting = Some((k, i));
        }
    }
    let (_, outsider) = not_hosting.expect("some node hosts no replica of some topic");

    // A subscriber on a node outside the topic's group reads it from a replica.
    let victim = {
        let l: canal_proto::api::Locate = net
            .api(0)
            .unwrap()
            .get(&format!("/v1/topics/{}/locate", topic(0)))
            .await
            .unwrap();
        nodes_of(&net, &[l.leader.unwrap()])[0]
    };
    let mut subs = Vec::new();
    for i in (0..5).filter(|i| *i != victim).take(2).chain([outsider]) {
        if i == victim || subs.iter().any(|(j, _)| *j == i) {
            continue;
        }
        let api = net.node(i).info().unwrap().api.clone();
        subs.push((i, sub(&api, "five/#", N)));
    }
    let apis: Vec<canal_testnet::Api> = (0..5).map(|i| net.api(i).unwrap()).collect();
    let publish = |apis: Vec<canal_testnet::Api>, range: std::ops::Range<usize>| async move {
        for i in range {
            publish_until_acked(
                &apis,
                i,
                &topic(i),
                &format!("f{i}"),
                format!("e{i}").into_bytes(),
            )
            .await;
        }
    };
    // Event i through node i % 5: each node publishes to groups it hosts no replica of.
    publish(apis.clone(), 0..N / 2).await;
    net.kill(victim).await.unwrap();
    let survivors: Vec<canal_testnet::Api> =
        net.running().iter().map(|&i| net.api(i).unwrap()).collect();
    publish(survivors, N / 2..N).await;
    let want: BTreeSet<String> = (0..N).map(|i| format!("e{i}")).collect();
    for (i, child) in subs {
        let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("node{i}'s subscriber did not get {N} events"))
            .unwrap();
        assert!(out.status.success(), "node{i}: {}", stderr(&out));
        check_delivery(
            &String::from_utf8_lossy(&out.stdout),
            &want,
            &format!("node{i}"),
        );
    }

    // Back, it catches up: every group's replicas hold the same state. Down longer than
    // DOWN_AFTER (a slow machine), it lost its replicas to a new map meanwhile: the
    // replicas are the settled map's, not the first one's.
    net.restart(victim).await.unwrap();
    let now = wait_settled(&net, "the groups settled after the restart").await;
    for r in &now.rows {
        crate::raft::wait_same_digest(
            &net,
            &nodes_of(&net, &r.replicas),
            &format!("shard-{}", r.shard),
        )
        .await;
    }
}

/// `canal sub FILTER --durable NAME --from earliest --json --count N` against `api`.
fn sub_durable(api: &str, filter: &str, name: &str, count: usize) -> tokio::process::Child {
    tokio::process::Command::new(BIN)
        .env("CANAL_TOKEN", canal_testnet::admin_token())
        .env_remove("CANAL_API")
        .args([
            "--api",
            api,
            "sub",
            filter,
            "--durable",
            name,
            "--from",
            "earliest",
        ])
        .args(["--json", "--count", &count.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// What a `canal sub --json` printed: (topic, offset, payload) per event.
fn events_of(out: &std::process::Output) -> Vec<(String, u64, String)> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["topic"].as_str().unwrap().to_string(),
                v["offset"].as_u64().unwrap(),
                v["payload"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Waits until every running node hosts exactly the shard groups the map gives it, each
/// with a leader and the map's replicas as its voters.
pub(crate) async fn wait_settled(net: &Testnet, what: &str) -> ClusterShards {
    let mut last = None;
    for i in net.running() {
        let me = net.node(i).info().unwrap().peer_id.clone();
        last = Some(
            shards_where(net, i, what, |m| {
                m.rows.iter().try_for_each(|r| {
                    let replicas: BTreeSet<String> = r.replicas.iter().cloned().collect();
                    if replicas.contains(&me) {
                        settled(r.shard_group.as_ref(), &replicas)
                            .map_err(|e| format!("shard {}: {e}", r.shard))
                    } else {
                        match r.shard_group.as_ref().map(|g| g.state.as_str()) {
                            Some("not hosted here") => Ok(()),
                            _ => Err(format!(
                                "node{i} is no replica of shard {} (map {:?}) but hosts it: {:?}",
                                r.shard, r.replicas, r.shard_group
                            )),
                        }
                    }
                })
            })
            .await,
        );
    }
    last.unwrap()
}

/// Under a steady QoS 1 load a fifth node joins and then a node is removed: the map moves
/// replicas onto the new node and off the removed one, leadership follows the map's
/// preferred leaders (the busy groups' too), every acknowledged event is in its
/// log exactly once and in order, and a durable subscriber stopped before the moves
/// resumes after them where it left off: no gap, nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_and_one_is_removed_under_qos1_load_and_nothing_is_lost() {
    use crate::pubsub::{check_delivery, publish_until_acked, sub};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    const FIRST: usize = 40;
    let mut net = crate::raft::cluster(4, &[]).await;
    let first = every_shard_led(&net, 0).await;
    let apis: Arc<Mutex<Vec<canal_testnet::Api>>> =
        Arc::new(Mutex::new((0..4).map(|i| net.api(i).unwrap()).collect()));
    let (acked, stop) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let load = {
        let (apis, acked, stop) = (apis.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let now: Vec<canal_testnet::Api> = apis.lock().unwrap().clone();
                let topic = format!("moving/{}", i % 8);
                publish_until_acked(
                    &now,
                    i,
                    &topic,
                    &format!("m{i}"),
                    format!("e{i}").into_bytes(),
                )
                .await;
                i += 1;
                acked.store(i, Ordering::SeqCst);
            }
        })
    };
    let wait_acked = |n: usize| {
        let acked = acked.clone();
        async move {
            wait_for(
                "the load to be acknowledged",
                Duration::from_secs(120),
                || {
                    let got = acked.load(Ordering::SeqCst);
                    async move {
                        if got >= n {
                            Ok(())
                        } else {
                            Err(format!("{got} of {n}"))
                        }
                    }
                },
            )
            .await
            .unwrap()
        }
    };
    wait_acked(FIRST + 20).await;
    // A durable subscriber takes the first events and stops.
    let api1 = net.node(1).info().unwrap().api.clone();
    let before = sub_durable(&api1, "moving/#", "mover", FIRST)
        .wait_with_output()
        .await
        .unwrap();
    assert!(before.status.success(), "{}", stderr(&before));
    let before = events_of(&before);
    assert_eq!(before.len(), FIRST);

    // A fifth node joins: the map gives it replicas, and the groups move them.
    let five = net
        .add_node(NodeOptions {
            bootstrap_from_first: true,
            extra_args: vec!["--voters".into(), "4".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let new_id = net.node(five).info().unwrap().peer_id.clone();
    apis.lock().unwrap().push(net.api(five).unwrap());
    let joined = shards_where(&net, 0, "a map with the fifth node", |m| {
        if m.epoch > first.epoch
            && m.peers
                .iter()
                .any(|p| p.peer_id == new_id && p.replicas > 0)
        {
            Ok(())
        } else {
            Err(format!("epoch {}", m.epoch))
        }
    })
    .await;
    let settled_in = wait_settled(&net, "the replicas moved to the fifth node").await;
    assert!(settled_in.epoch >= joined.epoch);
    // The load goes on meanwhile: the groups of its topics are busy, and their leads move
    // by hand-off, the idle groups' by campaign.
    every_shard_led_by_its_preferred_leader(&net).await;
    let at_join = acked.load(Ordering::SeqCst);

    // Node 3 is removed: killed, then taken out; its replicas move to the others.
    let gone = 3;
    let gone_id = net.node(gone).info().unwrap().peer_id.clone();
    apis.lock()
        .unwrap()
        .retain(|a| a.base() != net.api(gone).unwrap().base());
    net.kill(gone).await.unwrap();
    let out = canal(&[
        "--api",
        &net.node(0).info().unwrap().api,
        "cluster",
        "remove",
        &gone_id,
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    shards_where(&net, 0, "a map without the removed node", |m| {
        match m.rows.iter().find(|r| r.replicas.contains(&gone_id)) {
            None => Ok(()),
            Some(r) => Err(format!("shard {} still on it", r.shard)),
        }
    })
    .await;
    wait_settled(&net, "the removed node's replicas moved to the others").await;
    wait_acked(at_join + 20).await;
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    let n = acked.load(Ordering::SeqCst);
    let want: BTreeSet<String> = (0..n).map(|i| format!("e{i}")).collect();

    // Every acknowledged event once, in order, read through the new node.
    let api5 = net.node(five).info().unwrap().api.clone();
    let all = tokio::time::timeout(
        Duration::from_secs(60),
        sub(&api5, "moving/#", n).wait_with_output(),
    )
    .await
    .expect("every event read back")
    .unwrap();
    assert!(all.status.success(), "{}", stderr(&all));
    check_delivery(&String::from_utf8_lossy(&all.stdout), &want, "node5");

    // The durable subscriber resumes after what it acknowledged, on another node.
    let api2 = net.node(2).info().unwrap().api.clone();
    let after = tokio::time::timeout(
        Duration::from_secs(60),
        sub_durable(&api2, "moving/#", "mover", n - FIRST).wait_with_output(),
    )
    .await
    .expect("the durable subscriber resumed")
    .unwrap();
    assert!(after.status.success(), "{}", stderr(&after));
    let mut got: Vec<String> = before.iter().map(|e| e.2.clone()).collect();
    got.extend(events_of(&after).into_iter().map(|e| e.2));
    let unique: BTreeSet<String> = got.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        got.len(),
        "an event came twice to the durable subscriber"
    );
    assert_eq!(unique, want, "the durable subscriber missed events");
}
