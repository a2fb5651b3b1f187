//! The node's configuration: a plain serde struct (the TOML file's shape) with defaults, and
//! `validate()`, which turns it into typed settings or an error naming the key, the value and
//! what is allowed. Flags and environment variables are merged in by the CLI.

use canal_proto::Gpu;
use libp2p::Multiaddr;
use libp2p::pnet::PreSharedKey;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The port of MQTT over TLS when TLS is configured and `mqtts_listen` is not given (IANA's
/// `secure-mqtt`).
pub const DEFAULT_MQTTS_PORT: u16 = 8883;

/// Everything `canal node` can be told, as written in its TOML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Where the identity and all data live.
    pub data_dir: PathBuf,
    /// Multiaddrs to listen on for peers.
    pub listen: Vec<String>,
    /// Address of the HTTP client API.
    pub api_listen: String,
    /// Address of the MQTT listener (TCP), or `none` for no MQTT over TCP.
    pub mqtt_listen: String,
    /// Address of the MQTT-over-TLS listener, with the API's certificate, key and client
    /// CA; unset: `127.0.0.1:8883` when TLS is configured; `none`: off.
    pub mqtts_listen: Option<String>,
    /// Multiaddrs of peers to join the mesh through.
    pub bootstrap: Vec<String>,
    /// Multiaddrs other peers should reach this one at, when not the listen addresses (a
    /// NAT's port forward, a proxy, the testnet's delay relay). When set, only these are
    /// announced to peers.
    pub advertise: Vec<String>,
    /// How many peers form the first Raft cluster (used by replication).
    pub bootstrap_expect: Option<u32>,
    /// This peer's tier (`edge`, `cloud`, ...).
    pub tier: String,
    /// Operator labels, `KEY = "VALUE"`.
    pub labels: BTreeMap<String, String>,
    /// Declared GPUs, `MODEL:MEMORY`.
    pub gpu: Vec<String>,
    /// File holding the cluster's pre-shared key.
    pub cluster_key: Option<PathBuf>,
    /// Find peers on the local network with mDNS.
    pub mdns: bool,
    /// K: home peers per shard.
    pub replication_factor: usize,
    /// Shards in the topic space, fixed when the cluster is created: the first shard map
    /// takes the founding leader's value, and a node started later with another one uses
    /// the cluster's (and says so in its log).
    pub shards: u32,
    /// How many voters each Raft group should have (the rest are learners).
    pub voters: usize,
    /// Build a Raft snapshot (and compact the log) after this many entries.
    pub raft_snapshot_every: u64,
    /// The shortest Raft election timeout, in milliseconds; the longest is twice it, and the
    /// RPC timeout (how long a leader waits for a follower's answer) two thirds of it, so it
    /// must exceed the round trip to every member by a margin. The default (600) suits round
    /// trips up to ~300 ms; peers on one LAN can use 200 for failover under a second.
    pub raft_election_timeout_ms: u64,
    /// Test only: milliseconds added to this node's wall clock where it stamps Raft entries
    /// and decides what to trim (negative: behind), to test a cluster with a skewed clock.
    pub clock_offset_ms: i64,
    /// Runs without a cluster key on addresses others can reach, letting any peer that
    /// connects join the cluster and receive its data. For trusted networks only.
    pub insecure_open: bool,
    /// How many subscribers (SSE and WebSocket) this node serves at once; more get a 503.
    pub max_subscribers: usize,
    /// How many publish streams (`GET /v1/publish`) this node serves at once; more get a
    /// 503 `too_many_streams`.
    pub max_publish_streams: usize,
    /// How the client API checks callers: `tokens` (every request but `/v1/health` carries a
    /// token signed by the cluster's token key) or `none` (anyone who reaches the API may do
    /// anything; loopback API addresses only, for local development).
    pub auth: String,
    /// The cluster's token signing key (`canal token keygen FILE`), held by the operator and
    /// given to the nodes that issue tokens. Without it, the founding node creates one in its
    /// data directory (`token-key`) at formation. See docs/auth.md.
    pub token_key: Option<PathBuf>,
    /// PEM certificate chain of the API's TLS (with `tls_key`): the API then speaks HTTPS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the API's TLS certificate.
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates that client certificates must chain to (mutual TLS): clients
    /// without one are refused in the handshake.
    pub tls_client_ca: Option<PathBuf>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            data_dir: PathBuf::from("./canal-data"),
            listen: vec!["/ip4/127.0.0.1/tcp/7000".into()],
            api_listen: "127.0.0.1:7070".into(),
            mqtt_listen: "127.0.0.1:1883".into(),
            mqtts_listen: None,
            bootstrap: Vec::new(),
            advertise: Vec::new(),
            bootstrap_expect: None,
            tier: "default".into(),
            labels: BTreeMap::new(),
            gpu: Vec::new(),
            cluster_key: None,
            mdns: false,
            replication_factor: canal_dht::topology::DEFAULT_REPLICATION,
            shards: canal_dht::topology::DEFAULT_SHARDS,
            voters: 3,
            raft_snapshot_every: 5000,
            raft_election_timeout_ms: canal_consensus::groups::SAFE_ELECTION_TIMEOUT.as_millis()
                as u64,
            clock_offset_ms: 0,
            insecure_open: false,
            max_subscribers: 10_000,
            max_publish_streams: 1000,
            auth: "tokens".into(),
            token_key: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
        }
    }
}

/// A configuration error: what was wrong and what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A setting has a value that is not allowed.
    #[error("{key}: {message}")]
    Invalid {
        /// The setting (as named in the TOML file).
        key: &'static str,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// The TOML file could not be read or parsed.
    #[error("config file {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// The configuration, checked and typed.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    /// The data directory.
    pub data_dir: PathBuf,
    /// Peer listen addresses.
    pub listen: Vec<Multiaddr>,
    /// The API address.
    pub api_listen: SocketAddr,
    /// The MQTT address (`None`: MQTT over TCP is off).
    pub mqtt_listen: Option<SocketAddr>,
    /// The MQTT-over-TLS address (`None`: off, always so without TLS).
    pub mqtts_listen: Option<SocketAddr>,
    /// Bootstrap addresses.
    pub bootstrap: Vec<Multiaddr>,
    /// Announced addresses (empty: the listen addresses are announced).
    pub advertise: Vec<Multiaddr>,
    /// Raft bootstrap size.
    pub bootstrap_expect: Option<u32>,
    /// Tier.
    pub tier: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Declared GPUs.
    pub gpus: Vec<Gpu>,
    /// The cluster key, read from its file.
    pub cluster_key: Option<PreSharedKey>,
    /// mDNS on or off.
    pub mdns: bool,
    /// Replication factor.
    pub replication_factor: usize,
    /// Shards.
    pub shards: u32,
    /// Target voter count.
    pub voters: usize,
    /// Raft snapshot interval, in entries.
    pub raft_snapshot_every: u64,
    /// Shortest election timeout.
    pub raft_election_timeout: std::time::Duration,
    /// Test only: the offset applied to this node's wall clock, in ms.
    pub clock_offset_ms: i64,
    /// Who joins the cluster without an operator's word.
    pub admission: Admission,
    /// The most subscribers served at once.
    pub max_subscribers: usize,
    /// The most publish streams served at once.
    pub max_publish_streams: usize,
    /// Whether the API checks tokens.
    pub auth: AuthMode,
    /// The operator-held token key file, if one was given.
    pub token_key: Option<PathBuf>,
    /// The API's TLS files; `None`: plain HTTP.
    pub tls: Option<TlsFiles>,
}

/// The files of the API's TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CAs of client certificates (mutual TLS), if required.
    pub client_ca: Option<PathBuf>,
}

/// How the client API checks callers (`auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Every request but `/v1/health` carries a valid token holding the right it needs.
    Tokens,
    /// No checks (`--auth none`): loopback API addresses only.
    None,
}

/// Which peers the cluster takes in as learners (and later voters) on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Every peer that can connect holds the cluster key, so every peer belongs.
    Keyed,
    /// No key, on loopback only: only peers admitted by hand (`canal cluster admit`) join.
    ByHand,
    /// `--insecure-open`: any peer that connects joins (trusted networks only).
    Open,
}

/// Whether a listen address can be reached only from this host.
fn is_loopback(addr: &Multiaddr) -> bool {
    use libp2p::multiaddr::Protocol;
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_loopback(),
        Some(Protocol::Ip6(ip)) => ip.is_loopback(),
        Some(Protocol::Dns(h) | Protocol::Dns4(h) | Protocol::Dns6(h)) => h == "localhost",
        _ => false,
    }
}

/// The largest test clock offset, either way: a day.
pub const MAX_CLOCK_OFFSET_MS: u64 = 24 * 60 * 60 * 1000;

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

fn multiaddr(key: &'static str, s: &str) -> Result<Multiaddr, ConfigError> {
    s.parse::<Multiaddr>().map_err(|e| {
        invalid(
            key,
            format!("{s:?} is not a multiaddr ({e}): write, for example, /ip4/127.0.0.1/tcp/7000 or /dns4/host/tcp/7000/p2p/PEER_ID"),
        )
    })
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Reads a cluster key file in the IPFS swarm.key format (`/key/swarm/psk/1.0.0/`, `/base16/`,
/// 64 hex digits).
pub fn read_cluster_key(path: &Path) -> Result<PreSharedKey, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        invalid(
            "cluster_key",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    text.trim().parse::<PreSharedKey>().map_err(|e| {
        invalid(
            "cluster_key",
            format!(
                "{} is not a cluster key ({e}): the file holds three lines, /key/swarm/psk/1.0.0/, /base16/ and 64 hex digits (`canal cluster keygen` writes one)",
                path.display()
            ),
        )
    })
}

/// Writes a fresh random cluster key in the format [`read_cluster_key`] reads.
pub fn cluster_key_text(bytes: [u8; 32]) -> String {
    format!("/key/swarm/psk/1.0.0/\n/base16/\n{}\n", hex::encode(bytes))
}

impl NodeConfig {
    /// Reads a TOML file. Unknown keys are refused, so a typo does not go unnoticed.
    pub fn from_file(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            message: format!("cannot read it: {e}"),
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            message: format!("not valid canal TOML: {}", e.to_string().trim()),
        })
    }

    /// Checks every setting and returns the typed configuration.
    pub fn validate(&self) -> Result<ValidConfig, ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        if self.listen.is_empty() {
            return Err(invalid(
                "listen",
                "at least one peer listen address is needed",
            ));
        }
        let listen = self
            .listen
            .iter()
            .map(|s| multiaddr("listen", s))
            .collect::<Result<Vec<_>, _>>()?;
        let bootstrap = self
            .bootstrap
            .iter()
            .map(|s| multiaddr("bootstrap", s))
            .collect::<Result<Vec<_>, _>>()?;
        let advertise = self
            .advertise
            .iter()
            .map(|s| multiaddr("advertise", s))
            .collect::<Result<Vec<_>, _>>()?;
        let api_listen = self.api_listen.parse::<SocketAddr>().map_err(|_| {
            invalid(
                "api_listen",
                format!(
                    "{:?} is not an IP address and port: write, for example, 127.0.0.1:7070",
                    self.api_listen
                ),
            )
        })?;
        let mqtt_listen = match self.mqtt_listen.as_str() {
            "none" => None,
            s => Some(s.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "mqtt_listen",
                    format!(
                        "{s:?} is not an IP address and port: write, for example, 127.0.0.1:1883, or none to turn MQTT over TCP off"
                    ),
                )
            })?),
        };
        if let Some(n) = self.bootstrap_expect
            && !(1..=7).contains(&n)
        {
            return Err(invalid(
                "bootstrap_expect",
                format!("{n} is out of range: 1 to 7 peers may form the first cluster"),
            ));
        }
        if !valid_name(&self.tier) {
            return Err(invalid(
                "tier",
                format!(
                    "{:?} is not a tier name: use 1-63 letters, digits, `-`, `_` or `.`",
                    self.tier
                ),
            ));
        }
        for (k, v) in &self.labels {
            if !valid_name(k) {
                return Err(invalid(
                    "labels",
                    format!(
                        "label key {k:?} is not allowed: use 1-63 letters, digits, `-`, `_` or `.`"
                    ),
                ));
            }
            if v.len() > 256 || v.chars().any(char::is_control) {
                return Err(invalid(
                    "labels",
                    format!(
                        "label {k}'s value is not allowed: at most 256 characters, no control characters"
                    ),
                ));
            }
        }
        let gpus = self
            .gpu
            .iter()
            .map(|g| Gpu::parse_declared(g).map_err(|e| invalid("gpu", e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let cluster_key = self
            .cluster_key
            .as_deref()
            .map(read_cluster_key)
            .transpose()?;
        if !(1..=16).contains(&self.replication_factor) {
            return Err(invalid(
                "replication_factor",
                format!("{} is out of range: 1 to 16", self.replication_factor),
            ));
        }
        if !(1..=canal_proto::shards::MAX_SHARDS).contains(&self.shards) {
            return Err(invalid(
                "shards",
                format!(
                    "{} is out of range: a topic space has 1 to {} shards (default {})",
                    self.shards,
                    canal_proto::shards::MAX_SHARDS,
                    canal_dht::topology::DEFAULT_SHARDS
                ),
            ));
        }
        if !(1..=7).contains(&self.voters) {
            return Err(invalid(
                "voters",
                format!(
                    "{} is out of range: 1 to 7 voters (3 or 5 is usual)",
                    self.voters
                ),
            ));
        }
        if !(10..=10_000_000).contains(&self.raft_snapshot_every) {
            return Err(invalid(
                "raft_snapshot_every",
                format!(
                    "{} is out of range: 10 to 10000000 entries",
                    self.raft_snapshot_every
                ),
            ));
        }
        if !(50..=60_000).contains(&self.raft_election_timeout_ms) {
            return Err(invalid(
                "raft_election_timeout_ms",
                format!(
                    "{} is out of range: 50 to 60000 milliseconds",
                    self.raft_election_timeout_ms
                ),
            ));
        }
        if self.clock_offset_ms.unsigned_abs() > MAX_CLOCK_OFFSET_MS {
            return Err(invalid(
                "clock_offset_ms",
                format!(
                    "{} is out of range: -{MAX_CLOCK_OFFSET_MS} to {MAX_CLOCK_OFFSET_MS} milliseconds (a day; it is for tests)",
                    self.clock_offset_ms
                ),
            ));
        }
        if !(1..=1_000_000).contains(&self.max_subscribers) {
            return Err(invalid(
                "max_subscribers",
                format!("{} is out of range: 1 to 1000000", self.max_subscribers),
            ));
        }
        if !(1..=1_000_000).contains(&self.max_publish_streams) {
            return Err(invalid(
                "max_publish_streams",
                format!("{} is out of range: 1 to 1000000", self.max_publish_streams),
            ));
        }
        let admission = match (&cluster_key, self.insecure_open) {
            (Some(_), _) => Admission::Keyed,
            (None, true) => Admission::Open,
            (None, false) => {
                if let Some(open) = listen.iter().find(|a| !is_loopback(a)) {
                    return Err(invalid(
                        "listen",
                        format!(
                            "{open} can be reached from other hosts, but no cluster key is set: any peer could join and read or rewrite the cluster's data. Give every node the same key (`canal cluster keygen swarm.key`, then --cluster-key swarm.key), listen on 127.0.0.1 only, or accept the risk with --insecure-open"
                        ),
                    ));
                }
                Admission::ByHand
            }
        };
        let auth = match self.auth.as_str() {
            "tokens" => AuthMode::Tokens,
            "none" if !api_listen.ip().is_loopback() => {
                return Err(invalid(
                    "auth",
                    format!(
                        "`none` lets anyone who reaches the API deploy code and read or write every topic, so it is refused with the API on {api_listen}, which other hosts can reach: listen on 127.0.0.1, or use tokens (the default)"
                    ),
                ));
            }
            "none" => AuthMode::None,
            other => {
                return Err(invalid(
                    "auth",
                    format!("{other:?} is not an auth mode: use `tokens` (the default) or `none`"),
                ));
            }
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            }),
            (None, None) if self.tls_client_ca.is_some() => {
                return Err(invalid(
                    "tls_client_ca",
                    "mutual TLS needs the API's own TLS: give tls_cert and tls_key too",
                ));
            }
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "tls_cert",
                    "tls_cert and tls_key go together: give both (PEM files) or neither",
                ));
            }
        };
        let mqtts_listen = match (self.mqtts_listen.as_deref(), &tls) {
            (Some("none"), _) => None,
            (None, Some(_)) => Some(SocketAddr::from(([127, 0, 0, 1], DEFAULT_MQTTS_PORT))),
            (None, None) => None,
            (Some(s), None) => {
                return Err(invalid(
                    "mqtts_listen",
                    format!(
                        "{s:?} needs TLS: give tls_cert and tls_key too, or set mqtts_listen to none"
                    ),
                ));
            }
            (Some(s), Some(_)) => Some(s.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "mqtts_listen",
                    format!(
                        "{s:?} is not an IP address and port: write, for example, 127.0.0.1:8883, or none to turn MQTT over TLS off"
                    ),
                )
            })?),
        };
        Ok(ValidConfig {
            data_dir: self.data_dir.clone(),
            listen,
            api_listen,
            mqtt_listen,
            mqtts_listen,
            bootstrap,
            advertise,
            bootstrap_expect: self.bootstrap_expect,
            tier: self.tier.clone(),
            labels: self.labels.clone(),
            gpus,
            cluster_key,
            mdns: self.mdns,
            replication_factor: self.replication_factor,
            shards: self.shards,
            voters: self.voters,
            raft_snapshot_every: self.raft_snapshot_every,
            raft_election_timeout: std::time::Duration::from_millis(self.raft_election_timeout_ms),
            clock_offset_ms: self.clock_offset_ms,
            admission,
            max_subscribers: self.max_subscribers,
            max_publish_streams: self.max_publish_streams,
            auth,
            token_key: self.token_key.clone(),
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let v = NodeConfig::default().validate();
        assert!(v.is_ok(), "{v:?}");
    }

    #[test]
    fn toml_round_trip_and_unknown_keys() {
        let text = r#"
            data_dir = "/tmp/x"
            listen = ["/ip4/127.0.0.1/tcp/0"]
            tier = "edge"
            gpu = ["H100:80GiB"]
            [labels]
            zone = "a"
        "#;
        let c: NodeConfig = toml::from_str(text).unwrap_or_default();
        assert_eq!(c.tier, "edge");
        assert_eq!(c.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(c.api_listen, "127.0.0.1:7070");
        assert_eq!(c.mqtt_listen, "127.0.0.1:1883");
        let off: NodeConfig = toml::from_str("mqtt_listen = \"none\"").unwrap_or_default();
        assert_eq!(off.validate().map(|v| v.mqtt_listen).ok(), Some(None));
        let bad: Result<NodeConfig, _> = toml::from_str("tierr = \"edge\"");
        assert!(bad.is_err());
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases: Vec<(NodeConfig, &str)> = vec![
            (
                NodeConfig {
                    listen: vec!["not-an-addr".into()],
                    ..Default::default()
                },
                "listen",
            ),
            (
                NodeConfig {
                    bootstrap: vec!["/ip4/1.2.3/tcp/1".into()],
                    ..Default::default()
                },
                "bootstrap",
            ),
            (
                NodeConfig {
                    advertise: vec!["127.0.0.1:7000".into()],
                    ..Default::default()
                },
                "advertise",
            ),
            (
                NodeConfig {
                    mqtt_listen: "localhost:1883".into(),
                    ..Default::default()
                },
                "mqtt_listen",
            ),
            (
                NodeConfig {
                    api_listen: "localhost".into(),
                    ..Default::default()
                },
                "api_listen",
            ),
            (
                NodeConfig {
                    tier: "edge tier".into(),
                    ..Default::default()
                },
                "tier",
            ),
            (
                NodeConfig {
                    gpu: vec!["H100".into()],
                    ..Default::default()
                },
                "gpu",
            ),
            (
                NodeConfig {
                    replication_factor: 0,
                    ..Default::default()
                },
                "replication_factor",
            ),
            (
                NodeConfig {
                    cluster_key: Some("/nonexistent/key".into()),
                    ..Default::default()
                },
                "cluster_key",
            ),
            (
                NodeConfig {
                    bootstrap_expect: Some(0),
                    ..Default::default()
                },
                "bootstrap_expect",
            ),
        ];
        for (c, key) in cases {
            let msg = c
                .validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                msg.starts_with(key),
                "expected an error about {key}, got {msg:?}"
            );
        }
    }

    #[test]
    fn cluster_keys_round_trip() {
        let dir = std::env::temp_dir().join(format!("canal-key-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("swarm.key");
        let written = std::fs::write(&path, cluster_key_text([7u8; 32]));
        assert!(written.is_ok());
        let key = read_cluster_key(&path);
        assert!(key.is_ok(), "{key:?}");
        let _ = std::fs::write(&path, "garbage");
        assert!(read_cluster_key(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn auth_none_is_for_loopback_apis_only_and_tokens_are_the_default() {
        let mode = |c: NodeConfig| c.validate().map(|v| v.auth).map_err(|e| e.to_string());
        assert_eq!(mode(NodeConfig::default()), Ok(AuthMode::Tokens));
        let none = NodeConfig {
            auth: "none".into(),
            ..Default::default()
        };
        assert_eq!(mode(none.clone()), Ok(AuthMode::None));
        let reachable = NodeConfig {
            api_listen: "0.0.0.0:7070".into(),
            ..none
        };
        let msg = mode(reachable).err().unwrap_or_default();
        assert!(
            msg.starts_with("auth") && msg.contains("0.0.0.0:7070"),
            "{msg}"
        );
        let other = NodeConfig {
            auth: "basic".into(),
            ..Default::default()
        };
        let msg = mode(other).err().unwrap_or_default();
        assert!(msg.contains("\"basic\"") && msg.contains("tokens"), "{msg}");
    }

    #[test]
    fn tls_files_go_together() {
        let tls = |cert: Option<&str>, key: Option<&str>, ca: Option<&str>| {
            NodeConfig {
                tls_cert: cert.map(PathBuf::from),
                tls_key: key.map(PathBuf::from),
                tls_client_ca: ca.map(PathBuf::from),
                ..Default::default()
            }
            .validate()
            .map(|v| v.tls)
            .map_err(|e| e.to_string())
        };
        assert_eq!(tls(None, None, None), Ok(None));
        let both = tls(Some("c.pem"), Some("k.pem"), Some("ca.pem"));
        assert!(both.is_ok_and(|t| t.is_some_and(|t| t.client_ca.is_some())));
        let half = tls(Some("c.pem"), None, None).err().unwrap_or_default();
        assert!(
            half.starts_with("tls_cert") && half.contains("both"),
            "{half}"
        );
        let ca_alone = tls(None, None, Some("ca.pem")).err().unwrap_or_default();
        assert!(ca_alone.starts_with("tls_client_ca"), "{ca_alone}");
    }

    #[test]
    fn mqtts_is_on_by_default_with_tls_only_and_none_turns_it_off() {
        let mqtts = |tls: bool, listen: Option<&str>| {
            let files = tls.then(|| PathBuf::from("f.pem"));
            NodeConfig {
                tls_cert: files.clone(),
                tls_key: files,
                mqtts_listen: listen.map(str::to_string),
                ..Default::default()
            }
            .validate()
            .map(|v| v.mqtts_listen.map(|a| a.to_string()))
            .map_err(|e| e.to_string())
        };
        assert_eq!(mqtts(false, None), Ok(None));
        assert_eq!(mqtts(true, None), Ok(Some("127.0.0.1:8883".into())));
        assert_eq!(mqtts(true, Some("none")), Ok(None));
        assert_eq!(mqtts(false, Some("none")), Ok(None));
        assert_eq!(
            mqtts(true, Some("127.0.0.1:0")),
            Ok(Some("127.0.0.1:0".into()))
        );
        let bad = mqtts(true, Some("localhost:8883"))
            .err()
            .unwrap_or_default();
        assert!(
            bad.starts_with("mqtts_listen") && bad.contains("127.0.0.1:8883"),
            "{bad}"
        );
        let no_tls = mqtts(false, Some("127.0.0.1:8883"))
            .err()
            .unwrap_or_default();
        assert!(
            no_tls.starts_with("mqtts_listen") && no_tls.contains("tls_cert"),
            "{no_tls}"
        );
    }

    #[test]
    fn reachable_addresses_need_a_key_or_insecure_open() {
        let open = NodeConfig {
            listen: vec!["/ip4/0.0.0.0/tcp/7000".into()],
            ..Default::default()
        };
        let msg = open
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.starts_with("listen"), "{msg}");
        assert!(
            msg.contains("--cluster-key") && msg.contains("--insecure-open"),
            "{msg}"
        );
        let insecure = NodeConfig {
            insecure_open: true,
            ..open.clone()
        };
        assert_eq!(
            insecure.validate().map(|v| v.admission).ok(),
            Some(Admission::Open)
        );
        let local = NodeConfig::default().validate().map(|v| v.admission).ok();
        assert_eq!(local, Some(Admission::ByHand));
        for addr in [
            "/ip6/::/tcp/1",
            "/dns4/edge1/tcp/7000",
            "/ip4/10.0.0.1/udp/1/quic-v1",
        ] {
            let c = NodeConfig {
                listen: vec![addr.into()],
                ..Default::default()
            };
            assert!(c.validate().is_err(), "{addr} needs a key");
        }
        for addr in [
            "/ip6/::1/tcp/1",
            "/dns4/localhost/tcp/7000",
            "/ip4/127.0.0.2/tcp/0",
        ] {
            let c = NodeConfig {
                listen: vec![addr.into()],
                ..Default::default()
            };
            assert!(c.validate().is_ok(), "{addr} is loopback");
        }
    }
}
