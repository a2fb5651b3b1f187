//! `canal testnet`: a multi-node mesh on this machine, whose nodes outlive the command.

use anyhow::{Context, bail};
use canal_proto::api::Health;
use canal_testnet::Api;
use canal_testnet::LinkSettings;
use canal_testnet::cluster::{self, ClusterNode, UpOptions, parse_link, parse_tiers};
use clap::{Args, Subcommand};
use comfy_table::{Table, presets::NOTHING};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug)]
pub(crate) struct TestnetArgs {
    /// Where the testnet's nodes keep their data.
    #[arg(
        long,
        global = true,
        env = "CANAL_TESTNET_DIR",
        default_value = "./canal-testnet"
    )]
    dir: PathBuf,
    #[command(subcommand)]
    command: TestnetCommand,
}

#[derive(Subcommand, Debug)]
enum TestnetCommand {
    /// Start N nodes on loopback, wait until they form a mesh, print their API addresses.
    Up {
        /// How many nodes (all of tier `default`), unless --tiers says otherwise.
        #[arg(long)]
        nodes: Option<usize>,
        /// How many nodes (the last ones) declare a GPU.
        #[arg(long, default_value_t = 0)]
        gpu_nodes: usize,
        /// The GPU those nodes declare, MODEL:MEMORY.
        #[arg(long, default_value = "H100:80GiB")]
        gpu: String,
        /// Tiers and their node counts, such as edge=3,cloud=2.
        #[arg(long, value_parser = |s: &str| parse_tiers(s).map(Tiers))]
        tiers: Option<Tiers>,
        /// A tier's link, `TIER=LATENCY[±JITTER][/LOSS%]` such as edge=30ms±5ms/1% (`+-` for
        /// `±`); repeatable. With --tiers or --link, every node is behind a delay relay; a
        /// tier without --link gets edge 30ms, cloud 1ms, any other none.
        #[arg(long = "link", value_parser = parse_link)]
        links: Vec<(String, LinkSettings)>,
        /// How long to wait for the mesh to form, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// The token key file the nodes get (copied into the testnet's directory); default:
        /// one made there on first `up` (`DIR/token.key`) and kept.
        #[arg(long)]
        token_key: Option<std::path::PathBuf>,
        /// Serve the APIs over HTTPS, with certificates of a local CA made in DIR/tls/ (it
        /// prints `export CANAL_CA=...` for the CLI).
        #[arg(long)]
        tls: bool,
        /// Shards of the topic space (`canal node --shards`) [default: 64].
        #[arg(long)]
        shards: Option<u32>,
    },
    /// Each node: running or not, its peer id, API address and readiness.
    Status,
    /// Stop every node (SIGTERM, then SIGKILL); data is kept unless --purge.
    Down {
        /// Remove the testnet's directory as well.
        #[arg(long)]
        purge: bool,
    },
    /// Kill one node with SIGKILL, as a crash would (node2, or 2).
    Kill {
        /// The node's name or index.
        node: String,
    },
    /// Start one node again on its data dir and ports (node2, or 2).
    Restart {
        /// The node's name or index.
        node: String,
    },
    /// Cut nodes off from the rest (node2, or 2,3): their connections across are reset and
    /// refused until `heal`. Needs a testnet with links (--tiers or --link).
    Partition {
        /// The nodes' names or indices, comma-separated.
        #[arg(value_delimiter = ',', required = true)]
        nodes: Vec<String>,
    },
    /// End the partition: every node can reach every other again.
    Heal,
    /// Make a local CA, a node certificate (localhost, 127.0.0.1) and a client certificate
    /// in DIR/tls/ (ca.pem, node.pem, node-key.pem, client.pem, client-key.pem), kept if they
    /// are there: what `up --tls` and the compose files serve the APIs with, and what
    /// `canal --cert --key` shows a node with `--tls-client-ca`.
    Certs,
    /// Run the testnet's delay relays until SIGTERM (started by `up`).
    #[command(hide = true)]
    Relay,
    /// Run a demo end to end against the running testnet (or given API URLs); exits 1 if
    /// anything expected did not happen.
    Scenario(crate::scenario::ScenarioArgs),
}

/// `--tiers`, parsed (a newtype, since clap reads a bare `Vec` as a repeated flag).
#[derive(Debug, Clone)]
struct Tiers(Vec<(String, usize)>);

pub(crate) async fn run(args: TestnetArgs, json: bool) -> anyhow::Result<()> {
    let bin = std::env::current_exe().context("cannot find the canal binary to run nodes with")?;
    let dir = args.dir;
    // A testnet up with --tls keeps its CA with it; this process trusts it unless --ca said.
    let local_ca = dir.join("tls").join("ca.pem");
    if local_ca.exists() {
        let _ = canal_client::tls::set_ca_file(&local_ca);
    }
    match args.command {
        TestnetCommand::Up {
            nodes,
            gpu_nodes,
            gpu,
            tiers,
            links,
            timeout,
            token_key,
            tls,
            shards,
        } => {
            canal_proto::Gpu::parse_declared(&gpu)?;
            let relayed = tiers.is_some() || !links.is_empty();
            let tiers = match (tiers, nodes) {
                (Some(Tiers(t)), Some(n)) if t.iter().map(|(_, c)| c).sum::<usize>() != n => {
                    bail!(
                        "--nodes {n} does not match --tiers, which add up to {}",
                        t.iter().map(|(_, c)| c).sum::<usize>()
                    )
                }
                (Some(Tiers(t)), _) => t,
                (None, Some(0)) => bail!("--nodes 0: a testnet needs at least one node"),
                (None, n) => vec![("default".to_string(), n.unwrap_or(3))],
            };
            let links = if relayed {
                Some(cluster::tier_links(&tiers, &links)?)
            } else {
                None
            };
            let opts = UpOptions {
                dir: dir.clone(),
                tiers,
                gpu_nodes,
                gpu,
                timeout: Duration::from_secs(timeout),
                links,
                token_key,
                tls,
                node_args: shards
                    .map(|n| vec!["--shards".to_string(), n.to_string()])
                    .unwrap_or_default(),
            };
            let (nodes, token) = cluster::up(&bin, &opts, |msg| eprintln!("{msg}")).await?;
            show(&nodes, json).await?;
            if let Some(api) = nodes
                .first()
                .and_then(|n| n.info.as_ref())
                .map(|i| i.api.clone())
            {
                // With --json, stdout is one JSON document; the lines to paste go to stderr.
                let mut lines = format!("export CANAL_API={api}\nexport CANAL_TOKEN={token}");
                if tls {
                    let ca = std::fs::canonicalize(&dir)?.join("tls").join("ca.pem");
                    lines.push_str(&format!("\nexport CANAL_CA={}", ca.display()));
                }
                if json {
                    eprintln!("{lines}");
                } else {
                    println!("{lines}");
                }
            }
            Ok(())
        }
        TestnetCommand::Status => {
            let nodes = cluster::list(&dir);
            if nodes.is_empty() {
                bail!(
                    "no testnet in {}: start one with `canal testnet up`",
                    dir.display()
                );
            }
            show(&nodes, json).await?;
            if let Some(links) = cluster::links_summary(&dir) {
                eprintln!("{links}");
            }
            Ok(())
        }
        TestnetCommand::Down { purge } => {
            let n = cluster::down(&dir, Duration::from_secs(15), purge).await?;
            eprintln!(
                "stopped {n} nodes{}",
                if purge { ", removed their data" } else { "" }
            );
            Ok(())
        }
        TestnetCommand::Kill { node } => {
            let n = cluster::kill(&dir, &node).await?;
            eprintln!("killed {} (pid {})", n.name, n.pid.unwrap_or(0));
            Ok(())
        }
        TestnetCommand::Restart { node } => {
            let n = cluster::restart(&bin, &dir, &node).await?;
            eprintln!("restarted {}", n.name);
            show(&[n], json).await
        }
        TestnetCommand::Partition { nodes } => {
            let (cut, rest) = cluster::partition(&dir, &nodes).await?;
            eprintln!(
                "cut off {} from {}; `canal testnet heal` joins them again",
                cut.join(", "),
                if rest.is_empty() {
                    "nothing".to_string()
                } else {
                    rest.join(", ")
                }
            );
            Ok(())
        }
        TestnetCommand::Heal => {
            cluster::heal(&dir).await?;
            eprintln!("healed: every node can reach every other");
            Ok(())
        }
        TestnetCommand::Relay => {
            let dir = std::fs::canonicalize(&dir)
                .with_context(|| format!("no testnet in {}", dir.display()))?;
            canal_testnet::relayd::run(&dir, async {
                use tokio::signal::unix::{SignalKind, signal};
                match signal(SignalKind::terminate()) {
                    Ok(mut term) => tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    },
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            })
            .await
        }
        TestnetCommand::Certs => {
            let files = canal_testnet::tls::ensure_local_ca(&dir.join("tls"))?;
            eprintln!(
                "local CA {}, node certificate {} and key {}, client certificate {} and key {}",
                files.ca.display(),
                files.cert.display(),
                files.key.display(),
                files.client_cert.display(),
                files.client_key.display()
            );
            Ok(())
        }
        TestnetCommand::Scenario(args) => crate::scenario::run(args, &dir, json).await,
    }
}

async fn show(nodes: &[ClusterNode], json: bool) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for n in nodes {
        let health = match &n.info {
            Some(info) => Api::new(&info.api).get::<Health>("/v1/health").await.ok(),
            None => None,
        };
        rows.push((n, health));
    }
    if json {
        let out: Vec<serde_json::Value> = rows
            .iter()
            .map(|(n, h)| {
                serde_json::json!({
                    "name": n.name,
                    "running": n.pid.is_some(),
                    "pid": n.pid,
                    "data_dir": n.dir,
                    "peer_id": n.info.as_ref().map(|i| i.peer_id.clone()),
                    "api": n.info.as_ref().map(|i| i.api.clone()),
                    "mqtt": n.info.as_ref().and_then(|i| i.mqtt.clone()),
                    "ready": h.as_ref().map(|h| h.ready),
                    "peers": h.as_ref().map(|h| h.peers),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let mut t = Table::new();
    t.load_preset(NOTHING).set_header(vec![
        "NODE", "STATE", "PID", "PEERS", "API", "MQTT", "PEER ID",
    ]);
    for (n, h) in rows {
        let state = match (&n.pid, &h) {
            (None, _) => "stopped",
            (Some(_), Some(h)) if h.ready => "ready",
            (Some(_), _) => "starting",
        };
        t.add_row(vec![
            n.name.clone(),
            state.to_string(),
            n.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            h.as_ref()
                .map(|h| h.peers.to_string())
                .unwrap_or_else(|| "-".into()),
            n.info
                .as_ref()
                .map(|i| i.api.clone())
                .unwrap_or_else(|| "-".into()),
            n.info
                .as_ref()
                .and_then(|i| i.mqtt.clone())
                .unwrap_or_else(|| "-".into()),
            n.info
                .as_ref()
                .map(|i| i.peer_id.clone())
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    println!("{t}");
    Ok(())
}
