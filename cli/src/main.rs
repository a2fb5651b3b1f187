//! # canal — the command-line tool
//!
//! `canal node` runs a peer; every other command is a client of a node's HTTP API
//! (`--api`, else `CANAL_API`, else `http://127.0.0.1:7070`).
//!
//! ## Layout
//!
//! - `node_cmd`: `canal node` — flags, `CANAL_*` variables and the TOML file merged into one
//!   configuration, then the node run until SIGINT/SIGTERM.
//! - `client`: the HTTP client and its error messages.
//! - `pubsub_cmd`: `canal pub` and `canal sub`.
//! - `fn_cmd`: `canal fn`, `canal trigger` and `canal state`: functions, their triggers and
//!   their state.
//! - `show`: tables for people, JSON for scripts.
//! - `bench`: `canal bench`, load generators; `bench_fn`: `canal bench fn`; `bench_nats`:
//!   the NATS side of `canal bench pubsub --compare-nats`; `bench_placement`: `canal bench
//!   placement`.
//! - `testnet_cmd`: `canal testnet`, a mesh of node processes on this machine.
//! - `token_cmd`: `canal token`: issue, list, revoke; key files; offline minting.
//! - `scenario`: `canal testnet scenario`, the README's demos run end to end and checked.
//!
//! Exit codes: 0 success, 1 the request failed, 2 bad usage.

mod bench;

// glibc's malloc was about a seventh of a node's CPU under QoS 1 load (dozens of groups'
// tasks allocating small buffers on every thread); mimalloc's per-thread free lists are
// cheaper there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
mod client;
mod fn_cmd;
mod node_cmd;
mod pubsub_cmd;
mod scenario;
mod show;
mod testnet_cmd;
mod token_cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// canal: a distributed publish/subscribe mesh with serverless WebAssembly functions.
#[derive(Parser, Debug)]
#[command(name = "canal", version, about, propagate_version = true)]
struct Cli {
    /// Base URL of a node's HTTP API.
    #[arg(
        long,
        global = true,
        env = "CANAL_API",
        default_value = "http://127.0.0.1:7070"
    )]
    api: String,
    /// The token requests carry (`Authorization: Bearer`): the admin token a founding node
    /// printed, or one from `canal token create`.
    #[arg(long, global = true, env = "CANAL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM CA certificates to verify an `https://` node's certificate with (instead of the
    /// system's roots); a certificate that does not chain to them is refused.
    #[arg(long, global = true, env = "CANAL_CA")]
    ca: Option<std::path::PathBuf>,
    /// PEM certificate chain to show a node that asks for one (mutual TLS, a node with
    /// --tls-client-ca), with --key. Before the command: `token mint --key` is another key.
    #[arg(
        long = "cert",
        id = "client_cert",
        env = "CANAL_CERT",
        requires = "client_key"
    )]
    cert: Option<std::path::PathBuf>,
    /// PEM private key of --cert.
    #[arg(
        long = "key",
        id = "client_key",
        env = "CANAL_KEY",
        requires = "client_cert"
    )]
    key: Option<std::path::PathBuf>,
    /// Print JSON for scripts instead of tables for people.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a canal peer.
    Node(Box<node_cmd::NodeArgs>),
    /// Publish to a topic.
    Pub(pubsub_cmd::PubArgs),
    /// Subscribe to a topic filter and print events as they come.
    Sub(pubsub_cmd::SubArgs),
    /// Every known peer: id, addresses, tier, labels, CPU, memory, GPUs, load, last seen.
    Peers,
    /// Whether the node is ready (GET /v1/health): exits 0 if so, 1 if not or unreachable.
    Health,
    /// Load generators: throughput and latency percentiles.
    Bench(bench::BenchArgs),
    /// A multi-node mesh on this machine: up, status, down, kill, restart.
    Testnet(testnet_cmd::TestnetArgs),
    /// The Raft groups and the shard map: status, shards, removing a peer for good, making a
    /// cluster key.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Topics: where they live.
    Topic {
        #[command(subcommand)]
        command: TopicCommand,
    },
    /// WebAssembly functions: deploy, list, rm, invoke, placement.
    Fn {
        #[command(subcommand)]
        command: fn_cmd::FnCommand,
    },
    /// Triggers: run a function on every event that matches a topic filter.
    Trigger {
        #[command(subcommand)]
        command: fn_cmd::TriggerCommand,
    },
    /// The state functions keep: get one value, list keys.
    State {
        #[command(subcommand)]
        command: fn_cmd::StateCommand,
    },
    /// Tokens: create, list, revoke; token key files.
    Token {
        #[command(subcommand)]
        command: token_cmd::TokenCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Per Raft group: leader, term, voters, learners, each member's log and commit index.
    Status,
    /// Let a peer join the cluster (as a learner, then a voter as needed) on a mesh without
    /// a cluster key, where peers do not join on their own.
    Admit {
        /// The peer id (from `canal peers` or the joining node's first log line).
        peer: String,
    },
    /// The shard map committed in the metadata group: every shard's replicas (preferred
    /// leader first), the group serving it today and that group's leader, each peer's share,
    /// and the moves planned from the previous map (not executed yet).
    Shards {
        /// List every planned move, not only their count.
        #[arg(long)]
        moves: bool,
    },
    /// Remove a peer that left for good from every Raft group.
    Remove {
        /// The peer id (from `canal cluster status` or `canal peers`).
        peer: String,
    },
    /// Write a new random cluster key to FILE, for `canal node --cluster-key FILE`.
    Keygen {
        /// Where to write the key; refused if the file exists.
        file: std::path::PathBuf,
        /// Keep FILE if it exists already (exit 0): for containers that share one key and
        /// may start together. The key is written whole or not at all.
        #[arg(long)]
        if_missing: bool,
    },
}

#[derive(Subcommand, Debug)]
enum TopicCommand {
    /// The topic's key and shard, the shard's planned replicas in the shard map, its DHT
    /// home peers, and the Raft group that holds the topic's log today.
    Locate {
        /// A topic name, such as sensors/room1/temp (no wildcards).
        #[arg(value_parser = parse_topic)]
        topic: canal_proto::Topic,
    },
    /// Where a topic's log starts and ends on the node asked.
    Log {
        /// A topic name.
        #[arg(value_parser = parse_topic)]
        topic: canal_proto::Topic,
    },
    /// Show or change the retention and payload limit of a topic or a filter
    /// (`sensors/#`): the most specific filter's settings apply to a topic.
    Settings {
        /// A topic or a filter.
        #[arg(value_parser = parse_filter)]
        filter: canal_proto::TopicFilter,
        /// Keep at most this many events.
        #[arg(long)]
        retain_events: Option<u64>,
        /// Keep at most this many payload bytes (0: no limit), e.g. 512MiB.
        #[arg(long)]
        retain_bytes: Option<String>,
        /// Keep events at most this long (0s: no limit), e.g. 24h.
        #[arg(long)]
        retain_age: Option<String>,
        /// The largest payload a publish may carry, e.g. 64KiB (at most 1MiB).
        #[arg(long)]
        max_payload: Option<String>,
        /// Remember publish ids this long, e.g. 5s: a publish with an id seen within it is
        /// the same event (default 2m, at most 1h).
        #[arg(long)]
        dedup_window: Option<String>,
        /// Remove the settings of this topic or filter.
        #[arg(long, conflicts_with_all = ["retain_events", "retain_bytes", "retain_age", "max_payload", "dedup_window"])]
        reset: bool,
    },
}

fn parse_filter(s: &str) -> Result<canal_proto::TopicFilter, String> {
    canal_proto::TopicFilter::new(s).map_err(|e| e.to_string())
}

fn parse_topic(s: &str) -> Result<canal_proto::Topic, String> {
    canal_proto::Topic::new(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Node(_) | Command::Testnet(_) | Command::Bench(_)
    ) {
        // A client printing into a closed pipe (`canal sub ... | head`) ends quietly, as Unix
        // tools do, instead of panicking on the write. Not for the node: it must survive
        // writes to sockets its peers closed.
        // SAFETY: signal(2) with SIG_DFL has no memory-safety preconditions; no other thread
        // exists yet.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // A setting with a value that is not allowed is bad usage (2), like a flag clap
            // refuses; anything that went wrong while doing the work is 1.
            let usage = e.chain().any(|c| {
                c.is::<canal_node::config::ConfigError>()
                    || c.is::<client::UsageError>()
                    || matches!(
                        c.downcast_ref::<canal_client::ClientError>(),
                        Some(canal_client::ClientError::BadUrl { .. })
                    )
                    || matches!(
                        c.downcast_ref::<canal_node::NodeError>(),
                        Some(canal_node::NodeError::Config(_))
                    )
            });
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(ca) = &cli.ca {
        canal_client::tls::set_ca_file(ca).map_err(client::UsageError)?;
    }
    if let (Some(cert), Some(key)) = (&cli.cert, &cli.key) {
        canal_client::tls::set_client_identity(cert, key).map_err(client::UsageError)?;
    }
    match cli.command {
        Command::Node(args) => node_cmd::run(*args).await,
        Command::Bench(args) => bench::run(args, cli.json).await,
        Command::Testnet(args) => testnet_cmd::run(args, cli.json).await,
        Command::Cluster { command } => match command {
            ClusterCommand::Status => {
                let client = client::Client::new(&cli.api, cli.token.as_deref())?;
                let status: canal_proto::api::ClusterStatus =
                    client.get("/v1/cluster/status").await?;
                show::cluster(&status, cli.json)
            }
            ClusterCommand::Shards { moves } => {
                let client = client::Client::new(&cli.api, cli.token.as_deref())?;
                let shards: canal_proto::api::ClusterShards =
                    client.get("/v1/cluster/shards").await?;
                show::shards(&shards, moves, cli.json)
            }
            ClusterCommand::Admit { peer } => {
                let client = client::Client::new(&cli.api, cli.token.as_deref())?;
                client
                    .post(&format!(
                        "/v1/cluster/admit/{}",
                        client::encode_segment(&peer)
                    ))
                    .await?;
                eprintln!("admitted {peer}: the leader adds it as a learner once it is seen");
                Ok(())
            }
            ClusterCommand::Remove { peer } => {
                let client = client::Client::new(&cli.api, cli.token.as_deref())?;
                client
                    .post(&format!(
                        "/v1/cluster/remove/{}",
                        client::encode_segment(&peer)
                    ))
                    .await?;
                eprintln!("removed {peer} from every Raft group");
                Ok(())
            }
            ClusterCommand::Keygen { file, if_missing } => keygen(&file, if_missing),
        },
        Command::Pub(args) => {
            pubsub_cmd::publish(&cli.api, cli.token.as_deref(), args, cli.json).await
        }
        Command::Sub(args) => {
            pubsub_cmd::subscribe(&cli.api, cli.token.as_deref(), args, cli.json).await
        }
        Command::Health => health(&cli.api, cli.json).await,
        Command::Peers => {
            let client = client::Client::new(&cli.api, cli.token.as_deref())?;
            let peers: canal_proto::api::Peers = client.get("/v1/peers").await?;
            show::peers(&peers, cli.json)
        }
        Command::Topic {
            command: TopicCommand::Locate { topic },
        } => {
            let client = client::Client::new(&cli.api, cli.token.as_deref())?;
            let path = format!(
                "/v1/topics/{}/locate",
                client::encode_segment(topic.as_str())
            );
            let locate: canal_proto::api::Locate = client.get(&path).await?;
            show::locate(&locate, cli.json)
        }
        Command::Topic {
            command: TopicCommand::Log { topic },
        } => {
            let client = client::Client::new(&cli.api, cli.token.as_deref())?;
            let path = format!("/v1/topics/{}/log", client::encode_segment(topic.as_str()));
            let log: canal_proto::api::TopicLog = client.get(&path).await?;
            if cli.json {
                show::json(&log)
            } else {
                println!(
                    "{}: offsets {}..{} ({} events stored)",
                    log.topic,
                    log.first,
                    log.next,
                    log.next - log.first
                );
                Ok(())
            }
        }
        Command::Topic {
            command:
                TopicCommand::Settings {
                    filter,
                    retain_events,
                    retain_bytes,
                    retain_age,
                    max_payload,
                    dedup_window,
                    reset,
                },
        } => {
            let client = client::Client::new(&cli.api, cli.token.as_deref())?;
            let path = format!(
                "/v1/topics/{}/settings",
                client::encode_segment(filter.as_str())
            );
            let change = canal_proto::settings::SettingsRequest {
                retain_events,
                retain_bytes,
                retain_age,
                max_payload,
                dedup_window,
            };
            if reset {
                client.delete(&path).await?;
            } else if change != canal_proto::settings::SettingsRequest::default() {
                let _: canal_proto::settings::SettingsAnswer = client
                    .put_json(&path, serde_json::to_vec(&change)?, &[])
                    .await?;
            }
            let answer: canal_proto::settings::SettingsAnswer = client.get(&path).await?;
            show::settings(&answer, cli.json)
        }
        Command::Fn { command } => {
            fn_cmd::function(&cli.api, cli.token.as_deref(), command, cli.json).await
        }
        Command::Trigger { command } => {
            fn_cmd::trigger(&cli.api, cli.token.as_deref(), command, cli.json).await
        }
        Command::State { command } => {
            fn_cmd::state(&cli.api, cli.token.as_deref(), command, cli.json).await
        }
        Command::Token { command } => {
            token_cmd::run(&cli.api, cli.token.as_deref(), command, cli.json).await
        }
    }
}

/// `canal health`: the node's own account of whether it is ready; also the health check of
/// the compose files (their images need no curl).
async fn health(api: &str, json: bool) -> anyhow::Result<()> {
    use anyhow::Context;
    let client = client::Client::with_timeout(api, None, std::time::Duration::from_secs(5))?;
    let (status, body) = client
        .raw(canal_client::Method::GET, "/v1/health", Vec::new(), &[])
        .await?;
    let h: canal_proto::api::Health = serde_json::from_slice(&body).with_context(|| {
        format!(
            "{api}/v1/health answered {status} with {:?}, not a health report",
            String::from_utf8_lossy(&body)
        )
    })?;
    if json {
        println!("{}", serde_json::to_string(&h)?);
    } else {
        println!(
            "{} {} (canal {}, up {} s, {} peers, {} connections, mqtt {}{})",
            h.peer_id,
            if h.ready { "ready" } else { "not ready" },
            h.version,
            h.uptime_s,
            h.peers,
            h.connections,
            h.mqtt_addr.as_deref().unwrap_or("off"),
            h.mqtts_addr
                .as_deref()
                .map(|a| format!(", mqtts {a}"))
                .unwrap_or_default()
        );
    }
    if !h.ready {
        anyhow::bail!(
            "the node at {api} is not ready: {}",
            h.reason.as_deref().unwrap_or("it gives no reason")
        );
    }
    Ok(())
}

fn keygen(file: &std::path::Path, if_missing: bool) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::{Read, Write};
    if if_missing && file.exists() {
        eprintln!("{} exists: keeping it", file.display());
        return Ok(());
    }
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .context("cannot read random bytes from /dev/urandom")?;
    // Written to a file of our own, then linked into place: linking fails if FILE exists,
    // so of several writers one wins and nobody ever reads a half-written key.
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let written = opts
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(canal_node::config::cluster_key_text(key).as_bytes())?;
            f.sync_all()
        })
        .with_context(|| format!("cannot write {}", tmp.display()));
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, file).map_err(anyhow::Error::from));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e)
            if if_missing
                && e.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::AlreadyExists) =>
        {
            eprintln!(
                "{} was written by another process: keeping it",
                file.display()
            );
            return Ok(());
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!("cannot create {} (it must not exist yet)", file.display())
            });
        }
    }
    eprintln!(
        "wrote a new cluster key to {}; give it to every node with --cluster-key",
        file.display()
    );
    Ok(())
}
