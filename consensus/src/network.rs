//! openraft's network, carried by a [`Transport`] the node provides (libp2p in canal), so this
//! crate needs no sockets of its own.

use crate::rpc::{RpcRequest, RpcResponse};
use crate::types::{GroupId, NodeId, RaftNode, TypeConfig};
use canal_proto::wire;
use openraft::AnyError;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use std::future::Future;

/// Carries bytes to another member and brings back its answer. Implementations must not
/// retry on their own: Raft and the forwarding logic decide what to repeat.
pub trait Transport: Clone + Send + Sync + 'static {
    /// Sends `body` to `target` and returns its answer, or why there is none.
    fn call(
        &self,
        target: &RaftNode,
        body: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<u8>, String>> + Send;
}

/// Sends one request and decodes the answer.
pub async fn call<T: Transport>(
    transport: &T,
    target: &RaftNode,
    req: &RpcRequest,
) -> Result<RpcResponse, String> {
    let body = wire::encode(req).map_err(|e| e.to_string())?;
    let answer = transport.call(target, body).await?;
    wire::decode(&answer).map_err(|e| format!("bad answer from {}: {e}", target.peer_id))
}

/// Makes one [`Connection`] per target for a group.
#[derive(Clone)]
pub struct Network<T> {
    /// The group the connections speak for.
    pub group: GroupId,
    /// The transport.
    pub transport: T,
}

/// openraft's view of the link to one member.
pub struct Connection<T> {
    group: GroupId,
    transport: T,
    target: NodeId,
    node: RaftNode,
}

impl<T: Transport> RaftNetworkFactory<TypeConfig> for Network<T> {
    type Network = Connection<T>;

    async fn new_client(&mut self, target: NodeId, node: &RaftNode) -> Connection<T> {
        Connection {
            group: self.group,
            transport: self.transport.clone(),
            target,
            node: node.clone(),
        }
    }
}

impl<T: Transport> Connection<T> {
    async fn send<E: std::error::Error>(
        &self,
        req: RpcRequest,
    ) -> Result<RpcResponse, RPCError<NodeId, RaftNode, E>> {
        call(&self.transport, &self.node, &req)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&AnyError::error(e))))
    }

    fn unexpected<E: std::error::Error>(&self, got: &RpcResponse) -> RPCError<NodeId, RaftNode, E> {
        RPCError::Network(NetworkError::new(&AnyError::error(format!(
            "unexpected answer from {}: {got:?}",
            self.node.peer_id
        ))))
    }
}

impl<T: Transport> RaftNetwork<TypeConfig> for Connection<T> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, RaftNode, RaftError<NodeId>>> {
        match self.send(RpcRequest::Append(self.group, rpc)).await? {
            RpcResponse::Append(r) => r.map_err(|e| {
                RPCError::RemoteError(RemoteError::new_with_node(
                    self.target,
                    self.node.clone(),
                    e,
                ))
            }),
            other => Err(self.unexpected(&other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, RaftNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self.send(RpcRequest::Snapshot(self.group, rpc)).await? {
            RpcResponse::Snapshot(r) => r.map_err(|e| {
                RPCError::RemoteError(RemoteError::new_with_node(
                    self.target,
                    self.node.clone(),
                    e,
                ))
            }),
            other => Err(self.unexpected(&other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, RaftNode, RaftError<NodeId>>> {
        match self.send(RpcRequest::Vote(self.group, rpc)).await? {
            RpcResponse::Vote(r) => r.map_err(|e| {
                RPCError::RemoteError(RemoteError::new_with_node(
                    self.target,
                    self.node.clone(),
                    e,
                ))
            }),
            other => Err(self.unexpected(&other)),
        }
    }
}
