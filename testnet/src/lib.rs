//! # canal-testnet — multi-node canal runs on one machine
//!
//! The harness every integration test uses, and (later) the engine of `canal testnet`: it
//! starts real `canal node` processes on loopback, each with its own data directory and
//! ephemeral ports, and offers kill, restart and wait-for-a-condition with a deadline.
//!
//! ## Layout
//!
//! - [`Testnet`]: a set of nodes under one directory; node 0 is the bootstrap peer of the rest.
//! - [`NodeOptions`]: per-node settings (tier, labels, GPUs, cluster key, extra flags).
//! - [`wait_for`]: poll a condition until it holds or a deadline passes, with a message
//!   saying what was awaited.
//! - [`Api`]: a small JSON client of one node's HTTP API, carrying the admin token.
//! - [`auth`]: the token key every node of the process's testnets gets, and its admin
//!   token ([`admin_token`]), so tests run with tokens checked.
//! - [`guests`]: the example guest functions, built for `wasm32-wasip2` on first use.
//! - [`cluster`]: the persistent testnet of `canal testnet up/status/down/kill/restart`,
//!   whose nodes outlive the command that started them.
//! - [`relay`]: delay-and-loss TCP relays between the nodes: tier links (latency, jitter,
//!   loss) and partitions. A testnet whose nodes have [`NodeOptions::link`] puts every node
//!   behind one; see [`Testnet::partition`], [`Testnet::heal`], [`Testnet::set_link`].
//! - [`relayd`]: the relay process of the persistent testnet, which outlives `canal testnet
//!   up` as its nodes do, and takes partitions through a control file.
//! - [`tls`]: a local CA and node certificates for `canal testnet up --tls` and TLS tests.
//! - [`ports`]: fixed loopback ports, reserved outside the ephemeral range until the
//!   process that binds them starts.
//! - [`compose`]: the compose files of a mesh in containers (Docker for real hosts, podman
//!   in CI), generated from one description.
//!
//! Every child process is killed when its [`Testnet`] is dropped, so a failing test leaves no
//! node behind.

use anyhow::{Context, anyhow, bail};
use canal_client::{Client, ClientError, Method};
use canal_proto::api::RuntimeInfo;
use serde::de::DeserializeOwned;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

pub mod auth;
pub mod cluster;
pub mod compose;
pub mod guests;
pub mod ports;
pub mod relay;
pub mod relayd;
pub mod tls;

pub use auth::{admin_token, http_client};
pub use relay::{Fabric, LinkSettings};

/// Settings of one node of a testnet.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// `--tier`.
    pub tier: Option<String>,
    /// `--label KEY=VALUE`, each.
    pub labels: Vec<(String, String)>,
    /// `--gpu MODEL:MEMORY`, each.
    pub gpus: Vec<String>,
    /// `--cluster-key FILE`; `None`: the testnet's own key (see [`Testnet::cluster_key`]),
    /// unless [`keyless`](Self::keyless) is set.
    pub cluster_key: Option<PathBuf>,
    /// Starts the node without any cluster key (loopback only; peers join by `canal cluster
    /// admit`), for tests of what a keyless mesh does.
    pub keyless: bool,
    /// Whether to bootstrap from node 0 (true for every node but node 0 unless changed).
    pub bootstrap_from_first: bool,
    /// Starts the node without the testnet's token key (`--token-key`): as a founding node,
    /// it makes one of its own at formation; otherwise it learns the cluster's. Tokens
    /// signed with the process's key ([`admin_token`]) are then refused by it.
    pub own_token_key: bool,
    /// Any further flags.
    pub extra_args: Vec<String>,
    /// Puts the node behind a delay-and-loss relay with this link (see [`relay`]). If any
    /// node of a testnet started with [`Testnet::start`] has one, every node is behind a
    /// relay (the others with [`LinkSettings::NONE`]), so that partitions can cut any node.
    pub link: Option<LinkSettings>,
}

impl NodeOptions {
    /// The `canal` command line of a node with these options, its data in `data_dir`,
    /// listening on ephemeral loopback ports, bootstrapping from `bootstrap` if given.
    pub fn args(&self, data_dir: &Path, bootstrap: Option<&str>) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "node".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen".into(),
            "/ip4/127.0.0.1/tcp/0".into(),
            "--api-listen".into(),
            "127.0.0.1:0".into(),
            "--mqtt-listen".into(),
            "127.0.0.1:0".into(),
        ];
        if let Some(b) = bootstrap {
            args.extend(["--bootstrap".into(), b.to_string()]);
        }
        if let Some(t) = &self.tier {
            args.extend(["--tier".into(), t.clone()]);
        }
        for (k, v) in &self.labels {
            args.extend(["--label".into(), format!("{k}={v}")]);
        }
        for g in &self.gpus {
            args.extend(["--gpu".into(), g.clone()]);
        }
        if let Some(k) = &self.cluster_key {
            args.extend(["--cluster-key".into(), k.display().to_string()]);
        }
        args.extend(self.extra_args.iter().cloned());
        // A TLS node would take 8883 for MQTT over TLS: an ephemeral port, like the others.
        let tls = self.extra_args.iter().any(|a| a == "--tls-cert");
        if tls
            && !self
                .extra_args
                .iter()
                .any(|a| a.starts_with("--mqtts-listen"))
        {
            args.extend(["--mqtts-listen".into(), "127.0.0.1:0".into()]);
        }
        args
    }
}

/// The Raft election timeout (ms) given to nodes that talk directly on loopback: elections
/// within 200-400 ms, an RPC timeout of 133 ms, failover under a second. Nodes behind relays
/// (tiers, links) keep the node's default (600 ms), which suits round trips up to ~300 ms.
pub const FAST_RAFT_ELECTION_TIMEOUT_MS: u64 = 200;

/// Adds `--raft-election-timeout-ms` [`FAST_RAFT_ELECTION_TIMEOUT_MS`] to a node's command
/// line unless it already names an election timeout.
pub fn add_fast_raft(args: &mut Vec<String>) {
    let named = args.iter().any(|a| {
        a.starts_with("--raft-election-timeout-ms") || a.starts_with("--raft-election-timeout")
    });
    if !named {
        args.extend([
            "--raft-election-timeout-ms".into(),
            FAST_RAFT_ELECTION_TIMEOUT_MS.to_string(),
        ]);
    }
}

/// One node process and what it reported about itself.
#[derive(Debug)]
pub struct TestNode {
    name: String,
    data_dir: PathBuf,
    options: NodeOptions,
    bootstrap: Option<String>,
    child: Option<Child>,
    info: Option<RuntimeInfo>,
    /// The ports of the first start, reused on restart so that peers and clients find the
    /// node where it was: (peer listen multiaddr without /p2p, API address, MQTT address).
    ports: Option<(String, String, Option<String>)>,
}

impl TestNode {
    /// The node's name (`node0`, `node1`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// What it wrote to `node.json` when it last started.
    pub fn info(&self) -> anyhow::Result<&RuntimeInfo> {
        self.info
            .as_ref()
            .ok_or_else(|| anyhow!("{} is not running", self.name))
    }

    /// Where its MQTT listener is (from `node.json` of its last start).
    pub fn mqtt_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        let info = self.info()?;
        info.mqtt
            .as_deref()
            .ok_or_else(|| anyhow!("{} reports no MQTT listener", self.name))?
            .parse()
            .with_context(|| format!("{}'s MQTT address {:?}", self.name, info.mqtt))
    }

    /// Where its MQTT-over-TLS listener is (from `node.json` of its last start).
    pub fn mqtts_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        let info = self.info()?;
        info.mqtts
            .as_deref()
            .ok_or_else(|| anyhow!("{} reports no MQTT-over-TLS listener", self.name))?
            .parse()
            .with_context(|| format!("{}'s MQTT-over-TLS address {:?}", self.name, info.mqtts))
    }

    /// Whether its process is running (as far as this harness knows).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The tail of its log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.data_dir.join("node.log"), lines)
    }
}

pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let tail_from = all.len().saturating_sub(lines);
    // The error a node exits with can come before the last lines: the tasks of its many
    // Raft groups log their shutdown after it. The last few errors come first.
    let mut errors: Vec<&str> = all[..tail_from]
        .iter()
        .filter(|l| l.starts_with("error: ") || l.contains(" ERROR "))
        .copied()
        .collect();
    errors.drain(..errors.len().saturating_sub(5));
    errors
        .into_iter()
        .chain(all[tail_from..].iter().copied())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The shard count the harness's nodes get unless told otherwise (see `spawn`).
pub const TEST_SHARDS: &str = "8";

/// A set of canal nodes on this machine, under one directory.
pub struct Testnet {
    bin: PathBuf,
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    nodes: Vec<TestNode>,
    /// The relays, one per node (relay `i` is node `i`'s), if the nodes are behind relays.
    fabric: Option<Fabric>,
    /// The cluster key file every node gets unless its options say otherwise; made by
    /// `canal cluster keygen` when the first node needs it.
    key: Option<PathBuf>,
}

/// Polls `check` until it returns `Some`, or fails after `timeout` with a message naming
/// `what` and the last state `check` reported through `Err`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(25);
    loop {
        let last = match check().await {
            Ok(v) => return Ok(v),
            Err(state) => state,
        };
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

/// Makes the cluster key file `path` with `canal cluster keygen` (the real command) unless
/// it exists already, so a restarted testnet keeps its key.
pub fn ensure_cluster_key(bin: &Path, path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let out = std::process::Command::new(bin)
        .args(["cluster", "keygen"])
        .arg(path)
        .output()
        .with_context(|| format!("cannot run {} cluster keygen", bin.display()))?;
    if !out.status.success() {
        bail!(
            "canal cluster keygen {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Testnet {
    /// An empty testnet whose nodes run `bin` (the `canal` binary) and keep their data in a
    /// fresh temporary directory, removed on drop.
    pub fn new(bin: impl Into<PathBuf>) -> anyhow::Result<Testnet> {
        let temp = tempfile::Builder::new()
            .prefix("canal-testnet-")
            .tempdir()
            .context("cannot make a temporary directory for the testnet")?;
        let dir = temp.path().to_path_buf();
        Ok(Testnet {
            bin: bin.into(),
            dir,
            _temp: Some(temp),
            nodes: Vec::new(),
            fabric: None,
            key: None,
        })
    }

    /// Like [`new`](Self::new), but every node added is behind a relay of its own (with the
    /// link of its [`NodeOptions::link`], no delay if none), so links can be changed and
    /// nodes partitioned. Must be called within a tokio runtime.
    pub fn new_relayed(bin: impl Into<PathBuf>) -> anyhow::Result<Testnet> {
        let mut net = Testnet::new(bin)?;
        net.fabric = Some(Fabric::new());
        Ok(net)
    }

    /// Starts `n` nodes, node 0 first, the rest bootstrapping from it; `options(i)` gives
    /// node `i`'s settings. Returns when every node has written its runtime file.
    pub async fn start(
        bin: impl Into<PathBuf>,
        n: usize,
        mut options: impl FnMut(usize) -> NodeOptions,
    ) -> anyhow::Result<Testnet> {
        let options: Vec<NodeOptions> = (0..n).map(&mut options).collect();
        let mut net = if options.iter().any(|o| o.link.is_some()) {
            Testnet::new_relayed(bin)?
        } else {
            Testnet::new(bin)?
        };
        for (i, mut o) in options.into_iter().enumerate() {
            o.bootstrap_from_first = i > 0;
            net.add_node(o).await?;
        }
        Ok(net)
    }

    /// The directory holding the nodes' data directories.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The `canal` binary the nodes run.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &TestNode {
        &self.nodes[i]
    }

    /// How many nodes the testnet has (running or not).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the testnet has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// A client of node `i`'s API.
    pub fn api(&self, i: usize) -> anyhow::Result<Api> {
        Ok(Api::new(&self.nodes[i].info()?.api))
    }

    /// Adds a node with `options` and starts it; returns its index.
    pub async fn add_node(&mut self, options: NodeOptions) -> anyhow::Result<usize> {
        let i = self.nodes.len();
        let bootstrap = if options.bootstrap_from_first {
            let first = self.nodes.first().ok_or_else(|| {
                anyhow!("node {i} should bootstrap from node 0, but there is none")
            })?;
            Some(match &self.fabric {
                // Through node 0's relay, as every other connection.
                Some(f) => format!(
                    "/ip4/127.0.0.1/tcp/{}/p2p/{}",
                    f.relay_addr(0).port(),
                    first.info()?.peer_id
                ),
                None => first
                    .info()?
                    .listen_addrs
                    .first()
                    .cloned()
                    .ok_or_else(|| anyhow!("node0 has no listen address"))?,
            })
        } else {
            None
        };
        match &self.fabric {
            Some(f) => {
                let r = f
                    .add(options.link.unwrap_or(LinkSettings::NONE))
                    .await
                    .with_context(|| format!("cannot start node{i}'s relay"))?;
                if r != i {
                    bail!("node{i} got relay {r}: relays and nodes must be added together");
                }
            }
            None if options.link.is_some() => bail!(
                "node{i} has a link, but this testnet has no relays: use Testnet::new_relayed, or give a node a link in Testnet::start"
            ),
            None => {}
        }
        if options.cluster_key.is_none() && !options.keyless {
            self.cluster_key()?;
        }
        auth::write_process_key(&self.dir.join(auth::TOKEN_KEY_FILE))?;
        self.nodes.push(TestNode {
            name: format!("node{i}"),
            data_dir: self.dir.join(format!("node{i}")),
            options,
            bootstrap,
            child: None,
            info: None,
            ports: None,
        });
        self.spawn(i).await?;
        Ok(i)
    }

    /// The cluster key file of this testnet's nodes, made on first use: a testnet runs
    /// keyed, as a cluster reachable by others must.
    pub fn cluster_key(&mut self) -> anyhow::Result<PathBuf> {
        if let Some(k) = &self.key {
            return Ok(k.clone());
        }
        let path = self.dir.join("swarm.key");
        ensure_cluster_key(&self.bin, &path)?;
        self.key = Some(path.clone());
        Ok(path)
    }

    /// The command line node `i` is started with.
    pub fn node_args(&self, i: usize) -> Vec<String> {
        let n = &self.nodes[i];
        let mut args = n.options.args(&n.data_dir, n.bootstrap.as_deref());
        if n.options.cluster_key.is_none()
            && !n.options.keyless
            && let Some(k) = &self.key
        {
            args.extend(["--cluster-key".into(), k.display().to_string()]);
        }
        let own_auth = n
            .options
            .extra_args
            .iter()
            .any(|a| a.starts_with("--auth") || a.starts_with("--token-key"));
        if !n.options.own_token_key && !own_auth {
            args.extend([
                "--token-key".into(),
                self.dir.join(auth::TOKEN_KEY_FILE).display().to_string(),
            ]);
        }
        if let Some((listen, api, mqtt)) = &n.ports {
            let mut prev = String::new();
            for a in args.iter_mut() {
                let was = a.clone();
                if a == "/ip4/127.0.0.1/tcp/0" {
                    *a = listen.clone();
                } else if a == "127.0.0.1:0" && prev == "--api-listen" {
                    *a = api.clone();
                } else if a == "127.0.0.1:0"
                    && prev == "--mqtt-listen"
                    && let Some(m) = mqtt
                {
                    *a = m.clone();
                }
                prev = was;
            }
        }
        match &self.fabric {
            // Other nodes are told only of the relay, so they reach this node through it;
            // its links may be slow, so Raft keeps the safe timings.
            Some(f) => args.extend([
                "--advertise".into(),
                format!("/ip4/127.0.0.1/tcp/{}", f.relay_addr(i).port()),
            ]),
            None => add_fast_raft(&mut args),
        }
        args
    }

    async fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let args = self.node_args(i);
        let node = &mut self.nodes[i];
        std::fs::create_dir_all(&node.data_dir)
            .with_context(|| format!("cannot create {}", node.data_dir.display()))?;
        let log_path = node.data_dir.join("node.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let log2 = log.try_clone()?;
        let child = Command::new(&self.bin)
            .args(&args)
            // A node inherits no client settings from the environment of the test.
            .env_remove("CANAL_API")
            // 8 shard groups a node unless a test's `--shards` (or CANAL_TEST_SHARDS) says
            // otherwise: tests run side by side on small machines, and 64 groups on every
            // node of every test would make the machine, not the code, what they measure.
            .env(
                "CANAL_SHARDS",
                std::env::var("CANAL_TEST_SHARDS").unwrap_or_else(|_| TEST_SHARDS.into()),
            )
            .env(
                "CANAL_LOG",
                std::env::var("CANAL_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {} {}", self.bin.display(), args.join(" ")))?;
        let pid = child.id().unwrap_or(0);
        if let Some(f) = &self.fabric {
            f.set_pid(i, Some(pid));
        }
        node.child = Some(child);
        node.info = None;
        let runtime_file = node.data_dir.join("node.json");
        let name = node.name.clone();
        let info = {
            let child = node.child.as_mut();
            wait_runtime(&name, &runtime_file, pid, child).await
        };
        match info {
            Ok(info) => {
                if node.ports.is_none() {
                    let listen = info
                        .listen_addrs
                        .iter()
                        .find(|a| a.starts_with("/ip4/127.0.0.1/tcp/"))
                        .and_then(|a| a.split("/p2p/").next())
                        .map(str::to_string);
                    let api = info
                        .api
                        .trim_start_matches("http://")
                        .trim_start_matches("https://")
                        .to_string();
                    node.ports = listen.map(|l| (l, api, info.mqtt.clone()));
                }
                node.info = Some(info);
                if let Some(f) = &self.fabric {
                    let listen = node
                        .ports
                        .as_ref()
                        .and_then(|(l, _, _)| l.rsplit('/').next()?.parse::<u16>().ok())
                        .ok_or_else(|| anyhow!("{name} reports no 127.0.0.1 listen port"))?;
                    f.set_target(i, std::net::SocketAddr::from(([127, 0, 0, 1], listen)));
                }
                Ok(())
            }
            Err(e) => Err(e.context(format!("{name}'s log:\n{}", node.log_tail(20)))),
        }
    }

    /// Kills node `i` with SIGKILL and waits for it to be gone.
    pub async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        if let Some(mut child) = node.child.take() {
            child.start_kill().ok();
            child
                .wait()
                .await
                .with_context(|| format!("waiting for {} to die", node.name))?;
        }
        Ok(())
    }

    /// Stops node `i` with SIGTERM (a clean shutdown) and waits for it; returns its exit
    /// status.
    pub async fn stop(&mut self, i: usize) -> anyhow::Result<std::process::ExitStatus> {
        let node = &mut self.nodes[i];
        let mut child = node
            .child
            .take()
            .ok_or_else(|| anyhow!("{} is not running", node.name))?;
        if let Some(pid) = child.id() {
            // SAFETY: kill(2) with a pid of our own child and a valid signal number has no
            // memory-safety preconditions.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .map_err(|_| anyhow!("{} did not stop within 30 s of SIGTERM", node.name))??;
        Ok(status)
    }

    /// Sends `signal` (such as `libc::SIGSTOP` or `libc::SIGCONT`) to node `i`: a stopped
    /// process holds its connections but answers nothing, as a hung or partitioned peer.
    pub fn signal(&self, i: usize, signal: i32) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        let pid = node
            .child
            .as_ref()
            .and_then(|c| c.id())
            .ok_or_else(|| anyhow!("{} is not running", node.name))?;
        // SAFETY: kill(2) has no memory-safety preconditions.
        let rc = unsafe { libc::kill(pid as i32, signal) };
        if rc != 0 {
            bail!(
                "cannot signal {}: {}",
                node.name,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Starts node `i` again on the same data directory (after [`kill`](Self::kill) or
    /// [`stop`](Self::stop)).
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        if self.nodes[i].child.is_some() {
            self.kill(i).await?;
        }
        self.spawn(i).await
    }

    /// The relays between the nodes, if the testnet has them.
    pub fn fabric(&self) -> Option<&Fabric> {
        self.fabric.as_ref()
    }

    fn relays(&self, what: &str) -> anyhow::Result<&Fabric> {
        self.fabric.as_ref().ok_or_else(|| {
            anyhow!(
                "cannot {what}: this testnet has no relays (give a node NodeOptions::link, or use Testnet::new_relayed)"
            )
        })
    }

    fn check_index(&self, i: usize) -> anyhow::Result<()> {
        if i >= self.nodes.len() {
            bail!(
                "there is no node {i}: the testnet has {} nodes",
                self.nodes.len()
            );
        }
        Ok(())
    }

    /// Where other nodes reach node `i`: its relay's address.
    pub fn relay_addr(&self, i: usize) -> anyhow::Result<std::net::SocketAddr> {
        self.check_index(i)?;
        Ok(self.relays("find a relay")?.relay_addr(i))
    }

    /// Cuts the nodes in `cut` off from the rest (replacing any earlier partition): their
    /// connections across are reset and new ones refused until [`heal`](Self::heal). The
    /// nodes on each side still reach each other. The nodes notice as peers do: connections
    /// drop at once, peer tables forget the other side when its records stop (about 10 s).
    pub fn partition(&self, cut: &[usize]) -> anyhow::Result<()> {
        for &i in cut {
            self.check_index(i)?;
        }
        self.relays("partition")?.partition(cut);
        Ok(())
    }

    /// Cuts the connections between nodes `a` and `b` only; both still reach every other
    /// node. Lasts until [`heal`](Self::heal).
    pub fn block(&self, a: usize, b: usize) -> anyhow::Result<()> {
        self.check_index(a)?;
        self.check_index(b)?;
        self.relays("block a link")?.block(a, b);
        Ok(())
    }

    /// Ends the partition and every blocked link.
    pub fn heal(&self) -> anyhow::Result<()> {
        self.relays("heal")?.heal();
        Ok(())
    }

    /// Changes node `i`'s link (latency, jitter, loss) from now on.
    pub fn set_link(&self, i: usize, link: LinkSettings) -> anyhow::Result<()> {
        self.check_index(i)?;
        self.relays("set a link")?.set_link(i, link);
        Ok(())
    }

    /// The indices of the nodes running now.
    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].is_running())
            .collect()
    }
}

/// Waits until the node process `pid` has written its runtime file at `path`; fails early if
/// `child` exits first.
pub(crate) async fn wait_runtime(
    name: &str,
    path: &Path,
    pid: u32,
    mut child: Option<&mut Child>,
) -> anyhow::Result<RuntimeInfo> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(c) = child.as_deref_mut()
            && let Some(status) = c.try_wait()?
        {
            bail!("{name} exited with {status} before it was ready");
        }
        // A runtime file left by an earlier, killed process names another pid.
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(info) = serde_json::from_str::<RuntimeInfo>(&text)
            && info.pid == pid
        {
            return Ok(info);
        }
        if Instant::now() >= deadline {
            bail!("{name} did not write {} within 60 s", path.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A small JSON client of one node's HTTP API, for tests: answers come back whatever their
/// status, as `(status, body)`, so a test can check refusals. Built on [`canal_client`].
#[derive(Clone)]
pub struct Api {
    base: String,
    /// The client, or why none could be built for this base (reported by every call).
    client: Result<Client, ClientError>,
}

impl Api {
    /// A client of the API at `base` (`http://127.0.0.1:PORT`) carrying the admin token.
    pub fn new(base: &str) -> Api {
        Api::with_token(base, Some(admin_token()))
    }

    /// A client of the API at `base` carrying `token` (none: no `Authorization` header).
    pub fn with_token(base: &str, token: Option<&str>) -> Api {
        Api {
            base: base.trim_end_matches('/').to_string(),
            client: Client::new(base, token),
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The shared client underneath, for what this small one does not offer (streams).
    pub fn client(&self) -> anyhow::Result<&Client> {
        self.client.as_ref().map_err(|e| anyhow!("{e}"))
    }

    /// GETs `path` and returns the status and the body.
    pub async fn get_raw(&self, path: &str) -> anyhow::Result<(u16, String)> {
        self.send(Method::GET, path, Vec::new(), None).await
    }

    /// Sends `method` to `path` with `body` and, if given, a `canal-request-id` header;
    /// returns the status and the body.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        request_id: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        let headers: Vec<(String, String)> = request_id
            .map(|id| ("canal-request-id".to_string(), id.to_string()))
            .into_iter()
            .collect();
        let (status, body) = self
            .client()?
            .raw(method.clone(), path, body, &headers)
            .await
            .with_context(|| format!("{method} {}{path}", self.base))?;
        Ok((status.as_u16(), String::from_utf8_lossy(&body).into_owned()))
    }

    /// GETs `path` and decodes a successful JSON answer.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let (status, body) = self.get_raw(path).await?;
        if !(200..300).contains(&status) {
            bail!("GET {}{path}: HTTP {status}: {body}", self.base);
        }
        serde_json::from_str(&body)
            .with_context(|| format!("GET {}{path}: bad JSON: {body}", self.base))
    }

    /// The sum of every sample of a Prometheus metric family on `/metrics`.
    pub async fn metric_sum(&self, name: &str) -> anyhow::Result<f64> {
        let (_, text) = self.get_raw("/metrics").await?;
        Ok(text
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

#[cfg(test)]
mod fast_raft_tests {
    use super::*;

    #[test]
    fn fast_raft_is_added_unless_a_timeout_is_named() {
        let mut args = vec!["node".to_string()];
        add_fast_raft(&mut args);
        assert_eq!(args, ["node", "--raft-election-timeout-ms", "200"]);
        let mut named = vec!["--raft-election-timeout-ms=900".to_string()];
        add_fast_raft(&mut named);
        assert_eq!(named, ["--raft-election-timeout-ms=900"]);
        let mut alias = vec!["--raft-election-timeout".to_string(), "900".to_string()];
        add_fast_raft(&mut alias);
        assert_eq!(alias.len(), 2);
    }
}
