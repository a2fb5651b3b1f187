//! Publish and subscribe: QoS 1 delivery exactly once and in order across a leader kill,
//! publisher dedup, QoS 0, and bad input.

use crate::raft::{cluster, leader, wait_same_digest};
use crate::{BIN, assert_clear_error, canal};
use canal_testnet::{Api, wait_for};
use reqwest::Method;
use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Starts `canal sub FILTER --from earliest --json --count N` against `api`.
pub(crate) fn sub(api: &str, filter: &str, count: usize) -> tokio::process::Child {
    tokio::process::Command::new(BIN)
        .env("CANAL_TOKEN", canal_testnet::admin_token())
        .args([
            "--api",
            api,
            "sub",
            filter,
            "--from",
            "earliest",
            "--json",
            "--count",
            &count.to_string(),
        ])
        .env_remove("CANAL_API")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Publishes event `i` through node `i % n` (then the others) until one acknowledges it.
async fn publish_acked(apis: &[Api], i: usize) {
    let topic = format!(
        "sensors/r{}/{}",
        i % 4,
        if i.is_multiple_of(2) { "temp" } else { "hum" }
    );
    publish_until_acked(
        apis,
        i,
        &topic,
        &format!("m{i}"),
        format!("e{i}").into_bytes(),
    )
    .await;
}

/// Publishes `payload` to `topic` with message id `id` through node `first % n`, then the
/// others in turn, until one acknowledges it (the id makes retries one event).
pub(crate) async fn publish_until_acked(
    apis: &[Api],
    first: usize,
    topic: &str,
    id: &str,
    payload: Vec<u8>,
) {
    let path = format!("/v1/topics/{}/events", topic.replace('/', "%2F"));
    let http = canal_testnet::http_client();
    let mut attempt = 0usize;
    wait_for(
        &format!("publish {id} to be acknowledged"),
        Duration::from_secs(90),
        || {
            let api = &apis[(first + attempt) % apis.len()];
            attempt += 1;
            let request = http
                .post(format!("{}{path}", api.base()))
                .header("canal-id", id)
                .body(payload.clone())
                .timeout(Duration::from_secs(30))
                .send();
            async move {
                match request.await {
                    Ok(resp) if resp.status().is_success() => Ok(()),
                    Ok(resp) => Err(resp.status().to_string()),
                    Err(e) => Err(e.to_string()),
                }
            }
        },
    )
    .await
    .unwrap();
}

/// Checks one subscriber's output: every expected event exactly once, offsets per topic
/// 0, 1, 2, ... in order.
pub(crate) fn check_delivery(out: &str, want_payloads: &BTreeSet<String>, who: &str) {
    let mut per_topic: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut payloads = BTreeSet::new();
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let topic = v["topic"].as_str().unwrap().to_string();
        per_topic
            .entry(topic)
            .or_default()
            .push(v["offset"].as_u64().unwrap());
        assert!(
            payloads.insert(v["payload"].as_str().unwrap().to_string()),
            "{who}: duplicate {line}"
        );
    }
    assert_eq!(&payloads, want_payloads, "{who}: wrong set of events");
    for (topic, offsets) in per_topic {
        let want: Vec<u64> = (0..offsets.len() as u64).collect();
        assert_eq!(offsets, want, "{who}: {topic} out of order or with gaps");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_subscribers_get_every_event_once_in_order_across_a_leader_kill() {
    const N: usize = 600;
    let mut net = cluster(3, &[]).await;
    // The leader of one of the topics' shard groups (each node leads some of them).
    let group = crate::raft::group_of_topic(&net, "sensors/0/temp").await;
    let lead = leader(&net, 0, &group).await;
    let others: Vec<usize> = (0..3).filter(|i| *i != lead).collect();
    // Subscribers on the nodes that stay up, with both kinds of wildcard.
    let mut subs = Vec::new();
    for &i in &others {
        let api = net.node(i).info().unwrap().api.clone();
        subs.push((
            format!("node{i} sensors/+/temp"),
            sub(&api, "sensors/+/temp", N / 2),
            true,
        ));
        subs.push((
            format!("node{i} sensors/#"),
            sub(&api, "sensors/#", N),
            false,
        ));
    }

    let apis: Vec<Api> = (0..3).map(|i| net.api(i).unwrap()).collect();
    let acked = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let mut publishers = Vec::new();
    for _ in 0..8 {
        let (apis, acked, next) = (apis.clone(), acked.clone(), next.clone());
        publishers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= N {
                    return;
                }
                publish_acked(&apis, i).await;
                acked.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let wait_acked = |n: usize| {
        let acked = acked.clone();
        async move {
            wait_for(
                &format!("{n} acknowledged publishes"),
                Duration::from_secs(120),
                || {
                    let acked = acked.clone();
                    async move {
                        let got = acked.load(Ordering::Relaxed);
                        if got >= n {
                            Ok(())
                        } else {
                            Err(got.to_string())
                        }
                    }
                },
            )
            .await
            .unwrap()
        }
    };
    wait_acked(N / 3).await;
    net.kill(lead).await.unwrap();
    wait_acked(2 * N / 3).await;
    net.restart(lead).await.unwrap();
    for p in publishers {
        p.await.unwrap();
    }

    let all: BTreeSet<String> = (0..N).map(|i| format!("e{i}")).collect();
    let temps: BTreeSet<String> = (0..N)
        .filter(|i| i.is_multiple_of(2))
        .map(|i| format!("e{i}"))
        .collect();
    for (who, child, temp_only) in subs {
        let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("{who} did not get all its events in time"))
            .unwrap();
        assert!(
            out.status.success(),
            "{who}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        check_delivery(&text, if temp_only { &temps } else { &all }, &who);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_id_is_stored_once_and_qos0_reaches_other_nodes() {
    let net = cluster(3, &[]).await;
    let a = net.node(0).info().unwrap().api.clone();
    let b = net.node(1).info().unwrap().api.clone();
    let first = canal(&[
        "--api", &a, "pub", "alerts/x", "one", "--id", "dup-1", "--json",
    ])
    .await;
    let second = canal(&[
        "--api",
        &b,
        "pub",
        "alerts/x",
        "one again",
        "--id",
        "dup-1",
        "--json",
    ])
    .await;
    let first: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    let second: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(first["offset"], 0);
    assert_eq!(second["offset"], 0, "{second}");
    assert_eq!(second["duplicate"], true, "{second}");
    let out = canal(&[
        "--api", &b, "sub", "alerts/#", "--from", "earliest", "--count", "1", "--json",
    ])
    .await;
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["payload"], "one");
    assert_eq!(e["id"], "dup-1");

    // QoS 0: a live subscriber on another node sees an event published after it subscribed.
    let c = net.node(2).info().unwrap().api.clone();
    let mut live = tokio::process::Command::new(BIN)
        .env("CANAL_TOKEN", canal_testnet::admin_token())
        .args(["--api", &c, "sub", "live/#", "--qos", "0", "--count", "1"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Publish until the subscriber has it (it may not be connected yet when the first goes).
    let got = wait_for("the QoS 0 event to arrive", Duration::from_secs(30), || {
        let a = a.clone();
        let done = live.try_wait().ok().flatten().is_some();
        async move {
            if done {
                return Ok(());
            }
            let _ = canal(&["--api", &a, "pub", "live/feed", "ping", "--qos", "0"]).await;
            Err("not yet".to_string())
        }
    })
    .await;
    got.unwrap();
    let out = live.wait_with_output().await.unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("live/feed - ping"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_publishes_and_subscriptions_are_refused_clearly() {
    let net = cluster(1, &[]).await;
    let api_url = net.node(0).info().unwrap().api.clone();
    let api = net.api(0).unwrap();
    let o = canal(&["--api", &api_url, "pub", "a/+/b", "x"]).await;
    assert_clear_error(&o, 2, "wildcards are allowed only in subscription filters");
    let o = canal(&["--api", &api_url, "sub", "a/#/b"]).await;
    assert_clear_error(&o, 2, "`#` may only be the last level");
    let o = canal(&["--api", &api_url, "pub", "a", "x", "--qos", "2"]).await;
    assert_clear_error(&o, 2, "not a QoS");
    let (status, body) = api
        .send(
            Method::POST,
            "/v1/topics/a/events",
            vec![0; (1 << 20) + 1],
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("at most 1048576"), "{body}");
    let (status, body) = api
        .get_raw("/v1/subscribe?filter=a/b&from=5")
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("beyond the end"), "{body}");
    let (status, body) = api.get_raw("/v1/subscribe?filter=a//b").await.unwrap();
    assert_eq!(status, 400, "{body}");
    let (status, body) = api
        .get_raw("/v1/subscribe?filter=a&from=yesterday")
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    // Nothing was stored by the refused publishes.
    let (status, body) = api
        .send(Method::POST, "/v1/topics/a/events", b"ok".to_vec(), None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"offset\":0"), "{body}");
    // A subscriber that goes away does not hurt the node.
    let resp = canal_testnet::http_client()
        .get(format!("{api_url}/v1/subscribe?filter=a&from=earliest"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    let (status, _) = api
        .send(Method::POST, "/v1/topics/a/events", b"after".to_vec(), None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (status, _) = api.get_raw("/v1/health").await.unwrap();
    assert_eq!(status, 200);

    // SIGTERM with a subscriber still connected is a clean, prompt shutdown.
    let open = canal_testnet::http_client()
        .get(format!("{api_url}/v1/subscribe?filter=a&from=earliest"))
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), 200);
    let mut net = net;
    let status = net.stop(0).await.unwrap();
    assert!(status.success(), "{status:?}");
    drop(open);
}

/// Reads JSON event lines from a running `canal sub` until `done` says stop; returns the
/// offsets read.
async fn read_offsets(
    child: &mut tokio::process::Child,
    mut done: impl FnMut(&[u64]) -> bool,
) -> Vec<u64> {
    use tokio::io::AsyncBufReadExt;
    let stdout = child.stdout.as_mut().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut offsets = Vec::new();
    while !done(&offsets) {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("no event within 60 s")
            .unwrap()
            .expect("the subscriber ended early");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        offsets.push(v["offset"].as_u64().unwrap());
    }
    offsets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_subscriber_resumes_after_its_last_ack_on_another_node() {
    const N: u64 = 200;
    let net = cluster(3, &[]).await;
    let apis: Vec<Api> = (0..3).map(|i| net.api(i).unwrap()).collect();
    for i in 0..N {
        let (status, body) = apis[i as usize % 3]
            .send(
                Method::POST,
                "/v1/topics/plant%2Fline1/events",
                format!("p{i}").into_bytes(),
                None,
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let start = |node: usize| {
        tokio::process::Command::new(BIN)
            .env("CANAL_TOKEN", canal_testnet::admin_token())
            .args([
                "--api",
                &net.node(node).info().unwrap().api,
                "sub",
                "plant/#",
                "--durable",
                "line-watch",
            ])
            .args(["--from", "earliest", "--json"])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    // The first subscriber is killed mid-stream.
    let mut first = start(0);
    let seen_first = read_offsets(&mut first, |o| o.len() >= 60).await;
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let last = *seen_first.last().unwrap();
    assert_eq!(seen_first, (0..=last).collect::<Vec<_>>());

    // Restarted on another node, it resumes after its last acknowledged event: the last one
    // it printed, or (if it died between printing and acknowledging) that one again.
    let mut second = start(1);
    let seen_second = read_offsets(&mut second, |o| o.last() == Some(&(N - 1))).await;
    let resumed = seen_second[0];
    assert!(
        resumed == last + 1 || resumed == last,
        "resumed at {resumed} after printing {last}"
    );
    assert_eq!(
        seen_second,
        (resumed..N).collect::<Vec<_>>(),
        "gap or disorder after resuming"
    );

    // An ack past the end of the topic is refused, and moves nothing.
    let ack = |offset: u64| {
        let api = apis[2].clone();
        async move {
            let path =
                format!("/v1/subscriptions/line-watch/ack?topic=plant%2Fline1&offset={offset}");
            api.send(Method::POST, &path, Vec::new(), None).await
        }
    };
    let (status, body) = ack(N + 5).await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains(&format!("its last offset is {}", N - 1)),
        "{body}"
    );
    let (status, body) = ack(N - 1).await.unwrap();
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_subscriber_gets_events_and_acks_a_durable_subscription() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let net = cluster(1, &[]).await;
    let api = net.api(0).unwrap();
    let apis = [api.clone()];
    for i in 0..5 {
        publish_until_acked(
            &apis,
            0,
            "ws/t",
            &format!("w{i}"),
            format!("e{i}").into_bytes(),
        )
        .await;
    }
    let url = format!(
        "{}/v1/subscribe?filter=ws%2F%23&from=earliest&durable=wsd&token={}",
        api.base().replace("http://", "ws://"),
        canal_testnet::admin_token()
    );
    let next_event = |m: Option<Result<Message, _>>| -> serde_json::Value {
        match m {
            Some(Ok(Message::Text(t))) => serde_json::from_str(t.as_str()).unwrap(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    };
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    for want in 0..3u64 {
        let e = next_event(ws.next().await);
        assert_eq!(e["offset"], want, "{e}");
        assert_eq!(e["data"], format!("e{want}"), "{e}");
    }
    // A malformed ack is answered with an error frame, and the stream goes on.
    ws.send(Message::Text("{\"ack\": 5}".into())).await.unwrap();
    // Events 3 and 4 may come first; the error follows.
    let mut e = next_event(ws.next().await);
    for _ in 0..2 {
        if e.get("error").is_some() {
            break;
        }
        e = next_event(ws.next().await);
    }
    assert!(e["error"].as_str().unwrap().contains("offset"), "{e}");
    ws.send(Message::Text(
        r#"{"ack": {"topic": "ws/t", "offset": 2}}"#.into(),
    ))
    .await
    .unwrap();
    ws.close(None).await.unwrap();
    // A new connection under the same name resumes after the last ack (once it committed).
    let resumed = wait_for(
        "the durable subscription to resume at 3",
        Duration::from_secs(30),
        || {
            let url = url.clone();
            async move {
                let (mut ws, _) = tokio_tungstenite::connect_async(&url)
                    .await
                    .map_err(|e| e.to_string())?;
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let e: serde_json::Value =
                            serde_json::from_str(t.as_str()).map_err(|e| e.to_string())?;
                        if e["offset"] == 3 {
                            Ok(e)
                        } else {
                            Err(format!("resumed at {}", e["offset"]))
                        }
                    }
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(resumed["data"], "e3");
    // Bad input is refused before the upgrade, as a plain HTTP error.
    let bad = format!(
        "{}/v1/subscribe?filter=ws%2F%2Bx&token={}",
        api.base().replace("http://", "ws://"),
        canal_testnet::admin_token()
    );
    let err = tokio_tungstenite::connect_async(&bad).await.unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_settings_bound_the_log_and_the_payload() {
    let net = cluster(1, &[]).await;
    let api = net.api(0).unwrap();
    let base = api.base().to_string();
    let o = canal(&[
        "--api",
        &base,
        "--json",
        "topic",
        "settings",
        "ret/#",
        "--retain-events",
        "3",
        "--max-payload",
        "10B",
    ])
    .await;
    assert!(o.status.success(), "{}", crate::stderr(&o));
    // A topic under the filter gets its settings, and says where they come from.
    let o = canal(&["--api", &base, "--json", "topic", "settings", "ret/a"]).await;
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["from"], "ret/#", "{s}");
    assert_eq!(s["settings"]["retention"]["max_events"], 3, "{s}");
    let apis = [api.clone()];
    for i in 0..5 {
        publish_until_acked(
            &apis,
            0,
            "ret/a",
            &format!("r{i}"),
            format!("e{i}").into_bytes(),
        )
        .await;
    }
    let o = canal(&["--api", &base, "--json", "topic", "log", "ret/a"]).await;
    let log: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (log["first"].as_u64(), log["next"].as_u64()),
        (Some(2), Some(5))
    );
    // Over the topic's payload limit: refused, saying the limit; nothing stored.
    let o = canal(&["--api", &base, "pub", "ret/a", "0123456789x"]).await;
    assert_clear_error(&o, 1, "at most 10");
    // Other topics keep the defaults.
    let o = canal(&["--api", &base, "pub", "other/a", "0123456789x"]).await;
    assert!(o.status.success(), "{}", crate::stderr(&o));
    // Bad settings are refused and change nothing.
    let o = canal(&[
        "--api",
        &base,
        "topic",
        "settings",
        "ret/#",
        "--retain-events",
        "0",
    ])
    .await;
    assert_clear_error(&o, 1, "retain-events 0");
    let o = canal(&[
        "--api",
        &base,
        "topic",
        "settings",
        "ret/#",
        "--retain-age",
        "soon",
    ])
    .await;
    assert_clear_error(&o, 1, "not a duration");
    let o = canal(&["--api", &base, "--json", "topic", "settings", "ret/a"]).await;
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["settings"]["retention"]["max_events"], 3, "{s}");
    // Reset: back to the defaults.
    let o = canal(&[
        "--api", &base, "--json", "topic", "settings", "ret/#", "--reset",
    ])
    .await;
    assert!(o.status.success(), "{}", crate::stderr(&o));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["from"], serde_json::Value::Null, "{s}");
    let o = canal(&["--api", &base, "pub", "ret/a", "0123456789x"]).await;
    assert!(o.status.success(), "{}", crate::stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_events_are_redelivered_then_given_up_on() {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let net = cluster(1, &[]).await;
    let api = net.api(0).unwrap();
    let apis = [api.clone()];
    for i in 0..2 {
        publish_until_acked(
            &apis,
            0,
            "rd/t",
            &format!("r{i}"),
            format!("e{i}").into_bytes(),
        )
        .await;
    }
    // Redelivery settings without a durable name are refused.
    let (status, body) = api
        .get_raw("/v1/subscribe?filter=rd%2Ft&ack_timeout=1s")
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("durable"), "{body}");
    let url = format!(
        "{}/v1/subscribe?filter=rd%2Ft&from=earliest&durable=rd&ack_timeout=300ms&max_deliveries=2&token={}",
        api.base().replace("http://", "ws://"),
        canal_testnet::admin_token()
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    // Never acknowledged: each event comes twice (go-back-N, in order), then is given up on
    // with a notice, and the subscription moves past it.
    let mut frames = Vec::new();
    while frames
        .iter()
        .filter(|f: &&serde_json::Value| f.get("lagged").is_some())
        .count()
        < 2
    {
        let next = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .unwrap_or_else(|_| panic!("no frame within 30 s after {frames:?}"));
        match next {
            Some(Ok(Message::Text(t))) => frames.push(serde_json::from_str(t.as_str()).unwrap()),
            other => panic!("{other:?}"),
        }
    }
    let offsets: Vec<i64> = frames
        .iter()
        .map(|f| match f.get("lagged") {
            Some(l) => -1 - l["from"].as_i64().unwrap(),
            None => f["offset"].as_i64().unwrap(),
        })
        .collect();
    // e0 e1 (first delivery), e0 e1 (redelivery), then give up on 0, later on 1 — 1 may be
    // sent a third time before its own timeout passes after 0 was given up on.
    assert_eq!(&offsets[..4], &[0, 1, 0, 1], "{frames:?}");
    assert!(offsets.contains(&-1) && offsets.contains(&-2), "{frames:?}");
    assert_eq!(offsets.iter().filter(|o| **o == 0).count(), 2, "{frames:?}");
    let notice = frames.iter().find(|f| f.get("lagged").is_some()).unwrap();
    assert!(
        notice["lagged"]["reason"]
            .as_str()
            .unwrap()
            .contains("2 deliveries"),
        "{notice}"
    );
}

/// Publishes `payload` to `topic` with message id `id` through `api` once; returns whether
/// the id was a duplicate, or why the publish failed.
async fn publish_once(
    http: &reqwest::Client,
    api: &Api,
    topic: &str,
    id: &str,
    payload: &str,
) -> Result<bool, String> {
    let resp = http
        .post(format!(
            "{}/v1/topics/{}/events",
            api.base(),
            topic.replace('/', "%2F")
        ))
        .header("canal-id", id)
        .body(payload.to_string())
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(resp.status().to_string());
    }
    let p: canal_proto::api::Published = resp.json().await.map_err(|e| e.to_string())?;
    Ok(p.duplicate)
}

/// Publishes through `api` until a node answers; returns whether the id was a duplicate.
async fn publish_answered(api: &Api, topic: &str, id: &str, payload: &str) -> bool {
    let http = canal_testnet::http_client();
    wait_for(
        &format!("publish {id} to {topic} to be answered"),
        Duration::from_secs(60),
        || publish_once(&http, api, topic, id, payload),
    )
    .await
    .unwrap()
}

/// Waits until node `api` answers `canal topic log` with `want` (it reads a replica, which
/// may be an entry behind the leader that acknowledged the publish), and fails naming what
/// it answered last.
async fn assert_log_bounds(api: &Api, topic: &str, want: (u64, u64)) {
    wait_for(
        &format!("{topic}'s log to span {want:?} on {}", api.base()),
        Duration::from_secs(10),
        || async move {
            match log_bounds(api, topic).await {
                got if got == want => Ok(()),
                got => Err(format!("{got:?}")),
            }
        },
    )
    .await
    .unwrap();
}

/// Where a topic's log starts and ends, as node `api` answers `canal topic log`.
async fn log_bounds(api: &Api, topic: &str) -> (u64, u64) {
    let o = canal(&["--api", api.base(), "--json", "topic", "log", topic]).await;
    assert!(o.status.success(), "{}", crate::stderr(&o));
    let log: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    (
        log["first"].as_u64().unwrap_or(u64::MAX),
        log["next"].as_u64().unwrap_or(u64::MAX),
    )
}

/// Point 4 of issue 11: replicas forget exactly the same publish ids and trim exactly the
/// same events, whatever the grouping of entries into apply calls and whatever the clock of
/// the node that accepted a publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_stay_identical_under_load_id_reuse_and_a_skewed_clock() {
    let mut net = cluster(3, &[]).await;
    // A fourth node whose clock is five minutes fast.
    let skewed = net
        .add_node(canal_testnet::NodeOptions {
            bootstrap_from_first: true,
            extra_args: vec![
                "--voters".into(),
                "3".into(),
                "--clock-offset-ms".into(),
                "300000".into(),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    let skewed_api = net.api(skewed).unwrap();
    wait_for(
        "the skewed node to follow every group",
        Duration::from_secs(90),
        || {
            let api = skewed_api.clone();
            async move {
                let s: canal_proto::api::ClusterStatus = api
                    .get("/v1/cluster/status")
                    .await
                    .map_err(|e| e.to_string())?;
                let ok = !s.groups.is_empty()
                    && s.groups.iter().all(|g| {
                        g.members
                            .first()
                            .and_then(|m| m.status.as_ref())
                            .is_some_and(|st| st.leader.is_some())
                    });
                if ok { Ok(()) } else { Err(format!("{s:?}")) }
            }
        },
    )
    .await
    .unwrap();
    // The map gives the skewed node replicas of some shards, which it may come to lead
    // (then its clock stamps their entries, as any leader's does). The age topic is one of
    // a shard it holds no replica of once the moves are done, so only the accepting node's
    // clock differs, never the stamping leader's.
    // The map may move more than once as the new node's record spreads: wait until its
    // epoch has stayed put for longer than the map job waits between two maps (SETTLE and
    // MIN_BETWEEN), then for the groups to follow it.
    let api0 = net.api(0).unwrap();
    let stable = std::cell::Cell::new((0u64, std::time::Instant::now()));
    wait_for(
        "the shard map to stay at one epoch for 12 s",
        Duration::from_secs(120),
        || {
            let api0 = api0.clone();
            let stable = &stable;
            async move {
                let m: canal_proto::api::ClusterShards = api0
                    .get("/v1/cluster/shards")
                    .await
                    .map_err(|e| e.to_string())?;
                let (epoch, since) = stable.get();
                if m.epoch != epoch {
                    stable.set((m.epoch, std::time::Instant::now()));
                    return Err(format!("epoch {} is new", m.epoch));
                }
                if since.elapsed() < Duration::from_secs(12) {
                    return Err(format!("epoch {epoch} for {:?}", since.elapsed()));
                }
                Ok(())
            }
        },
    )
    .await
    .unwrap();
    crate::shard_groups::wait_settled(&net, "the shard groups to settle on four nodes").await;
    let skewed_peer = net.node(skewed).info().unwrap().peer_id.clone();
    let mut picked = Vec::new();
    for prefix in ["age", "dedup", "reuse"] {
        let mut found = None;
        for i in 0..64 {
            let t = format!("{prefix}/t{i}");
            let l: canal_proto::api::Locate = net
                .api(0)
                .unwrap()
                .get(&format!("/v1/topics/{t}/locate"))
                .await
                .unwrap();
            if !l.planned_replicas.contains(&skewed_peer) {
                found = Some(t);
                break;
            }
        }
        picked.push(found.expect("a shard without the skewed node"));
    }
    let (age, dedup, reuse) = (picked[0].as_str(), picked[1].as_str(), picked[2].as_str());
    let apis: Vec<Api> = (0..4).map(|i| net.api(i).unwrap()).collect();
    let base = apis[0].base().to_string();
    let settings = |filter: &'static str, flag: &'static str, value: &'static str| {
        let base = base.clone();
        async move {
            let o = canal(&["--api", &base, "topic", "settings", filter, flag, value]).await;
            assert!(o.status.success(), "{}", crate::stderr(&o));
        }
    };
    settings("reuse/#", "--dedup-window", "2s").await;
    settings("age/#", "--retain-age", "4m").await;
    // A dedup window out of range is refused, naming the range.
    let o = canal(&[
        "--api",
        &base,
        "topic",
        "settings",
        "reuse/#",
        "--dedup-window",
        "2h",
    ])
    .await;
    assert_clear_error(&o, 1, "dedup-window");

    // Retention by age: events acknowledged through the three nodes, then one through the
    // skewed node. Measured by the accepting node's clock, that one would be five minutes
    // newer than the others and trim them all (they are within their 4 minutes).
    let age_start = std::time::Instant::now();
    for i in 0..20 {
        assert!(!publish_answered(&apis[i % 3], age, &format!("a{i}"), "x").await);
    }
    assert!(!publish_answered(&apis[skewed], age, "a-skewed", "x").await);
    assert!(!publish_answered(&apis[0], age, "a-after", "x").await);
    assert_log_bounds(&apis[0], age, (0, 22)).await;

    // Recent ids stay remembered after a publish through the skewed node.
    for i in 0..10 {
        assert!(!publish_answered(&apis[i % 3], dedup, &format!("d{i}"), "x").await);
    }
    assert!(!publish_answered(&apis[skewed], dedup, "d-skewed", "x").await);
    for i in 0..10 {
        let id = format!("d{i}");
        assert!(
            publish_answered(&apis[i % 3], dedup, &id, "x").await,
            "{id} was forgotten"
        );
        assert!(
            publish_answered(&apis[skewed], dedup, &id, "x").await,
            "{id} was forgotten"
        );
    }

    // Many publishes with ids from every node at once (group commit puts hundreds into an
    // entry, and followers apply many entries per call), each id twice, on topics whose ids
    // are forgotten after 2 s.
    let http = canal_testnet::http_client();
    let mut tasks = Vec::new();
    for (node, node_api) in apis.iter().enumerate() {
        for worker in 0..32 {
            let api = node_api.clone();
            let http = http.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0..12 {
                    let id = format!("load-{}-{n}", worker % 16);
                    let topic = format!("reuse/load/{}", worker % 4);
                    let mut tries = 0;
                    while publish_once(&http, &api, &topic, &id, "x").await.is_err() {
                        tries += 1;
                        assert!(tries < 20, "publish {id} through node {node} keeps failing");
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Id reuse: within the 2 s window a reused id is the same event; once the window has
    // passed (by the leader's clock) it is a new one, on every replica alike.
    assert!(!publish_answered(&apis[1], reuse, "r1", "first").await);
    assert!(publish_answered(&apis[skewed], reuse, "r1", "again").await);
    let reused_at = std::time::Instant::now();
    wait_for(
        "r1 to be forgotten after its window",
        Duration::from_secs(30),
        || {
            let (http, api) = (http.clone(), apis[2].clone());
            async move {
                match publish_once(&http, &api, reuse, "r1", "later").await? {
                    false => Ok(()),
                    true => Err("still a duplicate".to_string()),
                }
            }
        },
    )
    .await
    .unwrap();
    assert!(
        reused_at.elapsed() >= Duration::from_millis(1500),
        "r1 was forgotten after {:?}, within its 2 s window",
        reused_at.elapsed()
    );
    // The load's ids have all expired too: publishes now forget them (more than one
    // publish forgets at once) while reusing some.
    for n in 0..12 {
        publish_answered(&apis[n % 4], "reuse/load/0", &format!("load-0-{n}"), "x").await;
    }

    // Every replica, the skewed one included, holds the same state in the metadata group
    // and in every shard group the topics live in.
    let nodes = [0, 1, 2, skewed];
    let mut groups = std::collections::BTreeSet::new();
    for topic in [age, dedup, reuse]
        .into_iter()
        .map(String::from)
        .chain((0..4).map(|i| format!("reuse/load/{i}")))
    {
        groups.insert(crate::raft::group_of_topic(&net, &topic).await);
    }
    let mut keys = 0;
    for g in &groups {
        // The skewed node is among the replicas of some of them.
        let replicas = crate::raft::replicas_of_group(&net, g).await;
        keys += wait_same_digest(&net, &replicas, g).await.keys;
    }
    wait_same_digest(&net, &nodes, "metadata").await;
    assert!(keys > 100, "{keys} keys in {groups:?}");
    // No acknowledged event was trimmed early; reuse/a holds r1 twice, once per window.
    assert!(
        age_start.elapsed() < Duration::from_secs(230),
        "the test took {:?}: age/a's events are due to go by now, so the check below says nothing",
        age_start.elapsed()
    );
    for api in &apis {
        assert_log_bounds(api, age, (0, 22)).await;
        assert_log_bounds(api, dedup, (0, 11)).await;
        assert_log_bounds(api, reuse, (0, 2)).await;
    }
}

/// Each group's Raft term as every node sees it.
async fn terms(apis: &[Api]) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for api in apis {
        let s: canal_proto::api::ClusterStatus = api.get("/v1/cluster/status").await.unwrap();
        for g in s.groups {
            let term = g.members[0].status.as_ref().map(|m| m.term).unwrap_or(0);
            out.push((format!("{} via {}", g.group, api.base()), term));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos0_flood_does_not_cause_elections_while_qos1_writes_go_on() {
    let net = cluster(3, &[]).await;
    let apis: Vec<Api> = (0..3).map(|i| net.api(i).unwrap()).collect();
    // QoS 0 subscribers on the other two nodes, so node 0 sends them the flood.
    let mut subs: Vec<_> = (1..3)
        .map(|i| {
            tokio::process::Command::new(BIN)
                .env("CANAL_TOKEN", canal_testnet::admin_token())
                .args([
                    "--api",
                    apis[i].base(),
                    "sub",
                    "flood/#",
                    "--qos",
                    "0",
                    "--count",
                    "1000000",
                ])
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap()
        })
        .collect();
    let http = canal_testnet::http_client();
    let publish_qos0 = |payload: Vec<u8>| {
        http.post(format!("{}/v1/topics/flood%2Fx/events", apis[0].base()))
            .header("canal-qos", "0")
            .body(payload)
            .timeout(Duration::from_secs(30))
            .send()
    };
    // Until both nodes' interest has reached node 0, nothing is sent to them.
    wait_for(
        "node 0 to send QoS 0 events",
        Duration::from_secs(30),
        || {
            let probe = publish_qos0(b"probe".to_vec());
            let api = apis[0].clone();
            async move {
                let _ = probe.await;
                match api.metric_sum("canal_qos0_sent_total").await {
                    Ok(n) if n >= 2.0 => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await
    .unwrap();
    let before = terms(&apis).await;

    // The flood: 4 publishers of 4 KiB QoS 0 events on node 0, alongside QoS 1 writes. (On
    // a loaded 2-core machine, with debug builds, 8 publishers of 16 KiB events starve the
    // nodes' CPUs enough for elections, whatever lane the events take.)
    let flood: Vec<_> = (0..4)
        .map(|_| {
            let (http, base) = (http.clone(), apis[0].base().to_string());
            tokio::spawn(async move {
                for _ in 0..500 {
                    let _ = http
                        .post(format!("{base}/v1/topics/flood%2Fx/events"))
                        .header("canal-qos", "0")
                        .body(vec![b'f'; 4 << 10])
                        .timeout(Duration::from_secs(30))
                        .send()
                        .await;
                }
            })
        })
        .collect();
    for i in 0..60 {
        publish_acked(&apis, i).await;
    }
    for f in flood {
        f.await.unwrap();
    }
    for i in 60..80 {
        publish_acked(&apis, i).await;
    }
    let sent = apis[0].metric_sum("canal_qos0_sent_total").await.unwrap();
    assert!(sent > 1000.0, "only {sent} QoS 0 events sent");
    assert_eq!(
        terms(&apis).await,
        before,
        "an election ran during the QoS 0 flood"
    );
    for s in &mut subs {
        assert!(
            s.try_wait().unwrap().is_none(),
            "a QoS 0 subscriber stopped"
        );
    }
}

/// Publishes every message of `pending` (index to id `m-{i}`) over one publish stream to
/// `api`, reading acks meanwhile; answers the indexes acknowledged without error. Asserts the
/// acks come in seq order. `on_first_ack` runs once, after the stream's first ack.
async fn stream_round(
    api: &str,
    topic: &str,
    pending: &BTreeSet<usize>,
    mut on_first_ack: impl AsyncFnMut(),
) -> BTreeSet<usize> {
    use futures::StreamExt;
    let mut acked = BTreeSet::new();
    let Ok(stream) =
        canal_client::PublishStream::connect(api, Some(canal_testnet::admin_token())).await
    else {
        return acked;
    };
    let (mut tx, mut acks) = stream.split();
    let order: Vec<usize> = pending.iter().copied().collect();
    let to_send = order.clone();
    let topic = topic.to_string();
    // The sender gives its half back, so the socket stays open until the acks are read.
    let sender = tokio::spawn(async move {
        for i in to_send {
            let line = canal_proto::api::PublishLine {
                topic: Some(topic.clone()),
                payload: Some(format!("e{i}")),
                id: Some(format!("m-{i}")),
                ..Default::default()
            };
            if tx.send(line, Some(1)).await.is_err() {
                break;
            }
        }
        tx
    });
    let mut next_seq = 0u64;
    let mut first = true;
    while (next_seq as usize) < order.len() {
        let Ok(Some(Ok(ack))) = tokio::time::timeout(Duration::from_secs(30), acks.next()).await
        else {
            break;
        };
        assert_eq!(ack.seq, Some(next_seq), "acks out of seq order: {ack:?}");
        if ack.error.is_none() {
            assert!(ack.offset.is_some(), "{ack:?}");
            acked.insert(order[next_seq as usize]);
        }
        next_seq += 1;
        if first {
            first = false;
            on_first_ack().await;
        }
    }
    sender.abort();
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_stream_resent_after_a_leader_kill_stores_each_message_once() {
    const N: usize = 1000;
    const TOPIC: &str = "stream/orders";
    let mut net = cluster(3, &[]).await;
    let group = crate::raft::group_of_topic(&net, TOPIC).await;
    let lead = leader(&net, 0, &group).await;
    let apis: Vec<String> = (0..3)
        .map(|i| net.api(i).unwrap().base().to_string())
        .collect();
    let mut pending: BTreeSet<usize> = (0..N).collect();
    let mut killed = false;
    // The first stream goes to the leader, which is killed while the stream is in flight;
    // later ones go to the others in turn, resending what has no ack.
    let mut round = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while !pending.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} messages still unacknowledged after 180 s",
            pending.len()
        );
        let via = if round == 0 {
            lead
        } else {
            let others: Vec<usize> = (0..3).filter(|i| *i != lead).collect();
            others[round % others.len()]
        };
        round += 1;
        let acked = if killed {
            stream_round(&apis[via], TOPIC, &pending, async || {}).await
        } else {
            let net = &mut net;
            let a = stream_round(&apis[via], TOPIC, &pending, async || {
                net.kill(lead).await.unwrap();
            })
            .await;
            killed = true;
            a
        };
        pending.retain(|i| !acked.contains(i));
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(
        killed && round >= 2,
        "the leader was killed and the rest resent"
    );
    let survivor = (0..3).find(|i| *i != lead).unwrap();
    let child = sub(&apis[survivor], TOPIC, N);
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("the subscriber did not get 1000 events in time")
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut ids = BTreeMap::<String, usize>::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        *ids.entry(v["id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let want: BTreeMap<String, usize> = (0..N).map(|i| (format!("m-{i}"), 1)).collect();
    assert_eq!(ids, want, "each message once");
    // Nothing past the 1000: the log ends there.
    let log: canal_proto::api::TopicLog = net
        .api(survivor)
        .unwrap()
        .get(&format!("/v1/topics/{}/log", TOPIC.replace('/', "%2F")))
        .await
        .unwrap();
    assert_eq!(log.next - log.first, N as u64, "{log:?}");
}

/// POSTs `body` to `url` as NDJSON (a batch publish).
async fn post_ndjson(http: &reqwest::Client, url: &str, body: &'static str) -> reqwest::Response {
    http.post(url)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_batch_line_is_refused_by_number_and_nothing_is_stored() {
    let net = cluster(1, &["--max-publish-streams", "1"]).await;
    let api = net.api(0).unwrap();
    let http = canal_testnet::http_client();
    let url = format!("{}/v1/topics/batch%2Ft/events", api.base());
    let body = "{\"payload\": \"a\", \"id\": \"b-1\"}\n{\"payload\": \"b\"}\n{\"payload\": \"c\", \"id\": \"\"}\n";
    let resp = post_ndjson(&http, &url, body).await;
    assert_eq!(resp.status(), 400);
    let e: canal_proto::api::ErrorBody = resp.json().await.unwrap();
    assert_eq!(e.kind, "invalid_id");
    assert!(e.error.starts_with("line 3: "), "{}", e.error);
    let log: canal_proto::api::TopicLog = api.get("/v1/topics/batch%2Ft/log").await.unwrap();
    assert_eq!((log.first, log.next), (0, 0), "nothing stored");
    // The good lines alone are stored, an answer a line; on /v1/events too.
    let body = "{\"payload\": \"a\", \"id\": \"b-1\"}\n{\"payload_base64\": \"AAE=\"}\n";
    let resp = post_ndjson(&http, &url, body).await;
    assert_eq!(resp.status(), 200);
    let p: Vec<canal_proto::api::Published> = resp.json().await.unwrap();
    // An answer a line; the two may be stored in either order.
    let mut offsets: Vec<Option<u64>> = p.iter().map(|p| p.offset).collect();
    offsets.sort();
    assert_eq!(offsets, vec![Some(0), Some(1)]);
    let resp = http
        .post(format!("{}/v1/events", api.base()))
        .header("content-type", "application/x-ndjson")
        .body("{\"topic\": \"batch/t\", \"payload\": \"c\"}\n{\"payload\": \"no topic\"}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let e: canal_proto::api::ErrorBody = resp.json().await.unwrap();
    assert!(e.error.starts_with("line 2: "), "{}", e.error);
    let log: canal_proto::api::TopicLog = api.get("/v1/topics/batch%2Ft/log").await.unwrap();
    assert_eq!((log.first, log.next), (0, 2));
    let metrics = http
        .get(format!("{}/metrics", api.base()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "canal_pubsub_batches_refused_total 2"),
        "both refusals counted: {}",
        metrics
            .lines()
            .filter(|l| l.contains("batches_refused"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // `canal pub --stdin`: a line a message, over one publish stream, acks as they come;
    // the same ids again are duplicates.
    for dup in [false, true] {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new(BIN)
            .env("CANAL_TOKEN", canal_testnet::admin_token())
            .args([
                "--api",
                api.base(),
                "pub",
                "batch/s",
                "--stdin",
                "--id",
                "s",
                "--json",
            ])
            .env_remove("CANAL_API")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"one\ntwo\nthree\n").await.unwrap();
        drop(stdin);
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("canal pub --stdin did not end")
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let acks: Vec<canal_proto::api::StreamAck> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // Acks in seq order; the pipelined publishes may take their offsets in any order.
        let seqs: Vec<Option<u64>> = acks.iter().map(|a| a.seq).collect();
        assert_eq!(seqs, vec![Some(0), Some(1), Some(2)]);
        let mut offsets: Vec<Option<u64>> = acks.iter().map(|a| a.offset).collect();
        offsets.sort();
        assert_eq!(offsets, vec![Some(0), Some(1), Some(2)]);
        assert!(acks.iter().all(|a| a.duplicate == dup), "{acks:?}");
    }

    // A refused line fails `canal pub --stdin`, after every line was tried.
    let resp = http
        .put(format!("{}/v1/topics/batch%2Fbig/settings", api.base()))
        .body(r#"{"max_payload": "4"}"#)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    let stdin_pub = |input: &'static [u8]| {
        let api = api.base().to_string();
        async move {
            use tokio::io::AsyncWriteExt;
            let mut child = tokio::process::Command::new(BIN)
                .env("CANAL_TOKEN", canal_testnet::admin_token())
                .args(["--api", &api, "pub", "batch/big", "--stdin"])
                .env_remove("CANAL_API")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(input).await.unwrap();
            drop(stdin);
            tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
                .await
                .expect("canal pub --stdin did not end")
                .unwrap()
        }
    };
    let out = stdin_pub(b"12345\nok\n").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("line 1: ") && stderr.contains("(too_large)"),
        "{stderr}"
    );
    assert!(stderr.contains("1 of 2 publishes failed"), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "batch/big 0");

    // One publish stream is this node's limit: a second is refused, by name.
    let held = Arc::new(std::sync::Mutex::new(None));
    wait_for(
        "the earlier streams' slots to come back",
        Duration::from_secs(30),
        || {
            let base = api.base().to_string();
            let held = held.clone();
            async move {
                match canal_client::PublishStream::connect(
                    &base,
                    Some(canal_testnet::admin_token()),
                )
                .await
                {
                    Ok(s) => {
                        *held.lock().unwrap() = Some(s);
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
        },
    )
    .await
    .unwrap();
    let e = canal_client::PublishStream::connect(api.base(), Some(canal_testnet::admin_token()))
        .await
        .err()
        .expect("a second stream past max_publish_streams 1");
    assert_eq!(e.status().map(|s| s.as_u16()), Some(503), "{e}");
    assert!(e.to_string().contains("max_publish_streams"), "{e}");
    let out = stdin_pub(b"x\n").await;
    assert!(!out.status.success());
    drop(held);
}

/// One publisher's events get offsets in the order it sent them, even through a node that
/// does not lead the topic's group: the follower's group commit proposes its batches in queue
/// order and forwards them on its one link to the leader, which proposes forwarded writes in
/// the order they came (with 1,000 in flight, many batches are in flight at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_stream_through_a_follower_gets_offsets_in_send_order() {
    use futures::StreamExt;
    const N: usize = 1000;
    const TOPIC: &str = "stream/ordered";
    let net = cluster(3, &[]).await;
    let (group, lead, via) = crate::raft::topic_leader_and_follower(&net, TOPIC).await;
    let api = net.api(via).unwrap().base().to_string();
    let stream = canal_client::PublishStream::connect(&api, Some(canal_testnet::admin_token()))
        .await
        .unwrap();
    let (mut tx, mut acks) = stream.split();
    // All 1,000 go out without waiting for acks (the node's window is larger).
    let sender = tokio::spawn(async move {
        for i in 0..N {
            let line = canal_proto::api::PublishLine {
                topic: Some(TOPIC.to_string()),
                payload: Some(format!("e{i}")),
                id: Some(format!("o-{i}")),
                ..Default::default()
            };
            tx.send(line, Some(1)).await.unwrap();
        }
        tx
    });
    let mut offsets = Vec::with_capacity(N);
    while offsets.len() < N {
        let ack = tokio::time::timeout(Duration::from_secs(60), acks.next())
            .await
            .expect("an ack within 60 s")
            .expect("the stream stays open")
            .unwrap();
        assert_eq!(ack.seq, Some(offsets.len() as u64), "{ack:?}");
        assert!(ack.error.is_none(), "{ack:?}");
        offsets.push(ack.offset.unwrap());
    }
    let _tx = sender.await.unwrap();
    // Order is promised while the leader stays: it did.
    assert_eq!(leader(&net, 0, &group).await, lead, "the leader changed");
    let out_of_order: Vec<(usize, u64, u64)> = offsets
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[0] >= w[1])
        .map(|(i, w)| (i, w[0], w[1]))
        .collect();
    assert!(
        out_of_order.is_empty(),
        "offsets out of send order at (seq, offset, next offset): {:?}",
        &out_of_order[..out_of_order.len().min(10)]
    );
}
