//! The Raft side of a node: the transport that carries Raft over the peer mesh, and the
//! background job that forms the cluster (`--bootstrap-expect N`), adds joining peers as
//! learners and promotes them to voters up to the configured count.
//!
//! Who may join is the node's [`Admission`]: with a cluster key every peer that can connect
//! holds the key and belongs; without one only peers admitted by hand (`canal cluster
//! admit`) do, unless the node runs `--insecure-open`.
//!
//! Formation is confirmed before it happens, so two nodes whose views differ cannot both
//! form a cluster out of the same peers:
//!
//! ```text
//!   lowest forming peer ──FormRequest{members}──> each other chosen peer
//!        │                                          │ grants if it is no member and has not
//!        │                                          │ promised another initiator (the
//!        │                                          │ promise is kept in its data dir)
//!        └── all granted? ──> initialize(members) ──┘
//! ```

use canal_consensus::keys;
use canal_consensus::types::node_id_of;
use canal_consensus::{Consensus, GroupId, NodeId, RaftNode, Transport};
use canal_dht::{DhtHandle, InboundRpc};
use canal_proto::PeerChannel;
use canal_proto::peer::{FormAnswer, FormRequest};
use canal_proto::time::now_ms;
use libp2p::{Multiaddr, PeerId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::caps::LoadCounters;
use crate::config::Admission;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Carries Raft messages over the mesh's RPC lane (one link per peer).
#[derive(Clone)]
pub struct MeshTransport {
    /// The mesh.
    pub dht: DhtHandle,
}

impl MeshTransport {
    /// The peer of `target` and the addresses to reach it at, should it need dialling.
    fn route(&self, target: &RaftNode) -> Result<(PeerId, Vec<Multiaddr>), String> {
        let peer: PeerId = target
            .peer_id
            .parse()
            .map_err(|e| format!("member {:?} has a bad peer id: {e}", target.peer_id))?;
        // The addresses the peer advertises now (it may have restarted on new ports), then
        // those recorded in the membership.
        let mut addrs: Vec<Multiaddr> = self
            .dht
            .listen_addrs_of(&peer)
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        addrs.extend(target.addrs.iter().filter_map(|a| a.parse().ok()));
        Ok((peer, addrs))
    }
}

impl Transport for MeshTransport {
    async fn call(&self, target: &RaftNode, body: Vec<u8>) -> Result<Vec<u8>, String> {
        let (peer, addrs) = self.route(target)?;
        let framed = PeerChannel::Raft.frame(&body);
        self.dht
            .request(peer, addrs, framed)
            .await
            .map_err(|e| e.to_string())
    }

    // Queued on the peer's one RPC link, whose frames arrive in the order they were queued.
    async fn start(
        &self,
        target: &RaftNode,
        body: Vec<u8>,
    ) -> Result<canal_consensus::network::PendingAnswer, String> {
        let (peer, addrs) = self.route(target)?;
        let framed = PeerChannel::Raft.frame(&body);
        let reply = self
            .dht
            .start_request(peer, addrs, framed)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Box::pin(
            async move { reply.await.map_err(|e| e.to_string()) },
        ))
    }
}

/// The Raft node id of a peer.
pub fn node_id(peer: &PeerId) -> NodeId {
    node_id_of(&peer.to_bytes())
}

/// Answers requests from other peers, each in a task of its own (a slow snapshot install must
/// not hold up heartbeats): Raft messages go to the groups, formation requests to
/// [`Formation`]. Each is dispatched here, in the order the links delivered them, before its
/// task starts ([`Consensus::dispatch`]), so forwarded writes are proposed in the order
/// their senders sent them.
/// A forged or undecodable Raft request, and a request on no known channel, count against
/// the peer that sent it ([`DhtHandle::report_bad`]: counted, disconnected, banned when
/// repeated); a Raft request refused only because its sender is no member does not, since a
/// lagging member legitimately meets a leader it does not know yet.
pub fn serve<T: Transport>(
    dht: DhtHandle,
    consensus: Consensus<T>,
    formation: Arc<Formation>,
    mut inbound: mpsc::Receiver<InboundRpc>,
) {
    tokio::spawn(async move {
        while let Some(rpc) = inbound.recv().await {
            match PeerChannel::split(&rpc.body) {
                Ok(Some((PeerChannel::Raft, body))) => {
                    let dht = dht.clone();
                    // The sender is the authenticated peer the request came over: only
                    // members speak Raft, and only as themselves.
                    let peer = rpc.peer;
                    let handling = consensus.dispatch(node_id(&peer), body).await;
                    tokio::spawn(async move {
                        let handled = handling.await;
                        let _ = rpc.reply.send(handled.answer);
                        if let Some(o) = handled.offence
                            && o.ban_worthy
                        {
                            dht.report_bad(peer, raft_kind(o.kind), o.detail);
                        }
                    });
                }
                Ok(Some((PeerChannel::Formation, body))) => {
                    let answer = formation.answer(&consensus, rpc.peer, body);
                    let _ = rpc
                        .reply
                        .send(canal_proto::wire::encode(&answer).unwrap_or_default());
                }
                Err(channel) => dht.report_bad(
                    rpc.peer,
                    "rpc-channel",
                    format!("RPC on unknown channel {channel:#04x}: canal speaks R (Raft) and F (formation)"),
                ),
                Ok(None) => dht.report_bad(rpc.peer, "rpc-channel", "empty RPC request".into()),
            }
        }
    });
}

/// The metric label of a ban-worthy Raft offence: bytes that do not decode, or a request
/// naming another node as its leader or candidate.
fn raft_kind(kind: &str) -> &'static str {
    match kind {
        "decode" => "raft-decode",
        _ => "raft-forged",
    }
}

/// What the membership job needs.
pub struct Membership<T: Transport> {
    /// The groups.
    pub consensus: Consensus<T>,
    /// The mesh.
    pub dht: DhtHandle,
    /// How many peers form the first cluster; `None`: this node never forms one, it waits
    /// to be added.
    pub bootstrap_expect: Option<usize>,
    /// How many voters each group should have.
    pub voters: usize,
    /// Where the node advertises whether it is a member.
    pub live: Arc<LoadCounters>,
    /// Which peers join without an operator's word.
    pub admission: Admission,
    /// This node's side of formation confirmations.
    pub formation: Arc<Formation>,
}

/// How long the set of visible peers must stay the same before a node forms the cluster, so
/// that every peer started with it has been heard (records are gossiped every 2 s).
const STABLE_VIEW: Duration = Duration::from_secs(3);

/// How often the membership job looks at the peers and the groups.
const MEMBERSHIP_EVERY: Duration = Duration::from_millis(500);

/// The membership job as a [`canal_worker::Worker`]: a step every [`MEMBERSHIP_EVERY`]; a
/// step in hand (a formation, a learner being added) finishes before it stops.
struct MembershipJob<T: Transport> {
    membership: Membership<T>,
    view: View,
    tick: tokio::time::Interval,
}

impl<T: Transport> canal_worker::Worker for MembershipJob<T> {
    fn name(&self) -> &'static str {
        "membership"
    }

    async fn wait(&mut self) {
        self.tick.tick().await;
    }

    async fn work(&mut self) -> canal_worker::Flow {
        self.membership.step(&mut self.view).await;
        canal_worker::Flow::Continue
    }
}

impl<T: Transport> Membership<T> {
    /// Starts the job; the first step comes at once.
    pub fn spawn(self) -> canal_worker::WorkerHandle {
        canal_worker::spawn(MembershipJob {
            membership: self,
            view: View::default(),
            tick: tokio::time::interval(MEMBERSHIP_EVERY),
        })
    }

    async fn step(&self, view: &mut View) {
        let member = self.consensus.is_member();
        self.live.raft_member.store(member, Ordering::Relaxed);
        if !member {
            self.maybe_form(view).await;
            return;
        }
        // A shard group's members are the shard map's replicas, changed by the shard groups
        // job (crate::shard_groups): growing it to every peer would undo the map.
        let groups = self.consensus.groups().into_iter();
        for g in groups.filter(|g| canal_consensus::routing::shard_of_group(*g).is_none()) {
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
        let me = self.dht.local_peer_id();
        if let Err(why) = self.formation.promise(me, me) {
            debug!(%why, "not forming the cluster now");
            return;
        }
        let others: Vec<&&canal_dht::PeerView> = chosen.iter().filter(|p| !p.is_self).collect();
        let asks = others.iter().map(|p| self.confirm(p, &members));
        let answers = futures::future::join_all(asks).await;
        if let Some(why) = answers.into_iter().find_map(Result::err) {
            info!(%why, "cluster formation not confirmed; trying again when the view is stable");
            self.formation.release(me);
            view.since = std::time::Instant::now();
            return;
        }
        info!(
            members = n,
            "forming the cluster (--bootstrap-expect {n}), confirmed by every chosen peer"
        );
        if let Err(e) = self.consensus.initialize(members).await {
            warn!(error = %e, "cluster formation failed");
        }
    }

    /// Asks `peer` to confirm that it forms a cluster of `members` with this node.
    async fn confirm(
        &self,
        peer: &canal_dht::PeerView,
        members: &BTreeMap<NodeId, RaftNode>,
    ) -> Result<(), String> {
        let req = FormRequest {
            members: members.values().map(|m| m.peer_id.clone()).collect(),
        };
        let body = PeerChannel::Formation
            .frame(&canal_proto::wire::encode(&req).map_err(|e| e.to_string())?);
        let addrs = peer
            .caps
            .listen_addrs
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            self.dht.request(peer.peer_id, addrs, body),
        )
        .await
        .map_err(|_| format!("{} did not answer within 5 s", peer.peer_id))?
        .map_err(|e| e.to_string())?;
        match canal_proto::wire::decode::<FormAnswer>(&answer) {
            Ok(FormAnswer::Granted) => Ok(()),
            Ok(FormAnswer::Refused(why)) => Err(format!("{} refused: {why}", peer.peer_id)),
            Err(e) => Err(format!("{} answered garbage: {e}", peer.peer_id)),
        }
    }

    /// Whether `peer` may join the cluster without an operator's word.
    fn may_join(&self, peer: &PeerId) -> bool {
        // Both marks are internal records (written by `POST /v1/cluster/remove|admit/{peer}`
        // through `InternalKey::Removed|Admitted`), never client keys.
        let recorded = |table: &keys::Table<keys::Name, keys::Raw>| {
            self.consensus
                .state_machine(GroupId::METADATA)
                .ok()
                .and_then(|sm| sm.record(table, &peer.to_base58()).ok().flatten())
                .is_some()
        };
        if recorded(&keys::REMOVED) {
            return false;
        }
        match self.admission {
            Admission::Keyed | Admission::Open => true,
            Admission::ByHand => recorded(&keys::ADMITTED),
        }
    }

    /// On the leader: adds live peers that may join and are not members as learners, then
    /// promotes caught-up learners while the group has fewer voters than wanted.
    async fn grow(&self, g: GroupId) -> Result<(), String> {
        if !self.consensus.is_leader(g) {
            return Ok(());
        }
        let m = self.consensus.metrics(g).map_err(|e| e.to_string())?;
        let membership = m.membership_config.membership().clone();
        let known: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
        for p in self.dht.peers() {
            let id = node_id(&p.peer_id);
            if !known.contains(&id) && self.may_join(&p.peer_id) {
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

/// How long a promise to an initiator holds: far longer than the initiator takes from the
/// last grant to initializing (one RPC round), so a promise cannot lapse while the
/// formation it granted is still under way.
const PROMISE_TTL: Duration = Duration::from_secs(60);

/// A peer's promise to take part in one initiator's formation, kept in the data dir so a
/// restart cannot grant a second initiator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Promise {
    /// The initiator, base58.
    initiator: String,
    /// Until when it holds, ms since the Unix epoch (this node's own clock: the promise
    /// never leaves the node).
    until_ms: u64,
}

/// This node's side of formation confirmations: the promise it gave, if any.
pub struct Formation {
    path: PathBuf,
    promise: std::sync::Mutex<Option<Promise>>,
}

impl Formation {
    /// The promise kept in `path` (a file in the data dir), if one is there and readable.
    pub fn open(path: PathBuf) -> Formation {
        let promise = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Promise>(&b).ok());
        Formation {
            path,
            promise: std::sync::Mutex::new(promise),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Promise>> {
        self.promise.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Promises `initiator` (this node itself when it initiates) to take part in its
    /// formation, unless a live promise to another initiator stands. Written to disk before
    /// it counts.
    fn promise(&self, me: PeerId, initiator: PeerId) -> Result<(), String> {
        let now = now_ms();
        let mut current = self.lock();
        if let Some(p) = current.as_ref()
            && p.until_ms > now
            && p.initiator != initiator.to_base58()
        {
            let who = if p.initiator == me.to_base58() {
                "this node is forming a cluster itself".to_string()
            } else {
                format!("it promised to form the cluster with {}", p.initiator)
            };
            return Err(format!(
                "{who} (for {} s more)",
                (p.until_ms - now).div_ceil(1000)
            ));
        }
        let p = Promise {
            initiator: initiator.to_base58(),
            until_ms: now + PROMISE_TTL.as_millis() as u64,
        };
        let bytes = serde_json::to_vec(&p).map_err(|e| e.to_string())?;
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, bytes)
            .and_then(|_| std::fs::rename(&tmp, &self.path))
            .map_err(|e| format!("cannot record the promise in {}: {e}", self.path.display()))?;
        *current = Some(p);
        Ok(())
    }

    /// Drops this node's own promise to itself after a formation it initiated failed, so
    /// it may grant another initiator.
    fn release(&self, me: PeerId) {
        let mut current = self.lock();
        if current
            .as_ref()
            .is_some_and(|p| p.initiator == me.to_base58())
        {
            *current = None;
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Answers a [`FormRequest`] from `from`.
    pub fn answer<T: Transport>(
        &self,
        consensus: &Consensus<T>,
        from: PeerId,
        body: &[u8],
    ) -> FormAnswer {
        let req: FormRequest = match canal_proto::wire::decode(body) {
            Ok(r) => r,
            Err(e) => return FormAnswer::Refused(format!("undecodable request: {e}")),
        };
        let me = consensus_peer(consensus);
        if consensus.is_member() {
            return FormAnswer::Refused("this node is already a member of a cluster".into());
        }
        if !req.members.iter().any(|m| *m == from.to_base58()) {
            return FormAnswer::Refused("the initiator is not among the members it names".into());
        }
        if !req
            .members
            .iter()
            .any(|m| Some(m.as_str()) == me.as_deref())
        {
            return FormAnswer::Refused("this node is not among the members named".into());
        }
        let Some(me) = me.and_then(|m| m.parse::<PeerId>().ok()) else {
            return FormAnswer::Refused("this node does not know its own peer id".into());
        };
        match self.promise(me, from) {
            Ok(()) => FormAnswer::Granted,
            Err(why) => FormAnswer::Refused(why),
        }
    }
}

fn consensus_peer<T: Transport>(consensus: &Consensus<T>) -> Option<String> {
    consensus
        .local_status(GroupId::METADATA)
        .ok()
        .map(|s| s.peer_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_promise_holds_against_other_initiators_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("formation-promise.json");
        let (me, a, b) = (PeerId::random(), PeerId::random(), PeerId::random());
        let f = Formation::open(path.clone());
        assert!(f.promise(me, a).is_ok());
        // The same initiator again is fine (it retries); another is refused.
        assert!(f.promise(me, a).is_ok());
        let refused = f.promise(me, b).err().unwrap_or_default();
        assert!(refused.contains(&a.to_base58()), "{refused}");
        // A restarted node reads its promise back.
        let again = Formation::open(path.clone());
        assert!(again.promise(me, b).is_err());
        // Releasing only drops a promise to oneself.
        again.release(me);
        assert!(again.promise(me, b).is_err());
        let own = Formation::open(dir.path().join("other.json"));
        assert!(own.promise(me, me).is_ok());
        assert!(own.promise(me, a).is_err());
        own.release(me);
        assert!(own.promise(me, a).is_ok());
    }
}
