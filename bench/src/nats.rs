//! `canal bench pubsub --compare-nats`: the same publish/subscribe runs against a local
//! three-server NATS cluster (`nats-server` with JetStream), printed side by side with
//! canal's figures as ratios.
//!
//! The shape follows canal's runs: `count` events of each payload size, `publishers` tasks
//! publishing through the three servers in turn (event `i` through server `i % 3`), one
//! subscriber on the third server, the publish time in a header `t` (ns since the epoch) and
//! the publish-to-delivery latency taken where the subscriber receives the event.
//!
//! - QoS 0 is core NATS: fire-and-forget publishes to `core.{run}.t{i % 8}`, a core
//!   subscription on `core.{run}.>`. The subjects are not under `bench.>`, so the JetStream
//!   stream does not store them. The publish phase ends when every client has flushed its
//!   buffer to its server.
//! - QoS 1 is JetStream: one file-backed stream on `bench.>` with 3 replicas; each publish to
//!   `bench.{run}.t{i % 8}` awaits its PubAck (the event is committed on a majority of the
//!   stream's replicas) and carries a `Nats-Msg-Id`, so a retried publish is stored once, as
//!   canal's `canal-id` does. The subscriber is an ordered push consumer (ephemeral, flow
//!   control, no acks) on the stream, filtered to `bench.{run}.>`, from the first message:
//!   like canal's QoS 1 subscription it sees an event only once the stream committed it.

use crate::{ms, now_ns, pct};
use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::push::OrderedConfig, stream};
use async_nats::{Client, HeaderMap};
use futures::{Stream, StreamExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// The JetStream stream the QoS 1 runs publish to.
const STREAM: &str = "BENCH";

/// How long the subscriber waits for the next event before it gives up on the rest.
const IDLE: Duration = Duration::from_secs(10);

/// What one run does, the same for canal and NATS: a QoS, a payload size, how many
/// publishes are in flight, and where the publishers are (the subscriber is always on the
/// third node or server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    /// QoS level, 0 or 1.
    pub(crate) qos: u8,
    /// Payload bytes per event.
    pub(crate) bytes: usize,
    /// Publishes in flight.
    pub(crate) publishers: usize,
    /// Events published.
    pub(crate) count: usize,
    /// Publishers on every node in turn (`false`: on the first node only, so every event
    /// crosses from one node to the subscriber's).
    pub(crate) spread: bool,
}

impl Shape {
    /// How the run is named in the table: `QoS 1, 64 B, 64 in flight` and, for a run from the
    /// first node only, `node 1 -> node 3`.
    pub(crate) fn label(&self) -> String {
        let from = if self.spread {
            String::new()
        } else {
            ", node 1 -> node 3".to_string()
        };
        let flight = match self.publishers {
            1 => "one publisher".to_string(),
            n => format!("{n} in flight"),
        };
        format!("QoS {}, {} B, {flight}{from}", self.qos, self.bytes)
    }

    /// How many of `n` nodes or servers publish.
    pub(crate) fn publishing(&self, n: usize) -> usize {
        if self.spread { n } else { n.min(1) }
    }
}

/// The figures of one run, canal's or NATS's.
#[derive(Debug, Clone)]
pub(crate) struct RunStats {
    /// What the run did.
    pub(crate) shape: Shape,
    /// Events published.
    pub(crate) published: usize,
    /// Events published per second of the publish phase.
    pub(crate) published_per_s: f64,
    /// Events the subscriber received.
    pub(crate) delivered: usize,
    /// Events delivered per second, from the first publish to the last delivery.
    pub(crate) delivered_per_s: f64,
    /// Publish-to-delivery latency percentiles.
    pub(crate) p50: Duration,
    /// 99th percentile.
    pub(crate) p99: Duration,
    /// 99.9th percentile.
    pub(crate) p999: Duration,
}

impl RunStats {
    /// The figures of a run that published `published` events in `publish_time` and delivered
    /// one event per entry of `lat` (its latency), the last `delivered_in` after the start.
    pub(crate) fn new(
        shape: Shape,
        published: usize,
        publish_time: Duration,
        mut lat: Vec<Duration>,
        delivered_in: Duration,
    ) -> RunStats {
        lat.sort();
        RunStats {
            shape,
            published,
            published_per_s: published as f64 / publish_time.as_secs_f64(),
            delivered: lat.len(),
            delivered_per_s: lat.len() as f64 / delivered_in.as_secs_f64(),
            p50: pct(&lat, 50.0),
            p99: pct(&lat, 99.0),
            p999: pct(&lat, 99.9),
        }
    }

    /// The figures as the JSON object `canal bench pubsub --json` prints for a run.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "qos": self.shape.qos, "bytes": self.shape.bytes,
            "publishers": self.shape.publishers, "spread": self.shape.spread,
            "published": self.published,
            "published_per_s": self.published_per_s,
            "delivered": self.delivered, "delivered_per_s": self.delivered_per_s,
            "p50_ms": millis(self.p50), "p99_ms": millis(self.p99), "p999_ms": millis(self.p999),
        })
    }
}

impl std::fmt::Display for RunStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: published {} at {:.0}/s; delivered {} at {:.0}/s; latency p50 {} p99 {} p999 {}",
            self.shape.label(),
            self.published,
            self.published_per_s,
            self.delivered,
            self.delivered_per_s,
            ms(self.p50),
            ms(self.p99),
            ms(self.p999)
        )
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `nats-server` to run: `cmd` itself when it names a path, else the first `cmd` on
/// `PATH`; with its `--version` line.
pub(crate) async fn locate_server(cmd: &Path) -> anyhow::Result<(PathBuf, String)> {
    let missing = || {
        format!(
            "{} not found: install it with apt-get install nats-server, or give its path with --nats-server",
            cmd.display()
        )
    };
    let path = if cmd.components().count() > 1 {
        cmd.is_file().then(|| cmd.to_path_buf())
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(cmd))
                .find(|p| p.is_file())
        })
    };
    let path = path.with_context(missing)?;
    let out = Command::new(&path)
        .arg("--version")
        .output()
        .await
        .with_context(|| format!("cannot run {} --version", path.display()))?;
    if !out.status.success() {
        bail!("{} --version failed with {}", path.display(), out.status);
    }
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok((path, version))
}

/// Three local `nats-server` processes in one cluster, each with JetStream and its own store
/// in a temporary directory; killed when dropped.
struct NatsCluster {
    /// The server processes, n1 to n3 (declared before `dir`, so dropped before it).
    servers: Vec<Child>,
    /// `nats://127.0.0.1:PORT` of each server's client listener.
    client_urls: Vec<String>,
    /// Each server's log file.
    logs: Vec<PathBuf>,
    /// Holds the stores and the logs; removed on drop.
    dir: tempfile::TempDir,
}

/// The last `lines` lines of the file at `path`, or a note that it cannot be read.
fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

impl NatsCluster {
    /// Starts servers n1..n3 running `bin`, with routes between all of them.
    fn start(bin: &Path) -> anyhow::Result<NatsCluster> {
        let dir = tempfile::Builder::new()
            .prefix("canal-bench-nats-")
            .tempdir()
            .context("cannot make a temporary directory for nats-server")?;
        // Distinct, and apart from the ports outgoing connections take (see
        // `canal_testnet::ports`); let go of at once, since a server dials the others' route
        // ports as it starts.
        let ports = canal_testnet::ports::Reserved::new(6)?.ports();
        let (client_ports, route_ports) = ports.split_at(3);
        let routes = route_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = NatsCluster {
            servers: Vec::new(),
            client_urls: Vec::new(),
            logs: Vec::new(),
            dir,
        };
        for i in 0..3 {
            let name = format!("n{}", i + 1);
            let store = cluster.dir.path().join(&name);
            std::fs::create_dir_all(&store)
                .with_context(|| format!("cannot create {}", store.display()))?;
            let log_path = cluster.dir.path().join(format!("{name}.log"));
            let log = std::fs::File::create(&log_path)
                .with_context(|| format!("cannot create {}", log_path.display()))?;
            let log2 = log
                .try_clone()
                .with_context(|| format!("cannot reopen {}", log_path.display()))?;
            let args: Vec<String> = vec![
                "--server_name".into(),
                name.clone(),
                "--addr".into(),
                "127.0.0.1".into(),
                "--port".into(),
                client_ports[i].to_string(),
                "--jetstream".into(),
                "--store_dir".into(),
                store.display().to_string(),
                "--cluster_name".into(),
                "canal-bench".into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{}", route_ports[i]),
                "--routes".into(),
                routes.clone(),
            ];
            let child = Command::new(bin)
                .args(&args)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start {} {}", bin.display(), args.join(" ")))?;
            cluster.servers.push(child);
            cluster
                .client_urls
                .push(format!("nats://127.0.0.1:{}", client_ports[i]));
            cluster.logs.push(log_path);
        }
        Ok(cluster)
    }

    /// Fails with the server's log if a server has exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        for (i, child) in self.servers.iter_mut().enumerate() {
            if let Some(status) = child
                .try_wait()
                .with_context(|| format!("cannot check on nats-server n{}", i + 1))?
            {
                bail!(
                    "nats-server n{} exited with {status}; its log:\n{}",
                    i + 1,
                    log_tail(&self.logs[i], 20)
                );
            }
        }
        Ok(())
    }

    /// One client connected to each server, in server order, once all three accept clients.
    async fn connect(&mut self, timeout: Duration) -> anyhow::Result<Vec<Client>> {
        let deadline = Instant::now() + timeout;
        let mut clients = Vec::new();
        for i in 0..self.client_urls.len() {
            loop {
                self.check_running()?;
                // Each client stays on its own server, so the publishers stay spread.
                let attempt = async_nats::ConnectOptions::new()
                    .ignore_discovered_servers()
                    .connection_timeout(Duration::from_secs(1))
                    .connect(&self.client_urls[i])
                    .await;
                match attempt {
                    Ok(c) => {
                        clients.push(c);
                        break;
                    }
                    Err(e) if Instant::now() >= deadline => {
                        return Err(e).with_context(|| {
                            format!(
                                "nats-server n{} did not accept clients at {} within {timeout:?}; its log:\n{}",
                                i + 1,
                                self.client_urls[i],
                                log_tail(&self.logs[i], 20)
                            )
                        });
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        Ok(clients)
    }

    /// Kills the servers and waits for them to exit.
    async fn shutdown(mut self) {
        for child in &mut self.servers {
            // An error means it has already gone.
            child.kill().await.ok();
        }
    }
}

/// Creates the 3-replica stream on `bench.>` through `js`, retrying until the JetStream
/// cluster has a meta leader and the stream a leader of its own, or `timeout` passes.
async fn create_stream(js: &jetstream::Context, timeout: Duration) -> anyhow::Result<()> {
    canal_testnet::wait_for(
        "the NATS JetStream cluster to elect a leader and create the 3-replica stream",
        timeout,
        || async move {
            let mut s = js
                .get_or_create_stream(stream::Config {
                    name: STREAM.to_string(),
                    subjects: vec!["bench.>".to_string()],
                    num_replicas: 3,
                    storage: stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            let info = s.info().await.map_err(|e| e.to_string())?;
            match info.cluster.as_ref().and_then(|c| c.leader.as_deref()) {
                Some(_) => Ok(()),
                None => Err("the stream has no leader yet".to_string()),
            }
        },
    )
    .await
}

/// Starts the NATS cluster, makes `runs` in order, and stops the cluster.
pub(crate) async fn run_all(server: &Path, runs: &[Shape]) -> anyhow::Result<Vec<RunStats>> {
    eprintln!("starting 3 local nats-server processes ...");
    let mut cluster = NatsCluster::start(server)?;
    let result = async {
        let clients = cluster.connect(Duration::from_secs(30)).await?;
        let js: Vec<jetstream::Context> = clients.iter().cloned().map(jetstream::new).collect();
        create_stream(&js[0], Duration::from_secs(60))
            .await
            .with_context(|| {
                format!(
                    "JetStream did not come up; n1's log:\n{}",
                    log_tail(&cluster.logs[0], 20)
                )
            })?;
        let mut stats = Vec::new();
        for (run, shape) in runs.iter().enumerate() {
            let s = match shape.qos {
                0 => core_run(&clients, run, *shape).await,
                _ => jetstream_run(&clients, &js, run, *shape).await,
            }
            .with_context(|| format!("NATS run {}", shape.label()))?;
            eprintln!("NATS {s}");
            stats.push(s);
        }
        anyhow::Ok(stats)
    }
    .await;
    cluster.shutdown().await;
    result
}

/// The publish time a message carries in its `t` header, if it has one.
fn publish_time(m: &async_nats::Message) -> Option<u128> {
    m.headers.as_ref()?.get("t")?.as_str().parse().ok()
}

/// Reads `events` (each an event's publish time, or `None` for a message that is not one)
/// until `count` events came or none came for 10 s; returns each event's
/// publish-to-delivery latency and when the last one came.
fn collect_latencies<S>(
    mut events: S,
    count: usize,
) -> tokio::task::JoinHandle<(Vec<Duration>, Instant)>
where
    S: Stream<Item = Option<u128>> + Send + Unpin + 'static,
{
    tokio::spawn(async move {
        let mut lat = Vec::with_capacity(count);
        let mut last = Instant::now();
        while lat.len() < count {
            let left = IDLE.saturating_sub(last.elapsed());
            let Ok(Some(item)) = tokio::time::timeout(left, events.next()).await else {
                break;
            };
            if let Some(t) = item {
                lat.push(Duration::from_nanos(now_ns().saturating_sub(t) as u64));
                last = Instant::now();
            }
        }
        (lat, last)
    })
}

/// Runs `publishers` tasks that take event numbers `0..count` in turn and call
/// `publish(i, t)` for each, with `t` the publish time (ns since the epoch) as a string.
async fn publish_all<F, Fut>(count: usize, publishers: usize, publish: F) -> anyhow::Result<()>
where
    F: Fn(usize, String) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..publishers)
        .map(|_| {
            let (next, publish) = (next.clone(), publish.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return anyhow::Ok(());
                    }
                    publish(i, now_ns().to_string()).await?;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.context("a publisher task failed")??;
    }
    Ok(())
}

/// Waits until a probe published through each server reaches `sub`, so the subscription's
/// interest has spread over the cluster's routes before the run publishes.
async fn await_interest(
    clients: &[Client],
    sub: &mut async_nats::Subscriber,
    subject: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = vec![false; clients.len()];
    while seen.contains(&false) {
        if Instant::now() >= deadline {
            bail!("the subscription on {subject} did not see probes from every server within 10 s");
        }
        for (i, c) in clients.iter().enumerate().filter(|(i, _)| !seen[*i]) {
            c.publish(subject.to_string(), i.to_string().into_bytes().into())
                .await
                .with_context(|| format!("cannot publish a probe through n{}", i + 1))?;
            c.flush()
                .await
                .with_context(|| format!("cannot flush the client of n{}", i + 1))?;
        }
        let round = Instant::now() + Duration::from_millis(200);
        while let Ok(Some(m)) = tokio::time::timeout_at(round.into(), sub.next()).await {
            if let Some(i) = std::str::from_utf8(&m.payload)
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
                .filter(|i| *i < seen.len())
            {
                seen[i] = true;
            }
        }
    }
    Ok(())
}

/// A QoS 0 run: core NATS publishes, a core subscription on the third server.
async fn core_run(clients: &[Client], run: usize, shape: Shape) -> anyhow::Result<RunStats> {
    let (count, publishers, size) = (shape.count, shape.publishers, shape.bytes);
    let filter = format!("core.{run}.>");
    let mut sub = clients[2]
        .subscribe(filter.clone())
        .await
        .with_context(|| format!("cannot subscribe to {filter}"))?;
    await_interest(clients, &mut sub, &format!("core.{run}.probe")).await?;
    let collector = collect_latencies(sub.map(|m| publish_time(&m)), count);
    let payload = vec![b'x'; size];
    let started = Instant::now();
    let all = clients[..shape.publishing(clients.len())].to_vec();
    publish_all(count, publishers, move |i, t| {
        let (client, payload) = (all[i % all.len()].clone(), payload.clone());
        async move {
            let mut headers = HeaderMap::new();
            headers.insert("t", t);
            client
                .publish_with_headers(format!("core.{run}.t{}", i % 8), headers, payload.into())
                .await
                .with_context(|| format!("core publish {i} failed"))
        }
    })
    .await?;
    for (i, c) in clients.iter().enumerate() {
        c.flush()
            .await
            .with_context(|| format!("cannot flush the client of n{}", i + 1))?;
    }
    let published = started.elapsed();
    let (lat, done) = collector.await.context("the subscriber task failed")?;
    Ok(RunStats::new(
        shape,
        count,
        published,
        lat,
        done.duration_since(started),
    ))
}

/// A QoS 1 run: JetStream publishes awaiting their PubAck, an ordered push consumer on the
/// third server.
async fn jetstream_run(
    clients: &[Client],
    js: &[jetstream::Context],
    run: usize,
    shape: Shape,
) -> anyhow::Result<RunStats> {
    let (count, publishers, size) = (shape.count, shape.publishers, shape.bytes);
    let filter = format!("bench.{run}.>");
    let stream = js[2]
        .get_stream(STREAM)
        .await
        .with_context(|| format!("cannot look up stream {STREAM}"))?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_subject: clients[2].new_inbox(),
            filter_subject: filter.clone(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .with_context(|| format!("cannot create an ordered consumer on {filter}"))?;
    let messages = consumer
        .messages()
        .await
        .with_context(|| format!("cannot read the ordered consumer on {filter}"))?;
    // An error item (a missed heartbeat, a consumer being recreated) is not an event.
    let collector = collect_latencies(
        messages.map(|m| m.ok().and_then(|m| publish_time(&m))),
        count,
    );
    let payload = vec![b'x'; size];
    let started = Instant::now();
    let all = js[..shape.publishing(js.len())].to_vec();
    publish_all(count, publishers, move |i, t| {
        let (all, payload) = (all.clone(), payload.clone());
        async move {
            let subject = format!("bench.{run}.t{}", i % 8);
            let mut headers = HeaderMap::new();
            headers.insert("t", t);
            headers.insert(async_nats::header::NATS_MESSAGE_ID, format!("b{run}-{i}"));
            // A failed publish is retried through the next server with the same message
            // id, so it is stored once.
            let mut attempt = 0usize;
            loop {
                let js = &all[(i + attempt) % all.len()];
                let acked = match js
                    .publish_with_headers(subject.clone(), headers.clone(), payload.clone().into())
                    .await
                {
                    Ok(ack) => ack.await.map(|_| ()),
                    Err(e) => Err(e),
                };
                match acked {
                    Ok(()) => return Ok(()),
                    Err(e) if attempt >= 20 => {
                        return Err(e).with_context(|| format!("publish {i} failed 21 times"));
                    }
                    Err(_) => attempt += 1,
                }
            }
        }
    })
    .await?;
    let published = started.elapsed();
    let (lat, done) = collector.await.context("the subscriber task failed")?;
    Ok(RunStats::new(
        shape,
        count,
        published,
        lat,
        done.duration_since(started),
    ))
}

/// `a / b`, or `None` when `b` is zero.
fn ratio(a: f64, b: f64) -> Option<f64> {
    (b != 0.0).then(|| a / b)
}

/// Prints canal's and NATS's figures side by side, run by run, with the ratio canal/NATS:
/// a table for people, or with `json` one object per run with `nats` and `ratio` members.
pub(crate) fn report(
    canal: &[RunStats],
    nats: &[RunStats],
    nats_version: &str,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        let runs: Vec<serde_json::Value> = canal
            .iter()
            .zip(nats)
            .map(|(c, n)| {
                let mut v = c.to_json();
                v["nats"] = n.to_json();
                v["ratio"] = serde_json::json!({
                    "published_per_s": ratio(c.published_per_s, n.published_per_s),
                    "delivered_per_s": ratio(c.delivered_per_s, n.delivered_per_s),
                    "p50": ratio(millis(c.p50), millis(n.p50)),
                    "p99": ratio(millis(c.p99), millis(n.p99)),
                    "p999": ratio(millis(c.p999), millis(n.p999)),
                });
                v
            })
            .collect();
        let out = serde_json::json!({ "nats_server": nats_version, "runs": runs });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let show_ratio = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}"));
    let mut t = table(&["RUN", "", "CANAL", "NATS", "CANAL/NATS"]);
    for (c, n) in canal.iter().zip(nats) {
        let run = c.shape.label();
        t.add_row(vec![
            run,
            "published/s".into(),
            format!("{:.0}", c.published_per_s),
            format!("{:.0}", n.published_per_s),
            show_ratio(ratio(c.published_per_s, n.published_per_s)),
        ]);
        t.add_row(vec![
            String::new(),
            "delivered/s".into(),
            format!("{:.0} ({})", c.delivered_per_s, c.delivered),
            format!("{:.0} ({})", n.delivered_per_s, n.delivered),
            show_ratio(ratio(c.delivered_per_s, n.delivered_per_s)),
        ]);
        for (name, a, b) in [
            ("p50", c.p50, n.p50),
            ("p99", c.p99, n.p99),
            ("p999", c.p999, n.p999),
        ] {
            t.add_row(vec![
                String::new(),
                name.into(),
                ms(a),
                ms(b),
                show_ratio(ratio(millis(a), millis(b))),
            ]);
        }
    }
    println!("canal vs {nats_version} (3 local servers; delivered/s with the count delivered)");
    println!("{t}");
    Ok(())
}

/// A table without borders, like the CLI's.
fn table(header: &[&str]) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_header(header.to_vec());
    t
}
