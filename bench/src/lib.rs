//! # canal-bench — what `canal bench` and `canal testnet scenario` run
//!
//! Load generators that report throughput and latency percentiles, and the README's demos
//! run end to end. The `canal` binary owns their command line and calls in here; they talk
//! to nodes only through [`canal_client`] and [`canal_testnet`].
//!
//! [`shards`] computes the shard map of simulated peers in this process (no nodes, no I/O).
//! [`raft`], [`pubsub`], [`functions`] and [`placement`] start their own cluster of local
//! nodes (the running binary, which must be `canal`), so the numbers are reproducible with
//! one command: for `raft`, committed writes/s and commit latency with 1 and with 64
//! concurrent writers, then the time from `kill -9` of the leader to the next committed
//! write, repeated.

mod fn_bench;
mod mqtt;
mod nats;
mod placement;
pub mod scenario;
mod shard_map;

pub use fn_bench::run as functions;
pub use mqtt::run as mqtt;
pub use placement::run as placement;
pub use shard_map::{ShardsBench, run as shards};

use crate::nats::{RunStats, Shape};
use anyhow::{Context, bail};
use canal_client::{Client, Method, api_error, encode_segment};
use canal_proto::api::ClusterStatus;
use canal_testnet::{Api, NodeOptions, Testnet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Percentile `p` (0-100) of sorted `v`.
pub(crate) fn pct(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Starts a local 3-node cluster and waits for its leaders.
pub(crate) async fn local_cluster() -> anyhow::Result<Testnet> {
    local_cluster_of(3).await
}

/// Starts a local cluster of `n` nodes with the default shard count (64: the harness's
/// own default is smaller, for tests) and waits for its leaders.
pub(crate) async fn local_cluster_of(n: usize) -> anyhow::Result<Testnet> {
    // `CANAL_BENCH_NODE_BIN` runs the nodes from another build, so two builds of the node
    // can be measured with the same load generator.
    let bin = match std::env::var_os("CANAL_BENCH_NODE_BIN") {
        Some(path) => std::path::PathBuf::from(path),
        None => {
            std::env::current_exe().context("cannot find the canal binary to run nodes with")?
        }
    };
    // `CANAL_BENCH_NODE_ARGS` adds flags to every node (`--auth none` measures what checking
    // tokens costs).
    let more: Vec<String> = std::env::var("CANAL_BENCH_NODE_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    eprintln!(
        "starting {n} local nodes ({} {}) ...",
        bin.display(),
        more.join(" ")
    );
    let mut extra_args: Vec<String> = vec![
        "--bootstrap-expect".into(),
        n.to_string(),
        "--log".into(),
        "warn".into(),
    ];
    // The default shard count unless CANAL_BENCH_NODE_ARGS names one.
    if !more.iter().any(|a| a == "--shards") {
        extra_args.extend([
            "--shards".into(),
            canal_proto::keyspace::DEFAULT_SHARDS.to_string(),
        ]);
    }
    extra_args.extend(more);
    let net = Testnet::start(&bin, n, |_| NodeOptions {
        extra_args: extra_args.clone(),
        ..Default::default()
    })
    .await?;
    let netr = &net;
    // Every node routes, and knows a leader of every group it hosts (its shard groups
    // included), before anything is measured.
    canal_testnet::wait_for(
        "every node to route and know the leaders of its groups",
        Duration::from_secs(120),
        || async move {
            for i in netr.running() {
                let api = netr.api(i).map_err(|e| e.to_string())?;
                let s: canal_proto::api::ClusterStatus = api
                    .get("/v1/cluster/status")
                    .await
                    .map_err(|e| e.to_string())?;
                if !s.every_group_led() {
                    return Err(format!("node{i} is not ready: {:?}", s.unrouted));
                }
            }
            Ok(())
        },
    )
    .await?;
    Ok(net)
}

/// Now, in nanoseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// `canal bench pubsub`: for each QoS and payload size, `count` events published with
/// `publishers` in flight and delivered to one subscriber; with `nats_server`, the same runs
/// on three local nats-server processes, side by side.
pub async fn pubsub(
    count: usize,
    sizes: Vec<usize>,
    qos: Vec<u8>,
    publishers: usize,
    nodes: usize,
    nats_server: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    if count == 0 || publishers == 0 || qos.iter().any(|q| *q > 1) {
        bail!("--count and --publishers must be at least 1, and --qos only 0 or 1");
    }
    if !(3..=16).contains(&nodes) {
        bail!("--nodes {nodes} is not allowed: use 3 to 16");
    }
    // Find nats-server before spending minutes on canal's runs.
    let nats = match &nats_server {
        Some(cmd) => Some(crate::nats::locate_server(cmd).await?),
        None => None,
    };
    let shapes = shapes(count, &sizes, &qos, publishers);
    let mut net = local_cluster_of(nodes).await?;
    let apis: Vec<Api> = (0..nodes)
        .map(|i| net.api(i))
        .collect::<anyhow::Result<_>>()?;
    let mut results = Vec::new();
    for (run, shape) in shapes.iter().copied().enumerate() {
        let (q, size, count) = (shape.qos, shape.bytes, shape.count);
        // The subscriber on node 2, publishers on all three.
        let filter = format!("bench/{run}/#");
        let path = format!(
            "/v1/subscribe?filter={}&qos={q}&from=earliest",
            encode_segment(&filter)
        );
        let resp = subscribe(&apis[2], &path).await?;
        let sub = collect_latencies(resp, count);
        // QoS 0 goes only to peers that advertise interest: wait until every node knows the
        // subscriber's node wants these events.
        if q == 0 {
            wait_interest(&apis, &net.node(2).info()?.peer_id, &filter).await?;
        }
        let payload = vec![b'x'; size];
        let started = Instant::now();
        let topic = move |i: usize| format!("bench/{run}/t{}", i % 8);
        publish_streams(
            &apis[..shape.publishing(apis.len())],
            topic,
            q,
            count,
            shape.publishers,
            payload,
            &format!("b{run}"),
        )
        .await?;
        let published = started.elapsed();
        let (lat, done) = sub.await?;
        let stats = RunStats::new(shape, count, published, lat, done.duration_since(started));
        eprintln!("{stats}");
        results.push(stats);
    }
    if let Some((server, version)) = nats {
        // Stop canal's nodes first, so they take no CPU from the NATS runs.
        for i in net.running() {
            net.kill(i).await?;
        }
        drop(net);
        let nats = crate::nats::run_all(&server, &shapes).await?;
        return crate::nats::report(&results, &nats, &version, json);
    }
    if json {
        let runs: Vec<serde_json::Value> = results.iter().map(RunStats::to_json).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "runs": runs }))?
        );
    }
    Ok(())
}

/// The most events of a one-publisher run: one publish at a time takes long.
const ONE_PUBLISHER_EVENTS: usize = 500;

/// The runs of `canal bench pubsub`: each QoS and size with `publishers` in flight through
/// every node; then, for each QoS at the first size, one publisher and `publishers` in
/// flight from the first node only (every event crosses to the subscriber's node).
fn shapes(count: usize, sizes: &[usize], qos: &[u8], publishers: usize) -> Vec<Shape> {
    let mut out: Vec<Shape> = qos
        .iter()
        .flat_map(|&qos| {
            sizes.iter().map(move |&bytes| Shape {
                qos,
                bytes,
                publishers,
                count,
                spread: true,
            })
        })
        .collect();
    if let Some(&bytes) = sizes.first() {
        for &qos in qos {
            out.push(Shape {
                qos,
                bytes,
                publishers: 1,
                count: count.min(ONE_PUBLISHER_EVENTS),
                spread: false,
            });
            if publishers > 1 {
                out.push(Shape {
                    qos,
                    bytes,
                    publishers,
                    count,
                    spread: false,
                });
            }
        }
    }
    out
}

/// Reads a subscription's Server-Sent Events until `count` events carrying a `t` header (the
/// publish time, ns since the epoch) arrived or 10 s pass without one; returns each event's
/// publish-to-delivery latency and when the last one came.
pub(crate) fn collect_latencies(
    resp: canal_client::Response,
    count: usize,
) -> tokio::task::JoinHandle<(Vec<Duration>, Instant)> {
    let events = collect_events(resp, count);
    tokio::spawn(async move {
        let (events, last) = events
            .await
            .unwrap_or_else(|_| (Vec::new(), Instant::now()));
        (events.into_iter().map(|(d, _)| d).collect(), last)
    })
}

/// Like [`collect_latencies`], with each event.
pub(crate) fn collect_events(
    resp: canal_client::Response,
    count: usize,
) -> tokio::task::JoinHandle<(Vec<(Duration, canal_proto::api::Event)>, Instant)> {
    use futures::StreamExt;
    tokio::spawn(async move {
        let mut got = Vec::new();
        let mut last = Instant::now();
        let mut events = std::pin::pin!(canal_client::sse_events(resp));
        while got.len() < count {
            let Ok(Some(Ok(ev))) =
                tokio::time::timeout(Duration::from_secs(10), events.next()).await
            else {
                break;
            };
            // Only events: a `lagged` notice is not one.
            let Ok(e) = serde_json::from_str::<canal_proto::api::Event>(&ev.data) else {
                continue;
            };
            if let Some(t) = e.headers.get("t").and_then(|t| t.parse::<u128>().ok()) {
                got.push((Duration::from_nanos(now_ns().saturating_sub(t) as u64), e));
                last = Instant::now();
            }
        }
        (got, last)
    })
}

/// Subscribes through `api` to `path` (a `/v1/subscribe?...`), with no time limit on the
/// stream; fails with the node's error if it refuses.
pub(crate) async fn subscribe(api: &Api, path: &str) -> anyhow::Result<canal_client::Response> {
    let client = Client::streaming(api.base(), Some(canal_testnet::admin_token()))?;
    client
        .stream(path)
        .await
        .with_context(|| format!("cannot subscribe on {}", api.base()))
}

/// Waits until every node of `apis` has heard that `peer` wants QoS 0 events of `filter`
/// (peers advertise their interest every 2 s).
pub(crate) async fn wait_interest(apis: &[Api], peer: &str, filter: &str) -> anyhow::Result<()> {
    for api in apis {
        canal_testnet::wait_for(
            "the subscriber's interest to reach every node",
            Duration::from_secs(30),
            || async move {
                let p: canal_proto::api::Peers =
                    api.get("/v1/peers").await.map_err(|e| e.to_string())?;
                let known = p
                    .peers
                    .iter()
                    .any(|p| p.caps.peer_id == peer && p.caps.interest.iter().any(|f| f == filter));
                if known {
                    Ok(())
                } else {
                    Err("not yet".to_string())
                }
            },
        )
        .await?;
    }
    Ok(())
}

/// Publishes `count` events of `payload` at QoS `q` with `publishers` in flight, through
/// the nodes of `apis` in turn, event `i` to `topic(i)` with message id `{id_prefix}-{i}`
/// and the publish time in header `t`. A failed QoS 1 publish (an election under load) is
/// retried with the same message id, so it is stored once, as a real client would.
pub(crate) async fn publish_many(
    apis: &[Api],
    topic: impl Fn(usize) -> String + Clone + Send + 'static,
    q: u8,
    count: usize,
    publishers: usize,
    payload: Vec<u8>,
    id_prefix: &str,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..publishers {
        let (next, payload) = (next.clone(), payload.clone());
        let (topic, id_prefix) = (topic.clone(), id_prefix.to_string());
        // A client (and so a connection pool) per publisher, as a real client would have.
        let clients = apis
            .iter()
            .map(|a| Client::new(a.base(), Some(canal_testnet::admin_token())))
            .collect::<Result<Vec<_>, _>>()?;
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, anyhow::Error>(());
                }
                post_retrying(
                    &clients,
                    i,
                    &topic(i),
                    q,
                    &format!("{id_prefix}-{i}"),
                    &payload,
                )
                .await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Publishes event `i` (`payload` to `topic` at QoS `q` with message id `id`, the publish
/// time in header `t`) over HTTP, through `clients` in turn from `i`, retrying a failure
/// (an election under load) up to 20 times with the same id, so it is stored once; a
/// refusal (4xx) is not retried.
async fn post_retrying(
    clients: &[Client],
    i: usize,
    topic: &str,
    q: u8,
    id: &str,
    payload: &[u8],
) -> anyhow::Result<()> {
    if clients.is_empty() {
        bail!("no node to publish event {i} through");
    }
    let path = format!("/v1/topics/{}/events", encode_segment(topic));
    let headers = [
        ("canal-qos".to_string(), q.to_string()),
        ("canal-id".to_string(), id.to_string()),
        ("canal-header-t".to_string(), now_ns().to_string()),
    ];
    for attempt in 0..=20 {
        let client = &clients[(i + attempt) % clients.len()];
        match client
            .raw(Method::POST, &path, payload.to_vec(), &headers)
            .await
        {
            Ok((status, _)) if status.is_success() => return Ok(()),
            Ok((status, body)) if status.is_client_error() => {
                bail!("publish refused: {}", api_error(status, &body))
            }
            _ => {}
        }
    }
    bail!("publish {i} failed 21 times")
}

/// Like [`publish_many`], over publish streams (`GET /v1/publish`): one stream per node,
/// `publishers` publishes in flight in all, shared among them. A publish answered with an
/// error (an election under load) is retried over HTTP with the same message id, so it is
/// stored once.
pub(crate) async fn publish_streams(
    apis: &[Api],
    topic: impl Fn(usize) -> String + Clone + Send + 'static,
    q: u8,
    count: usize,
    publishers: usize,
    payload: Vec<u8>,
    id_prefix: &str,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let payload = String::from_utf8(payload).context("bench payloads are text")?;
    let mut tasks = Vec::new();
    let streams = apis.len().min(publishers).max(1);
    for (n, api) in apis.iter().take(streams).enumerate() {
        // The in-flight publishes, split as evenly as they go.
        let window = publishers / streams + usize::from(n < publishers % streams);
        let stream =
            canal_client::PublishStream::connect(api.base(), Some(canal_testnet::admin_token()))
                .await?;
        let (mut tx, mut acks) = stream.split();
        let client = Client::new(api.base(), Some(canal_testnet::admin_token()))?;
        let (next, payload) = (next.clone(), payload.clone());
        let (topic, id_prefix) = (topic.clone(), id_prefix.to_string());
        let room = Arc::new(tokio::sync::Semaphore::new(window));
        let sent = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        let (room2, sent2, topic2, id2, payload2) = (
            room.clone(),
            sent.clone(),
            topic.clone(),
            id_prefix.clone(),
            payload.clone(),
        );
        let sender = tokio::spawn(async move {
            'send: loop {
                // What the window has room for goes out in one write.
                room2.acquire().await?.forget();
                let mut more = true;
                while more {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        tx.flush().await?;
                        break 'send;
                    }
                    if let Ok(mut s) = sent2.lock() {
                        s.push_back(i);
                    }
                    let mut headers = std::collections::BTreeMap::new();
                    headers.insert("t".to_string(), now_ns().to_string());
                    let line = canal_proto::api::PublishLine {
                        topic: Some(topic2(i)),
                        payload: Some(payload2.clone()),
                        payload_base64: None,
                        id: Some(format!("{id2}-{i}")),
                        headers,
                    };
                    tx.feed(line, Some(q)).await?;
                    more = room2.try_acquire().map(|p| p.forget()).is_ok();
                }
                tx.flush().await?;
            }
            tx.finish();
            Ok::<_, anyhow::Error>(())
        });
        tasks.push(tokio::spawn(async move {
            use futures::StreamExt;
            while let Some(ack) = acks.next().await {
                let ack = ack?;
                let i = sent.lock().ok().and_then(|mut s| s.pop_front());
                room.add_permits(1);
                if let (Some(e), Some(i)) = (&ack.error, i) {
                    post_retrying(
                        std::slice::from_ref(&client),
                        i,
                        &topic(i),
                        q,
                        &format!("{id_prefix}-{i}"),
                        payload.as_bytes(),
                    )
                    .await
                    .with_context(|| format!("first on the stream: {}", e.message))?;
                }
            }
            let left = sent.lock().map(|s| s.len()).unwrap_or(0);
            if left > 0 {
                sender.abort();
                bail!("the publish stream closed with {left} publishes unanswered");
            }
            sender.await??;
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

pub(crate) async fn leader(net: &Testnet) -> anyhow::Result<Option<usize>> {
    for i in net.running() {
        let Ok(s) = net.api(i)?.get::<ClusterStatus>("/v1/cluster/status").await else {
            continue;
        };
        let Some(g) = s.groups.iter().find(|g| g.group == "data-1") else {
            continue;
        };
        let Some(me) = g.members.first().and_then(|m| m.status.as_ref()) else {
            continue;
        };
        let Some(l) = me.leader else { continue };
        let Some((_, peer)) = me.nodes.iter().find(|(id, _)| *id == l) else {
            continue;
        };
        return Ok((0..net.len()).find(|j| {
            net.node(*j)
                .info()
                .map(|i| &i.peer_id == peer)
                .unwrap_or(false)
        }));
    }
    Ok(None)
}

/// `canal bench raft`: `count` replicated writes of `size` bytes for each number of
/// concurrent `writers`, then `failovers` leader kills, each timed to the next committed
/// write; prints a report (JSON when `json`).
pub async fn raft(
    count: usize,
    writers: Vec<usize>,
    size: usize,
    failovers: usize,
    json: bool,
) -> anyhow::Result<()> {
    if count == 0 || writers.contains(&0) {
        bail!("--count and --writers must be at least 1");
    }
    let mut net = local_cluster().await?;
    let apis: Vec<Api> = (0..3).map(|i| net.api(i)).collect::<anyhow::Result<_>>()?;
    let value = vec![b'x'; size];
    let mut results = Vec::new();
    for (run, &w) in writers.iter().enumerate() {
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..w {
            let (apis, next, value) = (apis.clone(), next.clone(), value.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return Ok::<_, anyhow::Error>(lat);
                    }
                    let t = Instant::now();
                    let (status, body) = apis[i % apis.len()]
                        .send(
                            canal_client::Method::PUT,
                            &format!("/v1/kv/bench-{run}-{i}"),
                            value.clone(),
                            None,
                        )
                        .await?;
                    if status != 200 {
                        bail!("write failed: {status} {body}");
                    }
                    lat.push(t.elapsed());
                }
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await??);
        }
        let elapsed = started.elapsed();
        lat.sort();
        let rate = count as f64 / elapsed.as_secs_f64();
        eprintln!(
            "writers {w:>3}: {count} writes of {size} B in {:.2} s = {rate:.0} committed writes/s; latency p50 {} p99 {}",
            elapsed.as_secs_f64(),
            ms(pct(&lat, 50.0)),
            ms(pct(&lat, 99.0))
        );
        results.push(serde_json::json!({
            "writers": w, "writes": count, "bytes": size, "seconds": elapsed.as_secs_f64(),
            "writes_per_s": rate, "p50_ms": pct(&lat, 50.0).as_secs_f64() * 1000.0,
            "p99_ms": pct(&lat, 99.0).as_secs_f64() * 1000.0,
        }));
    }

    let mut failover_times = Vec::new();
    for k in 0..failovers {
        let Some(l) = leader(&net).await? else {
            bail!("no leader before failover {k}")
        };
        let survivors: Vec<Api> = (0..3)
            .filter(|i| *i != l)
            .map(|i| apis[i].clone())
            .collect();
        let killed = Instant::now();
        net.kill(l).await?;
        // Write until one commits; each attempt goes to a surviving node.
        let mut i = 0usize;
        loop {
            let (status, _) = survivors[i % 2]
                .send(
                    canal_client::Method::PUT,
                    &format!("/v1/kv/failover-{k}"),
                    b"1".to_vec(),
                    Some(&format!("failover-{k}")),
                )
                .await
                .unwrap_or((0, String::new()));
            if status == 200 {
                break;
            }
            i += 1;
            if killed.elapsed() > Duration::from_secs(60) {
                bail!("no write committed within 60 s of killing the leader");
            }
        }
        let took = killed.elapsed();
        eprintln!(
            "failover {}: next committed write {} after kill -9 of the leader",
            k + 1,
            ms(took)
        );
        failover_times.push(took);
        net.restart(l).await?;
        // The restarted node must follow a leader again before the next round.
        let api = &apis[l];
        canal_testnet::wait_for(
            "the restarted node to rejoin",
            Duration::from_secs(60),
            || async move {
                let s: ClusterStatus = api
                    .get("/v1/cluster/status")
                    .await
                    .map_err(|e| e.to_string())?;
                let led = s.every_group_led();
                if led {
                    Ok(())
                } else {
                    Err("no leader known yet".to_string())
                }
            },
        )
        .await?;
    }
    failover_times.sort();
    if !failover_times.is_empty() {
        eprintln!(
            "failover over {} kills: median {}, min {}, max {}",
            failover_times.len(),
            ms(pct(&failover_times, 50.0)),
            ms(failover_times[0]),
            ms(failover_times[failover_times.len() - 1])
        );
    }
    if json {
        let out = serde_json::json!({
            "runs": results,
            "failover_ms": failover_times.iter().map(|d| d.as_secs_f64() * 1000.0).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

#[cfg(test)]
mod shape_tests {
    use super::*;

    #[test]
    fn the_runs_add_one_publisher_and_cross_node_rows_per_qos() {
        let s = shapes(5000, &[64, 4096], &[0, 1], 64);
        let labels: Vec<String> = s.iter().map(Shape::label).collect();
        assert_eq!(
            labels,
            [
                "QoS 0, 64 B, 64 in flight",
                "QoS 0, 4096 B, 64 in flight",
                "QoS 1, 64 B, 64 in flight",
                "QoS 1, 4096 B, 64 in flight",
                "QoS 0, 64 B, one publisher, node 1 -> node 3",
                "QoS 0, 64 B, 64 in flight, node 1 -> node 3",
                "QoS 1, 64 B, one publisher, node 1 -> node 3",
                "QoS 1, 64 B, 64 in flight, node 1 -> node 3",
            ]
        );
        assert!(
            s.iter()
                .all(|r| r.count == if r.publishers == 1 { 500 } else { 5000 })
        );
        assert_eq!(s[4].publishing(3), 1);
        assert_eq!(s[0].publishing(3), 3);
        // With one publisher asked for, no second row of the same.
        assert_eq!(shapes(100, &[64], &[1], 1).len(), 2);
    }
}
