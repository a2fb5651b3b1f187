//! Tier emulation: nodes behind delay relays, slow links seen in the measured round trip,
//! partitions that cut a node off and heal.

use crate::{BIN, assert_clear_error, canal, stderr, wait_peer_set};
use canal_proto::api::Peers;
use canal_testnet::{Api, LinkSettings, NodeOptions, Testnet, wait_for};
use std::collections::BTreeSet;
use std::time::Duration;

/// The round trip node `from` measured to the peer `to` (by ping, on a direct connection),
/// once `accept` holds for it.
async fn rtt_ms(net: &Testnet, from: usize, to: &str, accept: impl Fn(f64) -> bool) -> f64 {
    let api = net.api(from).unwrap();
    let what = format!("{}'s round trip to {to}", net.node(from).name());
    let accept = &accept;
    wait_for(&what, Duration::from_secs(60), || {
        let api = api.clone();
        async move {
            let peers: Peers = api.get("/v1/peers").await.map_err(|e| e.to_string())?;
            let rtt = peers
                .peers
                .iter()
                .find(|p| p.caps.peer_id == to)
                .and_then(|p| p.rtt_ms);
            match rtt {
                Some(ms) if accept(ms) => Ok(ms),
                other => Err(format!("rtt {other:?} ms")),
            }
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_link_shows_in_the_round_trip_and_a_partition_cuts_and_heals() {
    // Node 2 is behind a 40 ms link; nodes 0 and 1 are behind relays with no delay.
    let net = Testnet::start(BIN, 3, |i| NodeOptions {
        link: (i == 2).then(|| LinkSettings::latency(Duration::from_millis(40))),
        ..Default::default()
    })
    .await
    .unwrap();
    let ids: Vec<String> = (0..3)
        .map(|i| net.node(i).info().unwrap().peer_id.clone())
        .collect();
    let all: BTreeSet<String> = ids.iter().cloned().collect();
    for i in 0..3 {
        wait_peer_set(&net, i, &all, Duration::from_secs(60)).await;
    }

    // Peers know each node only by its relay's address.
    let peers: Peers = net.api(0).unwrap().get("/v1/peers").await.unwrap();
    for (i, id) in ids.iter().enumerate() {
        let p = peers.peers.iter().find(|p| p.caps.peer_id == *id).unwrap();
        let relay = format!(
            "/ip4/127.0.0.1/tcp/{}/p2p/{id}",
            net.relay_addr(i).unwrap().port()
        );
        assert_eq!(p.caps.listen_addrs, vec![relay], "node{i}");
    }

    // Crossing node 2's link twice costs at least 80 ms, whoever asks.
    for from in [0, 1] {
        let ms = rtt_ms(&net, from, &ids[2], |_| true).await;
        assert!(ms >= 80.0, "node{from} -> node2: {ms} ms");
    }
    let ms = rtt_ms(&net, 2, &ids[0], |_| true).await;
    assert!(ms >= 80.0, "node2 -> node0: {ms} ms");
    // Between the fast nodes the round trip is small (some ping answers well under 40 ms).
    rtt_ms(&net, 0, &ids[1], |ms| ms < 40.0).await;

    // The relays told the nodes apart by their source ports.
    let fabric = net.fabric().unwrap();
    let known: u64 = (0..3).map(|i| fabric.stats(i).known_source).sum();
    assert!(known > 0, "{fabric:?}");

    // Cut node 2 off: each side forgets the other (records expire after ~10 s).
    net.partition(&[2]).unwrap();
    let fast: BTreeSet<String> = ids[..2].iter().cloned().collect();
    let alone: BTreeSet<String> = [ids[2].clone()].into();
    wait_peer_set(&net, 0, &fast, Duration::from_secs(40)).await;
    wait_peer_set(&net, 1, &fast, Duration::from_secs(40)).await;
    wait_peer_set(&net, 2, &alone, Duration::from_secs(40)).await;

    // Healed, they find each other again.
    net.heal().unwrap();
    for i in 0..3 {
        wait_peer_set(&net, i, &all, Duration::from_secs(60)).await;
    }
}

/// Waits until the node at `api` lists `n` peers.
async fn wait_peer_count(api: &Api, n: usize, what: &str) {
    wait_for(what, Duration::from_secs(40), || {
        let api = api.clone();
        async move {
            let p: Peers = api.get("/v1/peers").await.map_err(|e| e.to_string())?;
            if p.peers.len() == n {
                Ok(())
            } else {
                Err(format!("{} peers", p.peers.len()))
            }
        }
    })
    .await
    .unwrap();
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testnet_links_partition_and_heal() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tn");
    let d = dir.display().to_string();
    let o = canal(&[
        "testnet",
        "up",
        "--dir",
        &d,
        "--tiers",
        "edge=2,cloud=1",
        "--link",
        "moon=1s",
    ])
    .await;
    assert_clear_error(&o, 1, "moon");
    let o = canal(&["testnet", "up", "--dir", &d, "--link", "edge=fast"]).await;
    assert_clear_error(&o, 2, "fast");

    let o = canal(&[
        "testnet",
        "up",
        "--dir",
        &d,
        "--tiers",
        "edge=2,cloud=1",
        "--link",
        "edge=15ms±1ms",
        "--json",
    ])
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("links: edge 15ms±1ms, cloud 1ms"),
        "{}",
        stderr(&o)
    );
    let nodes: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let api = |i: usize| Api::new(nodes[i]["api"].as_str().unwrap());
    let relay: u32 = std::fs::read_to_string(dir.join("relay.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(relay));

    // Cut the cloud node off: each side forgets the other.
    let o = canal(&["testnet", "partition", "node2", "--dir", &d]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cut off node2 from node0, node1"),
        "{}",
        stderr(&o)
    );
    wait_peer_count(&api(0), 2, "node0 to forget node2").await;
    wait_peer_count(&api(2), 1, "node2 to forget the others").await;
    let o = canal(&["testnet", "status", "--dir", &d]).await;
    assert!(
        stderr(&o).contains("partitioned: node2 cut off"),
        "{}",
        stderr(&o)
    );
    let o = canal(&["testnet", "partition", "node7", "--dir", &d]).await;
    assert_clear_error(&o, 1, "node7");
    let o = canal(&["testnet", "partition", "0,1,2", "--dir", &d]).await;
    assert_clear_error(&o, 1, "every node");

    let o = canal(&["testnet", "heal", "--dir", &d]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    wait_peer_count(&api(0), 3, "node0 to see node2 again").await;
    wait_peer_count(&api(2), 3, "node2 to see the others again").await;

    // `down` stops the relays too.
    let o = canal(&["testnet", "down", "--dir", &d, "--purge"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!alive(relay), "the relay process outlived `down`");
    assert!(!dir.exists());

    let o = canal(&["testnet", "heal", "--dir", &d]).await;
    assert_clear_error(&o, 1, "no testnet");
}

/// Stops the persistent testnet in `dir` when dropped, so a failing test leaves no node.
struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = std::process::Command::new(BIN)
            .env("CANAL_TOKEN", canal_testnet::admin_token())
            .args(["testnet", "down", "--dir", &self.0])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_voters_on_both_tiers_commit_and_run_the_iot_scenario() {
    // Every node forms the cluster (--bootstrap-expect 3 on all three), so the voters are
    // two edge nodes (30 ms one way) and the cloud node (1 ms): each round trip between the
    // tiers is 60+ ms, more than the fast Raft timings would carry.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tn");
    let d = dir.display().to_string();
    let _down = Down(d.clone());
    let o = canal(&[
        "testnet",
        "up",
        "--dir",
        &d,
        "--tiers",
        "edge=2,cloud=1",
        "--json",
        "--timeout",
        "120",
    ])
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("links: edge 30ms, cloud 1ms"),
        "{}",
        stderr(&o)
    );
    let nodes: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let api = |i: usize| Api::new(nodes[i]["api"].as_str().unwrap());

    // The voters span both tiers.
    let s: canal_proto::api::ClusterStatus = api(0).get("/v1/cluster/status").await.unwrap();
    for g in &s.groups {
        let me = g.members[0].status.as_ref().unwrap();
        assert_eq!(me.voters.len(), 3, "{g:?}");
    }
    // Nodes behind relays keep the safe timings.
    let timeout = api(0)
        .metric_sum("canal_raft_rpc_timeout_seconds")
        .await
        .unwrap();
    assert_eq!(timeout, 0.4);

    // Writes commit, through an edge node and the cloud node.
    for (i, node) in [0usize, 2].into_iter().enumerate() {
        let (status, body) = api(node)
            .send(
                reqwest::Method::PUT,
                &format!("/v1/kv/tiers-{i}"),
                b"v".to_vec(),
                Some(&format!("tiers-{i}")),
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "write through node{node}: {body}");
    }

    let wasm = canal_testnet::guests::path("threshold").unwrap();
    let o = canal(&[
        "testnet",
        "scenario",
        "iot",
        "--dir",
        &d,
        "--wasm",
        &wasm.display().to_string(),
        "--events",
        "60",
    ])
    .await;
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    // No Raft member's round trip came near the RPC timeout.
    for i in 0..3 {
        let slow = api(i).metric_sum("canal_raft_slow_members").await.unwrap();
        assert_eq!(slow, 0.0, "node{i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_testnet_up_stops_what_it_started() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tn");
    let d = dir.display().to_string();
    let _down = Down(d.clone());
    // Forming takes longer than a second (peers must be seen stable for 3 s), so this fails
    // after every node has started (without relays, whose start the timeout also bounds).
    let o = canal(&[
        "testnet",
        "up",
        "--dir",
        &d,
        "--nodes",
        "3",
        "--timeout",
        "1",
    ])
    .await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("stopped the nodes and relays this `up` started"),
        "{}",
        stderr(&o)
    );
    let pids: Vec<u32> = (0..3)
        .filter_map(|i| std::fs::read_to_string(dir.join(format!("node{i}/pid"))).ok())
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    assert_eq!(pids.len(), 3, "every node should have been started");
    assert!(
        pids.iter().all(|p| !alive(*p)),
        "nodes left running: {pids:?}"
    );
    let relay = std::fs::read_to_string(dir.join("relay.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    assert!(
        relay.is_none_or(|p| !alive(p)),
        "the relay outlived the failed up"
    );
}
