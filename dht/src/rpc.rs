//! A request-response channel between peers for the layers above (Raft, forwarding), and a
//! one-way lane for QoS 0 events, both carrying opaque bytes: the dht crate moves them and
//! knows nothing of what they mean.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use std::io;
use tokio::sync::oneshot;

/// The protocol name of canal's peer-to-peer RPC.
pub const RPC_PROTOCOL: &str = "/canal/rpc/1.0.0";
/// The largest request or response accepted, in bytes.
pub const MAX_RPC_BYTES: usize = 64 << 20;
/// The protocol name of canal's QoS 0 lane: one-way events, apart from the RPC channel, so a
/// QoS 0 flood never queues ahead of Raft.
pub const QOS0_PROTOCOL: &str = "/canal/qos0/1.0.0";
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

/// Length-prefixed bytes: a 4-byte big-endian length, then the body, of at most `max` bytes.
#[derive(Debug, Clone)]
pub struct BytesCodec {
    /// The largest body read or written, in bytes; a longer one fails the stream with
    /// `InvalidData` (counted against the peer that sent it).
    pub max: usize,
}

impl Default for BytesCodec {
    fn default() -> Self {
        BytesCodec { max: MAX_RPC_BYTES }
    }
}

/// A request as read from a stream: its bytes, or why it was refused unread (its length prefix
/// claims more than the limit). A refusal is passed up rather than failed as an I/O error,
/// because libp2p's request-response drops errors in reading a request without an event, and
/// the swarm counts a refusal against the peer that sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The request's bytes.
    Bytes(Vec<u8>),
    /// Why the request was refused (only ever read, never written).
    Refused(String),
}

/// Reads a frame; `Ok(Err(why))` when its length is over `max` (nothing more is read).
async fn read_frame<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    max: usize,
) -> io::Result<Result<Vec<u8>, String>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Ok(Err(format!(
            "message of {len} bytes is over the limit of {max}"
        )));
    }
    // Grow with the bytes that actually arrive, not with what the prefix claims.
    let mut buf = Vec::new();
    io.take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("RPC message ended after {} of {len} bytes", buf.len()),
        ));
    }
    Ok(Ok(buf))
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    body: Vec<u8>,
    max: usize,
) -> io::Result<()> {
    if body.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("message of {} bytes is over the limit of {max}", body.len()),
        ));
    }
    io.write_all(&(body.len() as u32).to_be_bytes()).await?;
    io.write_all(&body).await?;
    io.close().await
}

impl libp2p::request_response::Codec for BytesCodec {
    type Protocol = StreamProtocol;
    type Request = Frame;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Frame> {
        Ok(match read_frame(io, self.max).await? {
            Ok(body) => Frame::Bytes(body),
            Err(why) => Frame::Refused(why),
        })
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        read_frame(io, self.max)
            .await?
            .map_err(|why| io::Error::new(io::ErrorKind::InvalidData, why))
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Frame,
    ) -> io::Result<()> {
        match req {
            Frame::Bytes(body) => write_frame(io, body, self.max).await,
            Frame::Refused(why) => Err(io::Error::new(io::ErrorKind::InvalidInput, why)),
        }
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()> {
        write_frame(io, res, self.max).await
    }
}
