//! `canal fn`, `canal trigger` and `canal state`: functions, the triggers that run them and
//! the state they keep, through a node's HTTP API.

use crate::client::{Client, UsageError, encode_path, encode_segment};
use crate::pubsub_cmd::{parse_filter, parse_header, parse_qos, parse_topic};
use crate::show;
use anyhow::{Context, bail};
use base64::Engine;
use canal_proto::api::{PlacementAnswer, StateList};
use canal_proto::function::{
    Deployed, FunctionList, InvokeResult, Limits, MAX_MODULE_BYTES, MAX_RETRIES, MAX_TIMEOUT_MS,
    Requirements, TriggerList, TriggerRequest, TriggerSpec, check_function_name,
    check_trigger_name,
};
use canal_proto::parse_label;
use canal_proto::size::{format_bytes, parse_bytes};
use canal_proto::time::now_ms;
use canal_proto::{Topic, TopicFilter};
use clap::{Args, Subcommand};
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

/// How long a deploy may take in all: the upload, then validating and compiling on the node.
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long an invocation may take in all: the longest time limit a function may have, and
/// room for placement and the network.
const INVOKE_TIMEOUT: Duration = Duration::from_millis(MAX_TIMEOUT_MS + 30_000);

/// `canal fn`.
#[derive(Subcommand, Debug)]
pub(crate) enum FnCommand {
    /// Upload a WebAssembly component and deploy it as NAME (replacing what had that name).
    Deploy(DeployArgs),
    /// Every deployed function: hash, size, limits, requirements.
    List,
    /// Remove a function.
    Rm {
        /// The function's name.
        #[arg(value_parser = parse_function_name)]
        name: String,
    },
    /// Run a function once on a message and show what it would publish, store and log
    /// (nothing is committed).
    Invoke(InvokeArgs),
    /// Where a function runs, and why.
    Placement {
        /// The function's name.
        #[arg(value_parser = parse_function_name)]
        name: String,
    },
}

/// `canal fn deploy`.
#[derive(Args, Debug)]
pub(crate) struct DeployArgs {
    /// The function's name: 1-64 letters, digits, `-`, `_` or `.` (not first).
    #[arg(value_parser = parse_function_name)]
    name: String,
    /// The compiled component (`.wasm`).
    file: PathBuf,
    /// Memory limit of an instance, such as 64MiB (1MiB to 1GiB; default 64MiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_memory)]
    memory: Option<String>,
    /// Time limit of one invocation, such as 500ms or 2s (at most 60s; default 1s).
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    /// Instruction budget of one invocation (wasmtime fuel); none by default.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    fuel: Option<u64>,
    /// The most outputs (publish + emit) one invocation may make (0 to 1000; default 64).
    #[arg(long, value_name = "N", value_parser = parse_max_outputs)]
    max_outputs: Option<u32>,
    /// The most bytes one invocation's outputs may add up to, topics and headers included,
    /// such as 256KiB (0 to 4MiB; default 1MiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_max_output_bytes)]
    max_output_bytes: Option<String>,
    /// The most bytes one invocation's state writes may add up to, keys included, such as
    /// 64KiB (0 to 4MiB; default 1MiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_max_state_bytes)]
    max_state_bytes: Option<String>,
    /// Run only on peers with a GPU; `--gpu=16GiB` asks for at least that much GPU memory.
    #[arg(
        long,
        value_name = "MEMORY",
        num_args = 0..=1,
        require_equals = true,
        value_parser = parse_gpu_memory
    )]
    gpu: Option<Option<String>>,
    /// Run only on peers of this tier (`edge`, `cloud`, ...).
    #[arg(long, value_name = "NAME")]
    tier: Option<String>,
    /// Run only on peers with this label KEY=VALUE; repeatable, or comma-separated.
    #[arg(long = "label", value_name = "KEY=VALUE", value_delimiter = ',', value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// How many peers run it (default 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    replicas: Option<u32>,
    /// Treat --gpu, --tier and --label as preferences: place it elsewhere, and say so, when
    /// no peer meets them (by default they are hard and the placement fails).
    #[arg(long)]
    preferred: bool,
    /// How placement picks peers: topology (closest to the function's key), spread,
    /// least-loaded, or latency (lowest predicted queueing + execution + round trip).
    #[arg(long, value_parser = parse_policy)]
    policy: Option<canal_proto::placement::Policy>,
}

fn parse_policy(s: &str) -> Result<canal_proto::placement::Policy, String> {
    s.parse()
        .map_err(|e: canal_proto::placement::PolicyError| e.to_string())
}

/// `canal fn invoke`.
#[derive(Args, Debug)]
pub(crate) struct InvokeArgs {
    /// The function's name.
    #[arg(value_parser = parse_function_name)]
    name: String,
    /// The message; `-` reads all of standard input. Empty if left out.
    message: Option<String>,
    /// The topic the message is given as coming from.
    #[arg(long, value_parser = parse_topic)]
    topic: Option<Topic>,
    /// A custom header KEY=VALUE; repeatable.
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_header)]
    headers: Vec<(String, String)>,
}

/// `canal trigger`.
#[derive(Subcommand, Debug)]
pub(crate) enum TriggerCommand {
    /// Run a function on every event that matches a filter (replacing a trigger of that name).
    Add(TriggerAddArgs),
    /// Every trigger: filter, function, output, QoS, retries, dead letter.
    List,
    /// Remove a trigger.
    Rm {
        /// The trigger's name.
        #[arg(value_parser = parse_trigger_name)]
        name: String,
    },
}

/// `canal trigger add`.
#[derive(Args, Debug)]
pub(crate) struct TriggerAddArgs {
    /// The trigger's name: 1-64 letters, digits, `-`, `_` or `.` (not first).
    #[arg(value_parser = parse_trigger_name)]
    name: String,
    /// The topic filter that fires it, such as sensors/+/temp.
    #[arg(long, value_name = "FILTER", value_parser = parse_filter)]
    on: TopicFilter,
    /// The function it runs.
    #[arg(long = "fn", value_name = "FUNCTION", value_parser = parse_function_name)]
    function: String,
    /// Where the function's output goes; it must not match the filter.
    #[arg(long, value_name = "TOPIC", value_parser = parse_topic)]
    out: Option<Topic>,
    /// 1 (default): reads the committed log, effects exactly once; 0: runs on QoS 0 events
    /// as they pass, at most once.
    #[arg(long, value_parser = parse_qos)]
    qos: Option<u8>,
    /// How often a failing event is retried before it goes to the dead letter (default 3).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=MAX_RETRIES as i64))]
    retries: Option<u32>,
    /// Where events that kept failing go (default dead-letter/NAME).
    #[arg(long, value_name = "TOPIC", value_parser = parse_topic)]
    dead_letter: Option<Topic>,
}

/// `canal state`.
#[derive(Subcommand, Debug)]
pub(crate) enum StateCommand {
    /// One value a function stored.
    Get {
        /// The function's name.
        #[arg(value_parser = parse_function_name)]
        function: String,
        /// The key, such as mean/sensors/r1/temp.
        #[arg(value_parser = parse_key)]
        key: String,
    },
    /// The keys and values a function stored.
    List {
        /// The function's name.
        #[arg(value_parser = parse_function_name)]
        function: String,
        /// Only keys that start with this.
        #[arg(long)]
        prefix: Option<String>,
    },
}

fn parse_function_name(s: &str) -> Result<String, String> {
    check_function_name(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

fn parse_trigger_name(s: &str) -> Result<String, String> {
    check_trigger_name(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

/// Checks `--memory` is a size within the limits; the text goes to the node as given.
fn parse_memory(s: &str) -> Result<String, String> {
    let bytes = parse_bytes(s).map_err(|e| e.to_string())?;
    Limits {
        memory_bytes: bytes,
        ..Limits::default()
    }
    .validate()
    .map_err(|e| e.to_string())?;
    Ok(s.trim().to_string())
}

/// Checks `--max-outputs` is within the limits.
fn parse_max_outputs(s: &str) -> Result<u32, String> {
    let n: u32 = s.trim().parse().map_err(|_| {
        format!(
            "{s:?} is not a whole number: use 0 to {}",
            canal_proto::function::MAX_MAX_OUTPUTS
        )
    })?;
    Limits {
        max_outputs: n,
        ..Limits::default()
    }
    .validate()
    .map_err(|e| e.to_string())?;
    Ok(n)
}

/// Checks `--max-output-bytes` is a size within the limits; the text goes as given.
fn parse_max_output_bytes(s: &str) -> Result<String, String> {
    let bytes = parse_bytes(s).map_err(|e| e.to_string())?;
    Limits {
        max_output_bytes: bytes,
        ..Limits::default()
    }
    .validate()
    .map_err(|e| e.to_string())?;
    Ok(s.trim().to_string())
}

/// Checks `--max-state-bytes` is a size within the limits; the text goes as given.
fn parse_max_state_bytes(s: &str) -> Result<String, String> {
    let bytes = parse_bytes(s).map_err(|e| e.to_string())?;
    Limits {
        max_state_bytes: bytes,
        ..Limits::default()
    }
    .validate()
    .map_err(|e| e.to_string())?;
    Ok(s.trim().to_string())
}

/// Checks `--gpu=MEMORY` is a size; the text goes to the node as given.
fn parse_gpu_memory(s: &str) -> Result<String, String> {
    match parse_bytes(s) {
        Ok(0) => Err(format!(
            "--gpu={s} asks for no GPU memory: leave the size out for any GPU, or give one such as 16GiB"
        )),
        Ok(_) => Ok(s.trim().to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Checks a state key can travel as the rest of a URL path: not empty, and no `.` or `..`
/// segment (URL parsing would resolve those away).
fn parse_key(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("the key is empty: give one such as mean/sensors/r1/temp".into());
    }
    if s.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(format!(
            "key {s:?} has a `.` or `..` level, which cannot be sent in a URL: use `canal state list` to see it"
        ));
    }
    Ok(s.to_string())
}

/// The query string of a deploy: only the settings that were given.
fn deploy_query(a: &DeployArgs) -> String {
    let mut q: Vec<(&str, String)> = Vec::new();
    if let Some(m) = &a.memory {
        q.push(("memory", m.clone()));
    }
    if let Some(t) = &a.timeout {
        q.push(("timeout", t.trim().to_string()));
    }
    if let Some(f) = a.fuel {
        q.push(("fuel", f.to_string()));
    }
    if let Some(n) = a.max_outputs {
        q.push(("max-outputs", n.to_string()));
    }
    if let Some(b) = &a.max_output_bytes {
        q.push(("max-output-bytes", b.clone()));
    }
    if let Some(b) = &a.max_state_bytes {
        q.push(("max-state-bytes", b.clone()));
    }
    match &a.gpu {
        Some(Some(mem)) => q.push(("gpu", mem.clone())),
        Some(None) => q.push(("gpu", "true".into())),
        None => {}
    }
    if let Some(t) = &a.tier {
        q.push(("tier", t.clone()));
    }
    if !a.labels.is_empty() {
        let labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        q.push(("labels", labels.join(",")));
    }
    if let Some(r) = a.replicas {
        q.push(("replicas", r.to_string()));
    }
    if a.preferred {
        q.push(("hard", "false".into()));
    }
    if let Some(p) = a.policy {
        q.push(("policy", p.to_string()));
    }
    if q.is_empty() {
        return String::new();
    }
    let pairs: Vec<String> = q
        .iter()
        .map(|(k, v)| format!("{k}={}", encode_segment(v)))
        .collect();
    format!("?{}", pairs.join("&"))
}

/// The first 8 hex digits of a hash, for people.
fn short_hash(h: &str) -> String {
    let prefix: String = h.chars().take(8).collect();
    if prefix.len() < h.len() {
        format!("{prefix}…")
    } else {
        prefix
    }
}

/// A duration in microseconds, for people: `23 µs`, `1.5 ms`, `2.10 s`.
fn fmt_micros(us: u64) -> String {
    if us < 1_000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{:.1} ms", us as f64 / 1e3)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

/// A time limit in milliseconds, for people: `1 s`, `500 ms`, `1500 ms`.
fn fmt_ms(ms: u64) -> String {
    if ms >= 1_000 && ms.is_multiple_of(1_000) {
        format!("{} s", ms / 1_000)
    } else {
        format!("{ms} ms")
    }
}

/// How long ago `then_ms` was at `now_ms` (both ms since the Unix epoch): `now`, `40s ago`,
/// `5m ago`, `3h ago`, `2d ago`.
fn age(now_ms: u64, then_ms: u64) -> String {
    let s = now_ms.saturating_sub(then_ms) / 1_000;
    match s {
        0 => "now".into(),
        1..60 => format!("{s}s ago"),
        60..3_600 => format!("{}m ago", s / 60),
        3_600..86_400 => format!("{}h ago", s / 3_600),
        _ => format!("{}d ago", s / 86_400),
    }
}

/// Where a function may run, in one line: `gpu=16GiB tier=edge zone=eu replicas=2 preferred`.
fn requirements_summary(r: &Requirements) -> String {
    let mut parts: Vec<String> = Vec::new();
    if r.gpu {
        parts.push(match r.gpu_memory_bytes {
            Some(b) => format!("gpu={}", format_bytes(b).replace(' ', "")),
            None => "gpu".into(),
        });
    }
    if let Some(t) = &r.tier {
        parts.push(format!("tier={t}"));
    }
    parts.extend(r.labels.iter().map(|(k, v)| format!("{k}={v}")));
    let constrained = !parts.is_empty();
    parts.push(format!("replicas={}", r.replicas));
    if constrained && !r.hard {
        parts.push("preferred".into());
    }
    parts.join(" ")
}

/// A trigger in one line: `trigger alerts: sensors/+/temp -> threshold -> alerts/temp (qos 1,
/// 3 retries, dead letter dead-letter/alerts)`.
fn describe_trigger(t: &TriggerSpec) -> String {
    let out = t
        .out
        .as_ref()
        .map(|o| format!(" -> {o}"))
        .unwrap_or_default();
    format!(
        "trigger {}: {} -> {}{out} (qos {}, {} {}, dead letter {})",
        t.name,
        t.filter,
        t.function,
        t.qos,
        t.retries,
        if t.retries == 1 { "retry" } else { "retries" },
        dead_letter(t)
    )
}

fn dead_letter(t: &TriggerSpec) -> String {
    t.dead_letter_topic()
        .map(|d| d.to_string())
        .unwrap_or_else(|_| format!("dead-letter/{}", t.name))
}

/// Bytes as people read them: the text if it is UTF-8, else base64.
fn text_or_base64(bytes: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (Some(s.to_string()), None),
        Err(_) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    }
}

/// Checks what the node would refuse about a trigger, so bad usage exits 2 before any request.
fn check_trigger(a: &TriggerAddArgs) -> Result<(), String> {
    TriggerSpec {
        name: a.name.clone(),
        uid: String::new(),
        filter: a.on.clone(),
        function: a.function.clone(),
        out: a.out.clone(),
        qos: a.qos.unwrap_or(1),
        retries: a.retries.unwrap_or(canal_proto::function::DEFAULT_RETRIES),
        dead_letter: a.dead_letter.clone(),
        created_ms: 0,
    }
    .validate()
    .map_err(|e| e.to_string())
}

/// Runs `canal fn ...`.
pub(crate) async fn function(
    api: &str,
    token: Option<&str>,
    command: FnCommand,
    json: bool,
) -> anyhow::Result<()> {
    match command {
        FnCommand::Deploy(a) => deploy(api, token, a, json).await,
        FnCommand::List => {
            let client = Client::new(api, token)?;
            let list: FunctionList = client.get("/v1/functions").await?;
            show_functions(&list, json)
        }
        FnCommand::Rm { name } => {
            let client = Client::new(api, token)?;
            client
                .delete(&format!("/v1/functions/{}", encode_segment(&name)))
                .await?;
            eprintln!("removed {name}");
            Ok(())
        }
        FnCommand::Invoke(a) => invoke(api, token, a, json).await,
        FnCommand::Placement { name } => {
            let client = Client::new(api, token)?;
            let answer: PlacementAnswer = client
                .get(&format!(
                    "/v1/functions/{}/placement",
                    encode_segment(&name)
                ))
                .await?;
            if json {
                return show::json(&answer);
            }
            print_placement(&answer);
            Ok(())
        }
    }
}

/// A placement for people: what is in force, then every candidate and why.
fn print_placement(a: &PlacementAnswer) {
    println!("{}: policy {}", a.function, a.policy);
    match &a.committed {
        None => println!("  in force: nothing decided yet (it runs on the data group's leader)"),
        Some(p) if p.decision.chosen.is_empty() => println!(
            "  in force: UNPLACEABLE: {}",
            p.decision.unplaceable.as_deref().unwrap_or("no peer fits")
        ),
        Some(p) => println!("  in force: runs on {}", p.decision.chosen.join(", ")),
    }
    let live = &a.live;
    if let Some(why) = &live.unplaceable {
        println!("  now: unplaceable: {why}");
    }
    if let Some(f) = &live.fallback {
        println!("  now: fallback: {f}");
    }
    if let Some(s) = &live.shortfall {
        println!("  now: {s}");
    }
    let mut t = show::table(&["PEER", "", "PREDICTED", "REASON"]);
    for v in &live.verdicts {
        let mark = if v.chosen {
            "chosen"
        } else if v.rejected {
            "rejected"
        } else {
            "-"
        };
        let predicted = v
            .predicted_ms
            .map(|ms| format!("{ms:.1} ms"))
            .unwrap_or_default();
        t.add_row(vec![
            v.peer_id.clone(),
            mark.to_string(),
            predicted,
            v.reason.clone(),
        ]);
    }
    println!("{t}");
    println!(
        "  (candidates and round trips as seen by {})",
        a.answered_by
    );
}

async fn deploy(api: &str, token: Option<&str>, a: DeployArgs, json: bool) -> anyhow::Result<()> {
    let module = std::fs::read(&a.file)
        .with_context(|| format!("cannot read the module {}", a.file.display()))?;
    if module.is_empty() {
        bail!("{} is empty: give a compiled component", a.file.display());
    }
    if module.len() > MAX_MODULE_BYTES {
        bail!(
            "{} is {}, more than the {} a module may be",
            a.file.display(),
            format_bytes(module.len() as u64),
            format_bytes(MAX_MODULE_BYTES as u64)
        );
    }
    let client = Client::with_timeout(api, token, DEPLOY_TIMEOUT)?;
    let path = format!(
        "/v1/functions/{}{}",
        encode_segment(&a.name),
        deploy_query(&a)
    );
    let headers = [("content-type".to_string(), "application/wasm".to_string())];
    let d: Deployed = client.put_json(&path, module, &headers).await?;
    if json {
        return show::json(&d);
    }
    let f = &d.function;
    let compile = if d.compile_ms < 10.0 {
        format!("{:.1}", d.compile_ms)
    } else {
        format!("{:.0}", d.compile_ms)
    };
    let replaced = d
        .replaced
        .as_deref()
        .map(|h| {
            if h == f.hash {
                format!(", replaced {} (same module)", short_hash(h))
            } else {
                format!(", replaced {}", short_hash(h))
            }
        })
        .unwrap_or_default();
    println!(
        "deployed {} (sha256 {}, {}, compiled in {compile} ms){replaced}",
        f.name,
        short_hash(&f.hash),
        format_bytes(f.size)
    );
    Ok(())
}

fn show_functions(list: &FunctionList, json: bool) -> anyhow::Result<()> {
    if json {
        return show::json(list);
    }
    let now = now_ms();
    let mut t = show::table(&[
        "NAME",
        "HASH",
        "SIZE",
        "MEMORY",
        "TIMEOUT",
        "FUEL",
        "OUTPUTS",
        "STATE",
        "REQUIREMENTS",
        "DEPLOYED",
    ]);
    for f in &list.functions {
        t.add_row(vec![
            f.name.clone(),
            f.hash.chars().take(12).collect(),
            format_bytes(f.size),
            format_bytes(f.limits.memory_bytes),
            fmt_ms(f.limits.timeout_ms),
            f.limits
                .fuel
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into()),
            format!(
                "{} / {}",
                f.limits.max_outputs,
                format_bytes(f.limits.max_output_bytes)
            ),
            format_bytes(f.limits.max_state_bytes),
            requirements_summary(&f.requirements),
            age(now, f.deployed_ms),
        ]);
    }
    println!("{t}");
    println!("{} functions", list.functions.len());
    Ok(())
}

async fn invoke(api: &str, token: Option<&str>, a: InvokeArgs, json: bool) -> anyhow::Result<()> {
    let body: Vec<u8> = match a.message.as_deref() {
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .lock()
                .read_to_end(&mut buf)
                .context("cannot read the message from standard input")?;
            buf
        }
        Some(m) => m.as_bytes().to_vec(),
        None => Vec::new(),
    };
    let mut headers: Vec<(String, String)> = Vec::new();
    if let Some(t) = &a.topic {
        headers.push(("canal-topic".into(), t.to_string()));
    }
    for (k, v) in &a.headers {
        headers.push((format!("canal-header-{k}"), v.clone()));
    }
    let client = Client::with_timeout(api, token, INVOKE_TIMEOUT)?;
    let path = format!("/v1/functions/{}/invoke", encode_segment(&a.name));
    let r: InvokeResult = client.post_json(&path, body, &headers).await?;
    if json {
        show::json(&r)?;
    } else {
        if r.result.is_ok() {
            println!("ok in {} on {}", fmt_micros(r.micros), r.executor);
        }
        for o in &r.outputs {
            let (text, b64) = text_or_base64(&o.payload);
            println!("-> {} {}", o.topic, text.or(b64).unwrap_or_default());
        }
        for (k, v) in &r.state {
            match v {
                Some(v) => println!("state {k} = {v}"),
                None => println!("state {k} deleted"),
            }
        }
        for l in &r.logs {
            println!("[{}] {}", l.level, l.message);
        }
    }
    match r.result {
        Ok(()) => Ok(()),
        Err(reason) if json => bail!("{reason}"),
        Err(reason) => bail!(
            "{reason} (after {} on {})",
            fmt_micros(r.micros),
            r.executor
        ),
    }
}

/// Runs `canal trigger ...`.
pub(crate) async fn trigger(
    api: &str,
    token: Option<&str>,
    command: TriggerCommand,
    json: bool,
) -> anyhow::Result<()> {
    match command {
        TriggerCommand::Add(a) => {
            check_trigger(&a).map_err(UsageError)?;
            let client = Client::new(api, token)?;
            let req = TriggerRequest {
                on: a.on.to_string(),
                function: a.function.clone(),
                out: a.out.as_ref().map(|o| o.to_string()),
                qos: a.qos,
                retries: a.retries,
                dead_letter: a.dead_letter.as_ref().map(|d| d.to_string()),
            };
            let headers = [("content-type".to_string(), "application/json".to_string())];
            let t: TriggerSpec = client
                .put_json(
                    &format!("/v1/triggers/{}", encode_segment(&a.name)),
                    serde_json::to_vec(&req)?,
                    &headers,
                )
                .await?;
            if json {
                return show::json(&t);
            }
            println!("{}", describe_trigger(&t));
            Ok(())
        }
        TriggerCommand::List => {
            let client = Client::new(api, token)?;
            let list: TriggerList = client.get("/v1/triggers").await?;
            if json {
                return show::json(&list);
            }
            let mut t = show::table(&[
                "NAME",
                "ON",
                "FUNCTION",
                "OUT",
                "QOS",
                "RETRIES",
                "DEAD LETTER",
            ]);
            for tr in &list.triggers {
                t.add_row(vec![
                    tr.name.clone(),
                    tr.filter.to_string(),
                    tr.function.clone(),
                    tr.out
                        .as_ref()
                        .map(|o| o.to_string())
                        .unwrap_or_else(|| "-".into()),
                    tr.qos.to_string(),
                    tr.retries.to_string(),
                    dead_letter(tr),
                ]);
            }
            println!("{t}");
            println!("{} triggers", list.triggers.len());
            Ok(())
        }
        TriggerCommand::Rm { name } => {
            let client = Client::new(api, token)?;
            client
                .delete(&format!("/v1/triggers/{}", encode_segment(&name)))
                .await?;
            eprintln!("removed trigger {name}");
            Ok(())
        }
    }
}

/// Runs `canal state ...`.
pub(crate) async fn state(
    api: &str,
    token: Option<&str>,
    command: StateCommand,
    json: bool,
) -> anyhow::Result<()> {
    let client = Client::new(api, token)?;
    match command {
        StateCommand::Get { function, key } => {
            let path = format!(
                "/v1/functions/{}/state/{}",
                encode_segment(&function),
                encode_path(&key)
            );
            let Some(bytes) = client.get_bytes_or_none(&path).await? else {
                bail!("{function} has no state at {key}");
            };
            let (text, b64) = text_or_base64(&bytes);
            if json {
                let mut o = serde_json::json!({ "function": function, "key": key });
                match (text, b64) {
                    (Some(t), _) => o["value"] = t.into(),
                    (None, b) => o["value_base64"] = b.unwrap_or_default().into(),
                }
                println!("{o}");
            } else {
                println!("{}", text.or(b64).unwrap_or_default());
            }
            Ok(())
        }
        StateCommand::List { function, prefix } => {
            let mut path = format!("/v1/functions/{}/state", encode_segment(&function));
            if let Some(p) = &prefix {
                path.push_str(&format!("?prefix={}", encode_segment(p)));
            }
            let entries: StateList = client.get(&path).await?;
            if json {
                return show::json(&entries);
            }
            let mut t = show::table(&["KEY", "VALUE"]);
            for e in &entries.entries {
                let value = e
                    .value
                    .clone()
                    .or_else(|| e.value_base64.clone())
                    .unwrap_or_default();
                t.add_row(vec![e.key.clone(), value]);
            }
            println!("{t}");
            println!("{} keys", entries.entries.len());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::collections::BTreeMap;

    #[derive(Parser, Debug)]
    struct FnCli {
        #[command(subcommand)]
        command: FnCommand,
    }

    #[derive(Parser, Debug)]
    struct TriggerCli {
        #[command(subcommand)]
        command: TriggerCommand,
    }

    fn deploy_args(args: &[&str]) -> Result<DeployArgs, clap::Error> {
        let mut all = vec!["fn", "deploy"];
        all.extend_from_slice(args);
        match FnCli::try_parse_from(all)?.command {
            FnCommand::Deploy(a) => Ok(a),
            other => panic!("not a deploy: {other:?}"),
        }
    }

    fn trigger_args(args: &[&str]) -> Result<TriggerAddArgs, clap::Error> {
        let mut all = vec!["trigger", "add"];
        all.extend_from_slice(args);
        match TriggerCli::try_parse_from(all)?.command {
            TriggerCommand::Add(a) => Ok(a),
            other => panic!("not an add: {other:?}"),
        }
    }

    #[test]
    fn deploy_sends_only_what_was_given() {
        let a = deploy_args(&["threshold", "t.wasm"]).unwrap();
        assert_eq!(deploy_query(&a), "");
        let a = deploy_args(&[
            "threshold",
            "t.wasm",
            "--memory",
            "64MiB",
            "--timeout",
            "500ms",
            "--fuel",
            "1000000",
            "--max-outputs",
            "10",
            "--max-output-bytes",
            "64KiB",
            "--max-state-bytes",
            "0",
            "--gpu",
            "--tier",
            "edge",
            "--label",
            "zone=eu",
            "--label",
            "rack=7,os=linux",
            "--replicas",
            "2",
            "--preferred",
        ])
        .unwrap();
        assert_eq!(
            deploy_query(&a),
            "?memory=64MiB&timeout=500ms&fuel=1000000&max-outputs=10&max-output-bytes=64KiB\
             &max-state-bytes=0&gpu=true&tier=edge\
             &labels=zone%3Deu%2Crack%3D7%2Cos%3Dlinux&replicas=2&hard=false"
        );
    }

    #[test]
    fn gpu_takes_an_optional_memory() {
        let a = deploy_args(&["f", "f.wasm", "--gpu=16GiB"]).unwrap();
        assert_eq!(a.gpu, Some(Some("16GiB".into())));
        assert_eq!(deploy_query(&a), "?gpu=16GiB");
        // Without `=`, the next word is not the GPU's memory.
        let a = deploy_args(&["--gpu", "f", "f.wasm"]).unwrap();
        assert_eq!(a.gpu, Some(None));
        assert_eq!(a.name, "f");
        assert!(deploy_args(&["f", "f.wasm", "--gpu=lots"]).is_err());
        assert!(deploy_args(&["f", "f.wasm", "--gpu=0"]).is_err());
    }

    #[test]
    fn bad_deploy_settings_are_usage_errors() {
        for bad in [
            &["a/b", "f.wasm"][..],
            &["f", "f.wasm", "--memory", "lots"],
            &["f", "f.wasm", "--memory", "4GiB"],
            &["f", "f.wasm", "--memory", "1000"],
            &["f", "f.wasm", "--fuel", "0"],
            &["f", "f.wasm", "--max-outputs", "1001"],
            &["f", "f.wasm", "--max-outputs", "-1"],
            &["f", "f.wasm", "--max-output-bytes", "5MiB"],
            &["f", "f.wasm", "--max-state-bytes", "lots"],
            &["f", "f.wasm", "--replicas", "0"],
            &["f", "f.wasm", "--label", "zone"],
            &["f", "f.wasm", "--label", "=eu"],
        ] {
            let e = deploy_args(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}: {e}");
        }
    }

    #[test]
    fn memory_is_checked_and_sent_as_given() {
        assert_eq!(parse_memory("128MiB"), Ok("128MiB".into()));
        let e = parse_memory("2GiB").unwrap_err();
        assert!(e.contains("1MiB to 1 GiB"), "{e}");
        assert!(
            parse_memory("12 parsecs")
                .unwrap_err()
                .contains("byte size")
        );
    }

    #[test]
    fn keys_must_survive_a_url() {
        assert_eq!(
            parse_key("mean/sensors/r1/temp"),
            Ok("mean/sensors/r1/temp".into())
        );
        assert!(parse_key("").is_err());
        assert!(parse_key("a/../b").is_err());
        assert!(parse_key(".").is_err());
        assert_eq!(parse_key("v1.2/x"), Ok("v1.2/x".into()));
    }

    #[test]
    fn requirements_in_one_line() {
        let mut r = Requirements {
            replicas: 1,
            hard: true,
            ..Requirements::default()
        };
        assert_eq!(requirements_summary(&r), "replicas=1");
        r.hard = false;
        assert_eq!(requirements_summary(&r), "replicas=1");
        r.gpu = true;
        r.tier = Some("edge".into());
        r.labels = BTreeMap::from([("zone".into(), "eu".into())]);
        assert_eq!(
            requirements_summary(&r),
            "gpu tier=edge zone=eu replicas=1 preferred"
        );
        r.hard = true;
        r.gpu_memory_bytes = Some(16 << 30);
        r.replicas = 3;
        assert_eq!(
            requirements_summary(&r),
            "gpu=16GiB tier=edge zone=eu replicas=3"
        );
    }

    #[test]
    fn triggers_are_checked_before_sending() {
        let a = trigger_args(&["alerts", "--on", "sensors/+/temp", "--fn", "threshold"]).unwrap();
        assert_eq!(check_trigger(&a), Ok(()));
        let a = trigger_args(&[
            "alerts",
            "--on",
            "sensors/+/temp",
            "--fn",
            "threshold",
            "--out",
            "sensors/x/temp",
        ])
        .unwrap();
        assert!(check_trigger(&a).unwrap_err().contains("forever"));
        for bad in [
            &["alerts", "--on", "sensors/+/temp"][..],
            &["alerts", "--on", "a/#/b", "--fn", "f"],
            &["alerts", "--on", "a", "--fn", "f", "--qos", "2"],
            &["alerts", "--on", "a", "--fn", "f", "--retries", "101"],
            &["alerts", "--on", "a", "--fn", "f", "--out", "b/+"],
            &["a b", "--on", "a", "--fn", "f"],
        ] {
            let e = trigger_args(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_trigger_in_one_line() {
        let a = trigger_args(&[
            "alerts",
            "--on",
            "sensors/+/temp",
            "--fn",
            "threshold",
            "--out",
            "alerts/temp",
        ])
        .unwrap();
        let mut t = TriggerSpec {
            name: a.name,
            uid: "u".into(),
            filter: a.on,
            function: a.function,
            out: a.out,
            qos: 1,
            retries: 3,
            dead_letter: None,
            created_ms: 0,
        };
        assert_eq!(
            describe_trigger(&t),
            "trigger alerts: sensors/+/temp -> threshold -> alerts/temp \
             (qos 1, 3 retries, dead letter dead-letter/alerts)"
        );
        t.out = None;
        t.qos = 0;
        t.retries = 1;
        t.dead_letter = Some(Topic::new("failed/alerts").unwrap());
        assert_eq!(
            describe_trigger(&t),
            "trigger alerts: sensors/+/temp -> threshold (qos 0, 1 retry, dead letter failed/alerts)"
        );
    }

    #[test]
    fn times_for_people() {
        assert_eq!(fmt_micros(23), "23 µs");
        assert_eq!(fmt_micros(1_500), "1.5 ms");
        assert_eq!(fmt_micros(2_100_000), "2.10 s");
        assert_eq!(fmt_ms(1_000), "1 s");
        assert_eq!(fmt_ms(500), "500 ms");
        assert_eq!(fmt_ms(1_500), "1500 ms");
        assert_eq!(age(10_000, 9_500), "now");
        assert_eq!(age(100_000, 60_000), "40s ago");
        assert_eq!(age(400_000, 0), "6m ago");
        assert_eq!(age(3 * 3_600_000 + 5, 0), "3h ago");
        assert_eq!(age(2 * 86_400_000, 0), "2d ago");
        assert_eq!(age(0, 5_000), "now");
    }

    #[test]
    fn hashes_and_payloads_for_people() {
        assert_eq!(short_hash("1a2b3c4d5e6f"), "1a2b3c4d…");
        assert_eq!(short_hash("1a2b"), "1a2b");
        assert_eq!(text_or_base64(b"21.5"), (Some("21.5".into()), None));
        assert_eq!(text_or_base64(&[0xff, 0x00]), (None, Some("/wA=".into())));
    }
}
