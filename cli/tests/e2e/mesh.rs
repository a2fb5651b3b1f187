//! The peer mesh: discovery, capabilities, membership, the topic space, cluster keys, bad
//! input, and `canal testnet`.

use crate::{BIN, assert_clear_error, canal, last_line, stderr, wait_peer_set};
use canal_proto::api::{ClusterShards, Health, Locate, Peers};
use canal_testnet::{Api, NodeOptions, Testnet, wait_for};
use std::collections::BTreeSet;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_find_each_other_track_membership_and_agree_on_homes() {
    let mut net = Testnet::start(BIN, 5, |i| NodeOptions {
        tier: Some(if i < 3 { "edge".into() } else { "cloud".into() }),
        labels: vec![("index".into(), i.to_string())],
        gpus: if i == 0 {
            vec!["H100:80GiB".into()]
        } else {
            vec![]
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let ids: Vec<String> = (0..5)
        .map(|i| net.node(i).info().unwrap().peer_id.clone())
        .collect();
    let all: BTreeSet<String> = ids.iter().cloned().collect();

    // Every node lists all five, with their capabilities, and node 0's declared GPU.
    for i in 0..5 {
        let peers = wait_peer_set(&net, i, &all, Duration::from_secs(60)).await;
        for p in &peers.peers {
            assert!(p.caps.cpu_cores >= 1, "{p:?}");
            assert!(p.caps.memory_total_bytes > 0, "{p:?}");
            assert!(!p.caps.listen_addrs.is_empty(), "{p:?}");
            let index: usize = p.caps.labels["index"].parse().unwrap();
            assert_eq!(p.caps.peer_id, ids[index]);
            assert_eq!(p.caps.tier, if index < 3 { "edge" } else { "cloud" });
            if index == 0 {
                assert_eq!(p.caps.gpus_declared.len(), 1, "{p:?}");
                assert_eq!(p.caps.gpus_declared[0].model, "H100");
                assert_eq!(p.caps.gpus_declared[0].memory_bytes, 80 << 30);
            } else {
                assert!(p.caps.gpus_declared.is_empty());
            }
            assert_eq!(p.is_self, index == i);
        }
        let health: Health = net.api(i).unwrap().get("/v1/health").await.unwrap();
        assert!(health.ready, "{health:?}");
        assert_eq!(health.peer_id, ids[i]);
    }

    // The CLI shows the declared GPU apart from detected ones.
    let out = canal(&["--api", &net.node(2).info().unwrap().api, "peers"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("H100 80 GiB (declared)"), "{table}");
    assert!(table.contains("5 peers"), "{table}");

    // `canal topic locate` gives the same home set on every node.
    let mut homes = BTreeSet::new();
    for i in 0..5 {
        let api = net.node(i).info().unwrap().api.clone();
        let api = &api;
        let l: Locate = wait_for(
            "locate to count all 5 peers",
            Duration::from_secs(30),
            || async move {
                let out = canal(&[
                    "--api",
                    api,
                    "topic",
                    "locate",
                    "sensors/room1/temp",
                    "--json",
                ])
                .await;
                if !out.status.success() {
                    return Err(stderr(&out));
                }
                let l: Locate = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
                if l.members == 5 {
                    Ok(l)
                } else {
                    Err(format!("{} members", l.members))
                }
            },
        )
        .await
        .unwrap();
        assert_eq!(l.home.len(), 3);
        homes.insert(l.home.iter().map(|h| h.peer_id.clone()).collect::<Vec<_>>());
    }
    assert_eq!(homes.len(), 1, "nodes disagree on the home set: {homes:?}");

    // A killed node disappears from every other table within 15 s.
    net.kill(3).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let without: BTreeSet<String> = all.iter().filter(|p| **p != ids[3]).cloned().collect();
    for i in [0, 1, 2, 4] {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        wait_peer_set(&net, i, &without, left).await;
    }

    // Restarted on its data dir, it comes back with the same peer id.
    net.restart(3).await.unwrap();
    assert_eq!(net.node(3).info().unwrap().peer_id, ids[3]);
    for i in 0..5 {
        wait_peer_set(&net, i, &all, Duration::from_secs(60)).await;
    }

    // SIGTERM is a clean shutdown: exit 0, runtime file removed.
    let status = net.stop(4).await.unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!net.node(4).data_dir().join("node.json").exists());
}

fn write_key(dir: &std::path::Path, name: &str, byte: u8) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, canal_node::config::cluster_key_text([byte; 32])).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_cluster_key_cannot_join() {
    let keys = tempfile::tempdir().unwrap();
    let ours = write_key(keys.path(), "ours.key", 1);
    let theirs = write_key(keys.path(), "theirs.key", 2);
    let mut net = Testnet::start(BIN, 2, |_| NodeOptions {
        cluster_key: Some(ours.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let members: BTreeSet<String> = (0..2)
        .map(|i| net.node(i).info().unwrap().peer_id.clone())
        .collect();
    // Peers with the key form a mesh.
    wait_peer_set(&net, 0, &members, Duration::from_secs(60)).await;
    wait_peer_set(&net, 1, &members, Duration::from_secs(60)).await;

    let stranger = net
        .add_node(NodeOptions {
            cluster_key: Some(theirs),
            bootstrap_from_first: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let api: Api = net.api(stranger).unwrap();
    // Its dials are refused (the handshake fails)...
    wait_for(
        "the stranger's dials to fail",
        Duration::from_secs(30),
        || {
            let api = api.clone();
            async move {
                let failed = api
                    .metric_sum("libp2p_swarm_outgoing_connection_error_total")
                    .await
                    .map_err(|e| e.to_string())?;
                if failed >= 2.0 {
                    Ok(())
                } else {
                    Err(format!("{failed} failed dials"))
                }
            }
        },
    )
    .await
    .unwrap();
    // ... so it knows only itself, is not ready, and the mesh never lists it.
    let stranger_id = net.node(stranger).info().unwrap().peer_id.clone();
    let peers: Peers = api.get("/v1/peers").await.unwrap();
    assert_eq!(peers.peers.len(), 1, "{peers:?}");
    let (status, body) = api.get_raw("/v1/health").await.unwrap();
    assert_eq!(status, 503, "{body}");
    for i in 0..2 {
        let peers: Peers = net.api(i).unwrap().get("/v1/peers").await.unwrap();
        assert!(
            peers.peers.iter().all(|p| p.caps.peer_id != stranger_id),
            "{peers:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_no_panic() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).display().to_string();
    let local = [
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--api-listen",
        "127.0.0.1:0",
        // Tests run at once: none may take the default MQTT port.
        "--mqtt-listen",
        "127.0.0.1:0",
    ];
    let node = |extra: &[&str]| {
        let mut v: Vec<String> = vec!["node".into()];
        v.extend(local.iter().map(|s| s.to_string()));
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |args: Vec<String>| async move {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        canal(&refs).await
    };

    // Unknown flag: usage error.
    let o = canal(&["node", "--no-such-flag"]).await;
    assert_clear_error(&o, 2, "--no-such-flag");

    // A bad multiaddr.
    let o = run(node(&[
        "--data-dir",
        &d("a"),
        "--bootstrap",
        "/ip4/1.2.3/tcp/x",
    ]))
    .await;
    assert_clear_error(&o, 2, "bootstrap");
    assert!(
        last_line(&o).contains("is not a multiaddr"),
        "{}",
        stderr(&o)
    );

    // A data dir that cannot be created (a file is in the way).
    std::fs::write(dir.path().join("file"), b"x").unwrap();
    let o = run(node(&["--data-dir", &d("file/sub")])).await;
    assert_clear_error(&o, 1, "file/sub");

    // A shard count out of range is refused, naming the setting and what is allowed.
    for bad in ["0", "100000"] {
        let o = run(node(&["--data-dir", &d("s"), "--shards", bad])).await;
        assert_clear_error(
            &o,
            2,
            &format!("shards: {bad} is out of range: a topic space has 1 to 65536 shards"),
        );
    }

    // Malformed TOML.
    std::fs::write(dir.path().join("bad.toml"), "tier = [\n").unwrap();
    let o = run(node(&["--config", &d("bad.toml"), "--data-dir", &d("b")])).await;
    assert_clear_error(&o, 2, "bad.toml");
    let o = canal(&["node", "--gpu", "H100"]).await;
    assert_clear_error(&o, 2, "MODEL:MEMORY");

    // A data dir locked by a running node, and an API port in use.
    let mut net = Testnet::start(BIN, 1, |_| NodeOptions::default())
        .await
        .unwrap();
    let locked = net.node(0).data_dir().display().to_string();
    let o = run(node(&["--data-dir", &locked])).await;
    assert_clear_error(&o, 1, "in use by another canal node");
    let busy = net
        .node(0)
        .info()
        .unwrap()
        .api
        .trim_start_matches("http://")
        .to_string();
    let o = canal(&[
        "node",
        "--data-dir",
        &d("c"),
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--api-listen",
        &busy,
    ])
    .await;
    assert_clear_error(&o, 1, "cannot listen for the API");

    // A topic with a wildcard where a topic is published: refused by the CLI (usage) and by
    // the API (400, JSON error), and the node stays up.
    let api_url = net.node(0).info().unwrap().api.clone();
    let o = canal(&["--api", &api_url, "topic", "locate", "sensors/+/temp"]).await;
    assert_clear_error(&o, 2, "wildcards are allowed only in subscription filters");
    let api = net.api(0).unwrap();
    let (status, body) = api
        .get_raw("/v1/topics/sensors%2F%2B%2Ftemp/locate")
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["kind"], "invalid_topic");
    assert!(
        err["error"].as_str().unwrap().contains("wildcard"),
        "{body}"
    );
    let (status, body) = api.get_raw("/v1/topics/a%2F%2Fb/locate").await.unwrap();
    assert_eq!(status, 400, "{body}");
    let (status, body) = api.get_raw("/v1/nothing-here").await.unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"].is_string());
    let (status, body) = api.get_raw("/v1/topics/locate").await.unwrap();
    assert_eq!(status, 400, "{body}");
    let (status, body) = api.get_raw("/v1/topics/%FF/locate").await.unwrap();
    assert_eq!(status, 400, "{body}");
    let (status, body) = api
        .send(reqwest::Method::POST, "/v1/peers", Vec::new(), None)
        .await
        .unwrap();
    assert_eq!(status, 405, "{body}");
    assert!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"].is_string());
    // Raw slashes work as well as %2F.
    let l: Locate = api
        .get("/v1/topics/sensors/room1/temp/locate")
        .await
        .unwrap();
    assert_eq!(l.topic, "sensors/room1/temp");

    // A client pointed at nothing says so.
    let o = canal(&["--api", "http://127.0.0.1:9", "peers"]).await;
    assert_clear_error(&o, 1, "cannot reach the canal API");
    let o = canal(&["--api", "not a url", "peers"]).await;
    assert_clear_error(&o, 2, "http://");

    let health: Health = api.get("/v1/health").await.unwrap();
    assert!(health.ready);
    net.stop(0).await.unwrap();
}

/// Whether a process is alive (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

fn pids(dir: &std::path::Path, n: usize) -> Vec<u32> {
    (0..n)
        .filter_map(|i| std::fs::read_to_string(dir.join(format!("node{i}/pid"))).ok())
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testnet_up_status_kill_restart_down() {
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
        "--gpu-nodes",
        "1",
    ])
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let export = out
        .lines()
        .find(|l| l.starts_with("export CANAL_API=http://127.0.0.1:"))
        .unwrap();
    let api = export.trim_start_matches("export CANAL_API=").to_string();

    let peers: Peers = Api::new(&api).get("/v1/peers").await.unwrap();
    assert_eq!(peers.peers.len(), 3);
    assert_eq!(
        peers
            .peers
            .iter()
            .filter(|p| p.caps.tier == "cloud")
            .count(),
        1
    );
    assert!(
        peers
            .peers
            .iter()
            .any(|p| p.caps.tier == "cloud" && p.caps.gpus_declared.len() == 1)
    );

    // A second `up` on a running testnet is refused.
    let o = canal(&["testnet", "up", "--dir", &d]).await;
    assert_clear_error(&o, 1, "already running");

    let o = canal(&["testnet", "status", "--dir", &d, "--json"]).await;
    let before_kill: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let o = canal(&["testnet", "kill", "node1", "--dir", &d]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = canal(&["testnet", "status", "--dir", &d, "--json"]).await;
    let status: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(status[1]["running"], false, "{status}");
    assert_eq!(status[0]["running"], true, "{status}");

    let o = canal(&["testnet", "restart", "1", "--dir", &d]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    // It comes back with the same identity and rejoins.
    let o = canal(&["testnet", "status", "--dir", &d, "--json"]).await;
    let after: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(after[1]["running"], true, "{after}");
    assert_eq!(after[1]["peer_id"], before_kill[1]["peer_id"], "{after}");
    let api1 = Api::new(after[1]["api"].as_str().unwrap());
    wait_for("node1 to rejoin", Duration::from_secs(60), || {
        let api1 = api1.clone();
        async move {
            let p: Peers = api1.get("/v1/peers").await.map_err(|e| e.to_string())?;
            if p.peers.len() == 3 {
                Ok(())
            } else {
                Err(format!("{} peers", p.peers.len()))
            }
        }
    })
    .await
    .unwrap();

    let before = pids(&dir, 3);
    assert_eq!(before.len(), 3);
    let o = canal(&["testnet", "down", "--dir", &d, "--purge"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        before.iter().all(|p| !alive(*p)),
        "nodes left running: {before:?}"
    );
    assert!(!dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_stops_what_an_interrupted_up_left() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tn");
    let d = dir.display().to_string();
    let mut up = tokio::process::Command::new(BIN)
        .env("CANAL_TOKEN", canal_testnet::admin_token())
        .args(["testnet", "up", "--dir", &d, "--nodes", "3"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Interrupt `up` once every node it started has its data dir (a pid file is written
    // at spawn, before the node has created anything), before it has seen the mesh form.
    let dir2 = dir.clone();
    wait_for("up to start 3 nodes", Duration::from_secs(60), || {
        let dir = dir2.clone();
        async move {
            let n = pids(&dir, 3).len();
            let keys = (0..3)
                .filter(|i| dir.join(format!("node{i}/identity.key")).exists())
                .count();
            if n == 3 && keys == 3 {
                Ok(())
            } else {
                Err(format!("{n} started, {keys} with an identity"))
            }
        }
    })
    .await
    .unwrap();
    up.start_kill().unwrap();
    up.wait().await.unwrap();
    let started = pids(&dir, 3);
    assert!(
        started.iter().all(|p| alive(*p)),
        "the nodes should outlive `up`"
    );

    let o = canal(&["testnet", "down", "--dir", &d]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        started.iter().all(|p| !alive(*p)),
        "nodes left running: {started:?}"
    );
    // Data is kept without --purge.
    assert!(dir.join("node0/identity.key").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_meet_over_quic() {
    let mut net = Testnet::new(BIN).unwrap();
    net.add_node(NodeOptions {
        extra_args: vec!["--listen".into(), "/ip4/127.0.0.1/udp/0/quic-v1".into()],
        // QUIC cannot carry a cluster key.
        keyless: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let quic = net
        .node(0)
        .info()
        .unwrap()
        .listen_addrs
        .iter()
        .find(|a| a.contains("/quic-v1/"))
        .cloned()
        .expect("node0 should report its QUIC address in node.json");
    // The second node knows node0 only by its QUIC address.
    net.add_node(NodeOptions {
        extra_args: vec!["--bootstrap".into(), quic],
        keyless: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let both: BTreeSet<String> = (0..2)
        .map(|i| net.node(i).info().unwrap().peer_id.clone())
        .collect();
    wait_peer_set(&net, 1, &both, Duration::from_secs(60)).await;
    wait_peer_set(&net, 0, &both, Duration::from_secs(60)).await;
    let (_, metrics) = net.api(1).unwrap().get_raw("/metrics").await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("libp2p_swarm_connections_established") && l.contains("quic-v1")),
        "no QUIC connection in the metrics"
    );
}

/// `/metrics` of a node that has served a publish and a subscription passes `promtool check
/// metrics` (Prometheus' own lint), and a scraper that asks for OpenMetrics gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_after_a_publish_and_a_subscription() {
    use futures::StreamExt;
    // Three voters, so the per-member Raft metrics have samples too.
    let net = crate::raft::cluster(3, &[]).await;
    let api = net.api(0).unwrap();
    let sub = canal_client::Client::streaming(
        net.api(2).unwrap().base(),
        Some(canal_testnet::admin_token()),
    )
    .unwrap();
    let events = sub
        .events("/v1/subscribe?filter=metrics%2F%23&qos=1&from=earliest")
        .await
        .unwrap();
    let mut events = std::pin::pin!(events);
    let (status, body) = api
        .send(
            reqwest::Method::POST,
            "/v1/topics/metrics%2Fa/events",
            b"hello".to_vec(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let got = tokio::time::timeout(Duration::from_secs(30), events.next())
        .await
        .expect("the event within 30 s")
        .expect("the stream open")
        .unwrap();
    let e: canal_proto::api::Event = serde_json::from_str(&got.data).unwrap();
    assert_eq!(e.data.as_deref(), Some("hello"));

    // Round trips to the other members are measured every few seconds.
    wait_for(
        "node 0 to export its Raft members' round trips",
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move {
                let (_, m) = api.get_raw("/metrics").await.map_err(|e| e.to_string())?;
                if m.contains("canal_raft_member_rtt_seconds{") {
                    Ok(())
                } else {
                    Err("no round trips yet".to_string())
                }
            }
        },
    )
    .await
    .unwrap();
    let (status, text) = api.get_raw("/metrics").await.unwrap();
    assert_eq!(status, 200, "{text}");
    // Counters are named after their samples, as the Prometheus text format has them.
    assert!(
        text.contains("# TYPE canal_capability_records_received_total counter\n"),
        "{text}"
    );
    assert!(!text.contains("# EOF"), "{text}");
    // A missing promtool fails the test: CI installs it (.ci/run), as should a developer
    // (Debian's `prometheus` package).
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): install it (apt-get install prometheus)")
        });
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Prometheus asks for OpenMetrics, and gets it.
    let resp = canal_testnet::http_client()
        .get(format!("{}/metrics", api.base()))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .unwrap();
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let om = resp.text().await.unwrap();
    assert!(om.trim_end().ends_with("# EOF"), "{om}");
}

/// The shard map of node `i` once `ok` holds for it.
async fn shard_map_where(
    net: &Testnet,
    i: usize,
    what: &str,
    ok: impl Fn(&ClusterShards) -> bool,
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
            if ok(&m) {
                Ok(m)
            } else {
                Err(format!(
                    "epoch {}, K = {}, peers {:?}",
                    m.epoch,
                    m.replication,
                    m.peers
                        .iter()
                        .map(|p| (p.peer_id.as_str(), p.replicas))
                        .collect::<Vec<_>>()
                ))
            }
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shard_map_is_committed_shown_and_moves_when_a_fourth_node_joins() {
    let form = |extra: &[&str]| NodeOptions {
        extra_args: ["--bootstrap-expect", "3"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect(),
        ..Default::default()
    };
    // The default shard count, said: the test harness gives its nodes fewer.
    let mut net = Testnet::start(BIN, 3, |_| form(&["--shards", "64"]))
        .await
        .unwrap();
    let ids: BTreeSet<String> = (0..3)
        .map(|i| net.node(i).info().unwrap().peer_id.clone())
        .collect();

    // The metadata leader commits a map of 64 shards, each on all three peers (K = 3).
    let first = shard_map_where(&net, 0, "a shard map of K = 3, every group led", |m| {
        m.epoch >= 1 && m.replication == 3 && m.rows.iter().all(|r| r.group_leader.is_some())
    })
    .await;
    assert_eq!((first.shards, first.rows.len()), (64, 64), "{first:?}");
    for r in &first.rows {
        let set: BTreeSet<String> = r.replicas.iter().cloned().collect();
        assert_eq!(set, ids, "shard {}: {:?}", r.shard, r.replicas);
        assert_eq!(r.served_by, format!("shard-{}", r.shard));
        assert!(
            r.group_leader.as_ref().is_some_and(|l| ids.contains(l)),
            "{r:?}"
        );
    }
    // Every peer leads about a third of the shards.
    assert_eq!(first.peers.len(), 3);
    for p in &first.peers {
        assert_eq!(p.replicas, 64, "{p:?}");
        assert!((18..=25).contains(&p.leaders), "{p:?}");
    }

    // `canal cluster shards` lists them, each served by its shard's group.
    let api0 = net.node(0).info().unwrap().api.clone();
    let out = canal(&["--api", &api0, "cluster", "shards"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "shard map epoch {}: 64 shards, K = 3",
            first.epoch
        )),
        "{text}"
    );
    assert!(text.contains("shard-63"), "{text}");
    assert!(ids.iter().all(|id| text.contains(id.as_str())), "{text}");

    // `locate` gives the topic's shard, its planned replicas from the map, the DHT home next
    // to them, and the group that holds its log.
    let out = canal(&[
        "--api",
        &api0,
        "topic",
        "locate",
        "sensors/room1/temp",
        "--json",
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let l: Locate = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(l.shards, 64);
    let row = &first.rows[l.shard as usize];
    assert_eq!(l.map_epoch, Some(first.epoch));
    assert_eq!(l.planned_replicas, row.replicas);
    assert_eq!(l.home.len(), 3);
    assert_eq!(l.group, format!("shard-{}", l.shard));
    let out = canal(&["--api", &api0, "topic", "locate", "sensors/room1/temp"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("shard-{} (leader ", l.shard)),
        "{text}"
    );

    // A fourth node joins, started with another shard count: the cluster's stays. The map's
    // epoch moves, with about a quarter of the 192 replicas on the new peer.
    let four = net
        .add_node(NodeOptions {
            bootstrap_from_first: true,
            ..form(&["--shards", "32"])
        })
        .await
        .unwrap();
    let new_id = net.node(four).info().unwrap().peer_id.clone();
    let second = shard_map_where(&net, 0, "a map with the fourth peer", |m| {
        m.epoch > first.epoch && m.peers.iter().any(|p| p.peer_id == new_id)
    })
    .await;
    assert_eq!((second.shards, second.replication), (64, 3));
    assert!(second.rows.iter().all(|r| r.replicas.len() == 3));
    let on_new = second
        .peers
        .iter()
        .find(|p| p.peer_id == new_id)
        .map(|p| p.replicas)
        .unwrap_or_default();
    assert!(
        (40..=56).contains(&on_new),
        "{on_new} of 192 replicas on the new peer"
    );
    assert_eq!(second.peers.iter().map(|p| p.replicas).sum::<usize>(), 192);
    assert_eq!(second.moves_from, Some(second.epoch - 1));
    assert!(
        second
            .moves
            .iter()
            .any(|m| m.step == "add_learner" && m.peer == new_id),
        "{:?}",
        second.moves
    );
    let api_url = net.node(0).info().unwrap().api.clone();
    let out = canal(&["--api", &api_url, "cluster", "shards", "--moves"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "moves from epoch {}: {} planned",
            second.epoch - 1,
            second.moves.len()
        )),
        "{text}"
    );
    assert!(text.contains("one at a time"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("add learner") && l.contains(new_id.as_str())),
        "{text}"
    );

    // The gauge follows the replica's map within a round of the job.
    let api0 = net.api(0).unwrap();
    let api0 = &api0;
    wait_for("the epoch gauge", Duration::from_secs(10), || async move {
        let epoch = api0
            .metric_sum("canal_shard_map_epoch")
            .await
            .map_err(|e| e.to_string())?;
        if epoch >= second.epoch as f64 {
            Ok(())
        } else {
            Err(format!("canal_shard_map_epoch {epoch}"))
        }
    })
    .await
    .unwrap();
    assert!(
        api0.metric_sum("canal_shard_map_changes_total")
            .await
            .unwrap()
            <= second.epoch as f64
    );
    // The new node uses the cluster's 64 shards, and says so.
    let on_four = shard_map_where(&net, four, "the new node's replica of the map", |m| {
        m.epoch >= second.epoch
    })
    .await;
    assert_eq!(on_four.shards, 64);
    let l: Locate = net
        .api(four)
        .unwrap()
        .get("/v1/topics/sensors/room1/temp/locate")
        .await
        .unwrap();
    assert_eq!((l.shards, l.shard), (64, row.shard));
    let node = net.node(four);
    wait_for(
        "the new node to log the cluster's shard count",
        Duration::from_secs(60),
        || async move {
            // The whole log: opening 64 shard groups logs far more than a few hundred lines.
            let log = node.log_tail(usize::MAX);
            if log.contains("started with --shards 32, but the cluster has 64 shards") {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        },
    )
    .await
    .unwrap();
}
