//! `canal node`: merge the TOML file, the `CANAL_*` environment and the flags (flags win over
//! the environment, which wins over the file), then run the node until SIGINT or SIGTERM.

use anyhow::Context;
use canal_node::{Node, NodeConfig};
use canal_proto::parse_label;
use clap::Args;
use std::path::PathBuf;
use tracing_subscriber::EnvFilter;

/// Flags of `canal node`. Every one has a `CANAL_*` variable; lists take commas there.
#[derive(Args, Debug, Default)]
pub(crate) struct NodeArgs {
    /// TOML file with any of the settings below (keys: data_dir, listen, api_listen, ...).
    #[arg(long, env = "CANAL_CONFIG")]
    config: Option<PathBuf>,
    /// Where the identity and data live [default: ./canal-data].
    #[arg(long, env = "CANAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Multiaddr to listen on for peers; repeatable [default: /ip4/127.0.0.1/tcp/7000].
    #[arg(long, env = "CANAL_LISTEN", value_delimiter = ',')]
    listen: Vec<String>,
    /// Address of the HTTP client API [default: 127.0.0.1:7070].
    #[arg(long, env = "CANAL_API_LISTEN")]
    api_listen: Option<String>,
    /// Address of the MQTT listener (TCP), or `none` [default: 127.0.0.1:1883].
    #[arg(long, env = "CANAL_MQTT_LISTEN")]
    mqtt_listen: Option<String>,
    /// Address of MQTT over TLS (the API's --tls-cert, --tls-key and --tls-client-ca), or
    /// `none` [default with TLS: 127.0.0.1:8883]. The plain --mqtt-listen stays on as set.
    #[arg(long, env = "CANAL_MQTTS_LISTEN")]
    mqtts_listen: Option<String>,
    /// Multiaddr of a peer to join through; repeatable.
    #[arg(long, env = "CANAL_BOOTSTRAP", value_delimiter = ',')]
    bootstrap: Vec<String>,
    /// Multiaddr other peers should reach this one at, announced instead of the listen
    /// addresses (a port forward, a proxy, the testnet's delay relay); repeatable.
    #[arg(long, env = "CANAL_ADVERTISE", value_delimiter = ',')]
    advertise: Vec<String>,
    /// How many peers form the first Raft cluster.
    #[arg(long, env = "CANAL_BOOTSTRAP_EXPECT")]
    bootstrap_expect: Option<u32>,
    /// This peer's tier, such as edge or cloud [default: default].
    #[arg(long, env = "CANAL_TIER")]
    tier: Option<String>,
    /// A label KEY=VALUE; repeatable.
    #[arg(long = "label", env = "CANAL_LABELS", value_delimiter = ',', value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Declare a GPU that detection cannot see, as MODEL:MEMORY (H100:80GiB); repeatable.
    #[arg(long = "gpu", env = "CANAL_GPU", value_delimiter = ',')]
    gpu: Vec<String>,
    /// File with the cluster's pre-shared key; peers without it cannot connect.
    #[arg(long, env = "CANAL_CLUSTER_KEY")]
    cluster_key: Option<PathBuf>,
    /// Find peers on the local network with mDNS (`--mdns`, or `--mdns=false` to turn off
    /// what the config file turned on).
    #[arg(long, env = "CANAL_MDNS", num_args = 0..=1, default_missing_value = "true")]
    mdns: Option<bool>,
    /// How many voters each Raft group should have [default: 3].
    #[arg(long, env = "CANAL_VOTERS")]
    voters: Option<usize>,
    /// Build a Raft snapshot after this many entries [default: 5000].
    #[arg(long, env = "CANAL_RAFT_SNAPSHOT_EVERY")]
    raft_snapshot_every: Option<u64>,
    /// Shortest Raft election timeout in ms [default: 600]. A follower that hears no leader
    /// for 1-2x this stands for election; a leader waits 2/3 of it for each follower's
    /// answer (the RPC timeout), so it must be well above the round trip to every Raft
    /// member: 600 suits round trips up to ~300 ms (edge to cloud); 200 gives failover under
    /// a second where members are close (one LAN). Raise it if the node warns that a
    /// member's round trip is close to the RPC timeout. Heartbeats go every 50 ms either way.
    #[arg(
        long,
        alias = "raft-election-timeout",
        env = "CANAL_RAFT_ELECTION_TIMEOUT_MS"
    )]
    raft_election_timeout_ms: Option<u64>,
    /// Run without a cluster key on addresses other hosts can reach: any peer that connects
    /// joins the cluster and gets a copy of its data. For trusted networks only; a node
    /// says so at every start.
    #[arg(long, env = "CANAL_INSECURE_OPEN", num_args = 0..=1, default_missing_value = "true")]
    insecure_open: Option<bool>,
    /// How many subscribers (SSE and WebSocket) the node serves at once; more get a 503
    /// [default: 10000].
    #[arg(long, env = "CANAL_MAX_SUBSCRIBERS")]
    max_subscribers: Option<usize>,
    /// How many publish streams (`GET /v1/publish`) the node serves at once; more get a 503
    /// [default: 1000].
    #[arg(long, env = "CANAL_MAX_PUBLISH_STREAMS")]
    max_publish_streams: Option<usize>,
    /// Test only: add this many ms to the node's clock (negative: behind) where it stamps
    /// Raft entries, to test a skewed clock. Never set it on a real node.
    #[arg(
        long,
        env = "CANAL_CLOCK_OFFSET_MS",
        hide = true,
        allow_hyphen_values = true
    )]
    clock_offset_ms: Option<i64>,
    /// How the API checks callers: `tokens` (every request but /v1/health carries a token;
    /// the default) or `none` (no checks; loopback API addresses only, for local development).
    #[arg(long, env = "CANAL_AUTH", value_parser = ["tokens", "none"])]
    auth: Option<String>,
    /// The cluster's token signing key (`canal token keygen FILE`), for a node that issues
    /// tokens. Without it the founding node makes one in its data directory at formation.
    #[arg(long, env = "CANAL_TOKEN_KEY")]
    token_key: Option<PathBuf>,
    /// PEM certificate chain for the API: with --tls-key, the API speaks HTTPS only.
    #[arg(long, env = "CANAL_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "CANAL_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificates client certificates must chain to (mutual TLS).
    #[arg(long, env = "CANAL_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// Home peers per shard (K).
    #[arg(long, env = "CANAL_REPLICATION_FACTOR")]
    replication_factor: Option<usize>,
    /// Shards in the topic space, 1 to 65536, fixed when the cluster is created: a node
    /// joining a cluster uses the cluster's count [default: 64].
    #[arg(long, env = "CANAL_SHARDS")]
    shards: Option<u32>,
    /// Log filter, as RUST_LOG (info, canal_dht=debug, ...).
    #[arg(long, env = "CANAL_LOG", default_value = "info")]
    log: String,
}

impl NodeArgs {
    /// The merged configuration: file, then anything given by flag or environment on top.
    pub(crate) fn merge(&self) -> anyhow::Result<NodeConfig> {
        let mut c = match &self.config {
            Some(path) => NodeConfig::from_file(path)?,
            None => NodeConfig::default(),
        };
        if let Some(v) = &self.data_dir {
            c.data_dir = v.clone();
        }
        if !self.listen.is_empty() {
            c.listen = self.listen.clone();
        }
        if let Some(v) = &self.api_listen {
            c.api_listen = v.clone();
        }
        if let Some(v) = &self.mqtt_listen {
            c.mqtt_listen = v.clone();
        }
        if self.mqtts_listen.is_some() {
            c.mqtts_listen = self.mqtts_listen.clone();
        }
        if !self.bootstrap.is_empty() {
            c.bootstrap = self.bootstrap.clone();
        }
        if !self.advertise.is_empty() {
            c.advertise = self.advertise.clone();
        }
        if self.bootstrap_expect.is_some() {
            c.bootstrap_expect = self.bootstrap_expect;
        }
        if let Some(v) = &self.tier {
            c.tier = v.clone();
        }
        c.labels.extend(self.labels.iter().cloned());
        if !self.gpu.is_empty() {
            c.gpu = self.gpu.clone();
        }
        if self.cluster_key.is_some() {
            c.cluster_key = self.cluster_key.clone();
        }
        if let Some(v) = self.mdns {
            c.mdns = v;
        }
        if let Some(v) = self.replication_factor {
            c.replication_factor = v;
        }
        if let Some(v) = self.shards {
            c.shards = v;
        }
        if let Some(v) = self.voters {
            c.voters = v;
        }
        if let Some(v) = self.raft_snapshot_every {
            c.raft_snapshot_every = v;
        }
        if let Some(v) = self.raft_election_timeout_ms {
            c.raft_election_timeout_ms = v;
        }
        if let Some(v) = self.clock_offset_ms {
            c.clock_offset_ms = v;
        }
        if let Some(v) = self.insecure_open {
            c.insecure_open = v;
        }
        if let Some(v) = self.max_subscribers {
            c.max_subscribers = v;
        }
        if let Some(v) = self.max_publish_streams {
            c.max_publish_streams = v;
        }
        if let Some(v) = &self.auth {
            c.auth = v.clone();
        }
        if self.token_key.is_some() {
            c.token_key = self.token_key.clone();
        }
        if self.tls_cert.is_some() {
            c.tls_cert = self.tls_cert.clone();
        }
        if self.tls_key.is_some() {
            c.tls_key = self.tls_key.clone();
        }
        if self.tls_client_ca.is_some() {
            c.tls_client_ca = self.tls_client_ca.clone();
        }
        Ok(c)
    }
}

pub(crate) async fn run(args: NodeArgs) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&args.log).with_context(|| {
        format!(
            "--log {:?} is not a log filter: write, for example, info or canal_dht=debug",
            args.log
        )
    })?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    exit_on_panic();
    let config = args.merge()?;
    let node = Node::start(&config).await?;
    let info = node.runtime_info();
    eprintln!(
        "canal node {} ready: API http://{} ",
        info.peer_id,
        node.api_addr()
    );
    wait_for_signal().await?;
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

/// A panic in any task (the swarm loop, a Raft task, a request handler) would leave a node
/// that answers `/v1/health` but may no longer gossip or replicate. The process exits
/// instead, non-zero, so whatever supervises it restarts it from its data dir, which holds
/// everything acknowledged.
fn exit_on_panic() {
    let print = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        print(info);
        tracing::error!(panic = %info, "a task panicked: the node exits so it restarts clean");
        std::process::exit(PANIC_EXIT_CODE);
    }));
}

/// The exit status of a node that stopped because a task panicked (EX_SOFTWARE).
const PANIC_EXIT_CODE: i32 = 70;

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot watch for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("canal.toml");
        std::fs::write(
            &file,
            "tier = \"cloud\"\napi_listen = \"127.0.0.1:9000\"\n[labels]\nzone = \"a\"\n",
        )
        .unwrap();
        let args = NodeArgs {
            config: Some(file),
            tier: Some("edge".into()),
            labels: vec![("rack".into(), "7".into())],
            ..Default::default()
        };
        let c = args.merge().unwrap();
        assert_eq!(c.tier, "edge");
        assert_eq!(c.api_listen, "127.0.0.1:9000");
        assert_eq!(c.labels.len(), 2);
    }

    #[test]
    fn a_flag_turns_off_what_the_file_turned_on() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("canal.toml");
        std::fs::write(&file, "mdns = true\n").unwrap();
        let on = NodeArgs {
            config: Some(file.clone()),
            ..Default::default()
        };
        assert!(on.merge().unwrap().mdns);
        let off = NodeArgs {
            config: Some(file),
            mdns: Some(false),
            ..Default::default()
        };
        assert!(!off.merge().unwrap().mdns);
    }

    #[test]
    fn a_malformed_file_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("canal.toml");
        std::fs::write(&file, "tier = [").unwrap();
        let args = NodeArgs {
            config: Some(file.clone()),
            ..Default::default()
        };
        let e = args
            .merge()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("canal.toml"), "{e}");
    }
}
