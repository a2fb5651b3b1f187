//! Delay-and-loss TCP relays: tier links and partitions for nodes on one machine.
//!
//! This machine's kernel has no `netem`, so link latency cannot come from `tc`. Instead each
//! node of a relayed testnet sits behind a relay of its own: a TCP listener on loopback that
//! forwards every connection to the node's real listen address and holds each chunk of bytes
//! back for the link's delay. The node announces the relay's address (`canal node
//! --advertise`), so every other node reaches it only through the relay.
//!
//! ```text
//!   node A ──dial (source port = A's listen port)──> relay of B ──> B's real listen port
//!              <── each chunk, both ways, delayed by link(A) + link(B) ──
//! ```
//!
//! ## Link model
//!
//! Each node is behind one access link ([`LinkSettings`]): a one-way delay of `latency ±
//! jitter` (uniform), and loss. A connection between nodes A and B crosses both nodes'
//! links, so each chunk is delayed by a sample of A's link plus a sample of B's, in each
//! direction: an edge node behind 30 ms and a cloud node behind 1 ms see about 31 ms one way,
//! 62 ms round trip; two edge nodes see 60 ms one way. Whoever dialled, the delay is the
//! same. Chunks are never reordered: a chunk is released no earlier than the one before it,
//! so jitter shows as varying delay, as on a TCP stream.
//!
//! **Loss.** A TCP stream cannot lose bytes; a lost segment costs the stream a
//! retransmission timeout instead. So here `loss` is the probability that a chunk is held
//! for an extra [`LOSS_PENALTY`] (200 ms, Linux's minimum retransmission timeout) on top of
//! its delay, and everything behind it on that connection waits too.
//!
//! ## Telling nodes apart
//!
//! A relay learns which node a connection comes from by its source port: libp2p's TCP
//! transport binds outgoing sockets to the port of its listener (port reuse is the default
//! for dials), so a connection from node A arrives from `127.0.0.1:<A's listen port>`. (The
//! source address is always 127.0.0.1: libp2p binds the unspecified address with that port,
//! so giving each node its own 127.0.0.N would not help.) Some connections come from another
//! port: a dial made before the listener was up, or one whose port reuse failed (the same
//! four-tuple still open or in TIME_WAIT) and fell back to a fresh port. For those, when the
//! relay knows the nodes' processes ([`Fabric::set_pid`]), it asks the kernel which process
//! holds the socket (`/proc/net/tcp`, `/proc/PID/fd`; Linux). A connection still not placed
//! is of **unknown source**: it gets the destination's link only.
//!
//! ## Partitions
//!
//! [`Fabric::partition`] cuts a set of nodes off from the rest: every open connection between
//! the set and the rest is reset (RST, so both ends notice at once), and new ones are
//! accepted and reset at once, until [`Fabric::heal`]. While a partition is in force, a
//! connection of unknown source is refused too (the relay cannot tell which side it comes
//! from); the nodes dial again from their listen port, which is known.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What a lost segment costs a TCP stream: the minimum retransmission timeout (Linux's
/// `TCP_RTO_MIN`).
pub const LOSS_PENALTY: Duration = Duration::from_millis(200);

/// How long a connection to a relay whose node has not started yet is held before it is
/// closed.
const TARGET_WAIT: Duration = Duration::from_secs(10);

/// How many chunks may wait in one direction of one connection (backpressure beyond). Each
/// read is a chunk, and busy peers write many small frames, so this must cover a link's
/// bandwidth-delay product in frames, or the relay, not the link, limits the rate.
const CHUNKS_IN_FLIGHT: usize = 16_384;

/// One node's access link.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LinkSettings {
    /// One-way delay.
    pub latency: Duration,
    /// The delay varies uniformly within `latency ± jitter` (never below zero).
    pub jitter: Duration,
    /// Probability (0 to 1) that a chunk costs an extra [`LOSS_PENALTY`].
    pub loss: f64,
}

fn fmt_duration(d: Duration) -> String {
    if d.subsec_micros().is_multiple_of(1000) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}us", d.as_micros())
    }
}

impl std::fmt::Display for LinkSettings {
    /// The form [`LinkSettings::parse`] reads: `30ms±5ms/1%`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", fmt_duration(self.latency))?;
        if !self.jitter.is_zero() {
            write!(f, "±{}", fmt_duration(self.jitter))?;
        }
        if self.loss > 0.0 {
            // At most three decimals, without trailing zeros: 1%, 0.5%, 0.125%.
            let pct = format!("{:.3}", self.loss * 100.0);
            write!(f, "/{}%", pct.trim_end_matches('0').trim_end_matches('.'))?;
        }
        Ok(())
    }
}

fn parse_duration(s: &str, what: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map(|i| s.split_at(i))
        .unwrap_or((s, ""));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{what} {s:?} is not a duration: write, for example, 30ms"))?;
    let scale = match unit.trim() {
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        _ => {
            return Err(format!(
                "{what} {s:?} has no unit: write, for example, 30ms (units: us, ms, s)"
            ));
        }
    };
    let secs = n * scale;
    if !(0.0..=60.0).contains(&secs) {
        return Err(format!("{what} {s:?} is out of range: 0 to 60 s"));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl LinkSettings {
    /// A link with no delay and no loss.
    pub const NONE: LinkSettings = LinkSettings {
        latency: Duration::ZERO,
        jitter: Duration::ZERO,
        loss: 0.0,
    };

    /// A link with this one-way latency, no jitter and no loss.
    pub fn latency(latency: Duration) -> LinkSettings {
        LinkSettings {
            latency,
            ..LinkSettings::NONE
        }
    }

    /// Parses `LATENCY[±JITTER][/LOSS%]`: `30ms`, `30ms±5ms`, `30ms+-5ms/1%`, `1ms/0.5%`.
    pub fn parse(s: &str) -> Result<LinkSettings, String> {
        let (delay, loss) = match s.split_once('/') {
            Some((d, l)) => (d, Some(l)),
            None => (s, None),
        };
        let (latency, jitter) = match delay.split_once('±').or_else(|| delay.split_once("+-")) {
            Some((l, j)) => (l, Some(j)),
            None => (delay, None),
        };
        let latency = parse_duration(latency, "latency")?;
        let jitter = jitter
            .map(|j| parse_duration(j, "jitter"))
            .transpose()?
            .unwrap_or_default();
        let loss = match loss {
            None => 0.0,
            Some(l) => {
                let l = l.trim();
                let pct: f64 = l
                    .strip_suffix('%')
                    .unwrap_or(l)
                    .trim()
                    .parse()
                    .map_err(|_| {
                        format!("loss {l:?} is not a percentage: write, for example, 1%")
                    })?;
                if !(0.0..=100.0).contains(&pct) {
                    return Err(format!("loss {l:?} is out of range: 0% to 100%"));
                }
                pct / 100.0
            }
        };
        Ok(LinkSettings {
            latency,
            jitter,
            loss,
        })
    }

    /// One chunk's delay on this link.
    fn sample(&self, rng: &mut Rng) -> Duration {
        let mut d = self.latency;
        if !self.jitter.is_zero() {
            // Uniform in [latency - jitter, latency + jitter].
            let span = self.jitter.as_secs_f64() * (2.0 * rng.unit() - 1.0);
            d = Duration::from_secs_f64((d.as_secs_f64() + span).max(0.0));
        }
        if self.loss > 0.0 && rng.unit() < self.loss {
            d += LOSS_PENALTY;
        }
        d
    }
}

/// A small seeded generator (SplitMix64): the relay needs cheap randomness, not good
/// randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Counters of one relay, for tests and people.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Connections forwarded whose source node was recognised when they were accepted.
    pub known_source: u64,
    /// Connections forwarded whose source was not recognised when they were accepted (it
    /// may be later, once the node's port is known).
    pub unknown_source: u64,
    /// Connections refused (partition, or no node to forward to).
    pub refused: u64,
    /// Open connections reset by a partition.
    pub cut: u64,
    /// Connections open now.
    pub open: u64,
}

#[derive(Debug)]
struct Endpoint {
    relay: SocketAddr,
    target: Option<SocketAddr>,
    /// Source ports that identify this node's outgoing connections (its listen ports).
    ports: Vec<u16>,
    /// The node's process, to tell its connections from unknown ports apart.
    pid: Option<u32>,
    link: LinkSettings,
    stats: RelayStats,
}

#[derive(Debug, Default)]
struct State {
    endpoints: Vec<Endpoint>,
    /// The nodes cut off from the rest; empty: no partition.
    cut: BTreeSet<usize>,
    /// Pairs of nodes that cannot reach each other (smaller index first), apart from `cut`.
    blocked: BTreeSet<(usize, usize)>,
}

impl State {
    fn source_of(&self, port: u16) -> Option<usize> {
        self.endpoints.iter().position(|e| e.ports.contains(&port))
    }

    /// Whether a connection from node `src` (`None`: unknown) may reach node `dst` now.
    fn allowed(&self, src: Option<usize>, dst: usize) -> bool {
        if !self.restricted() {
            return true;
        }
        match src {
            Some(s) => {
                self.cut.contains(&s) == self.cut.contains(&dst)
                    && !self.blocked.contains(&(s.min(dst), s.max(dst)))
            }
            None => false,
        }
    }

    /// Whether any partition or blocked pair is in force.
    fn restricted(&self) -> bool {
        !self.cut.is_empty() || !self.blocked.is_empty()
    }
}

struct Inner {
    state: Mutex<State>,
    /// Bumped on every change of targets or partitions; connections re-check on it.
    changed: watch::Sender<u64>,
    /// Set when the fabric is dropped: every relay and connection ends.
    stop: watch::Sender<bool>,
    seeds: AtomicU64,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a single assignment; a poisoned lock holds consistent state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

/// Stops every relay of the fabric when the last [`Fabric`] handle is dropped.
struct Owner {
    inner: Arc<Inner>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.inner.stop.send_replace(true);
    }
}

/// A set of relays, one per node, that share the link settings and the partition: the
/// network between the nodes of a testnet. Cheap to clone; the relays stop when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Fabric {
    owner: Arc<Owner>,
}

impl Default for Fabric {
    fn default() -> Self {
        Fabric::new()
    }
}

impl std::fmt::Debug for Fabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fabric")
            .field("state", &*self.inner().lock())
            .finish()
    }
}

impl Fabric {
    /// A fabric with no relays yet.
    pub fn new() -> Fabric {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Fabric {
            owner: Arc::new(Owner {
                inner: Arc::new(Inner {
                    state: Mutex::new(State::default()),
                    changed: watch::Sender::new(0),
                    stop: watch::Sender::new(false),
                    seeds: AtomicU64::new(seed),
                }),
            }),
        }
    }

    fn inner(&self) -> &Arc<Inner> {
        &self.owner.inner
    }

    /// Adds a relay on an ephemeral loopback port for a node behind `link`; returns its
    /// index. Its target is set later, with [`set_target`](Self::set_target).
    pub async fn add(&self, link: LinkSettings) -> std::io::Result<usize> {
        self.add_at(std::net::SocketAddr::from(([127, 0, 0, 1], 0)), None, link)
            .await
    }

    /// Adds a relay listening on `listen`, forwarding to `target` (if known yet), for a node
    /// behind `link`; returns its index. Must be called within a tokio runtime.
    pub async fn add_at(
        &self,
        listen: SocketAddr,
        target: Option<SocketAddr>,
        link: LinkSettings,
    ) -> std::io::Result<usize> {
        let listener = TcpListener::bind(listen).await?;
        let relay = listener.local_addr()?;
        let index = {
            let mut st = self.inner().lock();
            st.endpoints.push(Endpoint {
                relay,
                target,
                ports: target.map(|t| vec![t.port()]).unwrap_or_default(),
                pid: None,
                link,
                stats: RelayStats::default(),
            });
            st.endpoints.len() - 1
        };
        tokio::spawn(serve(listener, self.inner().clone(), index));
        Ok(index)
    }

    /// How many relays the fabric has.
    pub fn len(&self) -> usize {
        self.inner().lock().endpoints.len()
    }

    /// Whether it has none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The address relay `i` listens on: where other nodes reach node `i`.
    pub fn relay_addr(&self, i: usize) -> SocketAddr {
        self.inner().lock().endpoints[i].relay
    }

    /// Sets where relay `i` forwards to: node `i`'s real listen address, whose port also
    /// identifies node `i`'s outgoing connections at the other relays.
    pub fn set_target(&self, i: usize, target: SocketAddr) {
        {
            let mut st = self.inner().lock();
            let e = &mut st.endpoints[i];
            e.target = Some(target);
            if !e.ports.contains(&target.port()) {
                e.ports.push(target.port());
            }
        }
        self.inner().bump();
    }

    /// Tells relay `i` the process of node `i`: a connection from a port the relays do not
    /// know (a node's first dials, or a dial that could not reuse the listen port) is then
    /// placed by asking the kernel which process holds its socket (Linux).
    pub fn set_pid(&self, i: usize, pid: Option<u32>) {
        self.inner().lock().endpoints[i].pid = pid;
    }

    /// Node `i`'s link settings.
    pub fn link(&self, i: usize) -> LinkSettings {
        self.inner().lock().endpoints[i].link
    }

    /// Changes node `i`'s link settings; chunks read from now on get the new delay.
    pub fn set_link(&self, i: usize, link: LinkSettings) {
        self.inner().lock().endpoints[i].link = link;
    }

    /// Cuts the nodes in `cut` off from the others (replacing any earlier partition): open
    /// connections between the two sides are reset, new ones refused, until
    /// [`heal`](Self::heal). An empty set heals.
    pub fn partition(&self, cut: &[usize]) {
        self.inner().lock().cut = cut.iter().copied().collect();
        self.inner().bump();
    }

    /// Ends the partition and every blocked pair: every node may reach every other again.
    pub fn heal(&self) {
        self.inner().lock().blocked.clear();
        self.partition(&[]);
    }

    /// Cuts the link between nodes `a` and `b` only (both still reach everyone else), until
    /// [`heal`](Self::heal): for meshes where two peers see the rest but not each other.
    pub fn block(&self, a: usize, b: usize) {
        self.inner().lock().blocked.insert((a.min(b), a.max(b)));
        self.inner().bump();
    }

    /// The nodes cut off now (empty: no partition).
    pub fn partitioned(&self) -> Vec<usize> {
        self.inner().lock().cut.iter().copied().collect()
    }

    /// Relay `i`'s counters.
    pub fn stats(&self, i: usize) -> RelayStats {
        self.inner().lock().endpoints[i].stats
    }
}

/// The accept loop of relay `dst`.
async fn serve(listener: TcpListener, inner: Arc<Inner>, dst: usize) {
    let mut stop = inner.stop.subscribe();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    tokio::spawn(connection(socket, peer, inner.clone(), dst));
                }
                Err(e) => {
                    // Out of file descriptors or the like: wait a little instead of spinning.
                    debug_log(&format!("relay {dst}: accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stopped(&mut stop) => break,
        }
    }
}

/// Resolves once the fabric is dropped.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The relay runs inside tests and a helper process without a tracing subscriber; errors
/// that matter surface as refused or closed connections, so this only helps a person
/// debugging with `CANAL_RELAY_DEBUG=1`.
fn debug_log(msg: &str) {
    if std::env::var_os("CANAL_RELAY_DEBUG").is_some() {
        eprintln!("{msg}");
    }
}

/// Resets `socket` (RST instead of FIN), as a cut link would look to both ends.
fn reset(socket: &TcpStream) {
    let _ = socket.set_zero_linger();
}

/// Where a relayed connection comes from.
struct Source {
    /// Its source port; a node's listen port names the node.
    port: u16,
    /// The node found to own the connection's socket (`usize::MAX`: none yet).
    owner: AtomicUsize,
}

impl Source {
    /// The source node as far as known now. A node's port becomes known when it has
    /// started, after its first dials, so this is asked again at every use.
    fn node(&self, st: &State) -> Option<usize> {
        st.source_of(self.port).or_else(|| {
            let o = self.owner.load(Ordering::Relaxed);
            (o != usize::MAX).then_some(o)
        })
    }

    /// Finds the node of a connection from an unknown port by asking the kernel which
    /// process holds the socket.
    async fn identify(&self, inner: &Inner, peer: SocketAddr, relay: SocketAddr) -> Option<usize> {
        if let Some(n) = self.node(&inner.lock()) {
            return Some(n);
        }
        let pids: Vec<(usize, u32)> = inner
            .lock()
            .endpoints
            .iter()
            .enumerate()
            .filter_map(|(i, e)| Some((i, e.pid?)))
            .collect();
        if pids.is_empty() {
            return None;
        }
        let owner = tokio::task::spawn_blocking(move || socket_owner(peer, relay, &pids))
            .await
            .ok()
            .flatten()?;
        self.owner.store(owner, Ordering::Relaxed);
        Some(owner)
    }
}

/// The entry of `pids` whose process holds the TCP socket from `local` to `remote` on this
/// machine: the kernel's socket table (`/proc/net/tcp`) gives the socket's inode, a
/// process's open files (`/proc/PID/fd`) show whether it holds it. Linux and IPv4 only;
/// `None` elsewhere, or when the socket is gone.
fn socket_owner(local: SocketAddr, remote: SocketAddr, pids: &[(usize, u32)]) -> Option<usize> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(a) => Some(format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(a.ip().octets()),
            a.port()
        )),
        SocketAddr::V6(_) => None,
    };
    let (local, remote) = (hex(local)?, hex(remote)?);
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let inode = table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 9 && f[1] == local && f[2] == remote).then(|| f[9].to_string())
    })?;
    let target = format!("socket:[{inode}]");
    pids.iter().find_map(|(node, pid)| {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
        fds.filter_map(Result::ok)
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()))
            .then_some(*node)
    })
}

/// How a relayed connection ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Both directions ended cleanly, each end's close passed on.
    Closed,
    /// One side failed or was reset: the other is reset too, as a broken path looks.
    Failed,
    /// A partition cut it.
    Cut,
    /// The fabric was dropped.
    Stopped,
}

async fn connection(mut inbound: TcpStream, peer: SocketAddr, inner: Arc<Inner>, dst: usize) {
    let source = Source {
        port: peer.port(),
        owner: AtomicUsize::new(usize::MAX),
    };
    let relay = inner.lock().endpoints[dst].relay;
    let src = source.identify(&inner, peer, relay).await;
    let mut changed = inner.changed.subscribe();
    let mut stop = inner.stop.subscribe();
    if !inner.lock().allowed(src, dst) {
        inner.lock().endpoints[dst].stats.refused += 1;
        debug_log(&format!("relay {dst}: refused {peer} (source {src:?})"));
        reset(&inbound);
        return;
    }
    // The node behind the relay may not have started yet: hold the connection a while.
    let target = {
        let wait = async {
            // The `Ref` is not `Send`: drop it before any await.
            changed
                .wait_for(|_| inner.lock().endpoints[dst].target.is_some())
                .await
                .is_ok()
        };
        match tokio::time::timeout(TARGET_WAIT, wait).await {
            Ok(true) => inner.lock().endpoints[dst].target,
            _ => None,
        }
    };
    let outbound = match target {
        Some(t) => TcpStream::connect(t).await.ok(),
        None => None,
    };
    let Some(mut outbound) = outbound else {
        inner.lock().endpoints[dst].stats.refused += 1;
        reset(&inbound);
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    {
        let mut st = inner.lock();
        let stats = &mut st.endpoints[dst].stats;
        if src.is_some() {
            stats.known_source += 1;
        } else {
            stats.unknown_source += 1;
        }
        stats.open += 1;
    }
    debug_log(&format!("relay {dst}: forwarding {peer} (source {src:?})"));
    let seed = inner
        .seeds
        .fetch_add(0x5851_F42D_4C95_7F2D, Ordering::Relaxed);
    let end = {
        let (mut in_read, mut in_write) = inbound.split();
        let (mut out_read, mut out_write) = outbound.split();
        let forward = pipe(
            &mut in_read,
            &mut out_write,
            &inner,
            &source,
            dst,
            Rng(seed),
        );
        let backward = pipe(
            &mut out_read,
            &mut in_write,
            &inner,
            &source,
            dst,
            Rng(!seed),
        );
        // Checked before each wait, so a partition made while the connection was being set
        // up is not missed.
        let cut = async {
            loop {
                let known = source.node(&inner.lock());
                // A partition needs to know the side: look harder for an unknown source.
                let src = match known {
                    None if inner.lock().restricted() => source.identify(&inner, peer, relay).await,
                    known => known,
                };
                if !inner.lock().allowed(src, dst) {
                    return;
                }
                if changed.changed().await.is_err() {
                    return std::future::pending::<()>().await;
                }
            }
        };
        tokio::pin!(forward, backward, cut);
        let (mut forward_done, mut backward_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut forward, if !forward_done => {
                    forward_done = true;
                    if r.is_err() { break End::Failed; }
                }
                r = &mut backward, if !backward_done => {
                    backward_done = true;
                    if r.is_err() { break End::Failed; }
                }
                _ = &mut cut => break End::Cut,
                _ = stopped(&mut stop) => break End::Stopped,
            }
            if forward_done && backward_done {
                break End::Closed;
            }
        }
    };
    if end != End::Closed {
        reset(&inbound);
        reset(&outbound);
    }
    let mut st = inner.lock();
    let stats = &mut st.endpoints[dst].stats;
    stats.open -= 1;
    if end == End::Cut {
        stats.cut += 1;
        debug_log(&format!("relay {dst}: cut {peer}"));
    }
}

/// Copies `from` to `to`, each chunk released after the links' delay and never before the
/// chunk ahead of it. `Ok` when `from` ended and the end was passed on; `Err` when either
/// side failed.
async fn pipe<R, W>(
    from: &mut R,
    to: &mut W,
    inner: &Inner,
    source: &Source,
    dst: usize,
    mut rng: Rng,
) -> Result<(), ()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(CHUNKS_IN_FLIGHT);
    // The reader owns the sender: when it ends, the writer sees the end of the chunks.
    let reader = async move {
        let mut last = Instant::now();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(_) => return Err(()),
            };
            let delay = {
                let st = inner.lock();
                let mut d = st.endpoints[dst].link.sample(&mut rng);
                if let Some(s) = source.node(&st) {
                    d += st.endpoints[s].link.sample(&mut rng);
                }
                d
            };
            let release = (Instant::now() + delay).max(last);
            last = release;
            if tx.send((release, buf[..n].to_vec())).await.is_err() {
                return Err(());
            }
        }
    };
    let writer = async move {
        while let Some((release, chunk)) = rx.recv().await {
            tokio::time::sleep_until(release).await;
            if to.write_all(&chunk).await.is_err() {
                return Err(());
            }
        }
        to.shutdown().await.map_err(|_| ())
    };
    tokio::pin!(reader, writer);
    let mut read_end = false;
    loop {
        tokio::select! {
            r = &mut reader, if !read_end => {
                // A failed read loses what is in flight, as a reset does.
                r?;
                read_end = true;
            }
            w = &mut writer => {
                w?;
                // The writer ends cleanly only after the reader has.
                return if read_end { Ok(()) } else { (&mut reader).await };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::wait_for;

    #[test]
    fn links_parse_print_and_bad_ones_say_why() {
        let l = LinkSettings::parse("30ms±5ms/1%").unwrap();
        assert_eq!(l.latency, Duration::from_millis(30));
        assert_eq!(l.jitter, Duration::from_millis(5));
        assert!((l.loss - 0.01).abs() < 1e-12);
        assert_eq!(l.to_string(), "30ms±5ms/1%");
        assert_eq!(LinkSettings::parse("1ms/7%").unwrap().to_string(), "1ms/7%");
        assert_eq!(
            LinkSettings::parse("30ms+-5ms").unwrap().to_string(),
            "30ms±5ms"
        );
        assert_eq!(
            LinkSettings::parse("1ms").unwrap(),
            LinkSettings::latency(Duration::from_millis(1))
        );
        assert_eq!(LinkSettings::parse("250us").unwrap().to_string(), "250us");
        assert_eq!(
            LinkSettings::parse("0.5s/50%").unwrap(),
            LinkSettings {
                latency: Duration::from_millis(500),
                jitter: Duration::ZERO,
                loss: 0.5
            }
        );
        for bad in [
            "",
            "30",
            "30 parsecs",
            "ms",
            "30ms±",
            "30ms/x%",
            "30ms/150%",
            "90s",
        ] {
            assert!(
                LinkSettings::parse(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn samples_stay_within_the_jitter_and_loss_adds_the_penalty() {
        let mut rng = Rng(7);
        let l = LinkSettings::parse("30ms±5ms").unwrap();
        for _ in 0..1000 {
            let d = l.sample(&mut rng);
            assert!(
                d >= Duration::from_millis(25) && d <= Duration::from_millis(35),
                "{d:?}"
            );
        }
        let lossy = LinkSettings::parse("10ms/100%").unwrap();
        assert_eq!(lossy.sample(&mut rng), Duration::from_millis(210));
        let half = LinkSettings::parse("0ms/50%").unwrap();
        let lost = (0..1000)
            .filter(|_| half.sample(&mut rng) == LOSS_PENALTY)
            .count();
        assert!((400..600).contains(&lost), "{lost} of 1000 lost at 50%");
    }

    /// An echo server on loopback; returns its address.
    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await?;
        Ok(got)
    }

    #[tokio::test]
    async fn a_relay_delays_both_ways_and_keeps_order() {
        let echo = echo_server().await;
        let fabric = Fabric::new();
        let link = LinkSettings {
            latency: Duration::from_millis(20),
            jitter: Duration::from_millis(10),
            loss: 0.0,
        };
        let i = fabric.add(link).await.unwrap();
        fabric.set_target(i, echo);
        let mut s = TcpStream::connect(fabric.relay_addr(i)).await.unwrap();
        // The round trip crosses the link twice: at least 2 × (20 - 10) ms.
        let start = std::time::Instant::now();
        assert_eq!(round_trip(&mut s, b"ping").await.unwrap(), b"ping");
        assert!(
            start.elapsed() >= Duration::from_millis(20),
            "{:?}",
            start.elapsed()
        );

        // Many small writes, each a chunk with its own jittered delay, come back in order.
        let (mut r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            for n in 0u32..200 {
                w.write_all(&n.to_be_bytes()).await.unwrap();
                if n % 20 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            w
        });
        let mut got = vec![0u8; 800];
        r.read_exact(&mut got).await.unwrap();
        let nums: Vec<u32> = got
            .chunks(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(nums, (0..200).collect::<Vec<_>>());
        drop(writer.await.unwrap());
        assert_eq!(fabric.stats(i).unknown_source, 1);
    }

    #[tokio::test]
    async fn loss_holds_chunks_for_a_retransmission_timeout() {
        let echo = echo_server().await;
        let fabric = Fabric::new();
        let i = fabric
            .add(LinkSettings::parse("0ms/100%").unwrap())
            .await
            .unwrap();
        fabric.set_target(i, echo);
        let mut s = TcpStream::connect(fabric.relay_addr(i)).await.unwrap();
        let start = std::time::Instant::now();
        assert_eq!(round_trip(&mut s, b"x").await.unwrap(), b"x");
        assert!(start.elapsed() >= 2 * LOSS_PENALTY, "{:?}", start.elapsed());
        // Settings change at run time: without loss the next chunk is not held.
        fabric.set_link(i, LinkSettings::NONE);
        assert_eq!(fabric.link(i), LinkSettings::NONE);
        assert_eq!(round_trip(&mut s, b"y").await.unwrap(), b"y");
    }

    #[tokio::test]
    async fn links_of_both_ends_add_up_when_the_source_is_known() {
        let echo = echo_server().await;
        let fabric = Fabric::new();
        // Node 0 is the echo server behind 10 ms; node 1 is "us", behind 40 ms, whose
        // outgoing connections come from the port of its listener.
        let server = fabric
            .add(LinkSettings::latency(Duration::from_millis(10)))
            .await
            .unwrap();
        fabric.set_target(server, echo);
        let client = fabric
            .add(LinkSettings::latency(Duration::from_millis(40)))
            .await
            .unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = socket.local_addr().unwrap().port();
        fabric.set_target(client, SocketAddr::from(([127, 0, 0, 1], port)));
        let mut s = socket.connect(fabric.relay_addr(server)).await.unwrap();
        let start = std::time::Instant::now();
        assert_eq!(round_trip(&mut s, b"hello").await.unwrap(), b"hello");
        assert!(
            start.elapsed() >= Duration::from_millis(100),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(fabric.stats(server).known_source, 1);
    }

    #[tokio::test]
    async fn a_relay_holds_connections_until_its_node_is_known() {
        let echo = echo_server().await;
        let fabric = Fabric::new();
        let i = fabric.add(LinkSettings::NONE).await.unwrap();
        let mut s = TcpStream::connect(fabric.relay_addr(i)).await.unwrap();
        s.write_all(b"early").await.unwrap();
        fabric.set_target(i, echo);
        let mut got = [0u8; 5];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"early");
    }

    /// Binds a socket whose port stands for a node's listen port and connects from it.
    async fn connect_from(port_of: &TcpListener, to: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(port_of.local_addr()?)?;
        socket.connect(to).await
    }

    fn reuse_listener() -> TcpListener {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.set_reuseport(true).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        socket.listen(16).unwrap()
    }

    /// Whether a fresh connection from `from` through relay `to` carries a round trip.
    async fn reaches(fabric: &Fabric, from: &TcpListener, to: usize) -> bool {
        match connect_from(from, fabric.relay_addr(to)).await {
            Ok(mut s) => round_trip(&mut s, b"?").await.is_ok(),
            Err(_) => false,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partition_cuts_across_and_heal_restores() {
        // Three "nodes": each an echo server behind a relay, identified by the port of a
        // listener that stands for its peer listener.
        let fabric = Fabric::new();
        let mut ports = Vec::new();
        for _ in 0..3 {
            let i = fabric.add(LinkSettings::NONE).await.unwrap();
            let echo = echo_server().await;
            let own = reuse_listener();
            fabric.set_target(i, echo);
            // The echo server stands for the node; its outgoing connections come from `own`.
            fabric.inner().lock().endpoints[i]
                .ports
                .push(own.local_addr().unwrap().port());
            ports.push(own);
        }
        // Open connections 0 -> 1 and 0 -> 2.
        let mut c01 = connect_from(&ports[0], fabric.relay_addr(1)).await.unwrap();
        let mut c02 = connect_from(&ports[0], fabric.relay_addr(2)).await.unwrap();
        assert!(round_trip(&mut c01, b"a").await.is_ok());
        assert!(round_trip(&mut c02, b"a").await.is_ok());

        fabric.partition(&[2]);
        assert_eq!(fabric.partitioned(), vec![2]);
        // The connection across is reset; the one on the same side lives on.
        let c02 = Arc::new(tokio::sync::Mutex::new(c02));
        wait_for(
            "the cut connection to fail",
            Duration::from_secs(10),
            || {
                let f = &fabric;
                let c = c02.clone();
                async move {
                    match round_trip(&mut *c.lock().await, b"b").await {
                        Err(_) => Ok(()),
                        Ok(_) => Err(format!("still open: {:?}", f.stats(2))),
                    }
                }
            },
        )
        .await
        .unwrap();
        assert!(round_trip(&mut c01, b"b").await.is_ok());
        assert_eq!(fabric.stats(2).cut, 1);
        // New connections across are refused both ways; within a side they work.
        drop(c01);
        let p = &ports;
        let f = &fabric;
        wait_for(
            "partitioned reachability",
            Duration::from_secs(10),
            || async move {
                let seen = (
                    reaches(f, &p[0], 2).await,
                    reaches(f, &p[2], 0).await,
                    reaches(f, &p[1], 0).await,
                );
                if seen == (false, false, true) {
                    Ok(())
                } else {
                    Err(format!("0->2, 2->0, 1->0: {seen:?}"))
                }
            },
        )
        .await
        .unwrap();
        // A source the relay cannot place is refused while the partition lasts.
        // (The reset may come before `connect` returns, or after.)
        let through = match TcpStream::connect(fabric.relay_addr(1)).await {
            Ok(mut anon) => round_trip(&mut anon, b"?").await.is_ok(),
            Err(_) => false,
        };
        assert!(!through);

        fabric.heal();
        wait_for(
            "healed reachability",
            Duration::from_secs(10),
            || async move {
                let seen = (reaches(f, &p[0], 2).await, reaches(f, &p[2], 0).await);
                if seen == (true, true) {
                    Ok(())
                } else {
                    Err(format!("0->2, 2->0: {seen:?}"))
                }
            },
        )
        .await
        .unwrap();
        let mut anon = TcpStream::connect(fabric.relay_addr(1)).await.unwrap();
        assert!(round_trip(&mut anon, b"?").await.is_ok());
    }

    #[tokio::test]
    async fn the_kernel_names_the_process_that_holds_a_socket() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = l.local_addr().unwrap();
        let s = TcpStream::connect(to).await.unwrap();
        let from = s.local_addr().unwrap();
        let me = std::process::id();
        assert_eq!(socket_owner(from, to, &[(3, 1), (7, me)]), Some(7));
        assert_eq!(socket_owner(to, from, &[(3, 1)]), None);
        // A relay with the pids places a connection from an unknown port.
        let echo = echo_server().await;
        let fabric = Fabric::new();
        let node = fabric.add(LinkSettings::NONE).await.unwrap();
        fabric.set_target(node, echo);
        let client = fabric.add(LinkSettings::NONE).await.unwrap();
        fabric.set_pid(client, Some(me));
        let mut c = TcpStream::connect(fabric.relay_addr(node)).await.unwrap();
        assert!(round_trip(&mut c, b"who").await.is_ok());
        assert_eq!(fabric.stats(node).known_source, 1);
    }

    #[tokio::test]
    async fn dropping_the_fabric_stops_its_relays() {
        let echo = echo_server().await;
        let fabric = Fabric::new();
        let i = fabric.add(LinkSettings::NONE).await.unwrap();
        fabric.set_target(i, echo);
        let addr = fabric.relay_addr(i);
        let mut open = TcpStream::connect(addr).await.unwrap();
        assert!(round_trip(&mut open, b"1").await.is_ok());
        drop(fabric);
        wait_for("the relay to stop", Duration::from_secs(10), || async {
            match TcpStream::connect(addr).await {
                Err(_) => Ok(()),
                Ok(_) => Err("still accepting".to_string()),
            }
        })
        .await
        .unwrap();
        assert!(round_trip(&mut open, b"2").await.is_err());
    }
}
