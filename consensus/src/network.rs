//! openraft's network, carried by a [`Transport`] the node provides (libp2p in canal), so this
//! crate needs no sockets of its own.

use crate::rpc::{RpcRequest, RpcResponse};
use crate::types::{GroupId, NodeId, RaftNode, TypeConfig};
use canal_proto::wire;
use openraft::AnyError;
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{Entry, EntryPayload};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tracing::{debug, error};

/// The answer to a message already sent with [`Transport::start`]: await it.
pub type PendingAnswer = futures::future::BoxFuture<'static, Result<Vec<u8>, String>>;

/// Carries bytes to another member and brings back its answer. Implementations must not
/// retry on their own: Raft and the forwarding logic decide what to repeat.
pub trait Transport: Clone + Send + Sync + 'static {
    /// Sends `body` to `target` and returns its answer, or why there is none.
    fn call(
        &self,
        target: &RaftNode,
        body: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<u8>, String>> + Send;

    /// Sends `body` to `target` in two steps: the returned future is ready once the message
    /// is on its way (queued on the link to `target`), and yields the answer to await.
    /// Messages one caller starts one after another reach `target` in that order, which
    /// forwarded writes rely on to keep a publisher's order. The default starts nothing
    /// before the answer is awaited, so it orders nothing: ordered transports override it.
    fn start(
        &self,
        target: &RaftNode,
        body: Vec<u8>,
    ) -> impl Future<Output = Result<PendingAnswer, String>> + Send {
        let this = self.clone();
        let target = target.clone();
        async move {
            let answer: PendingAnswer = Box::pin(async move { this.call(&target, body).await });
            Ok(answer)
        }
    }
}

/// The most bytes one AppendEntries frame may carry. A larger batch is answered with
/// `PayloadTooLarge`, so openraft sends fewer entries: a frame over the transport's limit
/// (`canal_dht::rpc::MAX_RPC_BYTES`, 64 MiB; the node asserts this is below it) would
/// otherwise be refused as `Unreachable` and the same batch retried forever.
pub const MAX_APPEND_BYTES: usize = 16 << 20;

/// The largest client request a group accepts as one entry (checked where entries are
/// proposed): an entry cannot be split across frames, so it must fit in
/// [`MAX_APPEND_BYTES`] with room for the frame's own fields.
pub const MAX_ENTRY_BYTES: usize = 12 << 20;

/// Where a connection's append budget starts: 1 MiB, one large event.
pub const START_APPEND_BYTES: usize = 1 << 20;
/// The smallest append budget: a link that cannot carry this within the RPC timeout is
/// too slow for Raft at these settings anyway.
pub const MIN_APPEND_BYTES: usize = 64 << 10;

/// The next append budget of a connection after a frame of `sent` bytes was answered in
/// `took` of the RPC `timeout`. openraft drops every answer later than the timeout, so a
/// batch must be small enough to cross the link, be written and be answered in time: the
/// budget halves when an answer used more than half the timeout, and doubles (up to
/// [`MAX_APPEND_BYTES`]) when a frame that used most of the budget was answered within a
/// quarter of it.
pub fn budget_after_answer(budget: usize, sent: usize, took: Duration, timeout: Duration) -> usize {
    if took > timeout / 2 {
        (budget / 2).max(MIN_APPEND_BYTES)
    } else if took < timeout / 4 && sent.saturating_mul(2) > budget {
        budget.saturating_mul(2).min(MAX_APPEND_BYTES)
    } else {
        budget
    }
}

/// The next append budget after a frame with entries got no answer in time.
pub fn budget_after_loss(budget: usize) -> usize {
    (budget / 2).max(MIN_APPEND_BYTES)
}

/// Halves the connection's budget if the append it watches is dropped unanswered (openraft
/// dropped it at its timeout).
struct InFlight {
    budget: Arc<AtomicUsize>,
    answered: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.answered {
            let b = self.budget.load(Ordering::Relaxed);
            self.budget.store(budget_after_loss(b), Ordering::Relaxed);
        }
    }
}

/// Roughly how many bytes an entry takes on the wire: what a batch is cut by before it is
/// encoded (encoding a batch that is then refused would be wasted work).
pub fn entry_weight(e: &Entry<TypeConfig>) -> usize {
    64 + match &e.payload {
        EntryPayload::Blank => 0,
        EntryPayload::Normal(r) => r.request.weight(),
        EntryPayload::Membership(m) => 256 * m.nodes().count(),
    }
}

/// How many leading entries of the given sizes fit in `budget` bytes: at least one (a
/// single entry goes alone, whatever its size), at most all of them.
pub fn entries_that_fit(sizes: impl IntoIterator<Item = usize>, budget: usize) -> usize {
    let mut total = 0usize;
    let mut n = 0usize;
    for size in sizes {
        total = total.saturating_add(size);
        if n > 0 && total > budget {
            break;
        }
        n += 1;
    }
    n.max(1)
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
    /// How many bytes an append to this member may carry now (see
    /// [`budget_after_answer`]); never over [`MAX_APPEND_BYTES`].
    budget: Arc<AtomicUsize>,
}

impl<T: Transport> RaftNetworkFactory<TypeConfig> for Network<T> {
    type Network = Connection<T>;

    async fn new_client(&mut self, target: NodeId, node: &RaftNode) -> Connection<T> {
        Connection {
            group: self.group,
            transport: self.transport.clone(),
            target,
            node: node.clone(),
            budget: Arc::new(AtomicUsize::new(START_APPEND_BYTES)),
        }
    }
}

impl<T: Transport> Connection<T> {
    async fn send<E: std::error::Error>(
        &self,
        req: RpcRequest,
    ) -> Result<RpcResponse, RPCError<NodeId, RaftNode, E>> {
        let body = wire::encode(&req)
            .map_err(|e| RPCError::Network(NetworkError::new(&AnyError::error(e))))?;
        self.send_encoded(body).await
    }

    async fn send_encoded<E: std::error::Error>(
        &self,
        body: Vec<u8>,
    ) -> Result<RpcResponse, RPCError<NodeId, RaftNode, E>> {
        let answer = self
            .transport
            .call(&self.node, body)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&AnyError::error(e))))?;
        wire::decode(&answer).map_err(|e| {
            RPCError::Network(NetworkError::new(&AnyError::error(format!(
                "bad answer from {}: {e}",
                self.node.peer_id
            ))))
        })
    }

    /// Encodes an AppendEntries once, or says how many of its entries to send instead.
    // The error is openraft's own, handed straight back to it.
    #[allow(clippy::result_large_err)]
    fn encode_append(
        &self,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> Result<Vec<u8>, RPCError<NodeId, RaftNode, RaftError<NodeId>>> {
        let n = rpc.entries.len();
        let budget = self
            .budget
            .load(Ordering::Relaxed)
            .clamp(MIN_APPEND_BYTES, MAX_APPEND_BYTES);
        // Cut by estimate first: cheap, and right for the entries canal proposes.
        let fit = entries_that_fit(rpc.entries.iter().map(entry_weight), budget);
        if fit < n {
            debug!(target = %self.node.peer_id, entries = n, fit, budget, "append batch over this link's budget: asking openraft for fewer entries");
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(fit as u64),
            ));
        }
        let weights: Vec<usize> = rpc.entries.iter().map(entry_weight).collect();
        let body = wire::encode(&RpcRequest::Append(self.group, rpc))
            .map_err(|e| RPCError::Network(NetworkError::new(&AnyError::error(e))))?;
        if body.len() <= budget || (n == 1 && body.len() <= MAX_APPEND_BYTES) {
            return Ok(body);
        }
        if n > 1 {
            // The estimate was low: scale it to the real size and cut again.
            let estimated: usize = weights.iter().sum::<usize>().max(1);
            let budget = (budget as u128 * estimated as u128 / body.len() as u128)
                .min(usize::MAX as u128) as usize;
            let fit = entries_that_fit(weights, budget).min(n - 1);
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(fit as u64),
            ));
        }
        // One entry that does not fit cannot be shrunk; proposers refuse such entries, so
        // this is a bug or a foreign entry. Back off instead of retrying at once forever.
        error!(target = %self.node.peer_id, bytes = body.len(), limit = MAX_APPEND_BYTES, "one Raft entry is larger than an append frame may be: it cannot be replicated");
        Err(RPCError::Unreachable(Unreachable::new(&AnyError::error(
            format!(
                "one entry makes an append frame of {} bytes: the limit is {MAX_APPEND_BYTES} (MAX_APPEND_BYTES)",
                body.len()
            ),
        ))))
    }

    fn unexpected<E: std::error::Error>(&self, got: &RpcResponse) -> RPCError<NodeId, RaftNode, E> {
        // A member that closed the group (or has not opened it yet) is, for this group, as
        // good as down: openraft backs off from an unreachable member instead of retrying
        // at once.
        if let RpcResponse::Status(Err(e @ crate::rpc::ClientError::UnknownGroup(_))) = got {
            return RPCError::Unreachable(Unreachable::new(&AnyError::error(format!(
                "{}: {e}",
                self.node.peer_id
            ))));
        }
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
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, RaftNode, RaftError<NodeId>>> {
        let carries_entries = !rpc.entries.is_empty();
        let body = self.encode_append(rpc)?;
        let sent = body.len();
        let started = Instant::now();
        let mut watch = InFlight {
            budget: self.budget.clone(),
            // Heartbeats to a member that is down time out too; only batches teach.
            answered: !carries_entries,
        };
        let answer = self.send_encoded(body).await;
        watch.answered = true;
        if carries_entries && answer.is_ok() {
            let b = self.budget.load(Ordering::Relaxed);
            let next = budget_after_answer(b, sent, started.elapsed(), option.hard_ttl());
            if next != b {
                debug!(target = %self.node.peer_id, from = b, to = next, took = ?started.elapsed(), "append budget changed");
            }
            self.budget.store(next, Ordering::Relaxed);
        }
        match answer? {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::rpc::ClientError;
    use crate::types::{Op, Request};
    use openraft::{CommittedLeaderId, LogId, Vote};
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngSeed, TestRunner};

    #[test]
    fn entries_that_fit_keeps_a_prefix_within_the_budget_and_never_none() {
        assert_eq!(entries_that_fit([10, 10, 10], 30), 3);
        assert_eq!(entries_that_fit([10, 10, 10], 29), 2);
        assert_eq!(entries_that_fit([10, 10, 10], 10), 1);
        // One entry over the budget still goes alone: openraft cannot send less.
        assert_eq!(entries_that_fit([50, 10], 30), 1);
        assert_eq!(entries_that_fit([], 30), 1);
        assert_eq!(entries_that_fit([usize::MAX, usize::MAX], 30), 1);
        // 40 entries of 1 MiB: 15 fit in 16 MiB with their overhead.
        let mib = entry_weight(&entry(1, vec![0; 1 << 20]));
        assert_eq!(entries_that_fit(vec![mib; 40], MAX_APPEND_BYTES), 15);
    }

    #[test]
    fn the_budget_follows_how_fast_the_link_answers() {
        let t = Duration::from_millis(400);
        let ms = Duration::from_millis;
        // A full frame answered fast: the budget doubles, up to the frame limit.
        assert_eq!(budget_after_answer(1 << 20, 1 << 20, ms(50), t), 2 << 20);
        assert_eq!(
            budget_after_answer(MAX_APPEND_BYTES, MAX_APPEND_BYTES, ms(1), t),
            MAX_APPEND_BYTES
        );
        // A small frame says nothing about what a full one would take.
        assert_eq!(budget_after_answer(1 << 20, 1000, ms(1), t), 1 << 20);
        // In between: kept.
        assert_eq!(budget_after_answer(1 << 20, 1 << 20, ms(150), t), 1 << 20);
        // Slow or lost: halved, down to the floor.
        assert_eq!(budget_after_answer(1 << 20, 1 << 20, ms(250), t), 512 << 10);
        assert_eq!(budget_after_loss(1 << 20), 512 << 10);
        assert_eq!(budget_after_loss(MIN_APPEND_BYTES), MIN_APPEND_BYTES);
    }

    #[test]
    fn a_dropped_append_halves_the_budget() {
        let budget = Arc::new(AtomicUsize::new(4 << 20));
        drop(InFlight {
            budget: budget.clone(),
            answered: false,
        });
        assert_eq!(budget.load(Ordering::Relaxed), 2 << 20);
        drop(InFlight {
            budget: budget.clone(),
            answered: true,
        });
        assert_eq!(budget.load(Ordering::Relaxed), 2 << 20);
    }

    #[test]
    fn the_entry_limit_fits_in_one_append_frame() {
        let big = entry(1, vec![0; MAX_ENTRY_BYTES - 200]);
        let req = RpcRequest::Append(
            crate::routing::DEFAULT_GROUP,
            AppendEntriesRequest {
                vote: Vote::new_committed(1, 1),
                prev_log_id: None,
                leader_commit: None,
                entries: vec![big],
            },
        );
        assert!(wire::encode(&req).unwrap().len() < MAX_APPEND_BYTES);
    }

    fn entry(index: u64, value: Vec<u8>) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(crate::types::Proposal {
                time_ms: 0,
                request: Request {
                    id: Some(format!("w{index}")),
                    op: Op::Put {
                        key: format!("k{index}"),
                        value,
                    },
                },
            }),
        }
    }

    /// Valid messages of every shape, to mutate.
    fn samples() -> Vec<Vec<u8>> {
        let g = crate::routing::DEFAULT_GROUP;
        let append = AppendEntriesRequest {
            vote: Vote::new_committed(3, 7),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(3, 7), 9)),
            leader_commit: Some(LogId::new(CommittedLeaderId::new(3, 7), 8)),
            entries: vec![entry(10, b"hello".to_vec()), entry(11, vec![1, 2, 3])],
        };
        let reqs = [
            RpcRequest::Append(g, append),
            RpcRequest::Vote(g, openraft::raft::VoteRequest::new(Vote::new(4, 7), None)),
            RpcRequest::Write(
                g,
                Request {
                    id: Some("x".into()),
                    op: Op::Delete { key: "k".into() },
                },
            ),
            RpcRequest::Read(g, "key".into()),
            RpcRequest::SetVoters(g, vec![1, 2, 3]),
            RpcRequest::Status(g),
        ];
        let resps = [
            RpcResponse::Write(Err(ClientError::NotLeader {
                group: g,
                leader: None,
            })),
            RpcResponse::Read(Ok(Some(b"v".to_vec()))),
            RpcResponse::Membership(Err(ClientError::Refused {
                group: g,
                kind: "write".into(),
                rule: "not a member".into(),
            })),
            RpcResponse::Vote(Ok(openraft::raft::VoteResponse::new(
                Vote::new(4, 7),
                None,
                true,
            ))),
        ];
        reqs.iter()
            .map(|r| wire::encode(r).unwrap())
            .chain(resps.iter().map(|r| wire::encode(r).unwrap()))
            .collect()
    }

    fn runner() -> TestRunner {
        TestRunner::new(Config {
            cases: 3000,
            rng_seed: RngSeed::Fixed(0x00ca_0a11),
            failure_persistence: None,
            ..Config::default()
        })
    }

    fn log_query() -> impl Strategy<Value = crate::rpc::LogQuery> {
        use crate::rpc::LogQuery;
        let name = "[a-z/+#\u{1}]{0,12}";
        prop_oneof![
            (proptest::option::of(name), any::<u32>())
                .prop_map(|(after, limit)| LogQuery::Topics { after, limit }),
            name.prop_map(|topic| LogQuery::Meta { topic }),
            (name, any::<u64>(), any::<u32>()).prop_map(|(topic, from, limit)| LogQuery::Events {
                topic,
                from,
                limit
            }),
            (name, any::<u64>()).prop_map(|(topic, time_ms)| LogQuery::OffsetAt { topic, time_ms }),
            (name, name).prop_map(|(name, topic)| LogQuery::SubscriptionCursor { name, topic }),
            (any::<u64>(), any::<u32>())
                .prop_map(|(since, wait_ms)| LogQuery::Changes { since, wait_ms }),
        ]
    }

    fn log_answer() -> impl Strategy<Value = Result<crate::rpc::LogAnswer, ClientError>> {
        use crate::rpc::LogAnswer;
        use crate::topics::{StoredEvent, TopicMeta};
        let meta = (any::<u64>(), any::<u64>(), any::<u64>())
            .prop_map(|(first, next, bytes)| TopicMeta { first, next, bytes });
        let event = (
            any::<u64>(),
            any::<u64>(),
            proptest::option::of("[a-z]{0,6}"),
            proptest::collection::vec(("[a-z]{0,4}", "[a-z]{0,4}"), 0..3),
            proptest::collection::vec(any::<u8>(), 0..32),
        )
            .prop_map(|(offset, time_ms, id, headers, payload)| StoredEvent {
                offset,
                time_ms,
                id,
                headers,
                payload,
            });
        prop_oneof![
            proptest::collection::vec(("[a-z]{0,8}", meta.clone()), 0..4)
                .prop_map(|t| Ok(LogAnswer::Topics(t))),
            proptest::option::of(meta).prop_map(|m| Ok(LogAnswer::Meta(m))),
            (proptest::collection::vec(event, 0..4), any::<bool>())
                .prop_map(|(events, cut)| Ok(LogAnswer::Events { events, cut })),
            any::<u64>().prop_map(|o| Ok(LogAnswer::Offset(o))),
            proptest::option::of(any::<u64>()).prop_map(|c| Ok(LogAnswer::Cursor(c))),
            (
                any::<u64>(),
                proptest::option::of(proptest::collection::vec("[a-z]{0,8}", 0..4))
            )
                .prop_map(|(index, topics)| Ok(LogAnswer::Changes { index, topics })),
            any::<u32>().prop_map(|g| Err(ClientError::UnknownGroup(GroupId(g)))),
        ]
    }

    #[test]
    fn log_reads_round_trip_and_their_decoders_never_panic_on_mutated_bytes() {
        let strategy = (
            log_query(),
            log_answer(),
            proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 0..8),
        );
        runner()
            .run(&strategy, |(q, a, edits)| {
                let req = RpcRequest::LogRead(GroupId(7), q.clone());
                let resp = RpcResponse::LogRead(a.clone());
                let req_bytes = wire::encode(&req).unwrap();
                let resp_bytes = wire::encode(&resp).unwrap();
                match wire::decode::<RpcRequest>(&req_bytes).unwrap() {
                    RpcRequest::LogRead(GroupId(7), back) => prop_assert_eq!(back, q),
                    other => prop_assert!(false, "decoded as {other:?}"),
                }
                match wire::decode::<RpcResponse>(&resp_bytes).unwrap() {
                    RpcResponse::LogRead(back) => prop_assert_eq!(back, a),
                    other => prop_assert!(false, "decoded as {other:?}"),
                }
                for mut bytes in [req_bytes, resp_bytes] {
                    for (at, value, how) in &edits {
                        if bytes.is_empty() {
                            break;
                        }
                        let i = at.index(bytes.len());
                        match how {
                            0 => bytes[i] = *value,
                            1 => bytes.truncate(i),
                            2 => bytes.insert(i, *value),
                            _ => {
                                bytes
                                    .splice(i..i, [0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]);
                            }
                        }
                    }
                    let _ = wire::decode::<RpcRequest>(&bytes);
                    let _ = wire::decode::<RpcResponse>(&bytes);
                }
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn log_read_wire_tags_come_after_the_older_variants() {
        // The older variants keep their tags: Alive is the 11th request (tag 10) and the
        // 9th answer (tag 8); LogRead comes after each.
        let alive = wire::encode(&RpcRequest::Alive {
            leading: vec![],
            quiet: vec![],
        })
        .unwrap();
        let read = wire::encode(&RpcRequest::LogRead(
            GroupId(1),
            crate::rpc::LogQuery::Meta { topic: "t".into() },
        ))
        .unwrap();
        assert_eq!((alive[1], read[1]), (10, 11));
        let alive = wire::encode(&RpcResponse::Alive).unwrap();
        let read =
            wire::encode(&RpcResponse::LogRead(Ok(crate::rpc::LogAnswer::Offset(0)))).unwrap();
        assert_eq!((alive[1], read[1]), (8, 9));
    }

    #[test]
    fn rpc_decoders_never_panic_on_random_bytes() {
        runner()
            .run(&proptest::collection::vec(any::<u8>(), 0..512), |bytes| {
                let _ = wire::decode::<RpcRequest>(&bytes);
                let _ = wire::decode::<RpcResponse>(&bytes);
                let mut versioned = vec![wire::WIRE_VERSION];
                versioned.extend(&bytes);
                let _ = wire::decode::<RpcRequest>(&versioned);
                let _ = wire::decode::<RpcResponse>(&versioned);
                Ok(())
            })
            .unwrap();
    }

    // Fails (aborts the process on a 2^48-byte allocation) until `wire::decode` is bounded:
    // issue 11 point 1, done by helper "wire". Un-ignore when that is merged.
    #[test]
    fn rpc_decoders_never_panic_on_mutated_messages() {
        let samples = samples();
        for s in &samples {
            assert!(
                wire::decode::<RpcRequest>(s).is_ok() || wire::decode::<RpcResponse>(s).is_ok()
            );
        }
        let strategy = (
            0..samples.len(),
            proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..8),
        );
        runner()
            .run(&strategy, |(which, edits)| {
                let mut bytes = samples[which].clone();
                for (at, value, how) in edits {
                    if bytes.is_empty() {
                        break;
                    }
                    let i = at.index(bytes.len());
                    match how {
                        0 => bytes[i] = value,
                        1 => bytes.truncate(i),
                        2 => bytes.insert(i, value),
                        // A length prefix turned huge: varint 0xfd + u64.
                        _ => {
                            bytes.splice(i..i, [0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]);
                        }
                    }
                }
                let _ = wire::decode::<RpcRequest>(&bytes);
                let _ = wire::decode::<RpcResponse>(&bytes);
                Ok(())
            })
            .unwrap();
    }
}
