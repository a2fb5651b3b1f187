//! The persistent testnet behind `canal testnet up | status | down | kill | restart`.
//!
//! Unlike [`Testnet`](crate::Testnet), whose nodes die with the test, these nodes run in
//! their own process group and outlive the command that started them, so a person can use
//! the mesh, kill and restart nodes, and stop it all later. Everything needed to find and
//! restart a node is on disk, written before the node starts:
//!
//! ```text
//!   DIR/node0/args.json   the node's command line (fixed ports, so restarts keep them)
//!   DIR/node0/pid         written right after spawning, so `down` finds a node even if
//!                         `up` was interrupted before the node was ready
//!   DIR/node0/node.json   written by the node itself once it listens
//!   DIR/node0/node.log    its output
//! ```
//!
//! With links (`--tiers` or `--link`), every node is behind a delay relay, run by one more
//! detached process (see [`relayd`] for its files): each node listens on its
//! own port but announces its relay's (`--advertise`), and bootstraps from the others'
//! relays, so every connection between nodes crosses the relays, which delay it and can cut
//! it ([`partition`], [`heal`]).

use crate::relay::LinkSettings;
use crate::relayd::{self, RelayPlan, RelayPlanNode};
use crate::{Api, NodeOptions, log_tail, wait_for};
use anyhow::{Context, anyhow, bail};
use canal_proto::api::{Peers, RuntimeInfo};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// How `up` lays out the testnet.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Where the nodes' data directories go.
    pub dir: PathBuf,
    /// Tiers in order, with how many nodes each has.
    pub tiers: Vec<(String, usize)>,
    /// How many nodes (the last ones) declare a GPU.
    pub gpu_nodes: usize,
    /// The GPU the GPU nodes declare, `MODEL:MEMORY`.
    pub gpu: String,
    /// How long to wait for the mesh to form.
    pub timeout: Duration,
    /// Each tier's link; `None`: no relays (nodes talk directly). Use [`tier_links`].
    pub links: Option<Vec<(String, LinkSettings)>>,
    /// The token key file to give the nodes (copied to `DIR/token.key` if none is there);
    /// `None`: one made there on first `up`.
    pub token_key: Option<PathBuf>,
    /// Serve the APIs over TLS with certificates of a local CA made in `DIR/tls/`.
    pub tls: bool,
    /// More `canal node` flags every node gets (kept for restarts), such as
    /// `--shards 8`.
    pub node_args: Vec<String>,
}

/// The link a tier gets when `--link` names none: 30 ms for `edge`, 1 ms for `cloud`, no
/// delay for any other tier.
pub fn default_link(tier: &str) -> LinkSettings {
    match tier {
        "edge" => LinkSettings::latency(Duration::from_millis(30)),
        "cloud" => LinkSettings::latency(Duration::from_millis(1)),
        _ => LinkSettings::NONE,
    }
}

/// Parses one `--link TIER=LATENCY[±JITTER][/LOSS%]`.
pub fn parse_link(s: &str) -> Result<(String, LinkSettings), String> {
    let (tier, link) = s.split_once('=').ok_or_else(|| {
        format!("{s:?} is not TIER=LATENCY[±JITTER][/LOSS%]: write, for example, edge=30ms±5ms/1%")
    })?;
    let link = LinkSettings::parse(link).map_err(|e| format!("--link {s}: {e}"))?;
    Ok((tier.trim().to_string(), link))
}

/// Every tier's link: those given (each must name a tier of `tiers`), the
/// [`default_link`] for the rest.
pub fn tier_links(
    tiers: &[(String, usize)],
    given: &[(String, LinkSettings)],
) -> anyhow::Result<Vec<(String, LinkSettings)>> {
    for (t, _) in given {
        if !tiers.iter().any(|(name, _)| name == t) {
            let names: Vec<&str> = tiers.iter().map(|(n, _)| n.as_str()).collect();
            bail!(
                "--link names tier {t:?}, which the testnet does not have: its tiers are {}",
                names.join(", ")
            );
        }
    }
    Ok(tiers
        .iter()
        .map(|(t, _)| {
            let link = given
                .iter()
                .rev()
                .find(|(name, _)| name == t)
                .map(|(_, l)| *l)
                .unwrap_or_else(|| default_link(t));
            (t.clone(), link)
        })
        .collect())
}

/// Parses `edge=3,cloud=2`.
pub fn parse_tiers(s: &str) -> Result<Vec<(String, usize)>, String> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (name, n) = part.split_once('=').ok_or_else(|| {
            format!("{part:?} is not NAME=COUNT: write, for example, edge=3,cloud=2")
        })?;
        let n: usize = n.trim().parse().map_err(|_| {
            format!("{n:?} in {part:?} is not a node count: write a whole number, such as edge=3")
        })?;
        if n == 0 {
            return Err(format!(
                "tier {name:?} has 0 nodes: give every tier at least one"
            ));
        }
        let name = name.trim();
        if name.is_empty()
            || name.len() > 63
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "{name:?} is not a tier name: use 1-63 letters, digits, `-`, `_` or `.`"
            ));
        }
        out.push((name.trim().to_string(), n));
    }
    if out.is_empty() {
        return Err("no tiers given: write, for example, edge=3,cloud=2".into());
    }
    Ok(out)
}

/// One node of a persistent testnet, as found on disk.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    /// `node0`, `node1`, ...
    pub name: String,
    /// Its data directory.
    pub dir: PathBuf,
    /// The pid it was last started with, if it is alive now.
    pub pid: Option<u32>,
    /// Its runtime file, if the live process wrote one.
    pub info: Option<RuntimeInfo>,
}

/// Whether `pid` is a live (not zombie) `canal node` process using `data_dir`: a pid file can
/// outlive its process, and the pid be reused by something else.
fn is_our_node(pid: u32, data_dir: &Path) -> bool {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let Ok(cmdline) = std::fs::read(proc.join("cmdline")) else {
        return false;
    };
    let stat = std::fs::read_to_string(proc.join("stat")).unwrap_or_default();
    // The state is the field after the parenthesised command name.
    if stat
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('Z'))
    {
        return false;
    }
    // A process on its way out (its memory being torn down, which takes a while for a node
    // with large reservations) shows an empty command line but is not gone yet: the pid
    // file named it, so it is still this node until it is a zombie or has vanished.
    if cmdline.is_empty() {
        // (Kernel threads have no command line either; their parent is kthreadd, pid 2.)
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().nth(1));
        return ppid.is_some_and(|p| p != "2" && p != "0");
    }
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let dir = data_dir.display().to_string();
    args.iter().any(|a| a == "node") && args.contains(&dir)
}

fn node_dirs(dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let i = name.strip_prefix("node")?.parse::<usize>().ok()?;
                    e.path().join("args.json").exists().then(|| (i, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The nodes of the testnet in `dir`, running or not.
pub fn list(dir: &Path) -> Vec<ClusterNode> {
    // Nodes were started with absolute paths; compare like with like.
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    node_dirs(&dir)
        .into_iter()
        .map(|(i, d)| {
            let pid = std::fs::read_to_string(d.join("pid"))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .filter(|pid| is_our_node(*pid, &d));
            let info = std::fs::read_to_string(d.join("node.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<RuntimeInfo>(&t).ok())
                .filter(|info| Some(info.pid) == pid);
            ClusterNode {
                name: format!("node{i}"),
                dir: d,
                pid,
                info,
            }
        })
        .collect()
}

fn spawn_detached(bin: &Path, node_dir: &Path) -> anyhow::Result<u32> {
    let args: Vec<String> = serde_json::from_str(
        &std::fs::read_to_string(node_dir.join("args.json"))
            .with_context(|| format!("cannot read {}/args.json", node_dir.display()))?,
    )
    .with_context(|| format!("{}/args.json is damaged", node_dir.display()))?;
    let log_path = node_dir.join("node.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let child = std::process::Command::new(bin)
        .args(&args)
        .env_remove("CANAL_API")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C meant for `up` does not reach the nodes; `down`
        // stops them.
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let pid = child.id();
    std::fs::write(node_dir.join("pid"), format!("{pid}\n"))
        .with_context(|| format!("cannot write {}/pid", node_dir.display()))?;
    Ok(pid)
}

/// Starts a testnet in `opts.dir` and waits until every node sees every other; `progress`
/// is told what is happening. Returns the nodes and an admin token for them (also in
/// `DIR/admin-token`). If it fails after starting anything, it stops what it started (nodes
/// and relays) before returning the error.
pub async fn up(
    bin: &Path,
    opts: &UpOptions,
    progress: impl FnMut(&str),
) -> anyhow::Result<(Vec<ClusterNode>, String)> {
    check_free(opts)?;
    match start_all(bin, opts, progress).await {
        Ok(nodes) => Ok(nodes),
        Err(e) => {
            let dir = opts.dir.display();
            match down(&opts.dir, Duration::from_secs(5), false).await {
                Ok(_) => Err(anyhow!(
                    "{e}\nstopped the nodes and relays this `up` started; their logs stay in {dir}"
                )),
                Err(stop) => Err(anyhow!(
                    "{e}\ncould not stop everything this `up` started ({stop}): run `canal testnet down --dir {dir}`"
                )),
            }
        }
    }
}

/// Refuses to start over a testnet that is already running in the directory.
fn check_free(opts: &UpOptions) -> anyhow::Result<()> {
    let running: Vec<ClusterNode> = list(&opts.dir)
        .into_iter()
        .filter(|n| n.pid.is_some())
        .collect();
    if !running.is_empty() || relay_pid(&opts.dir).is_some() {
        bail!(
            "a testnet is already running in {} ({} nodes{}): stop it with `canal testnet down --dir {}` first",
            opts.dir.display(),
            running.len(),
            if relay_pid(&opts.dir).is_some() {
                " and the relays"
            } else {
                ""
            },
            opts.dir.display()
        );
    }
    Ok(())
}

async fn start_all(
    bin: &Path,
    opts: &UpOptions,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<(Vec<ClusterNode>, String)> {
    let n: usize = opts.tiers.iter().map(|(_, c)| c).sum();
    if n == 0 {
        bail!("a testnet needs at least one node");
    }
    if opts.gpu_nodes > n {
        bail!(
            "--gpu-nodes {} is more than the {n} nodes of the testnet",
            opts.gpu_nodes
        );
    }
    std::fs::create_dir_all(&opts.dir)
        .with_context(|| format!("cannot create {}", opts.dir.display()))?;
    // Every port of the testnet at once, held until the processes start (see `ports`): node
    // i's libp2p, API and MQTT ports, then its relay's and its MQTTS port when it has them.
    let per_node = 3 + usize::from(opts.links.is_some()) + usize::from(opts.tls);
    let mut reserved = crate::ports::Reserved::new(n * per_node)?;
    let picked = reserved.ports();
    let of_node: Vec<&[u16]> = picked.chunks(per_node).collect();
    let ports: Vec<(u16, u16, u16)> = of_node.iter().map(|p| (p[0], p[1], p[2])).collect();
    let mqtts: Vec<u16> = of_node.iter().map(|p| p[per_node - 1]).collect();
    let tiers: Vec<&str> = opts
        .tiers
        .iter()
        .flat_map(|(t, c)| std::iter::repeat_n(t.as_str(), *c))
        .collect();
    // Leftovers of an earlier testnet in this directory must not steer this one.
    for stale in [
        relayd::plan_path(&opts.dir),
        relayd::control_path(&opts.dir),
        relayd::state_path(&opts.dir),
    ] {
        let _ = std::fs::remove_file(stale);
    }
    // Where other nodes reach node i: its relay, or the node itself.
    let reach: Vec<u16> = match &opts.links {
        Some(links) => {
            let relay_ports: Vec<u16> = of_node.iter().map(|p| p[3]).collect();
            reserved.release(&relay_ports);
            let plan = RelayPlan {
                version: 1,
                nodes: (0..n)
                    .map(|i| {
                        let link = links
                            .iter()
                            .find(|(t, _)| t == tiers[i])
                            .map(|(_, l)| *l)
                            .unwrap_or_else(|| default_link(tiers[i]));
                        RelayPlanNode {
                            name: format!("node{i}"),
                            tier: tiers[i].to_string(),
                            listen: ([127, 0, 0, 1], ports[i].0).into(),
                            relay: ([127, 0, 0, 1], relay_ports[i]).into(),
                            link: link.to_string(),
                        }
                    })
                    .collect(),
            };
            relayd::write_json(&relayd::plan_path(&opts.dir), &plan)?;
            let pid = start_relays(bin, &opts.dir).await?;
            let summary: Vec<String> = links.iter().map(|(t, l)| format!("{t} {l}")).collect();
            progress(&format!(
                "started the relays (pid {pid}; links: {})",
                summary.join(", ")
            ));
            relay_ports
        }
        None => ports.iter().map(|(p, _, _)| *p).collect(),
    };
    // One key for the whole testnet, kept with it so restarted nodes still hold it.
    let key = std::fs::canonicalize(&opts.dir)?.join("swarm.key");
    crate::ensure_cluster_key(bin, &key)?;
    // And one token key, likewise kept; the admin token is minted from it.
    let token_key = std::fs::canonicalize(&opts.dir)?.join(crate::auth::TOKEN_KEY_FILE);
    if let Some(given) = &opts.token_key
        && !token_key.exists()
    {
        let text = std::fs::read_to_string(given)
            .with_context(|| format!("cannot read --token-key {}", given.display()))?;
        crate::auth::write_private(&token_key, &text)?;
    }
    let admin = crate::auth::persistent_credentials(&opts.dir)?;
    let tls = if opts.tls {
        let files = crate::tls::ensure_local_ca(&std::fs::canonicalize(&opts.dir)?.join("tls"))?;
        canal_client::tls::set_ca_file(&files.ca).map_err(|e| anyhow!(e))?;
        progress(&format!(
            "the APIs speak HTTPS with certificates of the local CA {}",
            files.ca.display()
        ));
        Some(files)
    } else {
        None
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    // Let go of together, just before the nodes start: a node's port still held while
    // another node dials it would take that connection into a backlog nobody accepts from.
    reserved.release(&picked);
    let mut pids = Vec::new();
    for i in 0..n {
        let node_dir = std::fs::canonicalize(&opts.dir)?.join(format!("node{i}"));
        std::fs::create_dir_all(&node_dir)?;
        let options = NodeOptions {
            cluster_key: Some(key.clone()),
            tier: Some(tiers[i].to_string()),
            gpus: if i >= n - opts.gpu_nodes {
                vec![opts.gpu.clone()]
            } else {
                vec![]
            },
            ..Default::default()
        };
        let mut args = options.args(&node_dir, None);
        // Fixed ports, so a restarted node is found where it was.
        let mut prev = String::new();
        for a in args.iter_mut() {
            let was = a.clone();
            if a == "/ip4/127.0.0.1/tcp/0" {
                *a = format!("/ip4/127.0.0.1/tcp/{}", ports[i].0);
            } else if a == "127.0.0.1:0" && prev == "--mqtt-listen" {
                *a = format!("127.0.0.1:{}", ports[i].2);
            } else if a == "127.0.0.1:0" {
                *a = format!("127.0.0.1:{}", ports[i].1);
            }
            prev = was;
        }
        args.extend(["--token-key".into(), token_key.display().to_string()]);
        args.extend(opts.node_args.iter().cloned());
        if let Some(t) = &tls {
            args.extend([
                "--tls-cert".into(),
                t.cert.display().to_string(),
                "--tls-key".into(),
                t.key.display().to_string(),
                // A fixed port of its own (not 8883, which every node would want), kept in
                // args.json so a restarted node is found where it was.
                "--mqtts-listen".into(),
                format!("127.0.0.1:{}", mqtts[i]),
            ]);
        }
        // The first (up to) three form the Raft cluster; later ones join it as learners.
        args.extend(["--bootstrap-expect".into(), n.min(3).to_string()]);
        if opts.links.is_some() {
            // Behind the relays the links may be slow: Raft keeps its safe timings.
            args.extend([
                "--advertise".into(),
                format!("/ip4/127.0.0.1/tcp/{}", reach[i]),
            ]);
        } else {
            crate::add_fast_raft(&mut args);
        }
        // Every node knows every other's address, so any of them can restart alone.
        for (j, p) in reach.iter().enumerate() {
            if j != i {
                args.extend(["--bootstrap".into(), format!("/ip4/127.0.0.1/tcp/{p}")]);
            }
        }
        std::fs::write(
            node_dir.join("args.json"),
            serde_json::to_vec_pretty(&args)?,
        )?;
        let pid = spawn_detached(bin, &node_dir)?;
        progress(&format!(
            "started node{i} ({}, pid {pid}, api {scheme}://127.0.0.1:{}, mqtt 127.0.0.1:{})",
            tiers[i], ports[i].1, ports[i].2
        ));
        pids.push(pid);
    }
    let apis: Vec<Api> = ports
        .iter()
        .map(|(_, a, _)| Api::with_token(&format!("{scheme}://127.0.0.1:{a}"), Some(&admin)))
        .collect();
    let deadline = std::time::Instant::now() + opts.timeout;
    let mut last_report = usize::MAX;
    // A node just spawned can briefly fail the "is it our node" check (its /proc entry is
    // read while it starts): only a node missing on several looks in a row has died.
    let mut missing_looks = 0;
    let result: anyhow::Result<()> = loop {
        let alive = list(&opts.dir).iter().filter(|n| n.pid.is_some()).count();
        if alive < n {
            missing_looks += 1;
            if missing_looks >= 3 {
                break Err(anyhow!("only {alive} of {n} nodes are running"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        missing_looks = 0;
        let mut complete = 0;
        for api in &apis {
            if let Ok(p) = api.get::<Peers>("/v1/peers").await
                && p.peers.len() == n
            {
                complete += 1;
            }
        }
        if complete != last_report {
            progress(&format!("{complete}/{n} nodes see all {n} peers"));
            last_report = complete;
        }
        if complete == n {
            break Ok(());
        }
        if std::time::Instant::now() >= deadline {
            break Err(anyhow!(
                "timed out after {:?}: {complete}/{n} nodes see all peers",
                opts.timeout
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Then the Raft groups: every node knows a leader of each.
    let result = match result {
        Ok(()) => {
            progress("waiting for the Raft groups to elect leaders");
            wait_for("the Raft groups to elect leaders", opts.timeout, || {
                let apis = apis.clone();
                async move {
                    for api in &apis {
                        let s: canal_proto::api::ClusterStatus = api
                            .get("/v1/cluster/status")
                            .await
                            .map_err(|e| e.to_string())?;
                        let led = s.every_group_led();
                        if !led {
                            return Err(format!(
                                "{} has no leader for every group yet",
                                api.base()
                            ));
                        }
                    }
                    Ok(())
                }
            })
            .await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        let tails: Vec<String> = list(&opts.dir)
            .iter()
            .filter(|n| n.pid.is_none())
            .map(|n| {
                format!(
                    "{} is not running; its log ends:\n{}",
                    n.name,
                    log_tail(&n.dir.join("node.log"), 5)
                )
            })
            .collect();
        return Err(anyhow!("{e}\n{}", tails.join("\n")));
    }
    Ok((list(&opts.dir), admin))
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Waits until no node of the testnet in `dir` is running.
async fn wait_all_stopped(dir: &Path, what: &str, timeout: Duration) -> anyhow::Result<()> {
    wait_for(what, timeout, || async move {
        let left = list(dir).iter().filter(|n| n.pid.is_some()).count();
        if left == 0 {
            Ok(())
        } else {
            Err(format!("{left} still running"))
        }
    })
    .await
}

/// Stops every node of the testnet in `dir` (SIGTERM, then SIGKILL after `grace`), then its
/// relays if it has them; returns how many nodes were running. With `purge`, removes the
/// directory too.
pub async fn down(dir: &Path, grace: Duration, purge: bool) -> anyhow::Result<usize> {
    let running: Vec<ClusterNode> = list(dir).into_iter().filter(|n| n.pid.is_some()).collect();
    for n in &running {
        if let Some(pid) = n.pid {
            signal(pid, libc::SIGTERM);
        }
    }
    let stopped = wait_all_stopped(dir, "the nodes to stop", grace).await;
    if stopped.is_err() {
        for n in list(dir) {
            if let Some(pid) = n.pid {
                signal(pid, libc::SIGKILL);
            }
        }
        wait_all_stopped(dir, "the killed nodes to die", Duration::from_secs(10)).await?;
    }
    stop_relays(dir).await?;
    if purge && dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    Ok(running.len())
}

fn find(dir: &Path, node: &str) -> anyhow::Result<ClusterNode> {
    let name = if node.chars().all(|c| c.is_ascii_digit()) {
        format!("node{node}")
    } else {
        node.to_string()
    };
    let all = list(dir);
    let names: Vec<String> = all.iter().map(|n| n.name.clone()).collect();
    all.into_iter().find(|n| n.name == name).ok_or_else(|| {
        anyhow!(
            "no node {node:?} in the testnet in {}: it has {}",
            dir.display(),
            if names.is_empty() {
                "no nodes".to_string()
            } else {
                names.join(", ")
            }
        )
    })
}

/// Waits (up to 10 s) until `pid` is no longer a live node process on `dir`.
async fn wait_gone(pid: u32, dir: &Path, what: &str) -> anyhow::Result<()> {
    wait_for(what, Duration::from_secs(10), || async move {
        if is_our_node(pid, dir) {
            Err("alive".to_string())
        } else {
            Ok(())
        }
    })
    .await
}

/// Kills one node with SIGKILL, as a crash would.
pub async fn kill(dir: &Path, node: &str) -> anyhow::Result<ClusterNode> {
    let n = find(dir, node)?;
    let pid = n.pid.ok_or_else(|| anyhow!("{} is not running", n.name))?;
    signal(pid, libc::SIGKILL);
    wait_gone(pid, &n.dir, &format!("{} to die", n.name)).await?;
    Ok(n)
}

/// Starts one node again with its recorded command line (stopping it first if it runs) and
/// waits until it is listening.
pub async fn restart(bin: &Path, dir: &Path, node: &str) -> anyhow::Result<ClusterNode> {
    let n = find(dir, node)?;
    if let Some(pid) = n.pid {
        signal(pid, libc::SIGTERM);
        if wait_gone(pid, &n.dir, "the node to stop").await.is_err() {
            signal(pid, libc::SIGKILL);
            // The old process must be gone before a new one takes the data dir's lock.
            wait_gone(pid, &n.dir, "the node to die").await?;
        }
    }
    let pid = spawn_detached(bin, &n.dir)?;
    crate::wait_runtime(&n.name, &n.dir.join("node.json"), pid, None).await?;
    find(dir, node)
}

fn is_our_relay(pid: u32, dir: &Path) -> bool {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let Ok(cmdline) = std::fs::read(proc.join("cmdline")) else {
        return false;
    };
    let stat = std::fs::read_to_string(proc.join("stat")).unwrap_or_default();
    if stat
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('Z'))
    {
        return false;
    }
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let dir = dir.display().to_string();
    args.iter().any(|a| a == "relay") && args.iter().any(|a| a == "testnet") && args.contains(&dir)
}

/// The pid of the relay process of the testnet in `dir`, if it is alive.
pub fn relay_pid(dir: &Path) -> Option<u32> {
    let dir = std::fs::canonicalize(dir).ok()?;
    std::fs::read_to_string(relayd::pid_path(&dir))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|pid| is_our_relay(*pid, &dir))
}

/// Starts the relay process (`canal testnet relay --dir DIR`) detached, and waits until every
/// relay listens.
async fn start_relays(bin: &Path, dir: &Path) -> anyhow::Result<u32> {
    let dir = std::fs::canonicalize(dir)?;
    let log_path = relayd::log_path(&dir);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let child = std::process::Command::new(bin)
        .args(["testnet", "relay", "--dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // As the nodes: its own process group, outliving `up`; `down` stops it.
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {} testnet relay", bin.display()))?;
    let pid = child.id();
    std::fs::write(relayd::pid_path(&dir), format!("{pid}\n"))
        .with_context(|| format!("cannot write {}", relayd::pid_path(&dir).display()))?;
    let d = &dir;
    let ready = wait_for(
        "the relays to listen",
        Duration::from_secs(15),
        || async move {
            if !is_our_relay(pid, d) {
                return Err("the relay process exited".to_string());
            }
            match relayd::read_state(d) {
                Some(s) if s.pid == pid => Ok(()),
                _ => Err("not listening yet".to_string()),
            }
        },
    )
    .await;
    if let Err(e) = ready {
        signal(pid, libc::SIGKILL);
        bail!(
            "{e}; {} ends:\n{}",
            log_path.display(),
            log_tail(&log_path, 5)
        );
    }
    Ok(pid)
}

/// Stops the relay process of the testnet in `dir`, if one runs.
async fn stop_relays(dir: &Path) -> anyhow::Result<()> {
    let Some(pid) = relay_pid(dir) else {
        return Ok(());
    };
    let dir = std::fs::canonicalize(dir)?;
    signal(pid, libc::SIGTERM);
    let d = &dir;
    let gone = |what: &'static str| {
        wait_for(what, Duration::from_secs(10), move || async move {
            if is_our_relay(pid, d) {
                Err("alive".to_string())
            } else {
                Ok(())
            }
        })
    };
    if gone("the relays to stop").await.is_err() {
        signal(pid, libc::SIGKILL);
        gone("the relays to die").await?;
    }
    Ok(())
}

/// The relays of the testnet in `dir`, or an error that says it has none.
fn plan_of(dir: &Path) -> anyhow::Result<RelayPlan> {
    if list(dir).is_empty() {
        bail!(
            "no testnet in {}: start one with `canal testnet up --tiers ...`",
            dir.display()
        );
    }
    relayd::read_plan(dir)?.ok_or_else(|| {
        anyhow!(
            "the testnet in {} runs without relays, so it cannot be partitioned: start it with --tiers or --link",
            dir.display()
        )
    })
}

/// Tells the relay process to cut off `cut` (node indices; empty: heal) and waits until it
/// has.
async fn set_partition(dir: &Path, cut: Vec<usize>) -> anyhow::Result<()> {
    let pid = relay_pid(dir).ok_or_else(|| {
        anyhow!(
            "the relays of the testnet in {} are not running (see {}): restart the testnet with `canal testnet down` and `up`",
            dir.display(),
            relayd::log_path(dir).display()
        )
    })?;
    let generation = relayd::read_control(dir)?.generation + 1;
    relayd::write_json(
        &relayd::control_path(dir),
        &relayd::Control {
            version: 1,
            generation,
            cut,
        },
    )?;
    wait_for(
        "the relays to apply the partition",
        Duration::from_secs(10),
        || async move {
            match relayd::read_state(dir) {
                Some(s) if s.pid == pid && s.generation >= generation => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
}

/// Cuts `nodes` (names or indices) off from the rest of the testnet in `dir`: their
/// connections across are reset and new ones refused until [`heal`]. Returns the names of
/// the two sides.
pub async fn partition(dir: &Path, nodes: &[String]) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let plan = plan_of(dir)?;
    let mut cut = Vec::new();
    for node in nodes {
        let n = find(dir, node)?;
        let i = plan
            .nodes
            .iter()
            .position(|p| p.name == n.name)
            .ok_or_else(|| anyhow!("{} has no relay", n.name))?;
        if !cut.contains(&i) {
            cut.push(i);
        }
    }
    if cut.is_empty() {
        bail!("name the nodes to cut off, such as node2 or 2,3");
    }
    if cut.len() == plan.nodes.len() {
        bail!("that names every node, which leaves no one to cut them off from: name some of them");
    }
    cut.sort();
    let (inside, outside): (Vec<_>, Vec<_>) = plan
        .nodes
        .iter()
        .enumerate()
        .partition(|(i, _)| cut.contains(i));
    set_partition(dir, cut).await?;
    let names =
        |v: Vec<(usize, &RelayPlanNode)>| v.into_iter().map(|(_, n)| n.name.clone()).collect();
    Ok((names(inside), names(outside)))
}

/// Ends the partition of the testnet in `dir`.
pub async fn heal(dir: &Path) -> anyhow::Result<()> {
    plan_of(dir)?;
    set_partition(dir, Vec::new()).await
}

/// One line about the links of the testnet in `dir` (each tier's, the partition, whether
/// the relays run), or `None` if it has no relays.
pub fn links_summary(dir: &Path) -> Option<String> {
    let plan = relayd::read_plan(dir).ok()??;
    let mut tiers: Vec<(String, String)> = Vec::new();
    for n in &plan.nodes {
        if !tiers.iter().any(|(t, _)| *t == n.tier) {
            tiers.push((n.tier.clone(), n.link.clone()));
        }
    }
    let links: Vec<String> = tiers.iter().map(|(t, l)| format!("{t} {l}")).collect();
    let state = match (relay_pid(dir), relayd::read_state(dir)) {
        (None, _) => "relays not running".to_string(),
        (Some(_), Some(s)) if !s.cut.is_empty() => {
            let cut: Vec<String> = s
                .cut
                .iter()
                .filter_map(|i| plan.nodes.get(*i).map(|n| n.name.clone()))
                .collect();
            format!("partitioned: {} cut off", cut.join(", "))
        }
        (Some(_), _) => "no partition".to_string(),
    };
    Some(format!("links: {}; {state}", links.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse_tiers("edge=3,cloud=2"),
            Ok(vec![("edge".to_string(), 3), ("cloud".to_string(), 2)])
        );
        for bad in ["", "=2", "a b=2", "edge=0", "edge=x", "edge"] {
            assert!(parse_tiers(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn links_default_by_tier_name_and_must_name_a_tier() {
        let tiers = parse_tiers("edge=3,cloud=2,lab=1").unwrap();
        let given = vec![parse_link("cloud=2ms±1ms/0.5%").unwrap()];
        let links = tier_links(&tiers, &given).unwrap();
        let show: Vec<String> = links.iter().map(|(t, l)| format!("{t}={l}")).collect();
        assert_eq!(show, ["edge=30ms", "cloud=2ms±1ms/0.5%", "lab=0ms"]);
        let e = tier_links(&tiers, &[parse_link("core=1ms").unwrap()]).unwrap_err();
        assert!(e.to_string().contains("edge, cloud, lab"), "{e}");
        for bad in ["edge", "edge=fast", "edge=30ms/200%"] {
            assert!(parse_link(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
