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
