//! The node's side of [`canal_pubsub`]: QoS 0 over the mesh (the [`MeshQos0`] link and the
//! inbound lane), and the service the HTTP layer publishes and subscribes through. Nothing
//! here names an HTTP type; the topic logic is the crate's.

use crate::NodeTransport;
use canal_consensus::Consensus;
use canal_dht::DhtHandle;
use tokio::sync::mpsc;

pub use canal_pubsub::{MAX_PAYLOAD_BYTES, PubSubError, Qos0Hub, Qos0Message};

/// Publishing and subscribing on this node.
pub type PubSub = canal_pubsub::PubSub<NodeTransport, MeshQos0>;

/// MQTT on this node, over the same service.
pub type Mqtt = canal_mqtt::Mqtt<NodeTransport, MeshQos0>;

/// QoS 0 over the mesh: each peer's copy goes on the peer's QoS 0 link (its own stream and
/// bounded queue, apart from Raft's RPCs). A publisher waits a bounded time for room in the
/// queue; a copy is dropped, and counted (`canal_qos0_dropped_total{peer,reason}`), only when
/// the link is down or that wait runs out, as at-most-once allows.
#[derive(Clone)]
pub struct MeshQos0 {
    /// The mesh.
    pub dht: DhtHandle,
}

impl canal_pubsub::Qos0Link for MeshQos0 {
    type Peer = libp2p::PeerId;

    fn peers(&self) -> Vec<(libp2p::PeerId, Vec<String>)> {
        self.dht
            .peers()
            .into_iter()
            .filter(|p| !p.is_self)
            .map(|p| (p.peer_id, p.caps.interest))
            .collect()
    }

    async fn send(&self, peer: libp2p::PeerId, bytes: Vec<u8>) {
        self.dht.send_qos0(peer, bytes).await;
    }
}

/// Publishes a QoS 0 event from this node: to its own subscribers and to every other live
/// peer that wants it, once; waits only (a bounded time) for room on the peers' links.
pub async fn publish_qos0(dht: &DhtHandle, hub: &Qos0Hub, m: Qos0Message) {
    canal_pubsub::publish_qos0(&MeshQos0 { dht: dht.clone() }, hub, m).await
}

/// Hands the QoS 0 events other peers send on the QoS 0 lane to this node's subscribers; a
/// message that does not decode or claims another source is refused and reported against the
/// peer that sent it.
///
/// Only members of the cluster publish into it: once this node is a member, events from a
/// peer that is neither a voter nor a learner of the metadata group are dropped and counted
/// in `not_members` (not reported as offences: a peer about to be added may send a few).
pub fn serve_qos0(
    dht: DhtHandle,
    hub: Qos0Hub,
    consensus: Consensus<NodeTransport>,
    not_members: prometheus_client::metrics::counter::Counter,
    mut inbound: mpsc::Receiver<canal_dht::InboundQos0>,
) {
    tokio::spawn(async move {
        // Each sender's node id and name, worked out once rather than per event (a peer
        // id's text is a base58 encoding). Bounded: a cluster has far fewer peers.
        const KNOWN: usize = 4096;
        let mut known: std::collections::HashMap<
            libp2p::PeerId,
            (canal_consensus::NodeId, String),
        > = std::collections::HashMap::new();
        while let Some(ev) = inbound.recv().await {
            if known.len() >= KNOWN && !known.contains_key(&ev.peer) {
                known.clear();
            }
            let (id, sender) = known
                .entry(ev.peer)
                .or_insert_with(|| (crate::cluster::node_id(&ev.peer), ev.peer.to_string()));
            if !canal_pubsub::qos0::sent_by_member(&consensus, *id) {
                not_members.inc();
                tracing::debug!(peer = %ev.peer, "QoS 0 event from a peer that is no member dropped");
                continue;
            }
            match canal_pubsub::qos0::check_qos0(sender, &ev.body, canal_dht::rpc::MAX_QOS0_BYTES) {
                // Waiting here holds back the peer's link, so it waits and counts its drops.
                Ok(m) => hub.deliver_wait(m).await,
                Err(r) => dht.report_bad(ev.peer, r.kind, r.detail),
            }
        }
    });
}
