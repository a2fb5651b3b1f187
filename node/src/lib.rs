//! # canal-node — the composition root
//!
//! Wires the parts of a canal peer together: the configuration, the data directory and
//! identity, the peer mesh ([`canal_dht`]), the HTTP client API and metrics. Protocol logic
//! lives in the crates below; this crate only connects them.
//!
//! ## Layout
//!
//! Modules import one way: [`http`] on top, the services below it, the crates below them.
//! Nothing below [`http`] names an HTTP type; the services are generic over
//! [`canal_consensus::Transport`], and only this module pins it ([`NodeTransport`], the mesh),
//! so their logic is tested over in-memory Raft groups without processes.
//!
//! - [`http`]: the client API on top: the axum router and the state its handlers share,
//!   [`http::ApiError`] with a `From` for each service's error, request parsing (headers and
//!   query into typed requests), one file of handlers per area.
//! - Services:
//!   - [`functions`]: the functions service: deploy, list, remove and invoke functions;
//!     triggers; function state. Typed requests in, [`functions::FunctionsError`] out.
//!   - [`executor`]: runs triggers' functions on their events, with exactly-once effects
//!     for QoS 1 triggers.
//!   - [`outbox`]: the outbox relay: delivers the outputs a function's group kept for
//!     topics of other groups, exactly once (idempotent-producer sequences).
//!   - [`placement`]: placement decisions as the metadata group holds them (read, decide,
//!     commit) and the peers they are made from ([`placement::PeerSource`]).
//!   - [`placer`]: the placement job (decides on the data group's leader, reports
//!     measurements).
//!   - [`pubsub`]: the node's side of [`canal_pubsub`] (publish, subscribe, settings,
//!     retention, durable consumers): QoS 0 over the mesh.
//!   - [`cluster`]: Raft over the mesh, and the job that forms and grows the cluster.
//!   - [`shard_groups`]: the shard groups job: hosts the groups of
//!     the shards this node is a replica of, and moves their replicas as the map changes.
//!   - [`shard_map`]: the shard map job (computes and commits the map on the metadata
//!     leader) and the map as `/v1/cluster/shards` shows it.
//!   - [`raft_links`]: the watch on the round trips to Raft members.
//! - Below the services: [`config`] (the TOML/flag configuration and its validation),
//!   [`datadir`] (the locked data directory), [`identity`] (the persistent ed25519 peer
//!   identity), [`caps`] (measuring the capability record: CPU, memory, GPUs through NVML,
//!   load).
//! - [`Node`]: start, run, stop. The background jobs (membership, executor, placer, Raft
//!   link watch) are [`canal_worker`] workers; [`Node::shutdown`] lets each finish the work
//!   in hand (a trigger's batch commits or not, never half-way) within a deadline.
//!
//! ```text
//!   config ─> data dir (lock) ─> identity ─> API listener ─> peer mesh ─> node.json
//!                                                 │               │
//!   http (router, ApiError, parsing) ──> services (functions, executor, placer, pubsub,
//!                                        cluster) ──> consensus, triggers, placement, dht
//! ```

pub mod caps;
pub mod cluster;
pub mod config;
pub mod datadir;
pub mod executor;
pub mod functions;
pub mod http;
pub mod identity;
pub mod outbox;
pub mod placement;
pub mod placer;
pub mod pubsub;
pub mod raft_links;
pub mod shard_groups;
pub mod shard_map;
#[cfg(test)]
mod shard_sim;
#[cfg(test)]
mod testkit;
pub mod tokens;

use crate::caps::{LoadCounters, Measurer};
use crate::cluster::{Membership, MeshTransport};
use crate::config::{ConfigError, ValidConfig};
use crate::datadir::{DataDir, DataDirError};
use crate::http::ApiState;
use crate::identity::IdentityError;
use canal_consensus::{Consensus, RaftDb, RaftNode, Settings};
use canal_dht::{Dht, DhtConfig, DhtError, TopicSpace};
use libp2p::metrics::Registry;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tracing::info;

pub use canal_proto::api::RuntimeInfo;
pub use config::NodeConfig;

/// The runtime file ([`RuntimeInfo`]) a running node writes into its data directory, so that tools (the
/// testnet, scripts) find its ephemeral ports.
pub const RUNTIME_FILE: &str = "node.json";

/// How many function instances may run at once on a node (the instance pool's size).
const WASM_INSTANCES: u32 = 16;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data directory cannot be used.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// The identity cannot be loaded.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The peer mesh cannot start.
    #[error(transparent)]
    Dht(#[from] DhtError),
    /// The MQTT address cannot be bound.
    #[error(
        "cannot listen for MQTT on {addr}: {source} (set --mqtt-listen to another address, or none)"
    )]
    MqttListen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The MQTT-over-TLS address cannot be bound.
    #[error(
        "cannot listen for MQTT over TLS on {addr}: {source} (set --mqtts-listen to another address, or none)"
    )]
    MqttsListen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The API address cannot be bound.
    #[error("cannot listen for the API on {addr}: {source}")]
    ApiListen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The Raft database cannot be opened.
    #[error(transparent)]
    Store(#[from] canal_consensus::StoreError),
    /// The Raft groups cannot start.
    #[error(transparent)]
    Consensus(#[from] canal_consensus::ConsensusError),
    /// The WebAssembly runtime cannot start.
    #[error("cannot start the WebAssembly runtime: {0}")]
    Wasm(String),
    /// The token key cannot be read or used.
    #[error("token key: {0}")]
    TokenKey(#[from] canal_auth::KeyError),
    /// The API's TLS cannot be set up.
    #[error(transparent)]
    Tls(#[from] http::tls::TlsError),
    /// The runtime file cannot be written.
    #[error("cannot write {path}: {source}")]
    Runtime {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The transport the node's Raft groups speak: the peer mesh. Named here, the composition
/// root, alone; the services are generic over [`canal_consensus::Transport`].
pub type NodeTransport = MeshTransport;

/// How long shutdown waits for a background job's work in hand (a placement commit, a
/// trigger's batch) before it aborts the job.
const JOB_SHUTDOWN: Duration = Duration::from_secs(10);

/// A running node.
pub struct Node {
    dht: Dht,
    consensus: Consensus<NodeTransport>,
    membership: canal_worker::WorkerHandle,
    executor: executor::ExecutorHandle,
    outbox_relay: canal_worker::WorkerHandle,
    trimmer: canal_worker::WorkerHandle,
    placer: canal_worker::WorkerHandle,
    shard_map: canal_worker::WorkerHandle,
    /// The shard groups job.
    shard_groups: canal_worker::WorkerHandle,
    raft_links: canal_worker::WorkerHandle,
    token_job: canal_worker::WorkerHandle,
    api_addr: SocketAddr,
    mqtt_addr: Option<SocketAddr>,
    server: tokio::task::JoinHandle<()>,
    stop_api: tokio::sync::watch::Sender<bool>,
    data_dir: DataDir,
    info: RuntimeInfo,
}

impl Node {
    /// Validates `config` and starts the node: everything is bound and listening when this
    /// returns.
    pub async fn start(config: &NodeConfig) -> Result<Node, NodeError> {
        let config: ValidConfig = config.validate()?;
        if config.admission == config::Admission::Open {
            tracing::warn!(
                "--insecure-open: no cluster key, so any peer that can connect joins the cluster, gets a copy of its data and takes part in its decisions; use it only on a network you trust"
            );
        }
        if config.auth == config::AuthMode::None {
            tracing::warn!(
                api = %config.api_listen,
                "--auth none: the API checks no tokens, so anyone who reaches it may deploy code, change settings and read or write every topic; for local development only"
            );
        }
        let data_dir = DataDir::open(&config.data_dir)?;
        let keypair = identity::load_or_create(data_dir.path())?;
        let tls = config
            .tls
            .as_ref()
            .map(http::tls::server_config)
            .transpose()?;
        let gate = Arc::new(tokens::Gate::new(
            config.auth,
            tokens::load_key(config.token_key.as_deref(), data_dir.path())?,
        )?);
        let listener = TcpListener::bind(config.api_listen)
            .await
            .map_err(|source| NodeError::ApiListen {
                addr: config.api_listen,
                source,
            })?;
        let api_addr = listener
            .local_addr()
            .map_err(|source| NodeError::ApiListen {
                addr: config.api_listen,
                source,
            })?;

        let mqtt_listener = match config.mqtt_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| NodeError::MqttListen { addr, source })?,
            ),
            None => None,
        };
        let mqtt_addr = mqtt_listener.as_ref().and_then(|l| l.local_addr().ok());
        // TLS configured is checked by validate(): mqtts_listen is None without it.
        let mqtts_listener = match (config.mqtts_listen, &tls) {
            (Some(addr), Some(api_tls)) => Some((
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| NodeError::MqttsListen { addr, source })?,
                http::tls::mqtt_config(api_tls),
            )),
            _ => None,
        };
        let mqtts_addr = mqtts_listener
            .as_ref()
            .and_then(|(l, _)| l.local_addr().ok());

        let raft_db = RaftDb::open(&data_dir.path().join("raft"))?;

        let mut registry = Registry::default();
        let live = Arc::new(LoadCounters::default());
        let measurer = Measurer::new(
            config.tier.clone(),
            config.labels.clone(),
            config.gpus.clone(),
            Some(api_addr.to_string()),
            mqtt_addr.map(|a| a.to_string()),
            live.clone(),
        )
        .forming(config.bootstrap_expect.is_some());
        let mut dht_config = DhtConfig::new(keypair, config.listen.clone());
        dht_config.bootstrap = config.bootstrap.clone();
        dht_config.advertise_addrs = config.advertise.clone();
        dht_config.mdns = config.mdns;
        dht_config.cluster_key = config.cluster_key;
        dht_config.topic_space = TopicSpace {
            shards: config.shards,
            replication: config.replication_factor,
        };
        let mut dht = Dht::start(dht_config, Box::new(measurer), &mut registry).await?;
        let handle = dht.handle();
        // The listeners report their bound addresses asynchronously; wait for them so that
        // node.json and the Raft membership name real ports.
        let listen_addrs = handle
            .wait_listening(config.listen.len(), Duration::from_secs(10))
            .await;

        // Other members reach this one where it is announced (its listen addresses unless
        // `advertise` says otherwise).
        let me = RaftNode {
            peer_id: handle.local_peer_id().to_base58(),
            addrs: handle
                .advertised_addrs()
                .iter()
                .map(|a| a.to_string())
                .collect(),
        };
        let settings = Settings {
            snapshot_every: config.raft_snapshot_every,
            keep_behind_snapshot: (config.raft_snapshot_every / 5).max(10),
            clock_offset_ms: config.clock_offset_ms,
            // Topics live in the shard groups of the cluster's shard map.
            sharded: true,
            ..Settings::with_election_timeout(config.raft_election_timeout)
        };
        let settings = Settings {
            quiesce_after: if std::env::var_os(NO_QUIESCE_ENV).is_some() {
                None
            } else {
                settings.quiesce_after
            },
            ..settings
        };
        let rpc_timeout = settings.rpc_timeout;
        // One metadata group and, on a small cluster, one data group for all shards; the
        // code keys everything by group id, so more data groups only need placement.
        let consensus = Consensus::start(
            &raft_db,
            cluster::node_id(&handle.local_peer_id()),
            me,
            &groups_to_start()?,
            settings,
            MeshTransport {
                dht: handle.clone(),
            },
            &mut registry,
        )
        .await?;
        let raft_links = raft_links::RaftLinks::register(&mut registry, rpc_timeout);
        let hub_dropped = prometheus_client::metrics::counter::Counter::default();
        registry.register(
            "canal_qos0_hub_dropped",
            "QoS 0 events dropped for a local subscriber still behind after the hub's wait (QOS0_HUB_WAIT, 250 ms)",
            hub_dropped.clone(),
        );
        let qos0 = pubsub::Qos0Hub::new(live.qos0.clone()).counting_drops_in(hub_dropped);
        let formation = Arc::new(cluster::Formation::open(
            data_dir.path().join("formation-promise.json"),
        ));
        if let Some(inbound) = dht.take_inbound() {
            cluster::serve(
                handle.clone(),
                consensus.clone(),
                formation.clone(),
                inbound,
            );
        }
        if let Some(inbound) = dht.take_qos0_inbound() {
            let not_members = prometheus_client::metrics::counter::Counter::default();
            registry.register(
                "canal_qos0_refused_not_member",
                "QoS 0 events dropped because the peer that sent them is no cluster member",
                not_members.clone(),
            );
            pubsub::serve_qos0(
                handle.clone(),
                qos0.clone(),
                consensus.clone(),
                not_members,
                inbound,
            );
        }
        let runtime = canal_triggers::Runtime::new(&canal_triggers::RuntimeConfig {
            cache_dir: Some(data_dir.path().join("wasm-cache")),
            instances: WASM_INSTANCES,
            ..canal_triggers::RuntimeConfig::default()
        })
        .map_err(|e| NodeError::Wasm(e.to_string()))?;
        let functions = Arc::new(functions::Functions {
            runtime: Arc::new(runtime),
            consensus: consensus.clone(),
            peer_id: handle.local_peer_id().to_base58(),
            slots: Arc::new(tokio::sync::Semaphore::new(WASM_INSTANCES as usize)),
            estimates: std::sync::Mutex::new(canal_placement::Estimates::new()),
            live: live.clone(),
            peers: Arc::new(handle.clone()),
        });
        let exec_metrics = executor::ExecMetrics::register(&mut registry);
        let pubsub_metrics = canal_pubsub::PubSubMetrics::register(&mut registry);
        let mqtt_metrics = canal_mqtt::MqttMetrics::register(&mut registry);
        let tls_metrics = http::tls::TlsMetrics::register(&mut registry);
        let membership = Membership {
            consensus: consensus.clone(),
            dht: handle.clone(),
            bootstrap_expect: config.bootstrap_expect.map(|n| n as usize),
            voters: config.voters,
            live,
            admission: config.admission,
            formation,
        }
        .spawn();

        // Shutdown ends the subscription streams too: graceful shutdown waits for every open
        // connection, and an SSE stream never ends on its own.
        let (stop_api, closing) = tokio::sync::watch::channel(false);
        let executor = Arc::new(executor::Executor {
            functions: functions.clone(),
            dht: handle.clone(),
            qos0: qos0.clone(),
            metrics: exec_metrics,
            backlog: Default::default(),
            routes: Default::default(),
        })
        .spawn();
        let outbox_relay = outbox::spawn(
            consensus.clone(),
            outbox::OutboxMetrics::register(&mut registry),
        );
        let trimmer = canal_worker::spawn(canal_pubsub::trim::Trimmer::new(consensus.clone()));
        let placer = placer::spawn(functions.clone());
        let shard_map = canal_worker::spawn(shard_map::ShardMapJob::new(
            consensus.clone(),
            Arc::new(handle.clone()),
            config.shards,
            config.replication_factor,
            shard_map::ShardMapMetrics::register(&mut registry),
        ));
        let shard_group_metrics = shard_groups::ShardGroupMetrics::register(&mut registry);
        let shard_groups_job =
            shard_groups::ShardGroupsJob::new(consensus.clone(), shard_group_metrics);
        consensus.set_directory(shard_groups::directory(shard_groups_job.shared_directory()));
        let shard_groups = canal_worker::spawn(shard_groups_job);
        let raft_links = raft_links.spawn(consensus.clone(), handle.clone());
        registry.register(
            "canal_auth_refused",
            "API requests refused by the token check, by reason (401: missing, malformed, bad_signature, foreign_cluster, expired, revoked, no_key; 403: publish, subscribe, admin)",
            gate.refused.clone(),
        );
        let tokens = Arc::new(tokens::Tokens {
            consensus: consensus.clone(),
            gate: gate.clone(),
            data_dir: data_dir.path().to_path_buf(),
        });
        let token_job = canal_worker::spawn(tokens::TokenJob::new(tokens.clone()));
        let pubsub = pubsub::PubSub::new(
            consensus.clone(),
            qos0,
            Arc::new(pubsub::MeshQos0 {
                dht: handle.clone(),
            }),
            canal_pubsub::NodeContext {
                local_peer: handle.local_peer_id().to_base58(),
                subscribers: Arc::new(tokio::sync::Semaphore::new(config.max_subscribers)),
                max_subscribers: config.max_subscribers,
                closing: closing.clone(),
                metrics: pubsub_metrics,
            },
        );
        let mqtt = canal_mqtt::Mqtt::new(
            pubsub.clone(),
            canal_mqtt::MqttConfig::default(),
            Arc::new(tokens::MqttTokens { gate: gate.clone() }),
            mqtt_metrics,
            closing.clone(),
        )
        .with_nodes(handle.local_peer_id().to_base58(), {
            // The peer table: a node that died leaves it after its TTL.
            let dht = handle.clone();
            move || {
                dht.peers()
                    .into_iter()
                    .map(|p| p.peer_id.to_base58())
                    .collect()
            }
        });
        mqtt.keep_wills();
        if let Some(l) = mqtt_listener {
            tokio::spawn(mqtt.clone().serve(l));
        }
        if let Some((l, tls_config)) = mqtts_listener {
            tokio::spawn(http::tls::serve_mqtts(
                l,
                tls_config,
                mqtt.clone(),
                tls_metrics.clone(),
                closing.clone(),
            ));
        }
        let state = ApiState {
            dht: handle.clone(),
            consensus: consensus.clone(),
            pubsub,
            mqtt,
            mqtt_addr,
            mqtts_addr,
            functions,
            registry: Arc::new(registry),
            started: Instant::now(),
            closing: closing.clone(),
            publish_streams: Arc::new(tokio::sync::Semaphore::new(config.max_publish_streams)),
            max_publish_streams: config.max_publish_streams,
            tokens,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let server = http::serve(listener, tls.map(|t| (t, tls_metrics)), state, closing).map_err(
            |source| NodeError::ApiListen {
                addr: api_addr,
                source,
            },
        )?;
        info!(api = %api_addr, %scheme, peer_id = %handle.local_peer_id(), "client API listening");
        if let Some(a) = mqtt_addr {
            info!(mqtt = %a, "MQTT listening");
        }
        if let Some(a) = mqtts_addr {
            info!(mqtts = %a, "MQTT over TLS listening");
        }

        let info = RuntimeInfo {
            pid: std::process::id(),
            peer_id: handle.local_peer_id().to_base58(),
            api: format!("{scheme}://{api_addr}"),
            mqtt: mqtt_addr.map(|a| a.to_string()),
            mqtts: mqtts_addr.map(|a| a.to_string()),
            listen_addrs: listen_addrs.iter().map(|a| a.to_string()).collect(),
        };
        write_runtime(data_dir.path(), &info)?;
        Ok(Node {
            dht,
            consensus,
            membership,
            executor,
            outbox_relay,
            trimmer,
            placer,
            shard_map,
            shard_groups,
            raft_links,
            token_job,
            api_addr,
            mqtt_addr,
            server,
            stop_api,
            data_dir,
            info,
        })
    }

    /// The address the API is bound to.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The address MQTT over TCP is bound to, if it is on.
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.mqtt_addr
    }

    /// What `node.json` says.
    pub fn runtime_info(&self) -> &RuntimeInfo {
        &self.info
    }

    /// Stops accepting requests, finishes those in flight, closes the peer connections and
    /// releases the data directory.
    pub async fn shutdown(self) {
        let _ = self.stop_api.send(true);
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(10), &mut server)
            .await
            .is_err()
        {
            tracing::warn!("API requests still open after 10 s; closing them");
            server.abort();
        }
        // The jobs finish the work in hand (a trigger's batch commits or not, never half-way)
        // while the groups still run.
        let jobs = vec![
            self.membership,
            self.placer,
            self.shard_map,
            self.raft_links,
            self.trimmer,
            self.token_job,
            self.outbox_relay,
            self.shard_groups,
        ];
        let (mut aborted, executor) = tokio::join!(
            canal_worker::shutdown_all(jobs, JOB_SHUTDOWN),
            self.executor.shutdown(JOB_SHUTDOWN)
        );
        aborted.extend(executor);
        if !aborted.is_empty() {
            tracing::warn!(jobs = ?aborted, "background jobs aborted at the shutdown deadline");
        }
        self.consensus.shutdown().await;
        self.dht.shutdown().await;
        let _ = std::fs::remove_file(self.data_dir.path().join(RUNTIME_FILE));
        info!("node stopped");
    }
}

fn write_runtime(dir: &Path, info: &RuntimeInfo) -> Result<(), NodeError> {
    let path = dir.join(RUNTIME_FILE);
    let err = |source| NodeError::Runtime {
        path: path.clone(),
        source,
    };
    let tmp = dir.join(format!("{RUNTIME_FILE}.tmp"));
    let text = serde_json::to_vec_pretty(info).map_err(|e| err(std::io::Error::other(e)))?;
    std::fs::write(&tmp, text).map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)
}

/// Test only: the environment variable naming how many extra data groups (ids 2, 3, ...)
/// every node opens beside the metadata group and data group 1, all nodes voters, to
/// measure the idle cost of many groups. Routing still sends every topic to group 1, so the
/// extra groups stay idle.
pub const EXTRA_GROUPS_ENV: &str = "CANAL_TEST_EXTRA_GROUPS";

/// Test only: when this environment variable is set, idle Raft groups never go quiescent
/// (every group heartbeats as before quiescence), to measure what quiescence saves.
pub const NO_QUIESCE_ENV: &str = "CANAL_TEST_NO_QUIESCE";

/// The most extra groups [`EXTRA_GROUPS_ENV`] may ask for.
const MAX_EXTRA_GROUPS: u32 = 1024;

/// The groups a node starts: [`canal_consensus::routing::groups_to_start`], plus the extra
/// idle groups of [`EXTRA_GROUPS_ENV`] if it is set.
fn groups_to_start() -> Result<Vec<canal_consensus::GroupId>, ConfigError> {
    with_extra_groups(std::env::var(EXTRA_GROUPS_ENV).ok().as_deref())
}

/// [`canal_consensus::routing::groups_to_start`] and, if `extra` names a number, that many
/// more groups with the next ids.
fn with_extra_groups(extra: Option<&str>) -> Result<Vec<canal_consensus::GroupId>, ConfigError> {
    let mut groups = canal_consensus::routing::groups_to_start();
    let Some(value) = extra else {
        return Ok(groups);
    };
    let extra = value
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|n| *n <= MAX_EXTRA_GROUPS)
        .ok_or_else(|| ConfigError::Invalid {
            key: EXTRA_GROUPS_ENV,
            message: format!(
                "{value:?} is not a number of extra Raft groups from 0 to {MAX_EXTRA_GROUPS}"
            ),
        })?;
    let first = groups.iter().map(|g| g.0).max().unwrap_or(0) + 1;
    groups.extend((first..first + extra).map(canal_consensus::GroupId));
    Ok(groups)
}

#[cfg(test)]
mod extra_groups_tests {
    use super::*;
    use canal_consensus::GroupId;

    #[test]
    fn extra_groups_follow_the_started_ones_and_bad_values_are_named() {
        let base = canal_consensus::routing::groups_to_start();
        assert_eq!(with_extra_groups(None).ok(), Some(base.clone()));
        let more = with_extra_groups(Some("3")).ok().unwrap_or_default();
        assert_eq!(more.len(), base.len() + 3);
        assert_eq!(more[base.len()..], [GroupId(2), GroupId(3), GroupId(4)]);
        for bad in ["x", "-1", "1025"] {
            let e = with_extra_groups(Some(bad)).err().map(|e| e.to_string());
            assert!(
                e.as_deref()
                    .is_some_and(|e| e.contains(EXTRA_GROUPS_ENV) && e.contains("0 to 1024")),
                "{bad}: {e:?}"
            );
        }
    }
}
