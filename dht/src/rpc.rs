//! A request-response channel between peers for the layers above (Raft, forwarding), carrying
//! opaque bytes: the dht crate moves them and knows nothing of what they mean.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use std::io;
use tokio::sync::oneshot;

/// The protocol name of canal's peer-to-peer RPC.
pub const RPC_PROTOCOL: &str = "/canal/rpc/1.0.0";
/// The largest request or response accepted, in bytes.
pub const MAX_RPC_BYTES: usize = 64 << 20;

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

/// Length-prefixed bytes: a 4-byte big-endian length, then the body.
#[derive(Debug, Clone, Default)]
pub struct BytesCodec;

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_RPC_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("RPC message of {len} bytes is over the limit of {MAX_RPC_BYTES}"),
        ));
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
    Ok(buf)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, body: Vec<u8>) -> io::Result<()> {
    if body.len() > MAX_RPC_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "RPC message of {} bytes is over the limit of {MAX_RPC_BYTES}",
                body.len()
            ),
        ));
    }
    io.write_all(&(body.len() as u32).to_be_bytes()).await?;
    io.write_all(&body).await?;
    io.close().await
}

impl libp2p::request_response::Codec for BytesCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        read_frame(io).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        read_frame(io).await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()> {
        write_frame(io, req).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()> {
        write_frame(io, res).await
    }
}
