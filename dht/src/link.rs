//! One long-lived, multiplexed link per peer and lane, over libp2p's generic streams
//! (`libp2p-stream`): a single stream carries every message of its lane in both directions
//! ([`crate::frame`] frames), instead of a new substream per message.
//!
//! ```text
//!   callers ──(bounded queue: wait for space)──> writer: every queued frame, one flush
//!                                                   │
//!                                                 stream (per peer, per lane)
//!                                                   │
//!   pending requests <──(id)── responses ────── reader ──> requests / events to the node
//! ```
//!
//! - Lanes: [`Lane::Rpc`] (requests with an id, answered in any order, many in flight) and
//!   [`Lane::Qos0`] (one-way events), each on its own stream, so a QoS 0 flood never queues
//!   ahead of Raft.
//! - A link opens lazily on first use (dialling the peer if need be) and is replaced by a new
//!   one after it fails; a stream the peer opened is used for this side's messages too when
//!   this side has none yet.
//! - A dead link fails all its pending requests at once; frames are delivered in the order
//!   they were queued, and inbound requests reach the node in the order they came.
//! - A frame over the lane's limit, of an unknown kind or version, or of a kind the lane does
//!   not carry is the peer's offence (counted by the guard) and closes the stream.

use crate::frame::{self, Frame, FrameReader, Kind, ReadError};
use crate::rpc::{
    InboundQos0, InboundRpc, MAX_QOS0_BYTES, MAX_RPC_BYTES, QOS0_PROTOCOL, RPC_PROTOCOL, RpcError,
};
use crate::swarm::{Command, DropLabels, PeerLabels};
use futures::stream::FuturesUnordered;
use futures::{AsyncReadExt, StreamExt};
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

/// How many frames may wait in one RPC link's queue; callers wait for space beyond it.
pub const RPC_LINK_QUEUE: usize = 1024;
/// How many QoS 0 events may wait in one peer's QoS 0 link queue.
pub const QOS0_LINK_QUEUE: usize = 4096;
/// How long a QoS 0 publisher waits for queue space before its copy for that peer is
/// dropped (and counted as `wait-timeout`).
pub const QOS0_WAIT: Duration = Duration::from_millis(250);
/// How long opening a link (dial and stream negotiation) may take.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// After a link failed to open, how long new messages for that peer and lane fail at once
/// instead of dialling again.
pub const DOWN_BACKOFF: Duration = Duration::from_millis(200);
/// The most frames one write carries (then it flushes and takes the next).
const MAX_FRAMES_PER_WRITE: usize = 1024;

/// A link's lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// Requests and their responses: Raft, forwarded writes and reads, formation.
    Rpc,
    /// One-way QoS 0 events.
    Qos0,
}

impl Lane {
    /// The lane's name in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Lane::Rpc => "rpc",
            Lane::Qos0 => "qos0",
        }
    }

    /// The stream protocol of the lane.
    pub fn protocol(self) -> StreamProtocol {
        StreamProtocol::new(match self {
            Lane::Rpc => RPC_PROTOCOL,
            Lane::Qos0 => QOS0_PROTOCOL,
        })
    }

    /// The largest frame body the lane carries.
    pub fn max(self) -> usize {
        match self {
            Lane::Rpc => MAX_RPC_BYTES,
            Lane::Qos0 => MAX_QOS0_BYTES,
        }
    }

    /// The offence kind of a bad frame on this lane (`canal_peer_bad_messages_total{kind}`).
    fn offence(self) -> &'static str {
        match self {
            Lane::Rpc => "rpc-frame",
            Lane::Qos0 => "qos0-frame",
        }
    }

    fn queue(self) -> usize {
        match self {
            Lane::Rpc => RPC_LINK_QUEUE,
            Lane::Qos0 => QOS0_LINK_QUEUE,
        }
    }

    /// Whether frames of `kind` may come on this lane.
    fn carries(self, kind: Kind) -> bool {
        match self {
            Lane::Rpc => kind != Kind::Event,
            Lane::Qos0 => kind == Kind::Event,
        }
    }
}

/// Labels of `canal_link_frames_total` and `canal_link_bytes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    lane: &'static str,
    direction: &'static str,
}

/// Labels of `canal_link_queue_depth`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LaneLabels {
    lane: &'static str,
}

/// The links' metrics.
#[derive(Clone, Default)]
pub(crate) struct LinkMetrics {
    frames: Family<FlowLabels, Counter>,
    bytes: Family<FlowLabels, Counter>,
    depth: Family<LaneLabels, Gauge>,
    reconnects: Counter,
    open: Family<LaneLabels, Gauge>,
    abandoned: Family<LaneLabels, Counter>,
}

impl LinkMetrics {
    /// Registers `canal_link_frames_total{lane,direction}`, `canal_link_bytes_total`,
    /// `canal_link_queue_depth{lane}`, `canal_link_reconnects_total`, `canal_links{lane}` and
    /// `canal_link_abandoned_total{lane}`.
    pub(crate) fn register(registry: &mut Registry) -> LinkMetrics {
        let m = LinkMetrics::default();
        registry.register(
            "canal_link_abandoned",
            "Requests dropped from a peer link's queue unsent because their caller had stopped waiting (a timeout), by lane",
            m.abandoned.clone(),
        );
        registry.register(
            "canal_link_frames",
            "Frames on peer links, by lane and direction (in, out)",
            m.frames.clone(),
        );
        registry.register(
            "canal_link_bytes",
            "Bytes on peer links (frame headers included), by lane and direction",
            m.bytes.clone(),
        );
        registry.register(
            "canal_link_queue_depth",
            "Frames queued for peer links' writers now, all peers together, by lane",
            m.depth.clone(),
        );
        registry.register(
            "canal_link_reconnects",
            "Peer links opened again after an earlier link to the same peer and lane ended",
            m.reconnects.clone(),
        );
        registry.register(
            "canal_links",
            "Peer links open now, by lane",
            m.open.clone(),
        );
        m
    }

    fn flow(&self, lane: Lane, direction: &'static str, bytes: usize) {
        let l = FlowLabels {
            lane: lane.name(),
            direction,
        };
        self.frames.get_or_create(&l).inc();
        self.bytes.get_or_create(&l).inc_by(bytes as u64);
    }

    fn depth(&self, lane: Lane) -> Gauge {
        self.depth
            .get_or_create(&LaneLabels { lane: lane.name() })
            .clone()
    }
}

/// A frame waiting for the writer.
struct Out {
    kind: Kind,
    id: u64,
    body: Vec<u8>,
}

type Answer = oneshot::Sender<Result<Vec<u8>, RpcError>>;

#[derive(Default)]
struct Pending {
    waiting: HashMap<u64, Answer>,
    /// Set once the link is dead: why. Nothing is registered after that.
    closed: Option<String>,
}

/// One link: the queue to its writer and the requests waiting for answers on it.
pub(crate) struct Link {
    peer: PeerId,
    lane: Lane,
    tx: mpsc::Sender<Out>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
}

impl Link {
    fn new(peer: PeerId, lane: Lane) -> (Arc<Link>, mpsc::Receiver<Out>) {
        let (tx, rx) = mpsc::channel(lane.queue());
        let link = Arc::new(Link {
            peer,
            lane,
            tx,
            pending: Mutex::new(Pending::default()),
            next_id: AtomicU64::new(1),
        });
        (link, rx)
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        // Every update is one insert or remove: a poisoned map is still consistent.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_closed(&self) -> bool {
        self.pending().closed.is_some()
    }

    fn failed(&self, why: &str) -> RpcError {
        RpcError::Failed {
            peer: self.peer.to_base58(),
            reason: why.to_string(),
        }
    }

    /// Registers a request's answer slot under a fresh id.
    fn register(&self, answer: Answer) -> Result<u64, RpcError> {
        let mut p = self.pending();
        if let Some(why) = &p.closed {
            return Err(self.failed(why));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        p.waiting.insert(id, answer);
        Ok(id)
    }

    fn complete(&self, id: u64, answer: Result<Vec<u8>, RpcError>) {
        if let Some(tx) = self.pending().waiting.remove(&id) {
            let _ = tx.send(answer);
        }
    }

    /// Marks the link dead and fails every request waiting on it, at once.
    fn fail_all(&self, why: &str) {
        let waiting = {
            let mut p = self.pending();
            p.closed.get_or_insert_with(|| why.to_string());
            std::mem::take(&mut p.waiting)
        };
        for (_, tx) in waiting {
            let _ = tx.send(Err(self.failed(why)));
        }
    }
}

/// Removes a request's answer slot when its caller stops waiting (openraft's timeout).
struct Registered {
    link: Arc<Link>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.link.pending().waiting.remove(&self.id);
    }
}

/// The answer to a request already queued on its link: await it. Dropping it gives up.
pub struct Reply {
    rx: oneshot::Receiver<Result<Vec<u8>, RpcError>>,
    _registered: Registered,
}

impl Future for Reply {
    type Output = Result<Vec<u8>, RpcError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let peer = self._registered.link.peer;
        Pin::new(&mut self.rx).poll(cx).map(|r| {
            r.unwrap_or_else(|_| {
                Err(RpcError::Failed {
                    peer: peer.to_base58(),
                    reason: "the link closed before the request was answered".into(),
                })
            })
        })
    }
}

/// Where the links send what they receive and report.
struct Sinks {
    rpc: mpsc::Sender<InboundRpc>,
    qos0: mpsc::Sender<InboundQos0>,
}

/// Every link of this peer, and what they need to open and serve streams.
pub(crate) struct Links {
    local: PeerId,
    control: libp2p_stream::Control,
    commands: mpsc::Sender<Command>,
    sinks: Mutex<Option<Sinks>>,
    map: Mutex<HashMap<(PeerId, Lane), Arc<Link>>>,
    /// When a link last failed to open, per peer and lane.
    down: Mutex<HashMap<(PeerId, Lane), Instant>>,
    /// How many links were ever opened per peer and lane (bounded; for reconnects).
    opened: Mutex<HashMap<(PeerId, Lane), u64>>,
    pub(crate) metrics: LinkMetrics,
    qos0_dropped: Family<DropLabels, Counter>,
    qos0_sent: Counter,
    qos0_received: Counter,
    labels: Arc<PeerLabels>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The counters the links share with the swarm's own metrics.
pub(crate) struct SharedCounters {
    pub(crate) qos0_dropped: Family<DropLabels, Counter>,
    pub(crate) qos0_sent: Counter,
    pub(crate) qos0_received: Counter,
    pub(crate) labels: Arc<PeerLabels>,
}

impl Links {
    /// Links of peer `local`, opening streams through `control`, asking the event loop to
    /// dial and to count offences through `commands`, handing inbound messages to
    /// `rpc`/`qos0`.
    pub(crate) fn new(
        local: PeerId,
        control: libp2p_stream::Control,
        commands: mpsc::Sender<Command>,
        rpc: mpsc::Sender<InboundRpc>,
        qos0: mpsc::Sender<InboundQos0>,
        metrics: LinkMetrics,
        counters: SharedCounters,
    ) -> Arc<Links> {
        Arc::new(Links {
            local,
            control,
            commands,
            sinks: Mutex::new(Some(Sinks { rpc, qos0 })),
            map: Mutex::new(HashMap::new()),
            down: Mutex::new(HashMap::new()),
            opened: Mutex::new(HashMap::new()),
            metrics,
            qos0_dropped: counters.qos0_dropped,
            qos0_sent: counters.qos0_sent,
            qos0_received: counters.qos0_received,
            labels: counters.labels,
        })
    }

    /// Stops handing inbound messages to the node (at shutdown), so its receivers end.
    pub(crate) fn close(&self) {
        lock(&self.sinks).take();
        let links: Vec<Arc<Link>> = lock(&self.map).drain().map(|(_, l)| l).collect();
        for l in links {
            l.fail_all("the peer mesh is shutting down");
        }
    }

    fn sink_rpc(&self) -> Option<mpsc::Sender<InboundRpc>> {
        lock(&self.sinks).as_ref().map(|s| s.rpc.clone())
    }

    fn sink_qos0(&self) -> Option<mpsc::Sender<InboundQos0>> {
        lock(&self.sinks).as_ref().map(|s| s.qos0.clone())
    }

    pub(crate) fn qos0_drop(&self, peer: &PeerId, reason: &str) {
        self.qos0_dropped
            .get_or_create(&DropLabels {
                peer: self.labels.of(peer),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// The live link to `peer` on `lane`, opening one (dialling `addrs` and the addresses the
    /// mesh knows) if there is none.
    fn link(
        self: &Arc<Self>,
        peer: PeerId,
        lane: Lane,
        addrs: Vec<Multiaddr>,
    ) -> Result<Arc<Link>, RpcError> {
        if peer == self.local {
            return Err(RpcError::Failed {
                peer: peer.to_base58(),
                reason: "a peer has no link to itself".into(),
            });
        }
        let key = (peer, lane);
        let mut map = lock(&self.map);
        if let Some(l) = map.get(&key)
            && !l.is_closed()
        {
            return Ok(l.clone());
        }
        if let Some(at) = lock(&self.down).get(&key)
            && at.elapsed() < DOWN_BACKOFF
        {
            return Err(RpcError::Failed {
                peer: peer.to_base58(),
                reason: format!(
                    "the {} link is down (opening it failed {:?} ago; the next try is after {DOWN_BACKOFF:?})",
                    lane.name(),
                    at.elapsed()
                ),
            });
        }
        let (link, rx) = Link::new(peer, lane);
        self.count_open(key);
        map.insert(key, link.clone());
        drop(map);
        let links = self.clone();
        let opening = link.clone();
        tokio::spawn(async move { links.run_outbound(opening, rx, addrs).await });
        Ok(link)
    }

    fn count_open(&self, key: (PeerId, Lane)) {
        let mut opened = lock(&self.opened);
        if opened.len() > 4096 {
            opened.clear();
        }
        let n = opened.entry(key).or_insert(0);
        if *n > 0 {
            self.metrics.reconnects.inc();
        }
        *n += 1;
    }

    async fn run_outbound(
        self: Arc<Self>,
        link: Arc<Link>,
        rx: mpsc::Receiver<Out>,
        addrs: Vec<Multiaddr>,
    ) {
        let peer = link.peer;
        let lane = link.lane;
        let open = async {
            let (done, dialled) = oneshot::channel();
            self.commands
                .send(Command::Dial { peer, addrs, done })
                .await
                .map_err(|_| "the peer mesh is shut down".to_string())?;
            let _ = dialled.await;
            let mut control = self.control.clone();
            control
                .open_stream(peer, lane.protocol())
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(OPEN_TIMEOUT, open).await {
            Ok(Ok(stream)) => {
                lock(&self.down).remove(&(peer, lane));
                self.run_stream(link, rx, stream).await;
            }
            Ok(Err(why)) => {
                debug!(%peer, lane = lane.name(), %why, "link did not open");
                lock(&self.down).insert((peer, lane), Instant::now());
                self.finish(
                    &link,
                    rx,
                    &format!("opening the {} link failed: {why}", lane.name()),
                );
            }
            Err(_) => {
                lock(&self.down).insert((peer, lane), Instant::now());
                self.finish(
                    &link,
                    rx,
                    &format!(
                        "the {} link did not open within {OPEN_TIMEOUT:?}",
                        lane.name()
                    ),
                );
            }
        }
    }

    /// Serves a stream `peer` opened on `lane`; it also carries this side's messages if
    /// this side has no live link of its own on the lane.
    pub(crate) fn accept(self: &Arc<Self>, peer: PeerId, lane: Lane, stream: libp2p::Stream) {
        let (link, rx) = Link::new(peer, lane);
        {
            let mut map = lock(&self.map);
            let free = map.get(&(peer, lane)).is_none_or(|l| l.is_closed());
            if free {
                map.insert((peer, lane), link.clone());
            }
        }
        let links = self.clone();
        tokio::spawn(async move { links.run_stream(link, rx, stream).await });
    }

    /// Runs one stream until it fails: its writer and its reader, concurrently.
    async fn run_stream(
        self: Arc<Self>,
        link: Arc<Link>,
        mut rx: mpsc::Receiver<Out>,
        stream: libp2p::Stream,
    ) {
        let lane = link.lane;
        let open = self
            .metrics
            .open
            .get_or_create(&LaneLabels { lane: lane.name() })
            .clone();
        open.inc();
        let (read, mut write) = stream.split();
        let why = tokio::select! {
            why = self.write_loop(&link, &mut write, &mut rx) => why,
            why = self.read_loop(&link, read) => why,
        };
        open.dec();
        debug!(peer = %link.peer, lane = lane.name(), %why, "link closed");
        self.finish(&link, rx, &why);
    }

    /// Ends a link: forgets it, fails its requests, and drops (counting) what it still held.
    fn finish(&self, link: &Arc<Link>, mut rx: mpsc::Receiver<Out>, why: &str) {
        {
            let mut map = lock(&self.map);
            if map
                .get(&(link.peer, link.lane))
                .is_some_and(|l| Arc::ptr_eq(l, link))
            {
                map.remove(&(link.peer, link.lane));
            }
        }
        link.fail_all(why);
        rx.close();
        let depth = self.metrics.depth(link.lane);
        while let Ok(out) = rx.try_recv() {
            depth.dec();
            if out.kind == Kind::Event {
                self.qos0_drop(&link.peer, "link-down");
            }
        }
    }

    /// Writes every queued frame, flushing once per batch: frames queue up while a write is
    /// under way and go out together with the next one. Returns why it stopped.
    async fn write_loop<W: futures::AsyncWrite + Unpin>(
        &self,
        link: &Link,
        io: &mut W,
        rx: &mut mpsc::Receiver<Out>,
    ) -> String {
        let lane = link.lane;
        let depth = self.metrics.depth(lane);
        let abandoned = self
            .metrics
            .abandoned
            .get_or_create(&LaneLabels { lane: lane.name() })
            .clone();
        let mut batch = Vec::with_capacity(64);
        let mut bytes = Vec::new();
        loop {
            if rx.recv_many(&mut batch, MAX_FRAMES_PER_WRITE).await == 0 {
                return "the link's queue closed".into();
            }
            bytes.clear();
            for out in batch.drain(..) {
                depth.dec();
                // A request whose caller gave up (timed out) while it waited here is not
                // sent: a sender that retries on timeout (openraft resending a large
                // append) would otherwise queue copy after copy ahead of every other
                // group's heartbeats, and the link would never catch up.
                if out.kind == Kind::Request && !link.pending().waiting.contains_key(&out.id) {
                    abandoned.inc();
                    continue;
                }
                frame::encode_into(&mut bytes, out.kind, out.id, &out.body);
                self.metrics
                    .flow(lane, "out", frame::HEADER_LEN + out.body.len());
                if out.kind == Kind::Event {
                    self.qos0_sent.inc();
                }
            }
            if let Err(e) = frame::write_batch(io, &bytes).await {
                return format!("writing to the link failed: {e}");
            }
            // A large batch must not keep its buffer for good.
            if bytes.capacity() > 4 << 20 {
                bytes = Vec::new();
            }
        }
    }

    /// Queues a frame on `link`, waiting for space.
    async fn queue(&self, link: &Link, out: Out) -> Result<(), RpcError> {
        let depth = self.metrics.depth(link.lane);
        depth.inc();
        link.tx.send(out).await.map_err(|_| {
            depth.dec();
            link.failed(&format!("the {} link closed", link.lane.name()))
        })
    }

    /// Reads frames until the stream fails or the peer sends a bad one; hands requests and
    /// events to the node in arrival order, and queues the node's answers back.
    async fn read_loop<R: futures::AsyncRead + Unpin>(&self, link: &Arc<Link>, read: R) -> String {
        let lane = link.lane;
        let peer = link.peer;
        let mut reader = FrameReader::new(read, lane.max());
        let mut answers = FuturesUnordered::new();
        loop {
            let frame = tokio::select! {
                f = reader.next() => f,
                Some((id, answer)) = answers.next(), if !answers.is_empty() => {
                    let out = match answer {
                        Some(body) if Vec::len(&body) <= lane.max() => Out { kind: Kind::Response, id, body },
                        Some(body) => {
                            tracing::warn!(%peer, bytes = body.len(), limit = lane.max(), "an RPC answer is over the frame limit (MAX_RPC_BYTES): sent as no answer");
                            Out { kind: Kind::NoAnswer, id, body: Vec::new() }
                        }
                        None => Out { kind: Kind::NoAnswer, id, body: Vec::new() },
                    };
                    if let Err(e) = self.queue(link, out).await {
                        return e.to_string();
                    }
                    continue;
                }
            };
            let Frame { kind, id, body } = match frame {
                Ok(Some(f)) => f,
                Ok(None) => return "the peer closed the link".into(),
                Err(ReadError::Io(e)) => return format!("reading from the link failed: {e}"),
                Err(ReadError::Frame(e)) => {
                    self.offence(peer, lane, e.to_string());
                    return format!("bad frame from the peer: {e}");
                }
            };
            self.metrics
                .flow(lane, "in", frame::HEADER_LEN + body.len());
            if !lane.carries(kind) {
                let why = format!(
                    "a frame of kind {kind:?} on the {} lane, which does not carry it",
                    lane.name()
                );
                self.offence(peer, lane, why.clone());
                return why;
            }
            match kind {
                Kind::Request => {
                    let (reply, rx) = oneshot::channel();
                    let delivered = match self.sink_rpc() {
                        // Waits for the node: backpressure on this link, not a refusal.
                        Some(sink) => sink.send(InboundRpc { peer, body, reply }).await.is_ok(),
                        None => false,
                    };
                    if delivered {
                        answers.push(async move { (id, rx.await.ok()) });
                    } else {
                        let out = Out {
                            kind: Kind::NoAnswer,
                            id,
                            body: Vec::new(),
                        };
                        if let Err(e) = self.queue(link, out).await {
                            return e.to_string();
                        }
                    }
                }
                Kind::Response => link.complete(id, Ok(body)),
                Kind::NoAnswer => link.complete(
                    id,
                    Err(link.failed(
                        "the peer gave no answer (its handler is busy, absent or refused it)",
                    )),
                ),
                Kind::Event => {
                    self.qos0_received.inc();
                    let delivered = match self.sink_qos0() {
                        Some(sink) => sink.send(InboundQos0 { peer, body }).await.is_ok(),
                        None => false,
                    };
                    if !delivered {
                        self.qos0_drop(&peer, "no-receiver");
                    }
                }
            }
        }
    }

    fn offence(&self, peer: PeerId, lane: Lane, detail: String) {
        let _ = self.commands.try_send(Command::ReportBad {
            peer,
            kind: lane.offence(),
            detail,
        });
    }

    /// Queues a request for `peer` on its RPC link (opening it if need be), waiting for
    /// queue space; the returned [`Reply`] is its answer.
    pub(crate) async fn request(
        self: &Arc<Self>,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        body: Vec<u8>,
    ) -> Result<Reply, RpcError> {
        if body.len() > MAX_RPC_BYTES {
            return Err(RpcError::Failed {
                peer: peer.to_base58(),
                reason: format!(
                    "a request of {} bytes is over the limit of {MAX_RPC_BYTES} bytes (MAX_RPC_BYTES)",
                    body.len()
                ),
            });
        }
        let link = self.link(peer, Lane::Rpc, addrs)?;
        let (answer, rx) = oneshot::channel();
        let id = link.register(answer)?;
        let registered = Registered {
            link: link.clone(),
            id,
        };
        self.queue(
            &link,
            Out {
                kind: Kind::Request,
                id,
                body,
            },
        )
        .await?;
        Ok(Reply {
            rx,
            _registered: registered,
        })
    }

    /// Queues a QoS 0 event for `peer`, waiting at most [`QOS0_WAIT`] for queue space;
    /// `false` (and a counted drop) when the link is down, the wait ran out or the event is
    /// over the lane's limit.
    pub(crate) async fn send_qos0(self: &Arc<Self>, peer: PeerId, body: Vec<u8>) -> bool {
        if body.len() > MAX_QOS0_BYTES {
            self.qos0_drop(&peer, "too-large");
            return false;
        }
        let link = match self.link(peer, Lane::Qos0, Vec::new()) {
            Ok(l) => l,
            Err(_) => {
                self.qos0_drop(&peer, "link-down");
                return false;
            }
        };
        let out = Out {
            kind: Kind::Event,
            id: 0,
            body,
        };
        match tokio::time::timeout(QOS0_WAIT, self.queue(&link, out)).await {
            Ok(Ok(())) => true,
            Ok(Err(_)) => {
                self.qos0_drop(&peer, "link-down");
                false
            }
            Err(_) => {
                self.qos0_drop(&peer, "wait-timeout");
                false
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dead_link_fails_every_pending_request_at_once() {
        let (link, _rx) = Link::new(PeerId::random(), Lane::Rpc);
        let mut waiting = Vec::new();
        for _ in 0..10 {
            let (tx, rx) = oneshot::channel();
            let id = link.register(tx).unwrap();
            waiting.push(Reply {
                rx,
                _registered: Registered {
                    link: link.clone(),
                    id,
                },
            });
        }
        link.fail_all("the peer went away");
        for r in waiting {
            let e = tokio::time::timeout(Duration::from_secs(1), r)
                .await
                .unwrap()
                .unwrap_err();
            assert!(e.to_string().contains("the peer went away"), "{e}");
        }
        // Nothing is registered on a dead link.
        let (tx, _rx) = oneshot::channel();
        assert!(link.register(tx).is_err());
    }

    #[tokio::test]
    async fn answers_find_their_requests_in_any_order() {
        let (link, _rx) = Link::new(PeerId::random(), Lane::Rpc);
        let mut replies = Vec::new();
        for _ in 0..5 {
            let (tx, rx) = oneshot::channel();
            let id = link.register(tx).unwrap();
            replies.push((
                id,
                Reply {
                    rx,
                    _registered: Registered {
                        link: link.clone(),
                        id,
                    },
                },
            ));
        }
        for (id, _) in replies.iter().rev() {
            link.complete(*id, Ok(id.to_be_bytes().to_vec()));
        }
        // An answer to nothing (a request whose caller gave up) is ignored.
        link.complete(999, Ok(Vec::new()));
        for (id, r) in replies {
            assert_eq!(r.await.unwrap(), id.to_be_bytes().to_vec());
        }
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_leaves_nothing_behind() {
        let (link, _rx) = Link::new(PeerId::random(), Lane::Rpc);
        let (tx, rx) = oneshot::channel();
        let id = link.register(tx).unwrap();
        drop(Reply {
            rx,
            _registered: Registered {
                link: link.clone(),
                id,
            },
        });
        assert!(link.pending().waiting.is_empty());
    }

    #[test]
    fn each_lane_carries_only_its_kinds() {
        assert!(Lane::Rpc.carries(Kind::Request) && Lane::Rpc.carries(Kind::NoAnswer));
        assert!(!Lane::Rpc.carries(Kind::Event));
        assert!(Lane::Qos0.carries(Kind::Event) && !Lane::Qos0.carries(Kind::Request));
    }
}
