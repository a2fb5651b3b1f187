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
