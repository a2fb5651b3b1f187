//! Who joins and who is served: a keyless mesh takes in only peers an operator admitted, a
//! node reachable from other hosts refuses to start without a key unless told
//! `--insecure-open`, and a node serves a bounded number of subscribers.

use canal_proto::api::ClusterStatus;
use canal_testnet::{NodeOptions, Testnet, wait_for};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

use crate::{BIN, assert_clear_error, canal, wait_peer_set};

/// The node ids of the metadata group's members, as node `via` sees them.
async fn members(net: &Testnet, via: usize) -> BTreeSet<String> {
    let s: ClusterStatus = net
        .api(via)
        .unwrap()
        .get("/v1/cluster/status")
        .await
        .unwrap();
    let g = s.groups.iter().find(|g| g.group == "metadata").unwrap();
    let st = g.members[0].status.as_ref().unwrap();
    st.nodes.iter().map(|(_, p)| p.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_mesh_takes_in_only_admitted_peers() {
    let mut net = crate::hostile::mesh(true).await;
    let newcomer = net
        .add_node(NodeOptions {
            keyless: true,
            bootstrap_from_first: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let id = net.node(newcomer).info().unwrap().peer_id.clone();
    let all: BTreeSet<String> = (0..4)
        .map(|i| net.node(i).info().unwrap().peer_id.clone())
        .collect();
    // Every node sees it in the mesh...
    for i in 0..3 {
        wait_peer_set(&net, i, &all, Duration::from_secs(60)).await;
    }
    // ...but for the membership job's many rounds (every 500 ms) nobody adds it.
    let mut round = tokio::time::interval(Duration::from_millis(500));
    for _ in 0..8 {
        round.tick().await;
        for i in 0..3 {
            assert!(
                !members(&net, i).await.contains(&id),
                "node{i} took in a stranger"
            );
        }
    }
    // Admitted by hand, it joins as a learner.
    let api = net.api(1).unwrap();
    let o = canal(&["cluster", "admit", &id, "--api", api.base()]).await;
    assert!(o.status.success(), "{}", crate::stderr(&o));
    wait_for("the admitted peer to join", Duration::from_secs(60), || {
        let net = &net;
        let id = id.clone();
        async move {
            let m = members(net, 0).await;
            if m.contains(&id) {
                Ok(())
            } else {
                Err(format!("{m:?}"))
            }
        }
    })
    .await
    .unwrap();
    // A bad peer id is refused with the reason.
    let o = canal(&["cluster", "admit", "not-a-peer", "--api", api.base()]).await;
    assert_clear_error(&o, 1, "is not a peer id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reachable_node_needs_a_key_or_insecure_open() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("a").display().to_string();
    let args = [
        "node",
        "--data-dir",
        &data,
        "--listen",
        "/ip4/0.0.0.0/tcp/0",
        "--api-listen",
        "127.0.0.1:0",
    ];
    let o = canal(&args).await;
    assert_clear_error(&o, 2, "--insecure-open");
    assert!(
        crate::stderr(&o).contains("--cluster-key"),
        "{}",
        crate::stderr(&o)
    );

    // With --insecure-open it starts, and says what that gives up.
    let mut child = tokio::process::Command::new(BIN)
        .env("CANAL_TOKEN", canal_testnet::admin_token())
        .args(args)
        .arg("--insecure-open")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(l)) = lines.next_line().await {
            let done = l.contains("ready: API");
            seen.push(l);
            if done {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(ready.ok(), Some(true), "{seen:#?}");
    assert!(
        seen.iter()
            .any(|l| l.contains("WARN") && l.contains("--insecure-open")),
        "{seen:#?}"
    );
    let _ = child.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serves_a_bounded_number_of_subscribers() {
    let net = Testnet::start(BIN, 1, |_| NodeOptions {
        extra_args: vec!["--max-subscribers".into(), "2".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let base = net.api(0).unwrap().base().to_string();
    let http = canal_testnet::http_client();
    let open = || {
        let http = http.clone();
        let url = format!("{base}/v1/subscribe?filter=a/%23&qos=0");
        async move { http.get(url).send().await.unwrap() }
    };
    let first = open().await;
    let second = open().await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let third = open().await;
    assert_eq!(third.status().as_u16(), 503);
    let body = third.text().await.unwrap();
    assert!(body.contains("limit of 2 subscribers"), "{body}");
    // A subscriber that leaves gives its slot back.
    drop(first);
    wait_for(
        "a slot to come back",
        Duration::from_secs(30),
        || async move {
            let r = open().await;
            if r.status().as_u16() == 200 {
                Ok(())
            } else {
                Err(r.status().to_string())
            }
        },
    )
    .await
    .unwrap();
    drop(second);
}
