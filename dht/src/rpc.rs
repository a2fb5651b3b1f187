//! A request-response channel between peers for the layers above (Raft, forwarding), and a
//! one-way lane for QoS 0 events, both carrying opaque bytes: the dht crate moves them and
//! knows nothing of what they mean. Both travel on the peer links of [`crate::link`].

use tokio::sync::oneshot;

/// The protocol name of canal's peer-to-peer RPC lane: one long-lived stream per peer
/// carrying [`crate::frame`] frames (version 2 of the protocol: version 1 was one
/// request-response substream per message).
pub const RPC_PROTOCOL: &str = "/canal/rpc/2.0.0";
/// The largest request or response accepted, in bytes.
pub const MAX_RPC_BYTES: usize = 64 << 20;
/// The protocol name of canal's QoS 0 lane: one-way events on a stream of their own, apart
/// from the RPC lane, so a QoS 0 flood never queues ahead of Raft.
pub const QOS0_PROTOCOL: &str = "/canal/qos0/2.0.0";
/// The largest QoS 0 message accepted, in bytes: the largest payload (1 MiB) and room for
/// its topic, ids and headers.
pub const MAX_QOS0_BYTES: usize = 2 << 20;

/// A QoS 0 message that arrived from a peer. Nothing is answered: QoS 0 is at most once.
#[derive(Debug)]
pub struct InboundQos0 {
    /// The peer that sent it (authenticated by the connection).
    pub peer: libp2p::PeerId,
    /// The message's bytes.
    pub body: Vec<u8>,
}

/// A request that arrived from a peer. Send the answer through `reply`; dropping it answers
/// with nothing (the caller sees a failure).
#[derive(Debug)]
pub struct InboundRpc {
    /// The peer that asked.
    pub peer: libp2p::PeerId,
    /// The request's bytes.
    pub body: Vec<u8>,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Vec<u8>>,
}

/// Why an RPC to a peer failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcError {
    /// The request could not be delivered or answered (no connection, timeout, refused).
    #[error("RPC to {peer} failed: {reason}")]
    Failed {
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The swarm is shutting down.
    #[error("the peer mesh is shut down")]
    Closed,
}
