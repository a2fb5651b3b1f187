//! Functions and triggers on real nodes with real components: the threshold scenario with
//! exactly-once effects (also across kill -9 of the executor), guest abuse, refused
//! deploys, a chain of three functions, a QoS 0 trigger, and the CLI.

use crate::pubsub::{publish_until_acked, sub};
use crate::raft::cluster;
use crate::{assert_clear_error, canal};
use canal_proto::api::TopicLog;
use canal_proto::function::{FunctionList, InvokeResult};
use canal_testnet::{Api, Testnet, guests, wait_for};
use reqwest::Method;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Deploys example function `guest` as `name` through `api`, with deploy query `query`.
pub(crate) async fn deploy(api: &Api, name: &str, guest: &str, query: &str) {
    let bytes = guests::bytes(guest).unwrap();
    let (status, body) = api
        .send(
            Method::PUT,
            &format!("/v1/functions/{name}{query}"),
            bytes,
            None,
        )
        .await
        .unwrap();
    assert!(
        (200..300).contains(&status),
        "deploy {name}: {status} {body}"
    );
}

/// Adds a trigger through `api` from its JSON request.
async fn trigger(api: &Api, name: &str, json: serde_json::Value) {
    let (status, body) = api
        .send(
            Method::PUT,
            &format!("/v1/triggers/{name}"),
            serde_json::to_vec(&json).unwrap(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "trigger {name}: {body}");
}

/// The log of `topic` on `api`'s replica.
pub(crate) async fn log(api: &Api, topic: &str) -> TopicLog {
    api.get(&format!("/v1/topics/{}/log", topic.replace('/', "%2F")))
        .await
        .unwrap()
}

/// Waits until `topic` holds `n` events on every running node of `net`.
async fn wait_log_len(net: &Testnet, topic: &str, n: u64) {
    for i in net.running() {
        let api = net.api(i).unwrap();
        wait_for(
            &format!("{topic} to hold {n} events on node{i}"),
            Duration::from_secs(120),
            || {
                let api = api.clone();
                async move {
                    let l = log(&api, topic).await;
                    if l.next >= n {
                        Ok(l)
                    } else {
                        Err(format!("{} so far", l.next))
                    }
                }
            },
        )
        .await
        .unwrap();
    }
}

/// Reads every event of `topic` from `api` (QoS 1, from the earliest) through the CLI.
pub(crate) async fn read_all(api: &Api, topic: &str, n: u64) -> Vec<serde_json::Value> {
    if n == 0 {
        return Vec::new();
    }
    let child = sub(api.base(), topic, n as usize);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the subscriber did not get every event within 60 s")
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A state value of `function`, read linearizably through `api`.
async fn state(api: &Api, function: &str, key: &str) -> Option<String> {
    let (status, body) = api
        .get_raw(&format!("/v1/functions/{function}/state/{key}"))
        .await
        .unwrap();
    match status {
        200 => Some(body),
        404 => None,
        other => panic!("state {key}: {other} {body}"),
    }
}

/// The sensor reading number `i` publishes: spread so that some pass the threshold of 30.
fn reading(i: usize) -> f64 {
    ((i * 37) % 50) as f64 + 0.5
}

/// What the threshold function must end with after readings `0..n` on 4 topics.
fn expected(n: usize) -> (u64, BTreeMap<String, (u64, f64)>) {
    let mut alerts = 0;
    let mut per: BTreeMap<String, (u64, f64)> = BTreeMap::new();
    for i in 0..n {
        let v = reading(i);
        let e = per.entry(format!("sensors/r{}/temp", i % 4)).or_default();
        e.0 += 1;
        e.1 += (v - e.1) / e.0 as f64;
        if v > 30.0 {
            alerts += 1;
        }
    }
    (alerts, per)
}

/// Sets up the threshold function and its trigger through node `via`.
async fn threshold_setup(net: &Testnet, via: usize) {
    let api = net.api(via).unwrap();
    deploy(&api, "threshold", "threshold", "").await;
    trigger(
        &api,
        "alerts",
        serde_json::json!({"on": "sensors/+/temp", "fn": "threshold", "out": "alerts/temp"}),
    )
    .await;
}

/// Publishes events `range` to `topic` one after another, event `i` through node `i % n`
/// with message id `{id}{i}` and payload `{payload}{i}`.
async fn publish_each(
    apis: &[Api],
    range: std::ops::Range<usize>,
    topic: &str,
    id: &str,
    payload: &str,
) {
    for i in range {
        publish_until_acked(
            apis,
            i,
            topic,
            &format!("{id}{i}"),
            format!("{payload}{i}").into_bytes(),
        )
        .await;
    }
}

/// Publishes readings `range` through the nodes in `apis`, 16 at a time.
async fn publish_readings(apis: &[Api], range: std::ops::Range<usize>) {
    use futures::StreamExt;
    futures::stream::iter(range)
        .for_each_concurrent(16, |i| async move {
            publish_until_acked(
                apis,
                i,
                &format!("sensors/r{}/temp", i % 4),
                &format!("reading-{i}"),
                format!("{}", reading(i)).into_bytes(),
            )
            .await
        })
        .await;
}

/// Checks the end state of the threshold scenario on every running node: each alert once,
/// the state equal to a run without failures.
async fn check_threshold_outcome(net: &Testnet, n: usize) {
    let (alerts, per) = expected(n);
    // Every reading processed: the counts are complete.
    let api = net.api(net.running()[0]).unwrap();
    for (topic, (count, _)) in &per {
        wait_for(
            &format!("{topic} to be counted {count} times"),
            Duration::from_secs(120),
            || {
                let api = api.clone();
                async move {
                    let got = state(&api, "threshold", &format!("count/{topic}")).await;
                    if got.as_deref() == Some(count.to_string().as_str()) {
                        Ok(())
                    } else {
                        Err(format!("{got:?}"))
                    }
                }
            },
        )
        .await
        .unwrap();
    }
    wait_log_len(net, "alerts/temp", alerts).await;
    for i in net.running() {
        let api = net.api(i).unwrap();
        // Exactly the expected alerts: none lost, none duplicated.
        assert_eq!(log(&api, "alerts/temp").await.next, alerts, "node{i}");
        for (topic, (count, mean)) in &per {
            let got = state(&api, "threshold", &format!("count/{topic}")).await;
            assert_eq!(got, Some(count.to_string()), "node{i} {topic}");
            let got: f64 = state(&api, "threshold", &format!("mean/{topic}"))
                .await
                .unwrap()
                .parse()
                .unwrap();
            assert!(
                (got - mean).abs() < 1e-9,
                "node{i} {topic}: mean {got}, want {mean}"
            );
        }
        assert_eq!(
            state(&api, "threshold", "alerts").await,
            Some(alerts.to_string()),
            "node{i}"
        );
    }
    let events = read_all(&api, "alerts/temp", alerts).await;
    let sources: BTreeSet<String> = events
        .iter()
        .map(|e| e["headers"]["canal-source"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(sources.len() as u64, alerts, "an input event alerted twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threshold_alerts_reach_a_subscriber_exactly_once() {
    const N: usize = 1000;
    let net = cluster(3, &[]).await;
    threshold_setup(&net, 0).await;
    let (alerts, _) = expected(N);
    // The subscriber on node 2 sees exactly the expected alerts.
    let subscriber = sub(net.api(2).unwrap().base(), "alerts/temp", alerts as usize);
    let publisher = [net.api(1).unwrap()];
    publish_readings(&publisher, 0..N).await;
    let out = tokio::time::timeout(Duration::from_secs(120), subscriber.wait_with_output())
        .await
        .expect("the subscriber did not get every alert")
        .unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len() as u64, alerts);
    // The executor is the peer placement chose, and says so on every output.
    let executor = &net.node(executor(&net, 0).await).info().unwrap().peer_id;
    for l in &lines {
        assert_eq!(
            l["headers"]["canal-executor"].as_str(),
            Some(executor.as_str())
        );
        assert_eq!(l["headers"]["canal-trigger"].as_str(), Some("alerts"));
        let v: serde_json::Value = serde_json::from_str(l["payload"].as_str().unwrap()).unwrap();
        assert!(v["value"].as_f64().unwrap() > 30.0, "{v}");
    }
    check_threshold_outcome(&net, N).await;
}

/// The index of the node that runs the threshold function now, as node `via` sees its
/// committed placement.
async fn executor(net: &Testnet, via: usize) -> usize {
    let api = net.api(via).unwrap();
    let a = wait_placement(&api, "threshold", "threshold to be placed", |p| {
        !p.decision.chosen.is_empty()
    })
    .await;
    let peer = a.committed.unwrap().decision.chosen[0].clone();
    (0..net.len())
        .find(|i| net.node(*i).info().is_ok_and(|n| n.peer_id == peer))
        .unwrap()
}

/// A tiny seeded generator, so a failing run can be repeated with `CANAL_TEST_SEED`.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let seed = std::env::var("CANAL_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("CANAL_TEST_SEED={seed}");
        Rng(seed | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_executor_loses_and_duplicates_nothing() {
    const N: usize = 600;
    let mut rng = Rng::seeded();
    let mut net = cluster(3, &[]).await;
    // Input, state and output in three groups: the inputs' shard group, data-1 (function
    // state and cursors) and the output's shard group, which the outbox delivers to.
    let input = crate::raft::group_of_topic(&net, "sensors/r0/temp").await;
    let output = crate::raft::group_of_topic(&net, "alerts/temp").await;
    let groups: BTreeSet<&str> = [input.as_str(), "data-1", output.as_str()].into();
    assert_eq!(groups.len(), 3, "{groups:?}");
    threshold_setup(&net, 0).await;
    let apis: Vec<Api> = (0..3).map(|i| net.api(i).unwrap()).collect();
    let mut published = 0;
    for round in 0..3 {
        // Publish a random share, then kill -9 the executor at a random point: while it
        // runs the batch, commits it, or sits idle.
        let chunk = 100 + rng.below(100) as usize;
        publish_readings(&apis, published..published + chunk).await;
        published += chunk;
        let lead = executor(&net, (round + 1) % 3).await;
        // A random point of progress: kill when the executor has counted this share of
        // the readings of one topic (0: at once, while it runs the first batch).
        let target = rng.below(published as u64 / 4 + 1);
        let executor = net.api(lead).unwrap();
        wait_for(
            "the executor to make progress",
            Duration::from_secs(60),
            || {
                let api = executor.clone();
                async move {
                    let (_, got) = api
                        .get_raw("/v1/functions/threshold/state/count/sensors/r0/temp?read=local")
                        .await
                        .map_err(|e| e.to_string())?;
                    match got.parse::<u64>() {
                        Ok(n) if n >= target => Ok(()),
                        _ if target == 0 => Ok(()),
                        _ => Err(format!("{got} of {target}")),
                    }
                }
            },
        )
        .await
        .unwrap();
        net.kill(lead).await.unwrap();
        let survivors: Vec<Api> = net.running().iter().map(|&i| net.api(i).unwrap()).collect();
        // Events acknowledged while the executor is down wait in the log.
        publish_readings(&survivors, published..published + 50).await;
        published += 50;
        net.restart(lead).await.unwrap();
    }
    let apis: Vec<Api> = (0..3).map(|i| net.api(i).unwrap()).collect();
    let total = published.max(N);
    publish_readings(&apis, published..total).await;
    check_threshold_outcome(&net, total).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abusive_guests_are_contained_and_bad_modules_refused() {
    let net = cluster(1, &[]).await;
    let api = net.api(0).unwrap();
    deploy(
        &api,
        "misbehave",
        "misbehave",
        "?timeout=200ms&memory=16MiB",
    )
    .await;
    deploy(&api, "upper", "uppercase", "").await;
    trigger(
        &api,
        "abuse",
        serde_json::json!({"on": "test/abuse", "fn": "misbehave", "out": "test/abuse-out",
                           "retries": 1, "dead_letter": "test/dead"}),
    )
    .await;
    trigger(
        &api,
        "shout",
        serde_json::json!({"on": "chat/#", "fn": "upper", "out": "shout/all"}),
    )
    .await;
    let apis = [api.clone()];
    for (i, p) in ["loop", "grow", "trap", "err", "ok"].iter().enumerate() {
        publish_until_acked(
            &apis,
            0,
            "test/abuse",
            &format!("a{i}"),
            p.as_bytes().to_vec(),
        )
        .await;
        // Other functions keep running while one misbehaves.
        publish_until_acked(
            &apis,
            0,
            "chat/room",
            &format!("c{i}"),
            format!("hi {i}").into_bytes(),
        )
        .await;
    }
    wait_log_len(&net, "test/dead", 4).await;
    wait_log_len(&net, "test/abuse-out", 1).await;
    wait_log_len(&net, "shout/all", 5).await;
    let dead = read_all(&api, "test/dead", 4).await;
    let kinds: Vec<&str> = dead
        .iter()
        .map(|e| e["headers"]["canal-error-kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["timeout", "memory", "trap", "error"]);
    for e in &dead {
        assert_eq!(e["headers"]["canal-attempts"].as_str(), Some("2"), "{e}");
        assert!(
            e["headers"]["canal-error"].as_str().unwrap().len() > 10,
            "{e}"
        );
    }
    let out = read_all(&api, "test/abuse-out", 1).await;
    assert_eq!(out[0]["payload"].as_str(), Some("ok"));
    let shouts = read_all(&api, "shout/all", 5).await;
    assert_eq!(shouts[4]["payload"].as_str(), Some("HI 4"));
    assert_eq!(
        api.metric_sum("canal_trigger_dead_letters_total")
            .await
            .unwrap(),
        4.0
    );

    // Refused at deploy with the reason; nothing registered.
    let component_with_evil_import = wat::parse_str(
        r#"(component (import "canal:evil/net@1.0.0" (instance (export "connect" (func)))))"#,
    )
    .unwrap();
    for (name, bytes, needle) in [
        ("text", b"hello, world".to_vec(), "does not start with"),
        (
            "core",
            b"\0asm\x01\0\0\0".to_vec(),
            "core WebAssembly module",
        ),
        ("evil", component_with_evil_import, "canal:evil/net"),
        (
            "empty",
            wat::parse_str("(component)").unwrap(),
            "does not export the canal handler",
        ),
    ] {
        let (status, body) = api
            .send(Method::PUT, &format!("/v1/functions/{name}"), bytes, None)
            .await
            .unwrap();
        assert_eq!(status, 400, "{name}: {body}");
        assert!(body.contains(needle), "{name}: {body}");
    }
    for (path, body, needle) in [
        ("/v1/functions/x?memory=lots", "", "memory"),
        ("/v1/functions/x?timeout=2h", "", "timeout"),
        ("/v1/functions/bad%20name", "", "not allowed"),
    ] {
        let (status, got) = api
            .send(Method::PUT, path, body.as_bytes().to_vec(), None)
            .await
            .unwrap();
        assert_eq!(status, 400, "{path}: {got}");
        assert!(got.contains(needle), "{path}: {got}");
    }
    let list: FunctionList = api.get("/v1/functions").await.unwrap();
    let names: Vec<&str> = list.functions.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["misbehave", "upper"]);
    // A trigger on a function that does not exist, or that would feed itself, is refused.
    for (json, needle) in [
        (
            serde_json::json!({"on": "a/#", "fn": "nope"}),
            "no function named nope",
        ),
        (
            serde_json::json!({"on": "a/#", "fn": "upper", "out": "a/b"}),
            "forever",
        ),
        (serde_json::json!({"on": "a/+x", "fn": "upper"}), "filter"),
    ] {
        let (status, got) = api
            .send(
                Method::PUT,
                "/v1/triggers/t",
                serde_json::to_vec(&json).unwrap(),
                None,
            )
            .await
            .unwrap();
        assert_eq!(status, 400, "{json}: {got}");
        assert!(got.contains(needle), "{json}: {got}");
    }
    // A function in use cannot be removed.
    let (status, got) = api
        .send(Method::DELETE, "/v1/functions/upper", Vec::new(), None)
        .await
        .unwrap();
    assert_eq!(status, 409, "{got}");
    assert!(got.contains("shout"), "{got}");
    let (status, _) = api.get_raw("/v1/health").await.unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_three_functions_and_a_qos0_trigger() {
    let net = cluster(3, &[]).await;
    let api = net.api(0).unwrap();
    deploy(&api, "upper", "uppercase", "").await;
    deploy(&api, "count", "counter", "").await;
    deploy(&api, "echo", "misbehave", "").await;
    trigger(
        &api,
        "a",
        serde_json::json!({"on": "in/x", "fn": "upper", "out": "a/out"}),
    )
    .await;
    trigger(
        &api,
        "b",
        serde_json::json!({"on": "a/#", "fn": "count", "out": "b/out"}),
    )
    .await;
    trigger(
        &api,
        "c",
        serde_json::json!({"on": "b/#", "fn": "echo", "out": "c/out"}),
    )
    .await;
    let apis: Vec<Api> = (0..3).map(|i| net.api(i).unwrap()).collect();
    publish_each(&apis, 0..5, "in/x", "x", "m").await;
    wait_log_len(&net, "c/out", 5).await;
    let out = read_all(&net.api(2).unwrap(), "c/out", 5).await;
    let payloads: Vec<&str> = out.iter().map(|e| e["payload"].as_str().unwrap()).collect();
    // The counter keys on the last level of its input topic, `out`.
    assert_eq!(payloads, ["out 1", "out 2", "out 3", "out 4", "out 5"]);

    // QoS 0: runs once on the executor as events pass, no log.
    trigger(
        &api,
        "q",
        serde_json::json!({"on": "live/+", "fn": "upper", "out": "live-out/all", "qos": 0}),
    )
    .await;
    let mut child = tokio::process::Command::new(crate::BIN)
        .env("CANAL_TOKEN", canal_testnet::admin_token())
        .args([
            "--api",
            net.api(1).unwrap().base(),
            "sub",
            "live-out/all",
            "--qos",
            "0",
        ])
        .args(["--count", "1", "--json"])
        .env_remove("CANAL_API")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let http = canal_testnet::http_client();
    let base = net.api(2).unwrap().base().to_string();
    // At most once: publish until one gets through the subscriber's start-up.
    wait_for("a QoS 0 output to arrive", Duration::from_secs(30), || {
        let req = http
            .post(format!("{base}/v1/topics/live%2Fa/events"))
            .header("canal-qos", "0")
            .body("quiet")
            .send();
        let done = child.try_wait().unwrap().is_some();
        async move {
            if done {
                return Ok(());
            }
            req.await.map_err(|e| e.to_string())?;
            Err("not yet".to_string())
        }
    })
    .await
    .unwrap();
    let out = child.wait_with_output().await.unwrap();
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    assert_eq!(line["payload"].as_str(), Some("QUIET"));
    assert_eq!(
        log(&api, "live-out/all").await.next,
        0,
        "QoS 0 outputs are not logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_deploys_binds_invokes_and_removes() {
    let net = cluster(1, &[]).await;
    let api = net.api(0).unwrap();
    let base = api.base().to_string();
    let wasm = guests::path("threshold").unwrap();
    let wasm = wasm.to_str().unwrap();
    let o = canal(&[
        "--api",
        &base,
        "fn",
        "deploy",
        "threshold",
        wasm,
        "--memory",
        "32MiB",
        "--timeout",
        "500ms",
    ])
    .await;
    assert!(o.status.success(), "{}", crate::stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("threshold"));
    let o = canal(&["--api", &base, "--json", "fn", "list"]).await;
    let list: FunctionList = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list.functions[0].limits.memory_bytes, 32 << 20);
    assert_eq!(list.functions[0].limits.timeout_ms, 500);
    // invoke runs once and commits nothing.
    let o = canal(&[
        "--api",
        &base,
        "--json",
        "fn",
        "invoke",
        "threshold",
        "42",
        "--topic",
        "sensors/r9/temp",
    ])
    .await;
    assert!(o.status.success(), "{}", crate::stderr(&o));
    let r: InvokeResult = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r.result, Ok(()));
    assert_eq!(r.outputs.len(), 1);
    assert_eq!(
        r.state.get("count/sensors/r9/temp"),
        Some(&Some("1".to_string()))
    );
    assert_eq!(
        state(&api, "threshold", "count/sensors/r9/temp").await,
        None
    );
    let o = canal(&["--api", &base, "fn", "invoke", "threshold", "warm"]).await;
    assert_clear_error(&o, 1, "warm");

    let o = canal(&[
        "--api",
        &base,
        "trigger",
        "add",
        "t",
        "--on",
        "sensors/+/temp",
        "--fn",
        "threshold",
        "--out",
        "alerts/x",
    ])
    .await;
    assert!(o.status.success(), "{}", crate::stderr(&o));
    let o = canal(&["--api", &base, "trigger", "list"]).await;
    assert!(String::from_utf8_lossy(&o.stdout).contains("sensors/+/temp"));
    publish_until_acked(
        std::slice::from_ref(&api),
        0,
        "sensors/r1/temp",
        "r1",
        b"50".to_vec(),
    )
    .await;
    wait_log_len(&net, "alerts/x", 1).await;
    let o = canal(&[
        "--api",
        &base,
        "state",
        "get",
        "threshold",
        "count/sensors/r1/temp",
    ])
    .await;
    assert!(o.status.success(), "{}", crate::stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "1");
    let o = canal(&["--api", &base, "state", "get", "threshold", "nothing/here"]).await;
    assert_clear_error(&o, 1, "nothing/here");

    let o = canal(&["--api", &base, "fn", "deploy", "x", "/no/such/file.wasm"]).await;
    assert_clear_error(&o, 1, "/no/such/file.wasm");
    let o = canal(&["--api", &base, "fn", "rm", "threshold"]).await;
    assert_clear_error(&o, 1, "trigger");
    let o = canal(&["--api", &base, "trigger", "rm", "t"]).await;
    assert!(o.status.success(), "{}", crate::stderr(&o));
    let o = canal(&["--api", &base, "fn", "rm", "threshold"]).await;
    assert!(o.status.success(), "{}", crate::stderr(&o));
    let o = canal(&["--api", &base, "--json", "fn", "list"]).await;
    let list: FunctionList = serde_json::from_slice(&o.stdout).unwrap();
    assert!(list.functions.is_empty());
}

/// Waits until `function`'s committed placement, as node `via` has it, satisfies `ok`.
async fn wait_placement(
    api: &Api,
    function: &str,
    what: &str,
    ok: impl Fn(&canal_proto::api::Placed) -> bool,
) -> canal_proto::api::PlacementAnswer {
    wait_for(what, Duration::from_secs(60), || {
        let api = api.clone();
        let ok = &ok;
        async move {
            let a: canal_proto::api::PlacementAnswer = api
                .get(&format!("/v1/functions/{function}/placement"))
                .await
                .map_err(|e| e.to_string())?;
            match &a.committed {
                Some(p) if ok(p) => Ok(a),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_function_runs_only_on_the_gpu_peer_and_waits_while_it_is_gone() {
    let mut net = Testnet::start(crate::BIN, 4, |i| canal_testnet::NodeOptions {
        gpus: if i == 3 {
            vec!["H100:80GiB".into()]
        } else {
            Vec::new()
        },
        extra_args: vec!["--bootstrap-expect".into(), "3".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    for i in 0..4 {
        crate::raft::wait_formed(&net, i, 3).await;
    }
    let gpu_peer = net.node(3).info().unwrap().peer_id.clone();
    let api = net.api(0).unwrap();
    deploy(&api, "gpufn", "uppercase", "?gpu=true").await;
    trigger(
        &api,
        "g",
        serde_json::json!({"on": "gpu/in", "fn": "gpufn", "out": "gpu/out"}),
    )
    .await;
    wait_placement(&api, "gpufn", "the GPU peer to be chosen", |p| {
        p.decision.chosen == [gpu_peer.clone()]
    })
    .await;
    let apis: Vec<Api> = (0..3).map(|i| net.api(i).unwrap()).collect();
    publish_each(&apis, 0..5, "gpu/in", "g", "a").await;
    wait_log_len(&net, "gpu/out", 5).await;

    // The GPU peer goes away: no other peer fits, so the function is unplaceable, says why,
    // and its events wait in the log.
    net.kill(3).await.unwrap();
    let a = wait_placement(&api, "gpufn", "the function to become unplaceable", |p| {
        p.decision.chosen.is_empty()
    })
    .await;
    let why = a.committed.unwrap().decision.unplaceable.unwrap();
    assert!(why.contains("GPU"), "{why}");
    let o = canal(&["--api", api.base(), "fn", "placement", "gpufn"]).await;
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("UNPLACEABLE"), "{text}");
    assert!(text.contains("no GPU"), "{text}");
    publish_each(&apis, 5..10, "gpu/in", "g", "a").await;
    assert_eq!(log(&api, "gpu/out").await.next, 5, "ran while unplaceable");

    // It comes back: the events published meanwhile are processed there, none lost.
    net.restart(3).await.unwrap();
    wait_placement(&api, "gpufn", "the GPU peer to be chosen again", |p| {
        p.decision.chosen == [gpu_peer.clone()]
    })
    .await;
    wait_log_len(&net, "gpu/out", 10).await;
    let out = read_all(&api, "gpu/out", 10).await;
    let mut payloads: Vec<&str> = out.iter().map(|e| e["payload"].as_str().unwrap()).collect();
    payloads.sort();
    let mut want: Vec<String> = (0..10).map(|i| format!("A{i}")).collect();
    want.sort();
    assert_eq!(payloads, want);
    for e in &out {
        assert_eq!(
            e["headers"]["canal-executor"].as_str(),
            Some(gpu_peer.as_str()),
            "{e}"
        );
    }
    assert_eq!(log(&api, "gpu/out").await.next, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_latency_policy_moves_a_function_to_the_faster_peer() {
    use canal_testnet::{LinkSettings, NodeOptions};
    // Three voters behind relays without delay; then two workers join as learners (never
    // leaders, so never the deciding node itself): node 3 behind a 40 ms link, node 4 not.
    let voters = vec![
        "--bootstrap-expect".into(),
        "3".into(),
        "--voters".into(),
        "3".into(),
    ];
    let mut net = Testnet::start(crate::BIN, 3, |_| NodeOptions {
        link: Some(LinkSettings::NONE),
        extra_args: voters.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    for i in 0..3 {
        crate::raft::wait_formed(&net, i, 3).await;
    }
    for delay in [40, 0] {
        net.add_node(NodeOptions {
            link: Some(LinkSettings::latency(Duration::from_millis(delay))),
            labels: vec![("pool".into(), "workers".into())],
            bootstrap_from_first: true,
            extra_args: vec!["--voters".into(), "3".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let peer = |i: usize| net.node(i).info().unwrap().peer_id.clone();
    let (slow, fast) = (peer(3), peer(4));
    let api = net.api(0).unwrap();
    deploy(
        &api,
        "lat",
        "uppercase",
        "?policy=latency&labels=pool=workers",
    )
    .await;
    trigger(
        &api,
        "l",
        serde_json::json!({"on": "lat/in", "fn": "lat", "out": "lat/out"}),
    )
    .await;
    wait_placement(&api, "lat", "the fast worker to be chosen", |p| {
        p.decision.chosen == [fast.clone()]
    })
    .await;
    let apis: Vec<Api> = (0..3).map(|i| net.api(i).unwrap()).collect();
    publish_until_acked(&apis, 0, "lat/in", "l0", b"a".to_vec()).await;
    wait_log_len(&net, "lat/out", 1).await;

    // The links swap: the decision follows the measured round trips.
    net.set_link(4, LinkSettings::latency(Duration::from_millis(60)))
        .unwrap();
    net.set_link(3, LinkSettings::NONE).unwrap();
    let a = wait_placement(
        &api,
        "lat",
        "the function to move to the now faster worker",
        |p| p.decision.chosen == [slow.clone()],
    )
    .await;
    let verdict = a
        .committed
        .unwrap()
        .decision
        .verdicts
        .into_iter()
        .find(|v| v.peer_id == fast)
        .unwrap();
    assert!(
        !verdict.chosen && verdict.predicted_ms.is_some(),
        "{verdict:?}"
    );
    // Each worker decides from its own replica of the placement whether it executes: the
    // old executor, 60 ms away now, runs what comes before its replica has the move (once,
    // by the cursor). The event that must run on the new executor comes after both have it.
    for i in [3, 4] {
        wait_placement(
            &net.api(i).unwrap(),
            "lat",
            "the move to reach both workers' replicas",
            |p| p.decision.chosen == [slow.clone()],
        )
        .await;
    }
    publish_until_acked(&apis, 1, "lat/in", "l1", b"b".to_vec()).await;
    wait_log_len(&net, "lat/out", 2).await;
    let out = read_all(&api, "lat/out", 2).await;
    let executors: Vec<&str> = out
        .iter()
        .map(|e| e["headers"]["canal-executor"].as_str().unwrap())
        .collect();
    assert_eq!(executors, [fast.as_str(), slow.as_str()]);
}

/// The dead letters of `topic`, `n` of them, with their `canal-error-kind` and `canal-error`.
pub(crate) async fn dead_letters(api: &Api, topic: &str, n: u64) -> Vec<(String, String, String)> {
    read_all(api, topic, n)
        .await
        .iter()
        .map(|e| {
            let h = &e["headers"];
            (
                e["payload"].as_str().unwrap_or_default().to_string(),
                h["canal-error-kind"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                h["canal-error"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_over_their_limits_go_to_the_dead_letter_and_loops_stop() {
    let net = cluster(1, &[]).await;
    let api = net.api(0).unwrap();
    let base = api.base().to_string();

    // Bad limits are refused at deploy with the value and what is allowed, by the node...
    for (query, needles) in [
        ("?max-outputs=1001", &["max-outputs 1001", "0 to 1000"][..]),
        (
            "?max-outputs=many",
            &["max-outputs", "many", "not a whole number"],
        ),
        (
            "?max-output-bytes=5MiB",
            &["max-output-bytes of 5242880 bytes", "0 to 4194304"],
        ),
        (
            "?max-state-bytes=lots",
            &["max-state-bytes", "lots", "is not a byte size"],
        ),
    ] {
        let (status, got) = api
            .send(
                Method::PUT,
                &format!("/v1/functions/x{query}"),
                Vec::new(),
                None,
            )
            .await
            .unwrap();
        assert_eq!(status, 400, "{query}: {got}");
        for n in needles {
            assert!(got.contains(n), "{query}: {n:?} not in {got}");
        }
    }
    // ... and by the CLI before it sends anything.
    let wasm = guests::path("misbehave").unwrap();
    let wasm = wasm.to_str().unwrap();
    for (flag, value, needle) in [
        (
            "--max-outputs",
            "5000",
            "max-outputs 5000 is not allowed: use 0 to 1000",
        ),
        (
            "--max-output-bytes",
            "1GiB",
            "max-output-bytes of 1073741824 bytes is not allowed",
        ),
        (
            "--max-state-bytes",
            "5MiB",
            "max-state-bytes of 5242880 bytes is not allowed",
        ),
    ] {
        let o = canal(&["--api", &base, "fn", "deploy", "x", wasm, flag, value]).await;
        assert_clear_error(&o, 2, needle);
    }
    let list: FunctionList = api.get("/v1/functions").await.unwrap();
    assert!(list.functions.is_empty(), "{list:?}");

    // A function with tight limits, one with the defaults that feeds itself, and one that
    // behaves.
    let o = canal(&[
        "--api",
        &base,
        "fn",
        "deploy",
        "spammer",
        wasm,
        "--max-outputs",
        "4",
        "--max-output-bytes",
        "4KiB",
        "--max-state-bytes",
        "2KiB",
    ])
    .await;
    assert!(o.status.success(), "{}", crate::stderr(&o));
    deploy(&api, "looper", "misbehave", "").await;
    deploy(&api, "upper", "uppercase", "").await;
    let list: FunctionList = api.get("/v1/functions").await.unwrap();
    let spammer = list.functions.iter().find(|f| f.name == "spammer").unwrap();
    assert_eq!(
        (
            spammer.limits.max_outputs,
            spammer.limits.max_output_bytes,
            spammer.limits.max_state_bytes
        ),
        (4, 4 << 10, 2 << 10)
    );
    let looper = list.functions.iter().find(|f| f.name == "looper").unwrap();
    assert_eq!(
        looper.limits,
        canal_proto::function::Limits::default(),
        "the defaults"
    );
    let o = canal(&["--api", &base, "fn", "list"]).await;
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        table.contains("4 / 4 KiB") && table.contains("2 KiB"),
        "{table}"
    );

    // fn invoke says which limit, too.
    let r: InvokeResult = {
        let (status, body) = api
            .send(
                Method::POST,
                "/v1/functions/spammer/invoke",
                b"spam:5:1".to_vec(),
                None,
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    let e = r.result.unwrap_err();
    assert!(e.contains("max-outputs") && e.contains("limit of 4"), "{e}");

    trigger(
        &api,
        "limits",
        serde_json::json!({"on": "test/limits", "fn": "spammer", "out": "test/limits-out",
                           "retries": 1, "dead_letter": "test/limits-dead"}),
    )
    .await;
    trigger(
        &api,
        "loop",
        serde_json::json!({"on": "test/loop", "fn": "looper", "retries": 1,
                           "dead_letter": "test/loop-dead"}),
    )
    .await;
    trigger(
        &api,
        "shout",
        serde_json::json!({"on": "chat/#", "fn": "upper", "out": "shout/all"}),
    )
    .await;
    let apis = [api.clone()];
    // Publish is the only way back into the function's own input: the hop limit stops it.
    publish_until_acked(&apis, 0, "test/loop", "loop0", b"republish".to_vec()).await;
    let payloads = ["spam:5:1", "spam:3:2000", "state:3:1000", "spam:4:10"];
    for (i, p) in payloads.iter().enumerate() {
        publish_until_acked(
            &apis,
            0,
            "test/limits",
            &format!("l{i}"),
            p.as_bytes().to_vec(),
        )
        .await;
        // Other functions keep running.
        publish_until_acked(
            &apis,
            0,
            "chat/room",
            &format!("c{i}"),
            format!("hi {i}").into_bytes(),
        )
        .await;
    }
    wait_log_len(&net, "test/limits-dead", 3).await;
    wait_log_len(&net, "test/limits-out", 4).await;
    wait_log_len(&net, "shout/all", 4).await;
    let dead = dead_letters(&api, "test/limits-dead", 3).await;
    for ((payload, kind, error), (want_payload, needle)) in dead.iter().zip([
        ("spam:5:1", "max-outputs: output number 5"),
        ("spam:3:2000", "max-output-bytes"),
        ("state:3:1000", "max-state-bytes"),
    ]) {
        assert_eq!(payload, want_payload);
        assert_eq!(kind, "limit", "{payload}: {error}");
        assert!(
            error.contains(needle),
            "{payload}: {needle:?} not in {error}"
        );
    }
    // What stayed inside its limits went through, and nothing of the failed runs did.
    assert_eq!(log(&api, "test/limits-out").await.next, 4);
    assert_eq!(
        state(&api, "spammer", "k0").await,
        None,
        "a failed run's state was committed"
    );

    // The loop: the client's event and 16 hops, then the dead letter says why.
    wait_log_len(&net, "test/loop-dead", 1).await;
    let dead = dead_letters(&api, "test/loop-dead", 1).await;
    assert_eq!(dead[0].1, "limit", "{dead:?}");
    assert!(dead[0].2.contains("over the hop limit of 16"), "{dead:?}");
    assert_eq!(log(&api, "test/loop").await.next, 17);
    let chain = read_all(&api, "test/loop", 17).await;
    for (i, e) in chain.iter().enumerate() {
        let hops = e["headers"]["canal-hops"].as_str().map(str::to_string);
        let want = (i > 0).then(|| i.to_string());
        assert_eq!(hops, want, "event {i}: {e}");
    }
    let metrics = api.get_raw("/metrics").await.unwrap().1;
    for limit in ["max-outputs", "max-output-bytes", "max-state-bytes", "hops"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("canal_fn_limit_exceeded_total{")
                    && l.contains(&format!("limit=\"{limit}\""))),
            "no {limit} in the limit metric"
        );
    }
    // The node is healthy, and the loop has stopped for good.
    let (status, _) = api.get_raw("/v1/health").await.unwrap();
    assert_eq!(status, 200);
    publish_until_acked(&apis, 0, "chat/room", "c-last", b"still here".to_vec()).await;
    wait_log_len(&net, "shout/all", 5).await;
    assert_eq!(log(&api, "test/loop").await.next, 17);
}
