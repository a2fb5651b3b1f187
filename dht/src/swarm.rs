//! The swarm: transports, behaviours and the event loop.

use crate::guard::{GuardConfig, PeerGuard};
use crate::link::{Lane, LinkMetrics, Links, Reply, SharedCounters};
use crate::peers::{Applied, PeerTable};
use crate::rpc::{InboundQos0, InboundRpc, RpcError};
use crate::topology::{Placement, TopicSpace};
use crate::{CAPS_TOPIC, IDENTIFY_PROTOCOL, KAD_PROTOCOL};
use canal_proto::time::now_ms;
use canal_proto::{Capabilities, Topic, wire};
use futures::StreamExt;
use libp2p::core::transport::upgrade::Version;
use libp2p::core::{Transport, muxing::StreamMuxerBox};
use libp2p::metrics::{Metrics, Recorder, Registry};
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, allow_block_list, gossipsub, identify, identity, kad,
    mdns, noise, ping, tcp, yamux,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// How the swarm is set up. Built by the node from its configuration.
pub struct DhtConfig {
    /// The peer's identity.
    pub keypair: identity::Keypair,
    /// Multiaddrs to listen on (`/ip4/0.0.0.0/tcp/7000`, `/ip4/0.0.0.0/udp/7000/quic-v1`).
    pub listen: Vec<Multiaddr>,
    /// Peers to join the mesh through. A `/p2p/PEER_ID` suffix is optional.
    pub bootstrap: Vec<Multiaddr>,
    /// The addresses other peers should reach this one at, when they differ from the listen
    /// addresses (behind a NAT, a port forward or the testnet's delay relays). When set, only
    /// these are announced: identify carries them instead of the listen addresses (so
    /// Kademlia spreads them alone), and so do the capability records.
    pub advertise_addrs: Vec<Multiaddr>,
    /// Whether to find peers on the local network with mDNS.
    pub mdns: bool,
    /// The cluster's pre-shared key; when set, only peers with the same key can connect, and
    /// only TCP is used (QUIC cannot carry the key).
    pub cluster_key: Option<PreSharedKey>,
    /// The shape of the topic space.
    pub topic_space: TopicSpace,
    /// How often this peer advertises its capability record.
    pub advertise_interval: Duration,
    /// How long a peer's record stays without a refresh before the peer counts as gone.
    pub peer_ttl: Duration,
}

impl DhtConfig {
    /// A configuration with canal's defaults for everything but the identity and addresses.
    pub fn new(keypair: identity::Keypair, listen: Vec<Multiaddr>) -> Self {
        DhtConfig {
            keypair,
            listen,
            bootstrap: Vec::new(),
            advertise_addrs: Vec::new(),
            mdns: false,
            cluster_key: None,
            topic_space: TopicSpace::default(),
            advertise_interval: Duration::from_secs(2),
            peer_ttl: Duration::from_secs(10),
        }
    }
}

/// Errors starting the swarm. Each names the address or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum DhtError {
    /// A transport or behaviour could not be built.
    #[error("cannot set up the peer-to-peer stack: {0}")]
    Setup(String),
    /// A listen address could not be bound.
    #[error("cannot listen for peers on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why (address in use, not supported by the transports, ...).
        reason: String,
    },
    /// A bootstrap address could not be dialled at all.
    #[error("cannot dial bootstrap peer {addr}: {reason}")]
    Bootstrap {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// The configuration contradicts itself.
    #[error("{0}")]
    Config(String),
}

/// The source of this peer's own capability record, measured anew for every advertisement.
/// The swarm fills in `peer_id`, `listen_addrs`, `seq` and `measured_at_ms` itself.
pub trait LocalRecord: Send + 'static {
    /// Measures the record now.
    fn measure(&mut self) -> Capabilities;
}

/// One peer, as `DhtHandle::peers` shows it.
#[derive(Debug, Clone)]
pub struct PeerView {
    /// The peer id.
    pub peer_id: PeerId,
    /// Its latest capability record.
    pub caps: Capabilities,
    /// Whether it is this node.
    pub is_self: bool,
    /// Whether there is an open connection to it.
    pub connected: bool,
    /// How long ago its record was last received.
    pub last_seen: Duration,
    /// The latest ping round trip on a direct connection.
    pub rtt: Option<Duration>,
}

#[derive(Default)]
struct State {
    table: PeerTable,
    connected: HashMap<PeerId, usize>,
    rtt: HashMap<PeerId, Duration>,
    listen_addrs: Vec<Multiaddr>,
    /// Listeners that reported at least one address.
    listeners_up: HashSet<libp2p::core::transport::ListenerId>,
}

struct Shared {
    local: PeerId,
    /// Bumped whenever the listen addresses change, so callers can wait for them.
    listening: tokio::sync::watch::Sender<usize>,
    topic_space: TopicSpace,
    needs_bootstrap: bool,
    /// The announced addresses (`/p2p/PEER_ID` appended); empty: the listen addresses are.
    advertised: Vec<Multiaddr>,
    state: RwLock<State>,
    /// Cleared when the event loop ends for any reason, a panic included, so readiness can
    /// tell a node whose mesh is gone.
    running: AtomicBool,
    /// Whether the loop ended because it was told to.
    stopped: AtomicBool,
    labels: Arc<PeerLabels>,
}

/// Clears [`Shared::running`] when dropped: at the end of the event loop task, however it ends.
struct Running(Arc<Shared>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::SeqCst);
    }
}

/// The most distinct peers named in metric labels; further peers are counted as `other`, so a
/// stranger cycling peer ids cannot grow the metrics without bound.
const MAX_LABELLED_PEERS: usize = 256;

/// Which peers have their own metric label.
#[derive(Default)]
pub(crate) struct PeerLabels(Mutex<HashSet<PeerId>>);

impl PeerLabels {
    /// The label of `peer`: its id, or `other` past the cap.
    pub(crate) fn of(&self, peer: &PeerId) -> String {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if set.contains(peer) || set.len() < MAX_LABELLED_PEERS {
            set.insert(*peer);
            peer.to_base58()
        } else {
            "other".to_string()
        }
    }
}

/// Labels of `canal_peer_bad_messages_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BadLabels {
    peer: String,
    kind: String,
}

/// Labels of `canal_qos0_dropped_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DropLabels {
    pub(crate) peer: String,
    pub(crate) reason: String,
}

/// How many inbound QoS 0 events may wait for the node to take them; past that the QoS 0
/// links stop reading (backpressure to the senders' queues).
pub const QOS0_INBOUND_QUEUE: usize = 4096;

/// The longest [`DhtHandle::request`] waits for an answer, queueing included.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// How many inbound requests may wait for the node to take them; past that the RPC links stop
/// reading (backpressure).
pub const RPC_INBOUND_QUEUE: usize = 1024;

/// A cheap, cloneable handle to a running swarm.
#[derive(Clone)]
pub struct DhtHandle {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    links: Arc<Links>,
}

/// The running swarm: its handle and its task.
pub struct Dht {
    handle: DhtHandle,
    task: JoinHandle<()>,
    inbound: Option<mpsc::Receiver<InboundRpc>>,
    qos0_inbound: Option<mpsc::Receiver<InboundQos0>>,
    /// The tasks that accept the streams peers open, one per lane.
    acceptors: Vec<JoinHandle<()>>,
}

/// What the handle and the links ask of the event loop.
pub(crate) enum Command {
    Shutdown(oneshot::Sender<()>),
    /// Dial `peer` (at `addrs` and wherever the mesh knows) unless connected or dialling;
    /// `done` is answered once the dial is under way.
    Dial {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        done: oneshot::Sender<()>,
    },
    ReportBad {
        peer: PeerId,
        kind: &'static str,
        detail: String,
    },
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    gossipsub: gossipsub::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    /// The peer links' streams (`/canal/rpc/2.0.0`, `/canal/qos0/2.0.0`).
    stream: libp2p_stream::Behaviour,
}

fn setup_err(e: impl std::fmt::Display) -> DhtError {
    DhtError::Setup(e.to_string())
}

fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic))
}

fn build_behaviour(
    key: &identity::Keypair,
    config: &DhtConfig,
) -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    let local = key.public().to_peer_id();
    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public())
            .with_agent_version(format!("canal/{}", canal_proto::VERSION))
            // With announced addresses, identify sends only those (the swarm's external
            // addresses), never the real listen addresses.
            .with_hide_listen_addrs(!config.advertise_addrs.is_empty()),
    );
    let ping = ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(5)));
    let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
    if let Some(k) = NonZeroUsize::new(config.topic_space.replication.max(1)) {
        kad_config.set_replication_factor(k);
    }
    kad_config.set_query_timeout(Duration::from_secs(10));
    let mut kad =
        kad::Behaviour::with_config(local, kad::store::MemoryStore::new(local), kad_config);
    // A canal peer always answers Kademlia queries: meshes on private networks and loopback
    // have no confirmed external address, which would leave the automatic mode in client.
    kad.set_mode(Some(kad::Mode::Server));
    let gossip_config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_millis(500))
        .validation_mode(gossipsub::ValidationMode::Strict)
        // A record is forwarded only after this node checked it (see `on_record`).
        .validate_messages()
        .max_transmit_size(MAX_GOSSIP_BYTES)
        .build()?;
    let mut gossipsub = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        gossip_config,
    )?;
    gossipsub.subscribe(&gossipsub::IdentTopic::new(CAPS_TOPIC))?;
    let mdns = if config.mdns {
        Some(mdns::tokio::Behaviour::new(mdns::Config::default(), local)?)
    } else {
        None
    };
    Ok(Behaviour {
        blocked: allow_block_list::Behaviour::default(),
        stream: libp2p_stream::Behaviour::new(),
        identify,
        ping,
        kad,
        gossipsub,
        mdns: mdns.into(),
    })
}

fn build_swarm(config: &DhtConfig) -> Result<Swarm<Behaviour>, DhtError> {
    let idle = |c: libp2p::swarm::Config| c.with_idle_connection_timeout(Duration::from_secs(60));
    let builder = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone()).with_tokio();
    let swarm = match config.cluster_key {
        Some(psk) => builder
            .with_other_transport(
                move |key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                    let noise = noise::Config::new(key)?;
                    Ok(
                        tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                            .upgrade(Version::V1Lazy)
                            .authenticate(noise)
                            .multiplex(yamux::Config::default())
                            .timeout(Duration::from_secs(20))
                            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer))),
                    )
                },
            )
            .map_err(setup_err)?
            .with_dns()
            .map_err(setup_err)?
            .with_behaviour(|key| build_behaviour(key, config))
            .map_err(setup_err)?
            .with_swarm_config(idle)
            .build(),
        None => builder
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(setup_err)?
            .with_quic()
            .with_dns()
            .map_err(setup_err)?
            .with_behaviour(|key| build_behaviour(key, config))
            .map_err(setup_err)?
            .with_swarm_config(idle)
            .build(),
    };
    Ok(swarm)
}

/// The largest gossip message, in bytes (a valid capability record is at most
/// `canal_proto::caps::MAX_RECORD_BYTES`).
pub const MAX_GOSSIP_BYTES: usize = 64 << 10;

struct CanalMetrics {
    peers: Gauge,
    connections: Gauge,
    records_received: Counter,
    records_rejected: Counter,
    bad_messages: Family<BadLabels, Counter>,
    banned: Gauge,
    qos0_dropped: Family<DropLabels, Counter>,
    qos0_sent: Counter,
    qos0_received: Counter,
    links: LinkMetrics,
}

impl CanalMetrics {
    fn new(registry: &mut Registry) -> Self {
        let m = CanalMetrics {
            peers: Gauge::default(),
            connections: Gauge::default(),
            records_received: Counter::default(),
            records_rejected: Counter::default(),
            bad_messages: Family::default(),
            banned: Gauge::default(),
            qos0_dropped: Family::default(),
            qos0_sent: Counter::default(),
            qos0_received: Counter::default(),
            links: LinkMetrics::register(registry),
        };
        // prometheus-client appends `_total` to counters.
        registry.register(
            "canal_peer_bad_messages",
            "Messages refused from a peer (undecodable, invalid, forged, oversized, refused), by peer and kind",
            m.bad_messages.clone(),
        );
        registry.register(
            "canal_peers_banned",
            "Peers banned now after repeated bad messages",
            m.banned.clone(),
        );
        registry.register(
            "canal_qos0_dropped",
            "QoS 0 events dropped (at most once): the link was down, the wait for queue space ran out, or nobody took it, by peer and reason",
            m.qos0_dropped.clone(),
        );
        registry.register(
            "canal_qos0_sent",
            "QoS 0 events sent to peers",
            m.qos0_sent.clone(),
        );
        registry.register(
            "canal_qos0_received",
            "QoS 0 events received from peers",
            m.qos0_received.clone(),
        );
        registry.register(
            "canal_peers",
            "Peers known alive, this node included",
            m.peers.clone(),
        );
        registry.register(
            "canal_peer_connections",
            "Open peer-to-peer connections",
            m.connections.clone(),
        );
        registry.register(
            "canal_capability_records_received",
            "Capability records received from other peers",
            m.records_received.clone(),
        );
        registry.register(
            "canal_capability_records_rejected",
            "Capability records dropped as undecodable, invalid or not signed by the peer they describe",
            m.records_rejected.clone(),
        );
        m
    }
}

impl Dht {
    /// Builds the swarm, binds its listeners, dials the bootstrap peers and starts the event
    /// loop. Fails if a listener cannot be bound or a bootstrap address cannot be dialled.
    pub async fn start(
        config: DhtConfig,
        local_record: Box<dyn LocalRecord>,
        registry: &mut Registry,
    ) -> Result<Dht, DhtError> {
        if config.cluster_key.is_some()
            && let Some(addr) = config
                .listen
                .iter()
                .chain(config.bootstrap.iter())
                .find(|a| is_quic(a))
        {
            return Err(DhtError::Config(format!(
                "{addr} is a QUIC address, but a cluster key is set: the cluster key protects TCP only, so use /tcp/ addresses"
            )));
        }
        let mut swarm = build_swarm(&config)?;
        for addr in &config.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| DhtError::Listen {
                    addr: addr.clone(),
                    reason: transport_reason(&e),
                })?;
        }
        let local = *swarm.local_peer_id();
        let advertised: Vec<Multiaddr> = config
            .advertise_addrs
            .iter()
            .map(|a| {
                let mut bare = a.clone();
                if matches!(bare.iter().last(), Some(Protocol::P2p(_))) {
                    bare.pop();
                }
                swarm.add_external_address(bare.clone());
                bare.with(Protocol::P2p(local))
            })
            .collect();
        for addr in &config.bootstrap {
            dial_bootstrap(&mut swarm, addr)?;
        }
        let metrics = Metrics::new(registry);
        let canal_metrics = CanalMetrics::new(registry);
        let shared = Arc::new(Shared {
            local,
            topic_space: config.topic_space,
            needs_bootstrap: !config.bootstrap.is_empty(),
            advertised,
            listening: tokio::sync::watch::Sender::new(0),
            state: RwLock::new(State::default()),
            running: AtomicBool::new(true),
            stopped: AtomicBool::new(false),
            labels: Arc::new(PeerLabels::default()),
        });
        let (tx, rx) = mpsc::channel(1024);
        let (inbound_tx, inbound_rx) = mpsc::channel(RPC_INBOUND_QUEUE);
        let (qos0_in_tx, qos0_in_rx) = mpsc::channel(QOS0_INBOUND_QUEUE);
        let mut control = swarm.behaviour().stream.new_control();
        let links = Links::new(
            local,
            control.clone(),
            tx.clone(),
            inbound_tx,
            qos0_in_tx,
            canal_metrics.links.clone(),
            SharedCounters {
                qos0_dropped: canal_metrics.qos0_dropped.clone(),
                qos0_sent: canal_metrics.qos0_sent.clone(),
                qos0_received: canal_metrics.qos0_received.clone(),
                labels: shared.labels.clone(),
            },
        );
        let mut acceptors = Vec::new();
        for lane in [Lane::Rpc, Lane::Qos0] {
            let mut incoming = control
                .accept(lane.protocol())
                .map_err(|e| DhtError::Setup(format!("{}: {e}", lane.protocol())))?;
            let links = links.clone();
            acceptors.push(tokio::spawn(async move {
                while let Some((peer, stream)) = incoming.next().await {
                    links.accept(peer, lane, stream);
                }
            }));
        }
        let event_loop = EventLoop {
            swarm,
            shared: shared.clone(),
            commands: rx,
            local_record,
            metrics,
            canal_metrics,
            bootstrap: config.bootstrap,
            advertise_interval: config.advertise_interval,
            peer_ttl: config.peer_ttl,
            seq: 0,
            caps_topic: gossipsub::IdentTopic::new(CAPS_TOPIC),
            guard: PeerGuard::new(GuardConfig::default()),
            warned_invalid_record: false,
        };
        let running = Running(shared.clone());
        let task = tokio::spawn(async move {
            let _running = running;
            event_loop.run().await;
        });
        info!(peer_id = %local, "peer mesh started");
        Ok(Dht {
            handle: DhtHandle {
                shared,
                commands: tx,
                links,
            },
            task,
            inbound: Some(inbound_rx),
            qos0_inbound: Some(qos0_in_rx),
            acceptors,
        })
    }

    /// A handle for reading the tables and stopping the swarm.
    pub fn handle(&self) -> DhtHandle {
        self.handle.clone()
    }

    /// The requests other peers send on the RPC lane; taken once by whoever answers them.
    /// Up to [`RPC_INBOUND_QUEUE`] wait in it; past that the links stop reading until it is
    /// read (backpressure). Once it is dropped, requests are answered with "no answer".
    pub fn take_inbound(&mut self) -> Option<mpsc::Receiver<InboundRpc>> {
        self.inbound.take()
    }

    /// The QoS 0 events other peers send on the QoS 0 lane; taken once by whoever delivers
    /// them. Up to [`QOS0_INBOUND_QUEUE`] wait in it; past that the links stop reading
    /// (backpressure). Once it is dropped, events are dropped and counted (`no-receiver`).
    pub fn take_qos0_inbound(&mut self) -> Option<mpsc::Receiver<InboundQos0>> {
        self.qos0_inbound.take()
    }

    /// Stops the event loop, closing every connection, and waits for it to end.
    pub async fn shutdown(self) {
        for a in &self.acceptors {
            a.abort();
        }
        self.handle.links.close();
        let (tx, rx) = oneshot::channel();
        if self
            .handle
            .commands
            .send(Command::Shutdown(tx))
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
        let _ = self.task.await;
    }
}

fn transport_reason<T: std::fmt::Debug>(e: &libp2p::TransportError<T>) -> String {
    match e {
        libp2p::TransportError::MultiaddrNotSupported(a) => {
            format!(
                "{a} is not supported: use /ip4/HOST/tcp/PORT, /ip6/HOST/tcp/PORT or /ip4/HOST/udp/PORT/quic-v1"
            )
        }
        libp2p::TransportError::Other(e) => format!("{e:?}"),
    }
}

fn dial_bootstrap(swarm: &mut Swarm<Behaviour>, addr: &Multiaddr) -> Result<(), DhtError> {
    if let Some(Protocol::P2p(peer)) = addr.iter().last() {
        let mut bare = addr.clone();
        bare.pop();
        swarm.behaviour_mut().kad.add_address(&peer, bare);
    }
    swarm.dial(addr.clone()).map_err(|e| DhtError::Bootstrap {
        addr: addr.clone(),
        reason: e.to_string(),
    })
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    local_record: Box<dyn LocalRecord>,
    metrics: Metrics,
    canal_metrics: CanalMetrics,
    bootstrap: Vec<Multiaddr>,
    advertise_interval: Duration,
    peer_ttl: Duration,
    seq: u64,
    caps_topic: gossipsub::IdentTopic,
    guard: PeerGuard<PeerId>,
    warned_invalid_record: bool,
}

impl EventLoop {
    async fn run(mut self) {
        let mut advertise = tokio::time::interval(self.advertise_interval);
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        // Redial bootstrap peers while alone, so peers may start in any order; refresh the
        // routing table now and then once in the mesh.
        let mut rejoin = tokio::time::interval(Duration::from_secs(3));
        let mut kad_refresh = tokio::time::interval(Duration::from_secs(30));
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                _ = advertise.tick() => self.advertise(),
                _ = sweep.tick() => self.sweep(),
                _ = rejoin.tick() => self.rejoin(),
                _ = kad_refresh.tick() => { let _ = self.swarm.behaviour_mut().kad.bootstrap(); }
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Shutdown(done)) => {
                        self.shared.stopped.store(true, Ordering::SeqCst);
                        let _ = done.send(());
                        break;
                    }
                    Some(Command::Dial { peer, addrs, done }) => {
                        if !self.swarm.is_connected(&peer) {
                            let opts = DialOpts::peer_id(peer)
                                .addresses(addrs)
                                .extend_addresses_through_behaviour()
                                .condition(PeerCondition::DisconnectedAndNotDialing)
                                .build();
                            if let Err(e) = self.swarm.dial(opts) {
                                debug!(%peer, error = %e, "dial for a link failed");
                            }
                        }
                        let _ = done.send(());
                    }
                    Some(Command::ReportBad { peer, kind, detail }) => self.offence(peer, kind, &detail),
                    None => {
                        self.shared.stopped.store(true, Ordering::SeqCst);
                        break;
                    }
                },
            }
        }
        info!("peer mesh stopped");
    }

    /// Counts an offence of `peer`, logs it (at most once a minute per peer), disconnects the
    /// peer, and bans it after repeated offences.
    fn offence(&mut self, peer: PeerId, kind: &'static str, detail: &str) {
        if peer == self.shared.local {
            return;
        }
        self.canal_metrics
            .bad_messages
            .get_or_create(&BadLabels {
                peer: self.shared.labels.of(&peer),
                kind: kind.to_string(),
            })
            .inc();
        let now = Instant::now();
        let verdict = self.guard.offence(&peer, now);
        if verdict.log {
            warn!(%peer, kind, detail, unlogged = verdict.unlogged, "bad message from peer: disconnecting it");
        }
        if let Some(length) = verdict.ban {
            warn!(%peer, kind, ban_secs = length.as_secs(), "peer banned after repeated bad messages");
            self.swarm.behaviour_mut().blocked.block_peer(peer);
        }
        if verdict.disconnect {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        self.canal_metrics.banned.set(self.guard.banned(now) as i64);
    }

    fn state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        // A panic while holding the lock cannot leave the tables half-written in a way
        // that matters (each update is one insert or remove), so a poisoned lock is used as is.
        self.shared.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn advertise(&mut self) {
        self.seq += 1;
        let mut caps = self.local_record.measure();
        caps.peer_id = self.shared.local.to_base58();
        caps.seq = self.seq;
        caps.measured_at_ms = now_ms();
        caps.listen_addrs = if self.shared.advertised.is_empty() {
            self.state()
                .listen_addrs
                .iter()
                .map(|a| a.to_string())
                .collect()
        } else {
            self.shared
                .advertised
                .iter()
                .map(|a| a.to_string())
                .collect()
        };
        let local = self.shared.local;
        // Peers refuse a record over the limits (and count it against this node): say so once.
        if let Err(e) = caps.validate()
            && !self.warned_invalid_record
        {
            self.warned_invalid_record = true;
            warn!(error = %e, "this node's capability record is over the limits: peers will refuse it");
        }
        self.state()
            .table
            .apply(local, caps.clone(), Instant::now());
        match wire::encode(&caps) {
            Ok(bytes) => {
                if let Err(e) = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(self.caps_topic.clone(), bytes)
                {
                    // Expected until the first peer has told us it subscribes.
                    debug!(error = %e, "capability record not sent");
                }
            }
            Err(e) => warn!(error = %e, "cannot encode our capability record"),
        }
        self.update_gauges();
    }

    fn sweep(&mut self) {
        let ttl = self.peer_ttl;
        let now = Instant::now();
        let gone = self.state().table.expire(now, ttl);
        for p in gone {
            info!(peer = %p, "peer gone: no capability record for {ttl:?}");
        }
        for p in self.guard.expire(now) {
            info!(peer = %p, "ban over: the peer may connect again");
            self.swarm.behaviour_mut().blocked.unblock_peer(p);
        }
        self.canal_metrics.banned.set(self.guard.banned(now) as i64);
        self.update_gauges();
    }

    fn rejoin(&mut self) {
        let alone = self.state().connected.is_empty();
        if alone {
            for addr in self.bootstrap.clone() {
                if let Err(e) = dial_bootstrap(&mut self.swarm, &addr) {
                    debug!(%addr, error = %e, "bootstrap redial failed");
                }
            }
        }
    }

    fn update_gauges(&self) {
        let st = self.shared.state.read().unwrap_or_else(|p| p.into_inner());
        self.canal_metrics.peers.set(st.table.len() as i64);
        self.canal_metrics
            .connections
            .set(st.connected.values().sum::<usize>() as i64);
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        self.metrics.record(&event);
        match event {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                let full = address.with(Protocol::P2p(self.shared.local));
                info!(address = %full, "listening for peers");
                let n = {
                    let mut st = self.state();
                    st.listen_addrs.push(full);
                    st.listeners_up.insert(listener_id);
                    st.listeners_up.len()
                };
                self.shared.listening.send_replace(n);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                let full = address.with(Protocol::P2p(self.shared.local));
                self.state().listen_addrs.retain(|a| *a != full);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                ..
            } => {
                debug!(peer = %peer_id, "connected");
                let first = self.state().connected.is_empty();
                self.state()
                    .connected
                    .insert(peer_id, num_established.get() as usize);
                if first {
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
                self.update_gauges();
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                ..
            } => {
                let mut st = self.state();
                if num_established == 0 {
                    st.connected.remove(&peer_id);
                    st.rtt.remove(&peer_id);
                } else {
                    st.connected.insert(peer_id, num_established as usize);
                }
                drop(st);
                self.update_gauges();
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(peer = ?peer_id, %error, "dial failed");
            }
            SwarmEvent::Behaviour(ev) => self.on_behaviour_event(ev),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(ev) => {
                self.metrics.record(&ev);
                if let identify::Event::Received { peer_id, info, .. } = ev {
                    let kad_proto = StreamProtocol::new(KAD_PROTOCOL);
                    if info.protocols.contains(&kad_proto) {
                        for addr in info.listen_addrs {
                            self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                        }
                    }
                }
            }
            BehaviourEvent::Ping(ev) => {
                self.metrics.record(&ev);
                if let Ok(rtt) = ev.result {
                    self.state().rtt.insert(ev.peer, rtt);
                }
            }
            BehaviourEvent::Kad(ev) => self.metrics.record(&ev),
            BehaviourEvent::Stream(()) => {}
            BehaviourEvent::Blocked(ev) => match ev {},
            BehaviourEvent::Gossipsub(ev) => {
                self.metrics.record(&ev);
                if let gossipsub::Event::Message {
                    propagation_source,
                    message_id,
                    message,
                } = ev
                {
                    let verdict = self.on_record(message);
                    let acceptance = match verdict {
                        Ok(()) => gossipsub::MessageAcceptance::Accept,
                        Err((kind, detail)) => {
                            self.canal_metrics.records_rejected.inc();
                            self.offence(propagation_source, kind, &detail);
                            gossipsub::MessageAcceptance::Reject
                        }
                    };
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            acceptance,
                        );
                }
            }
            BehaviourEvent::Mdns(ev) => {
                if let mdns::Event::Discovered(found) = ev {
                    for (peer, addr) in found {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer, addr.clone());
                        if let Err(e) = self.swarm.dial(addr.clone()) {
                            debug!(%peer, %addr, error = %e, "mDNS dial failed");
                        }
                    }
                }
            }
        }
    }

    /// Checks a capability record from gossip and applies it; `Err` names the kind of
    /// offence and what was wrong, and the record is then neither used nor forwarded.
    fn on_record(&mut self, message: gossipsub::Message) -> Result<(), (&'static str, String)> {
        // Strict validation means the message is signed by `source`; a record is accepted only
        // from the peer it describes.
        let Some(source) = message.source else {
            return Err((
                "gossip-unsigned",
                "capability record without a source".into(),
            ));
        };
        if message.data.len() > canal_proto::caps::MAX_RECORD_BYTES {
            return Err((
                "gossip-invalid",
                format!(
                    "capability record of {} bytes is over the limit of {}",
                    message.data.len(),
                    canal_proto::caps::MAX_RECORD_BYTES
                ),
            ));
        }
        let caps: Capabilities =
            wire::decode_with_limit(&message.data, canal_proto::caps::MAX_RECORD_BYTES).map_err(
                |e| {
                    (
                        "gossip-decode",
                        format!("undecodable capability record: {e}"),
                    )
                },
            )?;
        if caps.peer_id != source.to_base58() {
            return Err((
                "gossip-forged",
                format!(
                    "capability record of {:?} signed by {source}",
                    caps.peer_id.chars().take(64).collect::<String>()
                ),
            ));
        }
        caps.validate()
            .map_err(|e| ("gossip-invalid", e.to_string()))?;
        self.canal_metrics.records_received.inc();
        if self.state().table.apply(source, caps, Instant::now()) == Applied::Joined {
            info!(peer = %source, "peer joined");
        }
        Ok(())
    }
}

impl DhtHandle {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.shared.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// This peer's id.
    pub fn local_peer_id(&self) -> PeerId {
        self.shared.local
    }

    /// The addresses this peer listens on, each ending in `/p2p/PEER_ID`.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.read().listen_addrs.clone()
    }

    /// The addresses other peers are told to reach this one at, each ending in
    /// `/p2p/PEER_ID`: the configured announced addresses if any, else the listen addresses.
    pub fn advertised_addrs(&self) -> Vec<Multiaddr> {
        if self.shared.advertised.is_empty() {
            self.listen_addrs()
        } else {
            self.shared.advertised.clone()
        }
    }

    /// Waits until `listeners` listeners (one per configured listen address) each report an
    /// address, or `timeout` passes; returns the addresses known then.
    pub async fn wait_listening(&self, listeners: usize, timeout: Duration) -> Vec<Multiaddr> {
        let mut rx = self.shared.listening.subscribe();
        let want = listeners.max(1);
        let _ = tokio::time::timeout(timeout, rx.wait_for(|n| *n >= want)).await;
        self.listen_addrs()
    }

    /// Open connections, all peers together.
    pub fn connections(&self) -> usize {
        self.read().connected.values().sum()
    }

    /// Whether the peer can serve: it listens, and if it was given bootstrap peers it is
    /// connected to at least one peer. `Err` says what is missing.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.is_running() {
            return Err(if self.shared.stopped.load(Ordering::SeqCst) {
                "the peer mesh is shut down".into()
            } else {
                "the peer mesh event loop ended unexpectedly (it panicked?): this node no longer gossips or replicates".into()
            });
        }
        let st = self.read();
        if st.listen_addrs.is_empty() {
            return Err("not listening for peers yet".into());
        }
        if self.shared.needs_bootstrap && st.connected.is_empty() {
            return Err("not connected to any peer yet (bootstrap peers unreachable?)".into());
        }
        if st.table.get(&self.shared.local).is_none() {
            return Err("capability record not measured yet".into());
        }
        Ok(())
    }

    /// The addresses `peer` advertises now, if it is in the peer table: what a request to
    /// it dials with, without copying the whole table (Raft sends thousands a second).
    pub fn listen_addrs_of(&self, peer: &PeerId) -> Vec<String> {
        self.read()
            .table
            .get(peer)
            .map(|e| e.caps.listen_addrs.clone())
            .unwrap_or_default()
    }

    /// Every live peer, this one included, in peer id order.
    pub fn peers(&self) -> Vec<PeerView> {
        let st = self.read();
        let now = Instant::now();
        st.table
            .iter()
            .map(|(p, e)| PeerView {
                peer_id: *p,
                caps: e.caps.clone(),
                is_self: *p == self.shared.local,
                connected: st.connected.contains_key(p),
                last_seen: now.saturating_duration_since(e.last_seen),
                rtt: st.rtt.get(p).copied(),
            })
            .collect()
    }

    /// Where `topic` lives among the peers known alive now.
    pub fn locate(&self, topic: &Topic) -> (Placement, usize) {
        let members: HashSet<PeerId> = self.read().table.ids().collect();
        let n = members.len();
        (self.shared.topic_space.locate(topic, members), n)
    }

    /// Sends `body` to `peer` on the RPC lane and waits for its answer, at most
    /// [`RPC_TIMEOUT`] (callers bound it tighter: openraft's RPC timeout, the client
    /// timeout). `addrs` are addresses to try besides those the mesh already knows, should
    /// the peer need dialling.
    pub async fn request(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, RpcError> {
        let answer = async { self.start_request(peer, addrs, body).await?.await };
        tokio::time::timeout(RPC_TIMEOUT, answer)
            .await
            .map_err(|_| RpcError::Failed {
                peer: peer.to_base58(),
                reason: format!("no answer within {RPC_TIMEOUT:?} (RPC_TIMEOUT)"),
            })?
    }

    /// Queues `body` for `peer` on its RPC link, waiting for queue space (backpressure), and
    /// returns the answer to await. Requests queued one after another by one caller reach
    /// the peer, and its handler, in that order. A link that dies fails every request
    /// waiting on it at once.
    pub async fn start_request(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        body: Vec<u8>,
    ) -> Result<Reply, RpcError> {
        if !self.is_running() {
            return Err(RpcError::Closed);
        }
        self.links.request(peer, addrs, body).await
    }

    /// The shape of the topic space.
    pub fn topic_space(&self) -> TopicSpace {
        self.shared.topic_space
    }

    /// Whether the swarm's event loop still runs. `false` after a shutdown, and after the loop
    /// ended any other way (a panic): then [`DhtHandle::readiness`] fails too.
    pub fn is_running(&self) -> bool {
        self.shared.running.load(Ordering::SeqCst)
    }

    /// Reports that `peer` sent something it should not have (an undecodable or refused Raft
    /// RPC, an undecodable QoS 0 event, ...). `kind` names the offence in the metric
    /// `canal_peer_bad_messages_total{peer,kind}`, `detail` goes to the log. The peer is
    /// disconnected, logged at most once a minute, and banned after repeated offences (3 in
    /// 10 minutes: 10 minutes, doubling on repeat up to a day). Never waits: if the event
    /// loop is swamped the report is dropped.
    pub fn report_bad(&self, peer: PeerId, kind: &'static str, detail: String) {
        let _ = self
            .commands
            .try_send(Command::ReportBad { peer, kind, detail });
    }

    /// Queues a QoS 0 event for `peer` on its QoS 0 link, apart from the RPC lane, waiting
    /// at most [`crate::link::QOS0_WAIT`] for queue space. `false` when it is dropped
    /// instead: the link is down, the wait ran out, or the event is over
    /// [`crate::rpc::MAX_QOS0_BYTES`]; every drop is counted in
    /// `canal_qos0_dropped_total{peer,reason}`.
    pub async fn send_qos0(&self, peer: PeerId, body: Vec<u8>) -> bool {
        if !self.is_running() {
            self.links.qos0_drop(&peer, "mesh-closed");
            return false;
        }
        self.links.send_qos0(peer, body).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Arc<Shared> {
        Arc::new(Shared {
            local: PeerId::random(),
            listening: tokio::sync::watch::Sender::new(0),
            topic_space: TopicSpace::default(),
            needs_bootstrap: false,
            advertised: Vec::new(),
            state: RwLock::new(State::default()),
            running: AtomicBool::new(true),
            stopped: AtomicBool::new(false),
            labels: Arc::new(PeerLabels::default()),
        })
    }

    #[tokio::test]
    async fn a_panicking_event_loop_is_no_longer_running() {
        let shared = shared();
        let running = Running(shared.clone());
        let task = tokio::spawn(async move {
            let _running = running;
            tokio::task::yield_now().await;
            panic!("the event loop failed");
        });
        assert!(task.await.is_err());
        assert!(!shared.running.load(Ordering::SeqCst));
        assert!(!shared.stopped.load(Ordering::SeqCst));
    }

    #[test]
    fn peer_labels_are_capped() {
        let labels = PeerLabels::default();
        let first = PeerId::random();
        assert_eq!(labels.of(&first), first.to_base58());
        for _ in 1..MAX_LABELLED_PEERS {
            labels.of(&PeerId::random());
        }
        assert_eq!(labels.of(&PeerId::random()), "other");
        assert_eq!(labels.of(&first), first.to_base58());
    }
}
