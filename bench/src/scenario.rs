//! `canal testnet scenario`: the README's demos run end to end against a running mesh, with
//! a non-zero exit when anything expected did not happen.
//!
//! ## `iot`
//!
//! ```text
//!  edge nodes                        the executor (placement's pick)        a cloud node
//!  publish sensors/RUN-K/temp ──────> trigger `alerts` runs `threshold` ───> alerts/temp
//!  (QoS 1, message ids,              state count/{topic}, mean/{topic}       SSE subscriber:
//!   round robin)                     emits an alert when value > threshold   each alert once?
//! ```
//!
//! 1. Finds the nodes: the running testnet's (tiers `edge` and `cloud`), or `--api-edge` and
//!    `--api-cloud`; waits until each is ready.
//! 2. Deploys the `threshold` example function and makes sure trigger `alerts` binds
//!    `sensors/+/temp` to it with output `alerts/temp` (kept if it is already so, else
//!    replaced).
//! 3. Subscribes to `alerts/temp` on a cloud node, then publishes the readings: values that
//!    follow a fixed pattern, about a third above the threshold, on topics named after this
//!    run so that earlier runs and their state do not count.
//! 4. Checks that exactly the expected alerts arrive, each once (an alert names its input
//!    event in its `canal-source` header), that each alert's value is its reading's, and that
//!    the function's state `count/{topic}` on every cloud node is the number of readings.
//!
//! Every wait has a deadline (`--timeout`); a failure names what was missing.

use anyhow::{Context, anyhow, bail};
use canal_client::{Client, Method, StatusCode, encode_path, encode_segment};
use canal_proto::api::{Event, Published};
use canal_proto::function::{Deployed, FunctionSpec, TriggerRequest, TriggerSpec};
use canal_proto::time::now_ms;
use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Where the guest workspace puts the threshold function.
pub const DEFAULT_WASM: &str = "examples/functions/target/wasm32-wasip2/release/threshold.wasm";
const FUNCTION: &str = "threshold";
const TRIGGER: &str = "alerts";
const FILTER: &str = "sensors/+/temp";
const OUT: &str = "alerts/temp";
/// The threshold the function uses when neither a header nor its state sets one.
const DEFAULT_THRESHOLD: f64 = 30.0;
/// How often a deadline loop looks again.
const POLL: Duration = Duration::from_millis(100);
/// How long to keep listening after the last expected alert, for duplicates.
const SETTLE: Duration = Duration::from_secs(1);
/// A deploy compiles on the node: it may take longer than other requests.
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(120);

/// What `canal testnet scenario iot` runs with (the CLI checks the ranges).
#[derive(Debug, Clone)]
pub struct IotOptions {
    /// The threshold function's component.
    pub wasm: PathBuf,
    /// How many readings to publish.
    pub events: u64,
    /// How many sensors (topics) the readings come from.
    pub sensors: u64,
    /// API URLs of edge nodes instead of the testnet's (with `api_cloud`).
    pub api_edge: Vec<String>,
    /// API URLs of cloud nodes instead of the testnet's (with `api_edge`).
    pub api_cloud: Vec<String>,
    /// The longest any one step may wait, in seconds.
    pub timeout: u64,
    /// Names this run's topics (`sensors/RUN-K/temp`); a fresh one when `None`.
    pub run_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reading {
    /// Its place in the run, from 0.
    index: u64,
    /// `sensors/{run}-{k}/temp`.
    topic: String,
    /// The payload: a decimal such as `31.4`.
    value: String,
    /// Its message id: `{run}-{index}`.
    id: String,
}

/// Reading `i`'s value: 20.0 to 34.9 in steps of 0.1, in a fixed order that visits every
/// value once in 150 readings (37 and 150 are coprime), so about a third are above 30.
fn value(i: u64) -> f64 {
    20.0 + ((i * 37) % 150) as f64 / 10.0
}

/// The readings of run `run`: `events` of them, round robin over `sensors` topics.
pub(crate) fn readings(run: &str, sensors: u64, events: u64) -> Vec<Reading> {
    (0..events)
        .map(|i| Reading {
            index: i,
            topic: format!("sensors/{run}-{}/temp", i % sensors),
            value: format!("{:.1}", value(i)),
            id: format!("{run}-{i}"),
        })
        .collect()
}

/// What the threshold function must do with a run's readings.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Expected {
    /// The readings that must fire an alert, by index.
    alerts: BTreeSet<u64>,
    /// `count/{topic}` after the run, by topic.
    counts: BTreeMap<String, u64>,
}

/// The alerts and counts `readings` must give with `threshold`, computed as the function
/// does: the payload read as a number, an alert when it is above the threshold.
pub(crate) fn expected(readings: &[Reading], threshold: f64) -> Expected {
    let mut e = Expected {
        alerts: BTreeSet::new(),
        counts: BTreeMap::new(),
    };
    for r in readings {
        *e.counts.entry(r.topic.clone()).or_default() += 1;
        if r.value.parse::<f64>().is_ok_and(|v| v > threshold) {
            e.alerts.insert(r.index);
        }
    }
    e
}

/// The `p`-th percentile (0-100) of `sorted`, nearest rank.
fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// An output's `canal-source` header, `{topic}:{offset}`.
fn parse_source(s: &str) -> Option<(&str, u64)> {
    let (topic, offset) = s.rsplit_once(':')?;
    Some((topic, offset.parse().ok()?))
}

/// The tier a testnet node was started with, from its command line.
fn tier_of(args: &[String]) -> Option<&str> {
    args.iter()
        .position(|a| a == "--tier")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// The alerts seen so far, against those expected.
#[derive(Debug, Default)]
struct Tally {
    expected: BTreeSet<u64>,
    /// How often each reading's alert arrived.
    seen: BTreeMap<u64, u32>,
    /// Latency of each expected alert's first arrival.
    latencies: Vec<Duration>,
    /// Problems with alerts: unexpected ones, wrong values, duplicates.
    problems: Vec<String>,
    /// Alerts on the output topic that came from other runs or publishers.
    foreign: u64,
}

impl Tally {
    fn new(expected: BTreeSet<u64>) -> Tally {
        Tally {
            expected,
            ..Tally::default()
        }
    }

    /// Records the alert for reading `index`, which arrived `latency` after its publish.
    fn record(&mut self, index: u64, latency: Duration) {
        let n = self.seen.entry(index).or_default();
        *n += 1;
        if !self.expected.contains(&index) {
            if *n == 1 {
                self.problems
                    .push(format!("reading {index} fired an alert it should not have"));
            }
        } else if *n == 2 {
            self.problems.push(format!(
                "the alert of reading {index} arrived more than once"
            ));
        } else if *n == 1 {
            self.latencies.push(latency);
        }
    }

    fn received(&self) -> usize {
        self.expected
            .iter()
            .filter(|i| self.seen.contains_key(i))
            .count()
    }

    fn missing(&self) -> Vec<u64> {
        self.expected
            .iter()
            .filter(|i| !self.seen.contains_key(i))
            .copied()
            .collect()
    }

    fn duplicates(&self) -> usize {
        self.seen.values().filter(|n| **n > 1).count()
    }

    fn unexpected(&self) -> usize {
        self.seen
            .keys()
            .filter(|i| !self.expected.contains(i))
            .count()
    }
}

/// The nodes a scenario runs against.
struct Nodes {
    edge: Vec<String>,
    cloud: Vec<String>,
}

/// The edge and cloud nodes of the running testnet in `dir`.
fn testnet_nodes(dir: &Path) -> anyhow::Result<Nodes> {
    let all = canal_testnet::cluster::list(dir);
    if all.is_empty() {
        bail!(
            "no testnet in {}: start one with `canal testnet up --tiers edge=3,cloud=2`, or give \
             --api-edge and --api-cloud",
            dir.display()
        );
    }
    let mut nodes = Nodes {
        edge: Vec::new(),
        cloud: Vec::new(),
    };
    let mut tiers = BTreeSet::new();
    for n in &all {
        let Some(info) = &n.info else {
            eprintln!("{} is not running; going on without it", n.name);
            continue;
        };
        let args: Vec<String> = std::fs::read_to_string(n.dir.join("args.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let tier = tier_of(&args).unwrap_or("default").to_string();
        match tier.as_str() {
            "edge" => nodes.edge.push(info.api.clone()),
            "cloud" => nodes.cloud.push(info.api.clone()),
            _ => {}
        }
        tiers.insert(tier);
    }
    if nodes.edge.is_empty() || nodes.cloud.is_empty() {
        bail!(
            "the iot scenario needs running nodes of tiers edge and cloud; the testnet in {} has {}: \
             start one with `canal testnet down && canal testnet up --tiers edge=3,cloud=2`",
            dir.display(),
            if tiers.is_empty() {
                "none running".to_string()
            } else {
                format!("tiers {}", tiers.into_iter().collect::<Vec<_>>().join(", "))
            }
        );
    }
    Ok(nodes)
}

/// `1 sensor`, `4 sensors`.
fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// The error a node answered with, for messages.
fn answer(status: StatusCode, body: &[u8]) -> String {
    let text = serde_json::from_slice::<canal_proto::api::ErrorBody>(body)
        .map(|b| b.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_string());
    format!("{text} (HTTP {status})")
}

/// A request that is tried again while the node answers 5xx (no leader yet, a replica
/// behind, a leader that lost its quorum) or cannot be reached, until `deadline`; any other
/// answer is returned. Every request the scenario retries is idempotent: publishes carry
/// message ids, a deploy of the same module is the same, a trigger added twice is refused.
async fn retrying(
    client: &Client,
    method: Method,
    path: &str,
    body: &[u8],
    headers: &[(String, String)],
    deadline: Instant,
) -> anyhow::Result<(StatusCode, Vec<u8>)> {
    retrying_counted(client, method, path, body, headers, deadline)
        .await
        .map(|(s, b, _)| (s, b))
}

/// [`retrying`], also saying how many tries it took.
async fn retrying_counted(
    client: &Client,
    method: Method,
    path: &str,
    body: &[u8],
    headers: &[(String, String)],
    deadline: Instant,
) -> anyhow::Result<(StatusCode, Vec<u8>, u32)> {
    let mut tries = 0;
    loop {
        tries += 1;
        let last = match client
            .raw(method.clone(), path, body.to_vec(), headers)
            .await
        {
            Ok((s, b)) if !s.is_server_error() => return Ok((s, b, tries)),
            Ok((s, b)) => answer(s, &b),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "{method} {}{path} did not succeed before the deadline: {last}",
                client.base()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `check` on every node until it holds on all, or fails at `deadline` naming the
/// nodes where it did not and what they last said.
async fn on_every_node<F, Fut>(
    what: &str,
    clients: &[Client],
    deadline: Instant,
    mut check: F,
) -> anyhow::Result<()>
where
    F: FnMut(Client) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut pending: Vec<usize> = (0..clients.len()).collect();
    loop {
        let mut still = Vec::new();
        let mut last = Vec::new();
        for i in pending {
            if let Err(e) = check(clients[i].clone()).await {
                last.push(format!("{}: {e}", clients[i].base()));
                still.push(i);
            }
        }
        if still.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out waiting for {what}; {}", last.join("; "));
        }
        pending = still;
        tokio::time::sleep(POLL).await;
    }
}

/// What the subscriber task hands the checker.
enum Sub {
    Event(Instant, Box<Event>),
    Broken(String),
}

/// Subscribes to `OUT` on `base` from now on; returns once the node answered with the
/// stream, and hands each event to `tx` from a task of its own.
async fn subscribe(
    base: &str,
    token: Option<&str>,
    deadline: Instant,
    tx: mpsc::UnboundedSender<Sub>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let client = Client::streaming(base, token)?;
    let path = format!(
        "/v1/subscribe?filter={}&qos=1&from=latest",
        encode_segment(OUT)
    );
    let left = deadline.saturating_duration_since(Instant::now());
    let resp = tokio::time::timeout(left, client.stream(&path))
        .await
        .map_err(|_| anyhow!("{base} did not answer the subscription to {OUT} in time"))?
        .with_context(|| format!("cannot subscribe to {OUT} on {base}"))?;
    Ok(tokio::spawn(async move {
        let mut events = std::pin::pin!(canal_client::sse_events(resp));
        while let Some(ev) = events.next().await {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    let _ = tx.send(Sub::Broken(format!("the subscription stream broke: {e}")));
                    return;
                }
            };
            let at = Instant::now();
            let (event, data) = (ev.event, ev.data);
            if event != "message" {
                let _ = tx.send(Sub::Broken(format!(
                    "the subscription reported {event}: {data}"
                )));
                continue;
            }
            match serde_json::from_str::<Event>(&data) {
                Ok(e) => {
                    let _ = tx.send(Sub::Event(at, Box::new(e)));
                }
                Err(e) => {
                    let _ = tx.send(Sub::Broken(format!("a bad event ({e}): {data}")));
                }
            }
        }
        let _ = tx.send(Sub::Broken("the node closed the subscription".into()));
    }))
}

/// A reading as published: where it landed and when it was sent.
struct Sent {
    index: u64,
    at: Instant,
    value: f64,
}

/// The checker's view of one alert event: which reading it is for, or why it is not one of
/// this run's.
fn classify(
    e: &Event,
    sent: &HashMap<(String, u64), Sent>,
    topics: &BTreeSet<String>,
) -> Result<Option<(u64, Instant)>, String> {
    let Some(source) = e.headers.get("canal-source") else {
        return Ok(None);
    };
    let Some((topic, offset)) = parse_source(source) else {
        return Ok(None);
    };
    if !topics.contains(topic) {
        return Ok(None);
    }
    let Some(s) = sent.get(&(topic.to_string(), offset)) else {
        return Err(format!(
            "an alert names {source} as its input, which this run did not publish"
        ));
    };
    // The alert says which reading fired it: it must be this one.
    let body: serde_json::Value = e
        .data
        .as_deref()
        .and_then(|d| serde_json::from_str(d).ok())
        .unwrap_or_default();
    let value = body.get("value").and_then(|v| v.as_f64());
    let alert_topic = body.get("topic").and_then(|v| v.as_str());
    if alert_topic != Some(topic) || value != Some(s.value) {
        return Err(format!(
            "the alert for reading {} ({topic} = {}) says {}",
            s.index,
            s.value,
            e.data.as_deref().unwrap_or("nothing")
        ));
    }
    Ok(Some((s.index, s.at)))
}

/// Runs the IoT scenario against the testnet in `dir`, or the nodes `a` names.
pub async fn iot(a: IotOptions, dir: &Path, json: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let step = Duration::from_secs(a.timeout);
    // A persistent testnet keeps its admin token with it (`canal testnet up` wrote it).
    let token = std::env::var("CANAL_TOKEN").ok().or_else(|| {
        let kept = dir.join(canal_testnet::auth::ADMIN_TOKEN_FILE);
        std::fs::read_to_string(kept)
            .ok()
            .map(|t| t.trim().to_string())
    });
    let token = token.as_deref();
    let nodes = if a.api_edge.is_empty() {
        testnet_nodes(dir)?
    } else {
        Nodes {
            edge: a.api_edge.clone(),
            cloud: a.api_cloud.clone(),
        }
    };
    let wasm = std::fs::read(&a.wasm).map_err(|e| {
        anyhow!(
            "cannot read the threshold function at {}: {e}; build it with \
             `cd examples/functions && cargo build --release --target wasm32-wasip2`, or give \
             its path with --wasm",
            a.wasm.display()
        )
    })?;
    let run = a
        .run_id
        .clone()
        .unwrap_or_else(|| format!("run{}", now_ms()));
    let edges: Vec<Client> = nodes
        .edge
        .iter()
        .map(|u| Client::new(u, token))
        .collect::<Result<_, _>>()?;
    let clouds: Vec<Client> = nodes
        .cloud
        .iter()
        .map(|u| Client::new(u, token))
        .collect::<Result<_, _>>()?;
    let all: Vec<Client> = nodes
        .edge
        .iter()
        .chain(&nodes.cloud)
        .map(|u| Client::new(u, token))
        .collect::<Result<_, _>>()?;
    eprintln!(
        "iot scenario {run}: {} ({}), {} ({})",
        count(nodes.edge.len(), "edge node"),
        nodes.edge.join(", "),
        count(nodes.cloud.len(), "cloud node"),
        nodes.cloud.join(", ")
    );

    // 1. Every node answers and is ready.
    on_every_node(
        "every node to be ready (GET /v1/health)",
        &all,
        Instant::now() + step,
        |c| async move {
            match c.raw(Method::GET, "/v1/health", Vec::new(), &[]).await {
                Ok((StatusCode::OK, _)) => Ok(()),
                Ok((s, b)) => Err(answer(s, &b)),
                Err(e) => Err(format!("{e:#}")),
            }
        },
    )
    .await?;
    eprintln!("all {} nodes are ready", all.len());

    // 2. The function, on every node's replica.
    let control = &clouds[0];
    deploy(control, &all, &wasm, &a.wasm, token, step).await?;

    // 3. The trigger: kept if it already binds what this scenario needs, else replaced.
    ensure_trigger(control, &all, step).await?;

    // The threshold: the function's state may set one; else its default.
    let (s, b) = retrying(
        control,
        Method::GET,
        &format!("/v1/functions/{FUNCTION}/state/config/threshold"),
        &[],
        &[],
        Instant::now() + step,
    )
    .await?;
    let threshold = match s {
        StatusCode::OK => String::from_utf8_lossy(&b)
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|t| t.is_finite())
            .unwrap_or(DEFAULT_THRESHOLD),
        _ => DEFAULT_THRESHOLD,
    };
    let readings = readings(&run, a.sensors, a.events);
    let want = expected(&readings, threshold);
    let topics: BTreeSet<String> = want.counts.keys().cloned().collect();
    eprintln!(
        "threshold {threshold}: {} on {} should fire {}",
        count(readings.len(), "reading"),
        count(topics.len(), "sensor"),
        count(want.alerts.len(), "alert")
    );

    // 4. The subscriber, on the last cloud node.
    let sub_node = nodes.cloud[nodes.cloud.len() - 1].clone();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sub_task = subscribe(&sub_node, token, Instant::now() + step, tx).await?;
    let _abort = AbortOnDrop(sub_task);
    eprintln!("subscribed to {OUT} on {sub_node}");

    // 5. The readings, round robin over the edge nodes.
    let mut tally = Tally::new(want.alerts.clone());
    let mut sent: HashMap<(String, u64), Sent> = HashMap::new();
    let mut pending: Vec<(Instant, Box<Event>)> = Vec::new();
    let publish_start = Instant::now();
    for r in &readings {
        let node = &edges[r.index as usize % edges.len()];
        let path = format!("/v1/topics/{}/events", encode_segment(&r.topic));
        let headers = [
            ("canal-qos".to_string(), "1".to_string()),
            ("canal-id".to_string(), r.id.clone()),
        ];
        let at = Instant::now();
        let (s, b, tries) = retrying_counted(
            node,
            Method::POST,
            &path,
            r.value.as_bytes(),
            &headers,
            at + step,
        )
        .await
        .with_context(|| format!("publishing reading {} ({})", r.index, r.id))?;
        if !s.is_success() {
            bail!(
                "{} refused reading {} on {}: {}",
                node.base(),
                r.id,
                r.topic,
                answer(s, &b)
            );
        }
        let p: Published = serde_json::from_slice(&b)
            .context("the publish answer is not what this canal expects")?;
        // A retried publish may find its first try stored; a first try may not.
        if p.duplicate && tries == 1 {
            bail!(
                "reading {} was taken as a duplicate: run {run} published before; leave out \
                 --run-id or give a fresh one",
                r.id
            );
        }
        let offset = p
            .offset
            .ok_or_else(|| anyhow!("the QoS 1 publish of {} got no offset", r.id))?;
        sent.insert(
            (r.topic.clone(), offset),
            Sent {
                index: r.index,
                at,
                value: r.value.parse().unwrap_or(f64::NAN),
            },
        );
        // Alerts of readings already sent may be here: keep them until the end of the
        // publishing, so their inputs are all known.
        while let Ok(m) = rx.try_recv() {
            match m {
                Sub::Event(t, e) => pending.push((t, e)),
                Sub::Broken(why) => bail!("on {sub_node}: {why}"),
            }
        }
        let n = r.index + 1;
        if n % 50 == 0 || n == a.events {
            eprintln!(
                "published {n}/{} readings on {}",
                a.events,
                count(edges.len(), "edge node")
            );
        }
    }
    let published_in = publish_start.elapsed();

    // 6. The alerts: all expected, each once, then a moment more for late duplicates.
    let take = |t: Instant, e: &Event, tally: &mut Tally| match classify(e, &sent, &topics) {
        Ok(Some((index, at))) => tally.record(index, t.saturating_duration_since(at)),
        Ok(None) => tally.foreign += 1,
        Err(problem) => tally.problems.push(problem),
    };
    for (t, e) in pending.drain(..) {
        take(t, &e, &mut tally);
    }
    let deadline = Instant::now() + step;
    let mut broken = None;
    let mut last_report = Instant::now();
    while tally.received() < want.alerts.len() && broken.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left.min(POLL * 10), rx.recv()).await {
            Ok(Some(Sub::Event(t, e))) => take(t, &e, &mut tally),
            Ok(Some(Sub::Broken(why))) => broken = Some(why),
            Ok(None) => broken = Some("the subscriber stopped".into()),
            Err(_) => {}
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            eprintln!("{}/{} alerts so far", tally.received(), want.alerts.len());
            last_report = Instant::now();
        }
    }
    if broken.is_none() {
        let settle = Instant::now() + SETTLE;
        loop {
            let left = settle.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(Sub::Event(t, e))) => take(t, &e, &mut tally),
                Ok(Some(Sub::Broken(why))) => {
                    broken = Some(why);
                    break;
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
    eprintln!(
        "{}/{} alerts received on {sub_node}",
        tally.received(),
        want.alerts.len()
    );

    // 7. The function's state on every cloud node: count/{topic} is the number of readings.
    let state_problems = check_state(&clouds, &want.counts, step).await;

    // 8. The summary, then the verdict.
    let mut lat = tally.latencies.clone();
    lat.sort();
    let (p50, p99, max) = (
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        lat.last().copied(),
    );
    let missing = tally.missing();
    let mut failures: Vec<String> = Vec::new();
    if let Some(why) = &broken {
        failures.push(format!("the subscriber on {sub_node} failed: {why}"));
    }
    if !missing.is_empty() {
        let ids: Vec<String> = missing
            .iter()
            .take(5)
            .map(|i| format!("{run}-{i}"))
            .collect();
        failures.push(format!(
            "{} of {} expected alerts did not arrive within {}s (readings {}{})",
            missing.len(),
            want.alerts.len(),
            a.timeout,
            ids.join(", "),
            if missing.len() > 5 { ", ..." } else { "" }
        ));
    }
    failures.extend(tally.problems.iter().take(10).cloned());
    failures.extend(state_problems);
    let ok = failures.is_empty();
    if json {
        let lat_ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
        let out = serde_json::json!({
            "scenario": "iot",
            "run": run,
            "ok": ok,
            "edge_nodes": nodes.edge,
            "cloud_nodes": nodes.cloud,
            "subscriber": sub_node,
            "threshold": threshold,
            "events_published": readings.len(),
            "publish_seconds": published_in.as_secs_f64(),
            "alerts_expected": want.alerts.len(),
            "alerts_received": tally.received(),
            "alerts_duplicated": tally.duplicates(),
            "alerts_unexpected": tally.unexpected(),
            "alerts_other_runs": tally.foreign,
            "latency_ms": {"p50": lat_ms(p50), "p99": lat_ms(p99), "max": lat_ms(max)},
            "seconds": started.elapsed().as_secs_f64(),
            "failures": failures,
        });
        println!("{out}");
    } else {
        let opt = |d: Option<Duration>| d.map(ms).unwrap_or_else(|| "-".into());
        println!("iot scenario {run}");
        println!(
            "  published  {} from {} on {} in {:.2} s (QoS 1)",
            count(readings.len(), "reading"),
            count(topics.len(), "sensor"),
            count(edges.len(), "edge node"),
            published_in.as_secs_f64()
        );
        println!(
            "  alerts     {}/{} received on {sub_node} (threshold {threshold}); {} duplicated, \
             {} unexpected",
            tally.received(),
            want.alerts.len(),
            tally.duplicates(),
            tally.unexpected()
        );
        println!(
            "  latency    publish -> alert: p50 {}, p99 {}, max {}",
            opt(p50),
            opt(p99),
            opt(max)
        );
        println!(
            "  total      {:.1} s; {}",
            started.elapsed().as_secs_f64(),
            if ok { "ok" } else { "FAILED" }
        );
    }
    if !ok {
        bail!("the iot scenario failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

/// Deploys the function through `control` and waits until every node has it.
async fn deploy(
    control: &Client,
    all: &[Client],
    wasm: &[u8],
    wasm_path: &Path,
    token: Option<&str>,
    step: Duration,
) -> anyhow::Result<()> {
    let deployer = Client::with_timeout(control.base(), token, DEPLOY_TIMEOUT)?;
    let (s, b) = retrying(
        &deployer,
        Method::PUT,
        &format!("/v1/functions/{FUNCTION}"),
        wasm,
        &[],
        Instant::now() + step,
    )
    .await?;
    if !s.is_success() {
        bail!(
            "{} refused the deploy of {}: {}",
            control.base(),
            wasm_path.display(),
            answer(s, &b)
        );
    }
    let deployed: Deployed =
        serde_json::from_slice(&b).context("the deploy answer is not what this canal expects")?;
    let hash = deployed.function.hash.clone();
    eprintln!(
        "deployed {FUNCTION} ({} bytes, hash {}…, compiled in {:.0} ms)",
        deployed.function.size,
        &hash[..hash.len().min(8)],
        deployed.compile_ms
    );
    on_every_node(
        "every node to have the function",
        all,
        Instant::now() + step,
        |c| {
            let hash = hash.clone();
            async move {
                match c
                    .raw(
                        Method::GET,
                        &format!("/v1/functions/{FUNCTION}"),
                        Vec::new(),
                        &[],
                    )
                    .await
                {
                    Ok((StatusCode::OK, b)) => match serde_json::from_slice::<FunctionSpec>(&b) {
                        Ok(f) if f.hash == hash => Ok(()),
                        Ok(f) => Err(format!("still has module {}", f.hash)),
                        Err(e) => Err(format!("a bad answer: {e}")),
                    },
                    Ok((s, b)) => Err(answer(s, &b)),
                    Err(e) => Err(format!("{e:#}")),
                }
            }
        },
    )
    .await?;
    Ok(())
}

/// Makes sure trigger `alerts` runs the function on `sensors/+/temp` with output
/// `alerts/temp`: kept if it already does, else (re)added through `control`; then waits until
/// every node has it.
async fn ensure_trigger(control: &Client, all: &[Client], step: Duration) -> anyhow::Result<()> {
    let trigger_path = format!("/v1/triggers/{TRIGGER}");
    let (s, b) = retrying(
        control,
        Method::GET,
        &trigger_path,
        &[],
        &[],
        Instant::now() + step,
    )
    .await?;
    let existing: Option<TriggerSpec> = match s {
        StatusCode::OK => Some(
            serde_json::from_slice(&b)
                .context("the trigger answer is not what this canal expects")?,
        ),
        StatusCode::NOT_FOUND => None,
        _ => bail!("cannot read trigger {TRIGGER}: {}", answer(s, &b)),
    };
    let wanted = |t: &TriggerSpec| {
        t.filter.as_str() == FILTER
            && t.function == FUNCTION
            && t.out.as_ref().map(|o| o.as_str()) == Some(OUT)
            && t.qos == 1
    };
    let uid = match existing {
        Some(t) if wanted(&t) => {
            eprintln!("trigger {TRIGGER} already runs {FUNCTION} on {FILTER} -> {OUT}; keeping it");
            t.uid
        }
        other => {
            if let Some(t) = other {
                eprintln!(
                    "trigger {TRIGGER} exists with other settings ({} -> {} -> {}, qos {}); \
                 replacing it",
                    t.filter,
                    t.function,
                    t.out.as_ref().map(|o| o.as_str()).unwrap_or("no output"),
                    t.qos
                );
                let (s, b) = retrying(
                    control,
                    Method::DELETE,
                    &trigger_path,
                    &[],
                    &[],
                    Instant::now() + step,
                )
                .await?;
                if !s.is_success() && s != StatusCode::NOT_FOUND {
                    bail!("cannot remove trigger {TRIGGER}: {}", answer(s, &b));
                }
                // The old one must be gone everywhere before the new one may fire.
                let path = trigger_path.clone();
                on_every_node(
                    "every node to drop the old trigger",
                    all,
                    Instant::now() + step,
                    |c| {
                        let path = path.clone();
                        async move {
                            match c.raw(Method::GET, &path, Vec::new(), &[]).await {
                                Ok((StatusCode::NOT_FOUND, _)) => Ok(()),
                                Ok((s, _)) => Err(format!("still answers {s}")),
                                Err(e) => Err(format!("{e:#}")),
                            }
                        }
                    },
                )
                .await?;
            }
            let req = TriggerRequest {
                on: FILTER.into(),
                function: FUNCTION.into(),
                out: Some(OUT.into()),
                qos: Some(1),
                retries: None,
                dead_letter: None,
            };
            let body = serde_json::to_vec(&req)?;
            let headers = [("content-type".to_string(), "application/json".to_string())];
            let deadline = Instant::now() + step;
            let spec: TriggerSpec = loop {
                let (s, b) = retrying(
                    control,
                    Method::PUT,
                    &trigger_path,
                    &body,
                    &headers,
                    deadline,
                )
                .await?;
                if s.is_success() {
                    break serde_json::from_slice(&b)
                        .context("the trigger answer is not what this canal expects")?;
                }
                // A retried add may find its first try committed.
                if s == StatusCode::CONFLICT
                    && let Ok((StatusCode::OK, b)) = control
                        .raw(Method::GET, &trigger_path, Vec::new(), &[])
                        .await
                    && let Ok(t) = serde_json::from_slice::<TriggerSpec>(&b)
                    && wanted(&t)
                {
                    break t;
                }
                // The control node's replica may not have applied the deploy or the removal
                // yet: 400 unknown_function and 409 exists pass.
                if (s == StatusCode::CONFLICT || s == StatusCode::BAD_REQUEST)
                    && Instant::now() < deadline
                {
                    tokio::time::sleep(POLL).await;
                    continue;
                }
                bail!("cannot add trigger {TRIGGER}: {}", answer(s, &b));
            };
            eprintln!("added trigger {TRIGGER}: {FILTER} -> {FUNCTION} -> {OUT}");
            spec.uid
        }
    };
    let path = trigger_path.clone();
    on_every_node(
        "every node to have the trigger",
        all,
        Instant::now() + step,
        |c| {
            let (path, uid) = (path.clone(), uid.clone());
            async move {
                match c.raw(Method::GET, &path, Vec::new(), &[]).await {
                    Ok((StatusCode::OK, b)) => match serde_json::from_slice::<TriggerSpec>(&b) {
                        Ok(t) if t.uid == uid => Ok(()),
                        Ok(_) => Err("has another trigger of that name".into()),
                        Err(e) => Err(format!("a bad answer: {e}")),
                    },
                    Ok((s, b)) => Err(answer(s, &b)),
                    Err(e) => Err(format!("{e:#}")),
                }
            }
        },
    )
    .await?;
    Ok(())
}

/// Checks the function's `count/{topic}` on every cloud node is `counts[topic]`, waiting for
/// the trigger to catch up until `step` has passed; returns what was wrong.
async fn check_state(
    clouds: &[Client],
    counts: &BTreeMap<String, u64>,
    step: Duration,
) -> Vec<String> {
    let state_deadline = Instant::now() + step;
    let mut state_problems = Vec::new();
    for c in clouds {
        for (topic, n) in counts {
            let path = format!(
                "/v1/functions/{FUNCTION}/state/{}",
                encode_path(&format!("count/{topic}"))
            );
            let have = loop {
                let have = match c.raw(Method::GET, &path, Vec::new(), &[]).await {
                    Ok((StatusCode::OK, b)) => String::from_utf8_lossy(&b).trim().to_string(),
                    Ok((StatusCode::NOT_FOUND, _)) => "nothing".to_string(),
                    Ok((s, b)) => answer(s, &b),
                    Err(e) => format!("{e:#}"),
                };
                // Counts only grow: more than the readings is final.
                let done = have == n.to_string() || have.parse::<u64>().is_ok_and(|h| h > *n);
                if done || Instant::now() >= state_deadline {
                    break have;
                }
                tokio::time::sleep(POLL).await;
            };
            if have != n.to_string() {
                state_problems.push(format!(
                    "{FUNCTION}'s count/{topic} on {} is {have}, not {n}",
                    c.base()
                ));
            }
        }
    }
    if state_problems.is_empty() {
        eprintln!(
            "state count/{{topic}} is right for {} on {}",
            count(counts.len(), "sensor"),
            count(clouds.len(), "cloud node")
        );
    }
    state_problems
}

/// Aborts the task when dropped, so no subscriber outlives the scenario.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_deterministic_and_spread() {
        let r = readings("r1", 4, 200);
        assert_eq!(r, readings("r1", 4, 200));
        assert_eq!(r.len(), 200);
        assert_eq!(r[0].topic, "sensors/r1-0/temp");
        assert_eq!(r[5].topic, "sensors/r1-1/temp");
        assert_eq!(r[5].id, "r1-5");
        assert_eq!(r[0].value, "20.0");
        assert_eq!(r[3].value, "31.1");
        for x in &r {
            canal_proto::Topic::new(&x.topic).unwrap();
            let v: f64 = x.value.parse().unwrap();
            assert!((20.0..35.0).contains(&v), "{v}");
        }
        // Every value once in 150 readings.
        let distinct: BTreeSet<&str> = r[..150].iter().map(|x| x.value.as_str()).collect();
        assert_eq!(distinct.len(), 150);
    }

    #[test]
    fn expected_alerts_are_the_readings_above_the_threshold() {
        let r = readings("r", 3, 150);
        let e = expected(&r, 30.0);
        // 30.1 to 34.9: 49 values above 30 in each 150 readings; 30.0 itself is not above.
        assert_eq!(e.alerts.len(), 49);
        assert!(
            e.alerts
                .iter()
                .all(|i| r[*i as usize].value.parse::<f64>().unwrap() > 30.0)
        );
        assert_eq!(e.counts.len(), 3);
        assert_eq!(e.counts.values().sum::<u64>(), 150);
        assert_eq!(e.counts["sensors/r-0/temp"], 50);
        assert!(expected(&r, 40.0).alerts.is_empty());
        assert_eq!(expected(&r, 0.0).alerts.len(), 150);
        let default = expected(&readings("r", 4, 200), DEFAULT_THRESHOLD);
        assert!(default.alerts.len() > 50 && default.alerts.len() < 80);
    }

    #[test]
    fn the_tally_finds_missing_duplicate_and_unexpected_alerts() {
        let mut t = Tally::new(BTreeSet::from([1, 2, 3]));
        t.record(1, Duration::from_millis(5));
        t.record(2, Duration::from_millis(7));
        assert_eq!(t.received(), 2);
        assert_eq!(t.missing(), [3]);
        assert!(t.problems.is_empty());
        t.record(2, Duration::from_millis(9));
        t.record(2, Duration::from_millis(9));
        t.record(7, Duration::from_millis(1));
        assert_eq!(t.duplicates(), 1);
        assert_eq!(t.unexpected(), 1);
        assert_eq!(t.problems.len(), 2, "{:?}", t.problems);
        assert_eq!(t.latencies.len(), 2);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&d, 50.0), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&d, 99.0), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&d, 100.0), Some(Duration::from_millis(100)));
        assert_eq!(percentile(&d[..1], 99.0), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn sources_and_tiers() {
        assert_eq!(
            parse_source("sensors/r-1/temp:17"),
            Some(("sensors/r-1/temp", 17))
        );
        assert_eq!(parse_source("sensors/r-1/temp"), None);
        let args: Vec<String> = ["node", "--tier", "edge", "--gpu", "x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(tier_of(&args), Some("edge"));
        assert_eq!(tier_of(&args[..2]), None);
        assert_eq!(count(1, "cloud node"), "1 cloud node");
        assert_eq!(count(3, "edge node"), "3 edge nodes");
    }

    #[test]
    fn alerts_are_matched_to_their_readings() {
        let mut sent = HashMap::new();
        let at = Instant::now();
        sent.insert(
            ("sensors/r-0/temp".to_string(), 4),
            Sent {
                index: 8,
                at,
                value: 31.5,
            },
        );
        let topics = BTreeSet::from(["sensors/r-0/temp".to_string()]);
        let event = |source: &str, data: &str| -> Event {
            serde_json::from_value(serde_json::json!({
                "specversion": "1.0", "id": "x", "source": "s", "type": "canal.event",
                "time": "t", "datacontenttype": "text/plain", "data": data,
                "topic": OUT, "qos": 1, "headers": {"canal-source": source},
            }))
            .unwrap()
        };
        let good = r#"{"topic":"sensors/r-0/temp","value":31.5,"mean":25,"threshold":30}"#;
        assert_eq!(
            classify(&event("sensors/r-0/temp:4", good), &sent, &topics),
            Ok(Some((8, at)))
        );
        // Another run's alert is not counted.
        assert_eq!(
            classify(&event("sensors/old-0/temp:4", good), &sent, &topics),
            Ok(None)
        );
        // An input this run never published, or a wrong value, is a failure.
        assert!(classify(&event("sensors/r-0/temp:5", good), &sent, &topics).is_err());
        let wrong = r#"{"topic":"sensors/r-0/temp","value":20,"mean":25,"threshold":30}"#;
        assert!(classify(&event("sensors/r-0/temp:4", wrong), &sent, &topics).is_err());
    }
}
