//! Reads of one group's topic logs, wherever the group is: [`GroupReader`] reads this node's
//! replica when it hosts the group, else a replica's over the transport
//! ([`RpcRequest::LogRead`]), so pubsub, the executor and MQTT read every group alike.
//!
//! ```text
//!   GroupReader::Local  ──> StateMachine (this node's replica)
//!   GroupReader::Remote ──> Remote (one per node and group, shared by its readers)
//!                             ├─ reads: LogRead to the current replica; on failure the next
//!                             │         one the directory names, retried until the client
//!                             │         timeout
//!                             └─ watch: one long-poll loop (LogQuery::Changes) to the same
//!                                       replica, fanned out to every GroupWatch; it runs
//!                                       while a watch lives
//! ```
//!
//! Reads and the watch of one remote group go to the same replica, so a change the watch
//! tells of is there when the reader looks, and offsets never go backwards while that
//! replica answers. When the replica changes, the watch's next notice is
//! [`Wake::Everything`]: the waiter rescans, and misses nothing the new replica holds.

use crate::network::Transport;
use crate::rpc::{
    ClientError, LogAnswer, LogQuery, MAX_CHANGES_TOPICS, MAX_CHANGES_WAIT_MS,
    MAX_LOG_ANSWER_BYTES, MAX_LOG_EVENTS, MAX_LOG_PAGE_TOPICS, RpcRequest, RpcResponse,
};
use crate::store::{ChangeWatch, ReadError, RingAnswer, StateMachine, Wake};
use crate::topics::{StoredEvent, TopicMeta};
use crate::types::{GroupId, RaftNode};
use canal_proto::wire;
use futures::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, broadcast};
use tracing::debug;

/// Where the replicas of a group this node does not host are: set by the node
/// ([`crate::Consensus::set_directory`]), asked for candidates, the preferred (the leader, if
/// known) first. May answer none.
pub type Directory = Arc<dyn Fn(GroupId) -> Vec<RaftNode> + Send + Sync>;

/// A directory that knows no replica: the default until the node sets one.
pub fn no_directory() -> Directory {
    Arc::new(|_| Vec::new())
}

/// How many notices a remote watch may fall behind before it is told to rescan
/// everything.
const REMOTE_WAKES: usize = 64;
/// The first pause after a failed remote call; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
/// The longest pause between remote calls that fail (every replica down).
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// The longest one remote read waits for one replica before it asks the next.
const READ_CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Room over a long-poll's wait for its answer to come back.
const POLL_SLACK: Duration = Duration::from_secs(2);

/// Carries one encoded request to a member and brings back its answer: the node's
/// [`Transport`], with its type erased so a [`GroupReader`] needs no type parameter.
pub(crate) trait Caller: Send + Sync {
    /// Sends `body` to `target`.
    fn call(&self, target: &RaftNode, body: Vec<u8>)
    -> BoxFuture<'static, Result<Vec<u8>, String>>;
}

/// [`Caller`] over a [`Transport`].
pub(crate) struct TransportCaller<T>(pub(crate) T);

impl<T: Transport> Caller for TransportCaller<T> {
    fn call(
        &self,
        target: &RaftNode,
        body: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, String>> {
        let t = self.0.clone();
        let target = target.clone();
        Box::pin(async move { t.call(&target, body).await })
    }
}

/// Counts remote operations by `kind` and `outcome` (`ok`, `retried`, `failed`):
/// `canal_raft_remote_requests_total`.
pub(crate) type RemoteCounter = Family<Vec<(String, String)>, Counter>;

pub(crate) fn count(c: &RemoteCounter, kind: &str, outcome: &str) {
    c.get_or_create(&vec![
        ("kind".to_string(), kind.to_string()),
        ("outcome".to_string(), outcome.to_string()),
    ])
    .inc();
}

/// A short account of what was tried, for the error at the deadline: the last few only.
#[derive(Default)]
pub(crate) struct Tried(Vec<String>);

impl Tried {
    const KEEP: usize = 8;

    pub(crate) fn note(&mut self, what: String) {
        if self.0.len() == Self::KEEP {
            self.0.remove(0);
        }
        self.0.push(what);
    }

    pub(crate) fn summary(&self) -> String {
        if self.0.is_empty() {
            "nothing (the directory names no replica)".to_string()
        } else {
            self.0.join("; ")
        }
    }
}

/// One remote group as this node reads it: the replica it reads from now, and the watch
/// loop its watchers share. One per node and group ([`crate::Consensus::reader`]).
pub(crate) struct Remote {
    group: GroupId,
    /// This node's peer id: never a candidate (it does not host the group).
    me: String,
    caller: Arc<dyn Caller>,
    directory: Arc<RwLock<Directory>>,
    timeout: Duration,
    /// The replica reads and the watch go to while it answers.
    current: Mutex<Option<RaftNode>>,
    wakes: broadcast::Sender<Wake>,
    /// The watch loop, while one runs.
    poller: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Told when a watch goes, so the loop ends at once after the last one.
    gone: Notify,
    counter: RemoteCounter,
}

impl Remote {
    pub(crate) fn new(
        group: GroupId,
        me: String,
        caller: Arc<dyn Caller>,
        directory: Arc<RwLock<Directory>>,
        timeout: Duration,
        counter: RemoteCounter,
    ) -> Remote {
        Remote {
            group,
            me,
            caller,
            directory,
            timeout,
            current: Mutex::new(None),
            wakes: broadcast::Sender::new(REMOTE_WAKES),
            poller: Mutex::new(None),
            gone: Notify::new(),
            counter,
        }
    }

    /// The replicas the directory names now, this node left out.
    fn candidates(&self) -> Vec<RaftNode> {
        let d = self
            .directory
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut out: Vec<RaftNode> = Vec::new();
        for n in d(self.group) {
            if n.peer_id != self.me && !out.iter().any(|o| o.peer_id == n.peer_id) {
                out.push(n);
            }
        }
        out
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Option<RaftNode>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The replica to ask now: the current one, else the directory's first.
    fn replica(&self) -> Option<RaftNode> {
        let mut cur = self.current();
        if cur.is_none() {
            *cur = self.candidates().into_iter().next();
        }
        cur.clone()
    }

    /// Moves on from `failed` (if it is still the current replica) to the candidate after
    /// it in the directory's order.
    fn move_on(&self, failed: &RaftNode) {
        let mut cur = self.current();
        if cur.as_ref().is_some_and(|c| c.peer_id != failed.peer_id) {
            return;
        }
        let list = self.candidates();
        let next = match list.iter().position(|n| n.peer_id == failed.peer_id) {
            Some(i) => list.get((i + 1) % list.len()).cloned(),
            None => list.into_iter().next(),
        };
        debug!(group = %self.group, from = %failed.peer_id, to = ?next.as_ref().map(|n| &n.peer_id), "remote reads move to another replica");
        *cur = next;
    }

    /// Sends `q` to the current replica, moving on to the next on failure, until one
    /// answers or the client timeout passes.
    async fn ask(&self, q: LogQuery) -> Result<LogAnswer, ReadError> {
        let deadline = Instant::now() + self.timeout;
        let mut backoff = FIRST_BACKOFF;
        let mut tried = Tried::default();
        let req = RpcRequest::LogRead(self.group, q);
        loop {
            if let Some(node) = self.replica() {
                // Reads are safe to repeat: a replica that hangs is given up on early.
                let remaining = deadline.saturating_duration_since(Instant::now());
                let answer =
                    tokio::time::timeout(remaining.min(READ_CALL_TIMEOUT), self.call(&node, &req))
                        .await;
                match answer {
                    Ok(Ok(RpcResponse::LogRead(Ok(a)))) => {
                        count(&self.counter, "log_read", "ok");
                        return Ok(a);
                    }
                    Ok(Ok(RpcResponse::LogRead(Err(e @ ClientError::Refused { .. })))) => {
                        // Every replica has the same rule: asking the others is in vain.
                        count(&self.counter, "log_read", "failed");
                        return Err(ReadError::NoReplica {
                            group: self.group,
                            tried: format!("{}: {e}", node.peer_id),
                        });
                    }
                    Ok(Ok(RpcResponse::LogRead(Err(e)))) => {
                        tried.note(format!("{}: {e}", node.peer_id))
                    }
                    Ok(Ok(other)) => tried.note(format!(
                        "{}: unexpected answer {}",
                        node.peer_id,
                        answer_kind(&other)
                    )),
                    Ok(Err(e)) => tried.note(format!("{}: {e}", node.peer_id)),
                    Err(_) => tried.note(format!("{}: no answer in time", node.peer_id)),
                }
                self.move_on(&node);
            } else {
                tried.note("the directory names no replica".to_string());
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                count(&self.counter, "log_read", "failed");
                return Err(ReadError::NoReplica {
                    group: self.group,
                    tried: tried.summary(),
                });
            }
            count(&self.counter, "log_read", "retried");
            tokio::time::sleep(backoff.min(remaining)).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn call(&self, node: &RaftNode, req: &RpcRequest) -> Result<RpcResponse, String> {
        let body = wire::encode(req).map_err(|e| e.to_string())?;
        let answer = self.caller.call(node, body).await?;
        wire::decode(&answer).map_err(|e| format!("bad answer from {}: {e}", node.peer_id))
    }

    /// Starts the watch loop unless one runs.
    fn ensure_poller(self: &Arc<Self>) {
        let mut p = self.poller.lock().unwrap_or_else(|p| p.into_inner());
        if p.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        *p = Some(tokio::spawn(poll_loop(self.clone())));
    }

    /// Whether the watch loop should end (no watch is left); if so, forgets the loop
    /// under the lock a new watch takes, so a watch made meanwhile starts a new one.
    fn poller_done(&self) -> bool {
        let mut p = self.poller.lock().unwrap_or_else(|p| p.into_inner());
        if self.wakes.receiver_count() == 0 {
            *p = None;
            true
        } else {
            false
        }
    }
}

fn answer_kind(a: &RpcResponse) -> &'static str {
    match a {
        RpcResponse::Append(_) => "append",
        RpcResponse::Vote(_) => "vote",
        RpcResponse::Snapshot(_) => "snapshot",
        RpcResponse::Write(_) => "write",
        RpcResponse::Read(_) => "read",
        RpcResponse::Membership(_) => "membership",
        RpcResponse::Status(_) => "status",
        RpcResponse::Quiesce(_) => "quiesce",
        RpcResponse::Alive => "alive",
        RpcResponse::LogRead(_) => "log_read",
        RpcResponse::TakeLead(_) => "take_lead",
    }
}

/// The shared watch of one remote group: long-polls the current replica for changes
/// after the last index it heard of and tells every watch. Its first answer from a replica
/// (asked with no index it knows) is "anything may have changed", told as
/// [`Wake::Everything`]: watches made before it rescan, and everything applied there after
/// that index comes as notices. It waits out failures with a backoff, and ends when the
/// last watch goes.
async fn poll_loop(remote: Arc<Remote>) {
    // (replica, the last index it applied) once it answered.
    let mut since: Option<(String, u64)> = None;
    let mut backoff = FIRST_BACKOFF;
    loop {
        if remote.poller_done() {
            return;
        }
        let Some(node) = remote.replica() else {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = remote.gone.notified() => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        };
        let index = match &since {
            Some((peer, i)) if *peer == node.peer_id => *i,
            // Ahead of any replica's index: answered at once with its index and "anything".
            _ => u64::MAX,
        };
        let req = RpcRequest::LogRead(
            remote.group,
            LogQuery::Changes {
                since: index,
                wait_ms: MAX_CHANGES_WAIT_MS,
            },
        );
        let wait = Duration::from_millis(u64::from(MAX_CHANGES_WAIT_MS)) + POLL_SLACK;
        let answer = tokio::select! {
            a = tokio::time::timeout(wait, remote.call(&node, &req)) => a,
            _ = remote.gone.notified() => continue,
        };
        match answer {
            Ok(Ok(RpcResponse::LogRead(Ok(LogAnswer::Changes { index, topics })))) => {
                count(&remote.counter, "changes", "ok");
                backoff = FIRST_BACKOFF;
                since = Some((node.peer_id.clone(), index));
                match topics {
                    None => {
                        let _ = remote.wakes.send(Wake::Everything);
                    }
                    Some(t) if !t.is_empty() => {
                        let _ = remote.wakes.send(Wake::Topics(t.into_iter().collect()));
                    }
                    Some(_) => {}
                }
            }
            other => {
                count(&remote.counter, "changes", "retried");
                debug!(group = %remote.group, replica = %node.peer_id, answer = ?other.as_ref().map(|r| r.as_ref().map(answer_kind)), "a remote change poll failed");
                remote.move_on(&node);
                since = None;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = remote.gone.notified() => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Reads one group's log state: this node's replica if it hosts the group, else a
/// replica's over the transport.
#[derive(Clone)]
pub struct GroupReader {
    kind: ReaderKind,
}

#[derive(Clone)]
enum ReaderKind {
    Local(StateMachine, GroupId),
    Remote(Arc<Remote>),
}

impl GroupReader {
    /// A reader of this node's replica `sm` of group `g`.
    pub fn local(sm: StateMachine, g: GroupId) -> GroupReader {
        GroupReader {
            kind: ReaderKind::Local(sm, g),
        }
    }

    pub(crate) fn remote(r: Arc<Remote>) -> GroupReader {
        GroupReader {
            kind: ReaderKind::Remote(r),
        }
    }

    /// The group it reads.
    pub fn group(&self) -> GroupId {
        match &self.kind {
            ReaderKind::Local(_, g) => *g,
            ReaderKind::Remote(r) => r.group,
        }
    }

    /// Whether it reads this node's own replica.
    pub fn is_local(&self) -> bool {
        matches!(self.kind, ReaderKind::Local(..))
    }

    /// The peer id of the replica a remote reader reads from now (`None` for a local
    /// reader, or while no replica is known): for diagnostics and tests.
    pub fn replica(&self) -> Option<String> {
        match &self.kind {
            ReaderKind::Local(..) => None,
            ReaderKind::Remote(r) => r.current().as_ref().map(|n| n.peer_id.clone()),
        }
    }

    /// Every topic with a log, and where its log starts and ends, in name order.
    pub async fn topics(&self) -> Result<Vec<(String, TopicMeta)>, ReadError> {
        let r = match &self.kind {
            ReaderKind::Local(sm, _) => return sm.topics(),
            ReaderKind::Remote(r) => r,
        };
        let mut out: Vec<(String, TopicMeta)> = Vec::new();
        loop {
            let after = out.last().map(|(t, _)| t.clone());
            let page = match r
                .ask(LogQuery::Topics {
                    after,
                    limit: MAX_LOG_PAGE_TOPICS as u32,
                })
                .await?
            {
                LogAnswer::Topics(p) => p,
                other => return Err(unexpected(r.group, "topics", &other)),
            };
            let full = page.len() >= MAX_LOG_PAGE_TOPICS;
            // A page from a replica moved to meanwhile may overlap: keep name order.
            let last = out.last().map(|(t, _)| t.clone());
            out.extend(
                page.into_iter()
                    .filter(|(t, _)| last.as_ref().is_none_or(|l| t > l)),
            );
            if !full {
                return Ok(out);
            }
        }
    }

    /// Where one topic's log starts and ends, if the topic has one.
    pub async fn topic_meta(&self, topic: &str) -> Result<Option<TopicMeta>, ReadError> {
        match &self.kind {
            ReaderKind::Local(sm, _) => sm.topic_meta(topic),
            ReaderKind::Remote(r) => match r
                .ask(LogQuery::Meta {
                    topic: topic.to_string(),
                })
                .await?
            {
                LogAnswer::Meta(m) => Ok(m),
                other => Err(unexpected(r.group, "a topic's meta", &other)),
            },
        }
    }

    /// Up to `limit` events of `topic` from offset `from` on, in offset order (remotely in
    /// pages of at most [`MAX_LOG_EVENTS`] events and [`MAX_LOG_ANSWER_BYTES`]).
    pub async fn events(
        &self,
        topic: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, ReadError> {
        let r = match &self.kind {
            ReaderKind::Local(sm, _) => return sm.events(topic, from, limit),
            ReaderKind::Remote(r) => r,
        };
        let mut out: Vec<StoredEvent> = Vec::new();
        let mut next = from;
        while out.len() < limit {
            let want = (limit - out.len()).min(MAX_LOG_EVENTS);
            let (page, cut) = match r
                .ask(LogQuery::Events {
                    topic: topic.to_string(),
                    from: next,
                    limit: want as u32,
                })
                .await?
            {
                LogAnswer::Events { events, cut } => (events, cut),
                other => return Err(unexpected(r.group, "events", &other)),
            };
            let got = page.len();
            for e in page {
                // Offsets only grow within one answer, and across answers of one replica;
                // what another replica sends again is dropped.
                if e.offset >= next {
                    next = e.offset + 1;
                    out.push(e);
                }
            }
            if got == 0 || (got < want && !cut) {
                break;
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    /// The offset of the first event of `topic` accepted at or after `time_ms` (the end of
    /// the log if none was).
    pub async fn offset_at(&self, topic: &str, time_ms: u64) -> Result<u64, ReadError> {
        match &self.kind {
            ReaderKind::Local(sm, _) => sm.offset_at(topic, time_ms),
            ReaderKind::Remote(r) => match r
                .ask(LogQuery::OffsetAt {
                    topic: topic.to_string(),
                    time_ms,
                })
                .await?
            {
                LogAnswer::Offset(o) => Ok(o),
                other => Err(unexpected(r.group, "an offset", &other)),
            },
        }
    }

    /// Where durable subscription `name` continues on `topic`, if it acknowledged anything.
    pub async fn subscription_cursor(
        &self,
        name: &str,
        topic: &str,
    ) -> Result<Option<u64>, ReadError> {
        match &self.kind {
            ReaderKind::Local(sm, _) => sm.subscription_cursor(name, topic),
            ReaderKind::Remote(r) => match r
                .ask(LogQuery::SubscriptionCursor {
                    name: name.to_string(),
                    topic: topic.to_string(),
                })
                .await?
            {
                LogAnswer::Cursor(c) => Ok(c),
                other => Err(unexpected(r.group, "a subscription cursor", &other)),
            },
        }
    }

    /// Change notices, like [`StateMachine::watch_changes`] (create it BEFORE the first
    /// read, so nothing applied in between goes unnoticed).
    pub fn watch_changes(&self) -> GroupWatch {
        match &self.kind {
            ReaderKind::Local(sm, _) => GroupWatch {
                kind: WatchKind::Local(sm.watch_changes()),
            },
            ReaderKind::Remote(r) => {
                let rx = r.wakes.subscribe();
                r.ensure_poller();
                GroupWatch {
                    kind: WatchKind::Remote {
                        rx,
                        _gone: Gone(r.clone()),
                    },
                }
            }
        }
    }
}

fn unexpected(g: GroupId, what: &str, got: &LogAnswer) -> ReadError {
    ReadError::NoReplica {
        group: g,
        tried: format!("asked for {what}, a replica answered {got:?}"),
    }
}

/// Change notices of a [`GroupReader`]'s group.
pub struct GroupWatch {
    kind: WatchKind,
}

enum WatchKind {
    Local(ChangeWatch),
    // Declared in this order so the receiver is dropped before `Gone` tells the loop.
    Remote {
        rx: broadcast::Receiver<Wake>,
        _gone: Gone,
    },
}

/// Tells a remote group's watch loop that a watch went (after its receiver is dropped).
struct Gone(Arc<Remote>);

impl Drop for Gone {
    fn drop(&mut self) {
        self.0.gone.notify_one();
    }
}

impl GroupWatch {
    /// Like [`ChangeWatch::next`]: waits for the next change and takes every notice already
    /// queued with it; `None` when the group is gone for good (a local replica closed).
    pub async fn next(&mut self) -> Option<Wake> {
        let rx = match &mut self.kind {
            WatchKind::Local(w) => return w.next().await,
            WatchKind::Remote { rx, .. } => rx,
        };
        let first = match rx.recv().await {
            Ok(w) => w,
            Err(broadcast::error::RecvError::Lagged(_)) => {
                *rx = rx.resubscribe();
                return Some(Wake::Everything);
            }
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        let Wake::Topics(mut set) = first else {
            *rx = rx.resubscribe();
            return Some(Wake::Everything);
        };
        loop {
            match rx.try_recv() {
                Ok(Wake::Topics(t)) => set.extend(t),
                Ok(Wake::Everything) | Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    *rx = rx.resubscribe();
                    return Some(Wake::Everything);
                }
                Err(_) => return Some(Wake::Topics(set)),
            }
        }
    }
}

/// Which bound, if any, cut a log read's answer short: for `canal_raft_log_reads_total`.
pub(crate) type Capped = Option<&'static str>;

/// Answers a [`LogQuery`] from this node's replica `sm` of a group: any replica answers,
/// with what it has applied. A `Changes` poll with nothing new waits for the next apply, up
/// to its `wait_ms` (at most [`MAX_CHANGES_WAIT_MS`]).
pub(crate) async fn answer(
    sm: &StateMachine,
    q: LogQuery,
) -> Result<(LogAnswer, Capped), ClientError> {
    let read = |e: ReadError| ClientError::Other(e.to_string());
    match q {
        LogQuery::Topics { after, limit } => {
            let n = (limit as usize).min(MAX_LOG_PAGE_TOPICS);
            let capped = (limit as usize > MAX_LOG_PAGE_TOPICS).then_some("MAX_LOG_PAGE_TOPICS");
            let page = sm.topics_after(after.as_deref(), n).map_err(read)?;
            Ok((LogAnswer::Topics(page), capped))
        }
        LogQuery::Meta { topic } => {
            Ok((LogAnswer::Meta(sm.topic_meta(&topic).map_err(read)?), None))
        }
        LogQuery::Events { topic, from, limit } => {
            let n = (limit as usize).min(MAX_LOG_EVENTS);
            let mut capped = (limit as usize > MAX_LOG_EVENTS).then_some("MAX_LOG_EVENTS");
            let mut events = sm.events(&topic, from, n).map_err(read)?;
            let (keep, cut) = fit_events(&events, MAX_LOG_ANSWER_BYTES);
            if cut {
                events.truncate(keep);
                capped = Some("MAX_LOG_ANSWER_BYTES");
            }
            Ok((LogAnswer::Events { events, cut }, capped))
        }
        LogQuery::OffsetAt { topic, time_ms } => Ok((
            LogAnswer::Offset(sm.offset_at(&topic, time_ms).map_err(read)?),
            None,
        )),
        LogQuery::SubscriptionCursor { name, topic } => Ok((
            LogAnswer::Cursor(sm.subscription_cursor(&name, &topic).map_err(read)?),
            None,
        )),
        LogQuery::Changes { since, wait_ms } => {
            let wait = Duration::from_millis(u64::from(wait_ms.min(MAX_CHANGES_WAIT_MS)));
            let deadline = tokio::time::Instant::now() + wait;
            // Subscribed before the ring is looked at: an apply in between wakes it.
            let mut applied = sm.watch_applied();
            loop {
                match sm.changes_since(since, MAX_CHANGES_TOPICS) {
                    RingAnswer::Now(index, topics) => {
                        return Ok((LogAnswer::Changes { index, topics }, None));
                    }
                    RingAnswer::Nothing(index) => {
                        let woke = tokio::time::timeout_at(deadline, applied.changed()).await;
                        if !matches!(woke, Ok(Ok(()))) {
                            return Ok((
                                LogAnswer::Changes {
                                    index,
                                    topics: Some(Vec::new()),
                                },
                                None,
                            ));
                        }
                    }
                }
            }
        }
    }
}

/// How many leading events fit in `budget` bytes (at least one, so a large event goes
/// alone), and whether that is fewer than all.
fn fit_events(events: &[StoredEvent], budget: usize) -> (usize, bool) {
    let mut total = 0usize;
    for (i, e) in events.iter().enumerate() {
        let size = 64
            + e.payload.len()
            + e.id.as_ref().map_or(0, String::len)
            + e.headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        total = total.saturating_add(size);
        if i > 0 && total > budget {
            return (i, true);
        }
    }
    (events.len(), false)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn event(offset: u64, bytes: usize) -> StoredEvent {
        StoredEvent {
            offset,
            time_ms: 0,
            id: None,
            headers: vec![],
            payload: vec![0; bytes],
        }
    }

    #[test]
    fn an_events_answer_keeps_to_its_byte_budget_but_never_sends_none() {
        let events: Vec<StoredEvent> = (0..4).map(|i| event(i, 1000)).collect();
        assert_eq!(fit_events(&events, 10_000), (4, false));
        assert_eq!(fit_events(&events, 2200), (2, true));
        // One event over the budget goes alone.
        assert_eq!(
            fit_events(&[event(0, 50_000), event(1, 1)], 1000),
            (1, true)
        );
        assert_eq!(fit_events(&[], 1000), (0, false));
    }

    #[test]
    fn tried_keeps_the_last_few() {
        let mut t = Tried::default();
        assert!(t.summary().contains("names no replica"));
        for i in 0..20 {
            t.note(format!("n{i}"));
        }
        assert_eq!(t.summary().split("; ").count(), Tried::KEEP);
        assert!(t.summary().ends_with("n19"));
    }
}
