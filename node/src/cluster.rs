//! The Raft side of a node: the transport that carries Raft over the peer mesh, and the
//! background job that forms the cluster (`--bootstrap-expect N`), adds joining peers as
//! learners and promotes them to voters up to the configured count.

use canal_consensus::types::node_id_of;
use canal_consensus::{Consensus, GroupId, NodeId, RaftNode, Transport};
use canal_dht::{DhtHandle, InboundRpc};
use libp2p::{Multiaddr, PeerId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::caps::LoadCounters;

/// Carries Raft messages over the mesh's RPC channel.
#[derive(Clone)]
pub struct MeshTransport {
    /// The mesh.
    pub dht: DhtHandle,
}

impl Transport for MeshTransport {
    async fn call(&self, target: &RaftNode, body: Vec<u8>) -> Result<Vec<u8>, String> {
        let peer: PeerId = target
            .peer_id
            .parse()
            .map_err(|e| format!("member {:?} has a bad peer id: {e}", target.peer_id))?;
        // The addresses the peer advertises now (it may have restarted on new ports), then
        // those recorded in the membership.
        let mut addrs: Vec<Multiaddr> = self
            .dht
            .peers()
            .into_iter()
            .find(|p| p.peer_id == peer)
            .map(|p| {
                p.caps
                    .listen_addrs
                    .iter()
                    .filter_map(|a| a.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        addrs.extend(target.addrs.iter().filter_map(|a| a.parse().ok()));
        let mut framed = Vec::with_capacity(body.len() + 1);
        framed.push(RAFT_CHANNEL);
        framed.extend(body);
        self.dht
            .request(peer, addrs, framed)
            .await
            .map_err(|e| e.to_string())
    }
}

/// The metadata key that marks a peer as removed from the cluster for good.
pub fn removed_key(peer: &PeerId) -> String {
    format!("cluster/removed/{peer}")
}

/// The Raft node id of a peer.
pub fn node_id(peer: &PeerId) -> NodeId {
    node_id_of(&peer.to_bytes())
}

/// The first byte of an RPC that carries a Raft message (QoS 0 events use
/// [`crate::pubsub::QOS0_CHANNEL`]).
/// (Distinct from any wire format version byte, so a message framed wrongly is refused rather
/// than misread.)
pub const RAFT_CHANNEL: u8 = b'R';

/// Answers requests from other peers, each in a task of its own (a slow snapshot install must
/// not hold up heartbeats): Raft messages go to the groups, QoS 0 events to this node's
/// subscribers.
pub fn serve(
    consensus: Consensus<MeshTransport>,
    qos0: crate::pubsub::Qos0Hub,
    mut inbound: mpsc::Receiver<InboundRpc>,
) {
    tokio::spawn(async move {
        while let Some(rpc) = inbound.recv().await {
            match rpc.body.split_first() {
                Some((&RAFT_CHANNEL, body)) => {
                    let c = consensus.clone();
                    let body = body.to_vec();
                    tokio::spawn(async move {
                        // The sender is the authenticated peer the request came over: only
                        // members speak Raft, and only as themselves.
                        let handled = c.handle(node_id(&rpc.peer), &body).await;
                        if let Some(o) = &handled.offence
                            && o.ban_worthy
                        {
                            // The groups already warned (at most once a minute per peer).
                            // TODO(integrator): pass to DhtHandle::report_bad once it exists.
                            debug!(peer = %rpc.peer, kind = o.kind, "peer sent a forged or undecodable Raft request: {}", o.detail);
                        }
                        let _ = rpc.reply.send(handled.answer);
                    });
                }
                Some((&crate::pubsub::QOS0_CHANNEL, body)) => {
                    match canal_proto::wire::decode::<crate::pubsub::Qos0Message>(body) {
                        Ok(m) => qos0.deliver(m),
                        Err(e) => {
                            debug!(peer = %rpc.peer, error = %e, "undecodable QoS 0 event dropped")
                        }
                    }
                    let _ = rpc.reply.send(Vec::new());
                }
                _ => debug!(peer = %rpc.peer, "RPC on an unknown channel dropped"),
            }
        }
    });
}

/// What the membership job needs.
pub struct Membership {
    /// The groups.
    pub consensus: Consensus<MeshTransport>,
    /// The mesh.
    pub dht: DhtHandle,
    /// How many peers form the first cluster; `None`: this node never forms one, it waits
    /// to be added.
    pub bootstrap_expect: Option<usize>,
    /// How many voters each group should have.
    pub voters: usize,
    /// Where the node advertises whether it is a member.
    pub live: Arc<LoadCounters>,
}

/// How long the set of visible peers must stay the same before a node forms the cluster, so
/// that every peer started with it has been heard (records are gossiped every 2 s).
const STABLE_VIEW: Duration = Duration::from_secs(3);

impl Membership {
    /// Runs the job until the task is dropped.
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            let mut view = View::default();
            loop {
                tick.tick().await;
                self.step(&mut view).await;
            }
        })
    }

    async fn step(&self, view: &mut View) {
        let member = self.consensus.is_member();
        self.live.raft_member.store(member, Ordering::Relaxed);
        if !member {
            self.maybe_form(view).await;
            return;
        }
        for g in self.consensus.groups() {
            if let Err(e) = self.grow(g).await {
                debug!(group = %g, error = %e, "membership step");
            }
        }
    }

    /// Forms the cluster exactly once. A node forms it only when it has seen the same set of
    /// peers for a while, at least `bootstrap_expect` of them started to form the cluster
    /// (`--bootstrap-expect`, said in their capability records), none of them a member yet,
    /// and it has the lowest peer id of those; it makes the `bootstrap_expect` lowest of them
    /// its voters. Peers started without the flag join later as learners. Two
    /// nodes could both form only if each failed to hear the other for the whole stable
    /// period; every later peer joins as a learner of the one cluster.
    async fn maybe_form(&self, view: &mut View) {
        let Some(n) = self.bootstrap_expect else {
            return;
        };
        let peers = self.dht.peers();
        if peers.iter().any(|p| p.caps.raft_member) {
            return; // a cluster exists; its leader will add us
        }
        let ids: BTreeSet<Vec<u8>> = peers.iter().map(|p| p.peer_id.to_bytes()).collect();
        if view.ids != ids {
            view.ids = ids;
            view.since = std::time::Instant::now();
            return;
        }
        let mut sorted: Vec<_> = peers.iter().filter(|p| p.caps.forms_cluster).collect();
        if sorted.len() < n || view.since.elapsed() < STABLE_VIEW {
            return;
        }
        sorted.sort_by_key(|p| p.peer_id.to_bytes());
        let chosen = &sorted[..n];
        if !chosen[0].is_self {
            return;
        }
        let members: BTreeMap<NodeId, RaftNode> = chosen
            .iter()
            .map(|p| {
                (
                    node_id(&p.peer_id),
                    RaftNode {
                        peer_id: p.peer_id.to_base58(),
                        addrs: p.caps.listen_addrs.clone(),
                    },
                )
            })
            .collect();
        info!(members = n, "forming the cluster (--bootstrap-expect {n})");
        if let Err(e) = self.consensus.initialize(members).await {
            warn!(error = %e, "cluster formation failed");
        }
    }

    /// On the leader: adds live peers that are not members as learners, then promotes caught-up
    /// learners while the group has fewer voters than wanted.
    async fn grow(&self, g: GroupId) -> Result<(), String> {
        let m = self.consensus.metrics(g).map_err(|e| e.to_string())?;
        if m.current_leader != Some(self.consensus.node_id()) {
            return Ok(());
        }
        let membership = m.membership_config.membership().clone();
        let known: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
        let removed = |p: &PeerId| {
            self.consensus
                .state_machine(GroupId::METADATA)
                .ok()
                .and_then(|sm| sm.get(&removed_key(p)).ok().flatten())
                .is_some()
        };
        for p in self.dht.peers() {
            let id = node_id(&p.peer_id);
            if !known.contains(&id) && !removed(&p.peer_id) {
                info!(group = %g, peer = %p.peer_id, "adding peer as a learner");
                let node = RaftNode {
                    peer_id: p.peer_id.to_base58(),
                    addrs: p.caps.listen_addrs.clone(),
                };
                self.consensus
                    .add_learner(g, id, node)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if voters.len() >= self.voters {
            return Ok(());
        }
        let live: BTreeSet<NodeId> = self
            .dht
            .peers()
            .iter()
            .map(|p| node_id(&p.peer_id))
            .collect();
        let last = m.last_log_index.unwrap_or(0);
        let caught_up = |id: &NodeId| {
            m.replication
                .as_ref()
                .and_then(|r| r.get(id).cloned().flatten())
                .is_some_and(|matched| matched.index + 100 >= last)
        };
        if let Some(learner) = membership
            .learner_ids()
            .find(|id| live.contains(id) && caught_up(id))
        {
            let mut next: Vec<NodeId> = voters.into_iter().collect();
            next.push(learner);
            info!(group = %g, node = learner, voters = next.len(), "promoting learner to voter");
            self.consensus
                .set_voters(g, next)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// The set of peers seen, and since when it has not changed.
struct View {
    ids: BTreeSet<Vec<u8>>,
    since: std::time::Instant,
}

impl Default for View {
    fn default() -> Self {
        View {
            ids: BTreeSet::new(),
            since: std::time::Instant::now(),
        }
    }
}
