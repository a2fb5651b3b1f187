//! What the services' unit tests share: Raft groups over an in-memory transport (no
//! processes, no sockets), a fixed peer table for placement, and the functions service on
//! them with the example guests.
//!
//! The transport is the one of consensus's own tests (`canal_consensus::mem`, feature
//! `mem-transport`).

use crate::caps::LoadCounters;
use crate::functions::{DeployRequest, DeploySettings, Functions};
use crate::placement::PeerSource;
use canal_consensus::mem::MemNet;
pub(crate) use canal_consensus::mem::MemTransport;
use canal_consensus::{Consensus, GroupId, NodeId, RaftDb, RaftNode, Settings, Transport};
use canal_dht::PeerView;
use canal_proto::Capabilities;
use libp2p::PeerId;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One member of a [`Cluster`].
pub(crate) struct Member {
    /// Its peer id (the Raft node's `peer_id` is its base58).
    pub(crate) peer: PeerId,
    /// Its groups.
    pub(crate) consensus: Consensus<MemTransport>,
}

/// Formed Raft groups (metadata and data group 1) in memory.
pub(crate) struct Cluster {
    /// The members, in the order they were started.
    pub(crate) members: Vec<Member>,
    nodes: MemNet,
    _dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    /// Starts `n` members with fast timings and forms every group out of all of them.
    pub(crate) async fn formed(n: usize) -> Cluster {
        let nodes = MemNet::default();
        let mut members = Vec::new();
        let mut dirs = Vec::new();
        for _ in 0..n {
            let peer = PeerId::random();
            let id = crate::cluster::node_id(&peer);
            let dir = tempfile::tempdir().expect("a temporary directory");
            let db = RaftDb::open(&dir.path().join("raft")).expect("a Raft database");
            let node = RaftNode {
                peer_id: peer.to_base58(),
                addrs: Vec::new(),
            };
            let consensus = Consensus::start(
                &db,
                id,
                node.clone(),
                &canal_consensus::routing::groups_to_start(),
                Settings::with_election_timeout(Duration::from_millis(200)),
                nodes.transport(id),
                &mut prometheus_client::registry::Registry::default(),
            )
            .await
            .expect("the groups start");
            nodes.insert(&node.peer_id, consensus.clone());
            members.push(Member { peer, consensus });
            dirs.push(dir);
        }
        let all: BTreeMap<NodeId, RaftNode> = members
            .iter()
            .map(|m| {
                (
                    crate::cluster::node_id(&m.peer),
                    RaftNode {
                        peer_id: m.peer.to_base58(),
                        addrs: Vec::new(),
                    },
                )
            })
            .collect();
        members[0]
            .consensus
            .initialize(all)
            .await
            .expect("the groups form");
        let cluster = Cluster {
            members,
            nodes,
            _dirs: dirs,
        };
        for g in canal_consensus::routing::groups_to_start() {
            cluster.leader(g).await;
        }
        cluster
    }

    /// The index of the member that leads `g`, once every member knows it.
    pub(crate) async fn leader(&self, g: GroupId) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let leaders: Vec<Option<NodeId>> = self
                .members
                .iter()
                .map(|m| m.consensus.metrics(g).ok().and_then(|m| m.current_leader))
                .collect();
            if let Some(Some(l)) = leaders.first()
                && leaders.iter().all(|x| x == &Some(*l))
                && let Some(i) = self
                    .members
                    .iter()
                    .position(|m| m.consensus.node_id() == *l)
            {
                return i;
            }
            assert!(Instant::now() < deadline, "no leader of {g}: {leaders:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Opens data group `g` on every member and forms it out of all of them (beside the
    /// groups routing starts), once every member knows its leader.
    pub(crate) async fn add_group(&self, g: GroupId) {
        for m in &self.members {
            m.consensus.open_group(g).await.expect("the group opens");
        }
        let all: BTreeMap<NodeId, RaftNode> = self
            .members
            .iter()
            .map(|m| {
                (
                    m.consensus.node_id(),
                    RaftNode {
                        peer_id: m.peer.to_base58(),
                        addrs: Vec::new(),
                    },
                )
            })
            .collect();
        self.members[0]
            .consensus
            .initialize_group(g, all)
            .await
            .expect("the group forms");
        self.leader(g).await;
    }

    /// Stops every member.
    pub(crate) async fn shutdown(self) {
        for m in &self.members {
            self.nodes.remove(&m.peer.to_base58());
        }
        for m in self.members {
            m.consensus.shutdown().await;
        }
    }
}

/// A peer table of its own, which a test changes.
#[derive(Default)]
pub(crate) struct FixedPeers(Mutex<Vec<PeerView>>);

impl FixedPeers {
    /// A table of `peers`, the first of them this node.
    pub(crate) fn of(peers: &[PeerId]) -> Arc<FixedPeers> {
        let views = peers
            .iter()
            .enumerate()
            .map(|(i, p)| PeerView {
                peer_id: *p,
                caps: Capabilities {
                    peer_id: p.to_base58(),
                    ..Capabilities::default()
                },
                is_self: i == 0,
                connected: i != 0,
                last_seen: Duration::ZERO,
                rtt: Some(Duration::from_millis(1)),
            })
            .collect();
        Arc::new(FixedPeers(Mutex::new(views)))
    }

    /// Takes `peer` out of the table, as when it is gone from the mesh.
    pub(crate) fn remove(&self, peer: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|v| v.peer_id.to_base58() != peer);
    }
}

impl PeerSource for FixedPeers {
    fn peers(&self) -> Vec<PeerView> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The functions service of `member`, placing among `peers`.
pub(crate) fn functions(
    member: &Member,
    peers: Arc<dyn PeerSource>,
) -> Arc<Functions<MemTransport>> {
    let runtime = canal_triggers::Runtime::new(&canal_triggers::RuntimeConfig {
        instances: 4,
        ..canal_triggers::RuntimeConfig::default()
    })
    .expect("the WebAssembly runtime starts");
    Arc::new(Functions {
        runtime: Arc::new(runtime),
        consensus: member.consensus.clone(),
        peer_id: member.peer.to_base58(),
        slots: Arc::new(tokio::sync::Semaphore::new(4)),
        estimates: Mutex::new(canal_placement::Estimates::new()),
        live: Arc::new(LoadCounters::default()),
        peers,
    })
}

/// An example guest, built by `cargo build --release --target wasm32-wasip2` in
/// examples/functions.
pub(crate) fn guest(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/functions/target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read the example guest {}: {e}; build it with `cd examples/functions && cargo build --release --target wasm32-wasip2`",
            path.display()
        )
    })
}

/// Deploys example guest `guest_name` as function `name` with the default settings.
pub(crate) async fn deploy<T: Transport>(functions: &Functions<T>, name: &str, guest_name: &str) {
    functions
        .deploy(DeployRequest {
            name: name.to_string(),
            settings: DeploySettings::default(),
            module: guest(guest_name),
        })
        .await
        .expect("the deploy succeeds");
}

/// Waits until `f` holds, at most `within`.
pub(crate) async fn until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
