//! One MQTT connection: CONNECT, then one loop over packets in, deliveries out and the
//! acknowledgements of publishes committed.
//!
//! ```text
//!   read CONNECT (deadline) ─> auth ─> session (new / resumed) ─> CONNACK ─> resubscribe
//!   loop select:
//!     socket bytes ─> frame ─> decode ─> handle (publish, subscribe, puback, ...)
//!     deliveries (one queue for all the connection's subscriptions, bounded in bytes),
//!         taken only while fewer than the send window are unacknowledged
//!     publishes committed, in the order they came ─> PUBACK
//!     keep-alive deadline, a takeover, the node closing
//!   end ─> will (abnormal end), session record (disconnected at), subscriptions dropped
//! ```

use crate::codec::{self, Inbound, Outbound, Publish, ServerLimits, Version, Will};
use crate::records::{self, Retained, Session, SessionSub};
use crate::{Credentials, Mqtt, topics};
use bytes::{Bytes, BytesMut};
use canal_consensus::keys::{MQTT_SESSIONS, RETAINED};
use canal_consensus::{InternalKey, Op, Request, Transport};
use canal_proto::TopicFilter;
use canal_proto::time::now_ms;
use canal_pubsub::event::EventData;
use canal_pubsub::feed::{self, FeedRx, FeedTx, Weighed};
use canal_pubsub::{Delivery, PubSubError, PublishRequest, Qos, Qos0Link, SubscribeRequest};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

pub use crate::session::{CONTENT_TYPE_HEADER, EXPIRY_HEADER, FROM_HEADER, RETAIN_HEADER};

/// The longest client id accepted, bytes.
pub const MAX_CLIENT_ID_BYTES: usize = 256;

/// How many QoS 0 publishes of one connection wait to be handed on, in order; past it the
/// connection reads no more from its socket until one is (backpressure on the client).
const QOS0_QUEUE: usize = 64;

/// How often at most a connection reads its client id's owner record again (when its
/// group applied something): the bound on what watching for a takeover costs, and about
/// the time a takeover from another node takes once applied here.
const OWNER_CHECK_EVERY: Duration = Duration::from_millis(100);

/// An event's payload as a [`Bytes`] that shares the event's memory instead of copying it.
struct PayloadOf(Arc<EventData>);

impl AsRef<[u8]> for PayloadOf {
    fn as_ref(&self) -> &[u8] {
        &self.0.payload
    }
}

/// A message on its way to the client.
struct Msg {
    topic: String,
    payload: Bytes,
    qos: u8,
    retain: bool,
    headers: Vec<(String, String)>,
    time_ms: u64,
    offset: Option<u64>,
    sub: Arc<SubInfo>,
}

impl Weighed for Msg {
    fn weight(&self) -> usize {
        64 + self.topic.len() + self.payload.len()
    }
}

/// What a delivery needs to know of the subscription it came through.
#[derive(Debug)]
struct SubInfo {
    rec: SessionSub,
    filter: TopicFilter,
    durable: Option<String>,
    /// For `$share/G/F`: the members' record prefix and this client's id.
    share: Option<(String, String)>,
}

/// A running subscription: the tasks that forward its canal subscriptions.
struct Sub {
    rec: SessionSub,
    tasks: Vec<JoinHandle<()>>,
    /// What ending it takes besides the tasks (leaving a share group).
    on_drop: Option<Box<dyn FnOnce() + Send>>,
}

impl Drop for Sub {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(f) = self.on_drop.take() {
            f();
        }
    }
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// DISCONNECT 0: no will.
    Normal,
    /// DISCONNECT 4: with will.
    WithWill,
    /// Anything else (socket closed, error, keep-alive, the node closing): the will is sent.
    Abnormal,
    /// A newer connection of the same client took the session over: it carries on with
    /// the session (and the will), so this one leaves both alone.
    TakenOver,
}

/// What one inbound packet leads to.
enum Next {
    Go,
    /// Close, sending a 5.0 DISCONNECT with this reason first (unless `None`).
    Close(Option<u8>, End),
}

struct Conn<T: Transport, L: Qos0Link> {
    mqtt: Mqtt<T, L>,
    version: Version,
    client_id: String,
    session: Option<Session>,
    will: Option<Will>,
    out: BytesMut,
    subs: BTreeMap<String, Sub>,
    tx: Arc<FeedTx<Msg>>,
    inflight_out: HashMap<u16, Option<(String, String, u64)>>,
    next_pkid: u16,
    window: usize,
    client_max_packet: Option<u32>,
    aliases: crate::session::Aliases,
    publishes: FuturesOrdered<BoxFuture<'static, (u16, u8)>>,
    /// QoS 0 publishes on their way, handed on one after another by a task of their own.
    qos0: mpsc::Sender<BoxFuture<'static, u8>>,
    keep_alive: Option<Duration>,
    rx: Option<FeedRx<Msg>>,
    /// This connection's number among the node's, and the signal that a newer connection
    /// of the same client took over (taken by [`run`]).
    takeover: Option<(u64, watch::Receiver<bool>)>,
    /// What the client may publish and subscribe to (decided at CONNECT).
    rights: Arc<dyn crate::Rights>,
    /// This connection's id in its client id's owner record, and the log index of the
    /// write that made it the owner (`None` if that write failed: no takeover from other
    /// nodes is seen then).
    owner: Option<(String, u64)>,
}

/// Serves one connection until it ends.
pub(crate) async fn run<T, L, S>(mqtt: Mqtt<T, L>, io: S, peer: String)
where
    T: Transport,
    L: Qos0Link,
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut buf = BytesMut::with_capacity(4096);
    let cfg = mqtt.config.clone();
    let first = tokio::time::timeout(
        cfg.connect_timeout,
        read_connect(&mut rd, &mut buf, cfg.max_packet_bytes),
    )
    .await;
    let (version, connect) = match first {
        Err(_) => {
            mqtt.metrics.refuse("connect_timeout");
            tracing::debug!(%peer, "MQTT connection sent no CONNECT in time");
            return;
        }
        Ok(Err(e)) => {
            let reason = match &e {
                codec::DecodeError::Protocol { .. } => "protocol",
                codec::DecodeError::TooLarge { .. } => "too_large",
                codec::DecodeError::NotConnect(_) => "not_connect",
                _ => "malformed",
            };
            mqtt.metrics.refuse(reason);
            tracing::info!(%peer, error = %e, "MQTT connection refused before CONNECT");
            if let codec::DecodeError::Protocol { level, .. } = e {
                // Told in the version it asked for where there is one; else 3.1.1's code.
                let v = if level == 5 {
                    Version::V5
                } else {
                    Version::V311
                };
                let mut out = BytesMut::new();
                let _ = codec::encode(v, &connack(false, 0x84, ServerLimits::default()), &mut out);
                let _ = wr.write_all(&out).await;
            }
            return;
        }
        Ok(Ok(c)) => c,
    };
    mqtt.metrics.packet("connect", true);
    let Some(mut conn) = accept(&mqtt, version, *connect, &mut wr, &peer).await else {
        return;
    };
    let (conn_id, mut taken_over) = match conn.takeover.take() {
        Some(t) => t,
        None => return,
    };
    mqtt.metrics.connections.inc();
    let watcher = conn.owner.clone().map(|(tag, index)| {
        tokio::spawn(watch_owner(
            mqtt.clone(),
            conn.client_id.clone(),
            conn_id,
            tag,
            index,
        ))
    });
    let end = conn.serve(&mut rd, &mut wr, buf, &mut taken_over).await;
    if let Some(w) = watcher {
        w.abort();
    }
    mqtt.metrics.connections.dec();
    forget(&mqtt, &conn.client_id, conn_id);
    conn.finish(end).await;
}

async fn read_connect<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    limit: usize,
) -> Result<(Version, Box<codec::Connect>), codec::DecodeError> {
    loop {
        if let Some(f) = codec::frame(buf, limit)? {
            let v = codec::connect_version(&f, buf)?;
            return match codec::decode(v, &f, buf)? {
                Inbound::Connect(c) => Ok((v, c)),
                _ => Err(codec::DecodeError::NotConnect(f.kind)),
            };
        }
        match rd.read_buf(buf).await {
            Ok(0) | Err(_) => {
                return Err(codec::DecodeError::Malformed {
                    what: "CONNECT",
                    why: "the connection closed before a whole CONNECT came".into(),
                });
            }
            Ok(_) => {}
        }
    }
}

/// Closes connection `id` of `client` once its owner record names another connection: a
/// CONNECT with the same client id on another node (or this one) took the session over.
/// It reads the record when the group applied something, at most every
/// [`OWNER_CHECK_EVERY`], and only after this replica applied the connection's own claim.
async fn watch_owner<T: Transport, L: Qos0Link>(
    mqtt: Mqtt<T, L>,
    client: String,
    id: u64,
    tag: String,
    index: u64,
) {
    let group = canal_consensus::routing::mqtt_records();
    let Ok(sm) = mqtt.pubsub.consensus().state_machine(group) else {
        return;
    };
    let mut applied = sm.watch_applied();
    if applied.wait_for(|i| *i >= index).await.is_err() {
        return;
    }
    let key = records::owner_key(&client);
    loop {
        let stored = sm.record(&MQTT_SESSIONS, &key).ok().flatten();
        if records::taken_over(stored.as_deref(), &tag) {
            tracing::info!(%client, "MQTT session taken over by a newer connection elsewhere; closing");
            let l = mqtt.lock();
            if let Some((i, stop)) = l.conns.get(&client)
                && *i == id
            {
                let _ = stop.send(true);
            }
            return;
        }
        if applied.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(OWNER_CHECK_EVERY).await;
    }
}

/// How long a CONNECT waits for the older connection of its client id to write its
/// session's end (a node that died never does: then the session is taken as it is).
const SESSION_END_WAIT: Duration = Duration::from_secs(2);

/// `client`'s session once its older connection wrote the end of it (or removed it), read
/// through the leader; `None` if that did not happen within [`SESSION_END_WAIT`] (or the
/// session is gone). Waits on the group's applies, not on a timer.
async fn await_session_end<T: Transport, L: Qos0Link>(
    mqtt: &Mqtt<T, L>,
    client: &str,
) -> Option<Session> {
    let group = canal_consensus::routing::mqtt_records();
    let consensus = mqtt.pubsub.consensus();
    let sm = consensus.state_machine(group).ok()?;
    let mut applied = sm.watch_applied();
    let deadline = tokio::time::Instant::now() + SESSION_END_WAIT;
    loop {
        let local: Option<Session> = sm
            .record(&MQTT_SESSIONS, client)
            .ok()
            .flatten()
            .and_then(|b| records::decode(&b).ok());
        if local.as_ref().is_none_or(|s| s.disconnected_ms.is_some()) {
            break;
        }
        match tokio::time::timeout_at(deadline, applied.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return None,
            Err(_) => {
                tracing::info!(%client, "MQTT CONNECT goes on without the older connection's session end");
                return None;
            }
        }
    }
    consensus
        .read_record(group, &MQTT_SESSIONS, client, true)
        .await
        .ok()
        .flatten()
        .and_then(|b| records::decode(&b).ok())
}

/// Makes connection `tag` the owner of `client` cluster-wide: the log index of the write.
async fn claim<T: Transport, L: Qos0Link>(
    mqtt: &Mqtt<T, L>,
    client: &str,
    tag: &str,
) -> Result<u64, String> {
    let owner = records::Owner {
        conn: tag.to_string(),
    };
    let value = records::encode(&owner).map_err(|e| e.to_string())?;
    mqtt.pubsub
        .consensus()
        .write_batched(
            canal_consensus::routing::mqtt_records(),
            Request {
                id: None,
                op: Op::Internal {
                    key: InternalKey::MqttSession(records::owner_key(client)),
                    value: Some(value),
                },
            },
        )
        .await
        .map(|r| r.index)
        .map_err(|e| e.to_string())
}

/// Removes `client`'s owner record if this replica still has connection `tag` in it (a
/// newer connection's claim that comes in between is removed too; its connection then
/// just sees no takeover, and the next CONNECT claims again).
async fn release<T: Transport, L: Qos0Link>(mqtt: &Mqtt<T, L>, client: &str, tag: &str) {
    remove_record_if::<_, _, records::Owner>(
        mqtt,
        client,
        records::owner_key(client),
        "owner",
        |o| o.conn == tag,
    )
    .await;
}

/// Removes `client`'s session record `key` (a `what` record, decoding as `R`) if this
/// replica's copy still passes `mine`.
async fn remove_record_if<T: Transport, L: Qos0Link, R: serde::de::DeserializeOwned>(
    mqtt: &Mqtt<T, L>,
    client: &str,
    key: String,
    what: &str,
    mine: impl Fn(&R) -> bool,
) {
    let group = canal_consensus::routing::mqtt_records();
    let still = mqtt
        .pubsub
        .consensus()
        .state_machine(group)
        .ok()
        .and_then(|sm| sm.record(&MQTT_SESSIONS, &key).ok().flatten())
        .and_then(|b| records::decode::<R>(&b).ok())
        .is_some_and(|r| mine(&r));
    if !still {
        return;
    }
    let r = mqtt
        .pubsub
        .consensus()
        .write_batched(
            group,
            Request {
                id: None,
                op: Op::Internal {
                    key: InternalKey::MqttSession(key),
                    value: None,
                },
            },
        )
        .await;
    if let Err(e) = r {
        tracing::debug!(%client, error = %e, "MQTT {what} record not removed");
    }
}

/// Forgets connection `id` of `client` (refused after it was registered).
fn forget<T: Transport, L: Qos0Link>(mqtt: &Mqtt<T, L>, client: &str, id: u64) {
    let mut l = mqtt.lock();
    if l.conns.get(client).is_some_and(|(i, _)| *i == id) {
        l.conns.remove(client);
    }
}

fn connack(session_present: bool, code: u8, limits: ServerLimits) -> Outbound {
    Outbound::ConnAck {
        session_present,
        code,
        limits: Box::new(limits),
    }
}

/// Checks a CONNECT, sets up the session and answers CONNACK; `None` if refused.
async fn accept<T: Transport, L: Qos0Link, W: AsyncWrite + Unpin>(
    mqtt: &Mqtt<T, L>,
    version: Version,
    c: codec::Connect,
    wr: &mut W,
    peer: &str,
) -> Option<Conn<T, L>> {
    let cfg = mqtt.config.clone();
    let refuse = |code: u8, reason: &str, why: String| {
        mqtt.metrics.refuse(reason);
        tracing::info!(%peer, client = %c.client_id, code, "MQTT CONNECT refused: {why}");
        let mut out = BytesMut::new();
        let _ = codec::encode(
            version,
            &connack(false, code, ServerLimits::default()),
            &mut out,
        );
        mqtt.metrics.packet("connack", false);
        out
    };
    let rights = match check_connect(mqtt, &c) {
        Ok(r) => r,
        Err((code, reason, why)) => {
            let out = refuse(code, reason, why);
            let _ = wr.write_all(&out).await;
            return None;
        }
    };
    let mut assigned = None;
    let client_id = if c.client_id.is_empty() {
        let id = canal_proto::time::fresh_id("mqtt");
        assigned = Some(id.clone());
        id
    } else {
        c.client_id.clone()
    };
    // An older connection of this client on this node ends now, before the session is
    // read, and its pending will with it.
    let takeover = {
        let mut l = mqtt.lock();
        l.next += 1;
        let id = l.next;
        let (stop, taken) = watch::channel(false);
        if let Some((_, old)) = l.conns.insert(client_id.clone(), (id, stop)) {
            let _ = old.send(true);
        }
        if let Some(will) = l.wills.remove(&client_id) {
            will.abort();
        }
        (id, taken)
    };
    // On every node: a connection of this client id elsewhere sees this claim and closes.
    let tag = canal_proto::time::fresh_id("conn");
    let owner = match claim(mqtt, &client_id, &tag).await {
        Ok(index) => Some((tag, index)),
        Err(e) => {
            tracing::warn!(client = %client_id, error = %e, "MQTT connection not claimed cluster-wide: an older one on another node stays");
            None
        }
    };
    let persistent = c.session_expiry_s > 0;
    let consensus = mqtt.pubsub.consensus();
    let group = canal_consensus::routing::mqtt_records();
    // Through the leader: the session may have been written on another node just now.
    let stored: Option<Session> = match consensus
        .read_record(group, &MQTT_SESSIONS, &client_id, true)
        .await
    {
        Ok(b) => b.and_then(|b| records::decode(&b).ok()),
        Err(e) => {
            let out = refuse(0x88, "no_leader", format!("cannot read the session: {e}"));
            let _ = wr.write_all(&out).await;
            forget(mqtt, &client_id, takeover.0);
            return None;
        }
    };
    // A session still connected is held by an older connection (here or on another node)
    // that is ending now, having seen the claim: its end is written first, so that it
    // cannot land on top of what this connection writes (or removes).
    let stored = match stored {
        Some(s) if s.disconnected_ms.is_none() => {
            await_session_end(mqtt, &client_id).await.or(Some(s))
        }
        other => other,
    };
    let had_record = stored.is_some();
    let now = now_ms();
    let resumed = match stored {
        Some(s) if !c.clean_start && persistent && !s.expired(now) => Some(s),
        _ => None,
    };
    let session_present = resumed.is_some();
    let session = if persistent {
        let mut s = resumed.unwrap_or_else(|| Session {
            epoch: canal_proto::time::fresh_id("s"),
            subs: Vec::new(),
            expiry_s: c.session_expiry_s,
            disconnected_ms: None,
        });
        s.expiry_s = c.session_expiry_s;
        s.disconnected_ms = None;
        if let Err(e) = write_session(mqtt, &client_id, Some(&s)).await {
            let out = refuse(0x88, "no_leader", format!("cannot store the session: {e}"));
            let _ = wr.write_all(&out).await;
            forget(mqtt, &client_id, takeover.0);
            return None;
        }
        Some(s)
    } else {
        // A clean, non-persistent session ends any stored one.
        if had_record && let Err(e) = write_session(mqtt, &client_id, None).await {
            // Left standing, it would be resumed by a later persistent CONNECT.
            tracing::warn!(client = %client_id, error = %e, "a clean start could not remove the stored session");
        }
        None
    };
    let window = usize::from(c.receive_maximum.min(cfg.max_inflight_out).max(1));
    let slot = match Arc::new(Semaphore::new(1)).try_acquire_owned() {
        Ok(s) => s,
        Err(_) => {
            forget(mqtt, &client_id, takeover.0);
            return None;
        }
    };
    let (tx, rx) = feed::feed::<Msg>(slot);
    let (qos0, mut qos0_rx) = mpsc::channel::<BoxFuture<'static, u8>>(QOS0_QUEUE);
    // In order, as the client sent them; it ends with the connection's sender.
    tokio::spawn(async move {
        while let Some(work) = qos0_rx.recv().await {
            work.await;
        }
    });
    let mut conn = Conn {
        mqtt: mqtt.clone(),
        version,
        client_id,
        session,
        will: c.will,
        out: BytesMut::with_capacity(8192),
        subs: BTreeMap::new(),
        tx: Arc::new(tx),
        inflight_out: HashMap::new(),
        next_pkid: 0,
        window,
        client_max_packet: c.max_packet_size,
        aliases: crate::session::Aliases::new(cfg.topic_alias_max),
        publishes: FuturesOrdered::new(),
        qos0,
        keep_alive: (c.keep_alive > 0)
            .then(|| Duration::from_millis(u64::from(c.keep_alive) * 1500)),
        rx: None,
        takeover: Some(takeover),
        rights,
        owner,
    };
    let limits = ServerLimits {
        receive_maximum: cfg.max_inflight_in,
        max_packet_size: u32::try_from(cfg.max_packet_bytes).unwrap_or(u32::MAX),
        topic_alias_max: cfg.topic_alias_max,
        assigned_client_id: assigned,
        session_expiry_s: None,
    };
    if let Some((tag, _)) = &conn.owner {
        // Replicated, so a live node sends it if this one dies.
        let delay = match (&conn.will, &conn.session) {
            (Some(w), Some(s)) => w.delay_s.min(s.expiry_s),
            _ => 0,
        };
        store_will(mqtt, &conn.client_id, tag, conn.will.as_ref(), delay).await;
    }
    conn.push(connack(session_present, 0, limits));
    if let Some(s) = conn.session.clone() {
        if !s.subs.is_empty() {
            catch_up(
                mqtt.pubsub.consensus(),
                &conn.client_id,
                s.subs
                    .iter()
                    .filter_map(|r| topics::filter(&r.filter).ok().map(|f| f.filter.to_string())),
            )
            .await;
        }
        for rec in s.subs {
            // The session may have been made under a token with more rights than this one.
            if let Ok(f) = topics::filter(&rec.filter)
                && let Err(why) = conn.rights.may_subscribe(&f.filter)
            {
                mqtt.metrics.refuse("not_authorized");
                tracing::warn!(client = %conn.client_id, filter = %rec.filter, "a persistent session's subscription is not resumed: {why}");
                continue;
            }
            if let Err(code) = conn.start_sub(rec.clone(), false).await {
                tracing::warn!(client = %conn.client_id, filter = %rec.filter, code, "a persistent session's subscription did not resume");
            }
        }
    }
    conn.rx = Some(rx);
    Some(conn)
}

/// The checks of a CONNECT before anything is stored: `(5.0 code, refusal reason, why)`.
fn check_connect<T: Transport, L: Qos0Link>(
    mqtt: &Mqtt<T, L>,
    c: &codec::Connect,
) -> Result<Arc<dyn crate::Rights>, (u8, &'static str, String)> {
    if c.client_id.is_empty() && !c.clean_start && c.version == Version::V311 {
        return Err((
            0x85,
            "client_id",
            "an empty client id needs clean session = 1".into(),
        ));
    }
    if c.client_id.len() > MAX_CLIENT_ID_BYTES
        || c.client_id.chars().any(char::is_control)
        || c.client_id.starts_with('$')
    {
        return Err((
            0x85,
            "client_id",
            format!(
                "client id {:?} is not allowed: at most {MAX_CLIENT_ID_BYTES} bytes, no control characters, not starting with `$`",
                c.client_id
            ),
        ));
    }
    if let Some(w) = &c.will {
        if let Err(e) = topics::topic(&w.topic) {
            return Err((0x90, "topic_invalid", format!("will topic: {e}")));
        }
        if w.qos > 1 && c.version == Version::V5 {
            return Err((0x9B, "qos2", "a will of QoS 2: the most is QoS 1".into()));
        }
    }
    let rights = mqtt
        .auth
        .check(Credentials {
            client_id: &c.client_id,
            username: c.username.as_deref(),
            password: c.password.as_deref(),
        })
        .map_err(|e| match e {
            crate::AuthRefused::BadCredentials(_) => (0x86, "not_authorized", e.to_string()),
            crate::AuthRefused::NotAuthorized(_) => (0x87, "not_authorized", e.to_string()),
        })?;
    // A will is a publish the client leaves behind: it needs the same right.
    if let Some(w) = &c.will
        && let Ok(t) = topics::topic(&w.topic)
        && let Err(why) = rights.may_publish(&t)
    {
        return Err((0x87, "not_authorized", format!("will topic: {why}")));
    }
    Ok(rights)
}

/// Writes (or with `None` removes) `client`'s session record.
async fn write_session<T: Transport, L: Qos0Link>(
    mqtt: &Mqtt<T, L>,
    client: &str,
    s: Option<&Session>,
) -> Result<(), String> {
    let value = match s {
        Some(s) => Some(records::encode(s).map_err(|e| e.to_string())?),
        None => None,
    };
    mqtt.pubsub
        .consensus()
        .write(
            canal_consensus::routing::mqtt_records(),
            Request {
                id: None,
                op: Op::Internal {
                    key: InternalKey::MqttSession(client.to_string()),
                    value,
                },
            },
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Joins (renews) or leaves a share group: the member record named `key`.
async fn write_member<T: Transport>(
    consensus: &canal_consensus::Consensus<T>,
    prefix: &str,
    me: &str,
    join: bool,
) -> Result<(), String> {
    let key = format!("{prefix}{me}");
    let value = if join {
        let m = crate::share::Member {
            lease_until_ms: now_ms() + crate::share::LEASE_MS,
        };
        Some(records::encode(&m).map_err(|e| e.to_string())?)
    } else {
        None
    };
    consensus
        .write_batched(
            canal_consensus::routing::mqtt_records(),
            Request {
                id: None,
                op: Op::Internal {
                    key: InternalKey::MqttSession(key),
                    value,
                },
            },
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The live members of the share group whose records start with `prefix`, as this replica
/// has them.
fn read_members<T: Transport>(
    consensus: &canal_consensus::Consensus<T>,
    prefix: &str,
) -> Vec<String> {
    let group = canal_consensus::routing::mqtt_records();
    let Ok(sm) = consensus.state_machine(group) else {
        return Vec::new();
    };
    let Ok(all) = sm.scan_table(&MQTT_SESSIONS) else {
        return Vec::new();
    };
    let records: Vec<(String, Vec<u8>)> = all
        .into_iter()
        .filter(|(name, _)| name.starts_with(prefix))
        .collect();
    crate::share::live(&records, prefix, now_ms())
}

/// Writes (or with an empty payload clears) `topic`'s retained message.
async fn write_retained<T: Transport, L: Qos0Link>(
    pubsub: &canal_pubsub::PubSub<T, L>,
    topic: &str,
    r: Retained,
) -> Result<(), String> {
    let value = if r.payload.is_empty() {
        None
    } else {
        Some(records::encode(&r).map_err(|e| e.to_string())?)
    };
    pubsub
        .consensus()
        .write_batched(
            canal_consensus::routing::mqtt_records(),
            Request {
                id: None,
                op: Op::Internal {
                    key: InternalKey::Retained(topic.to_string()),
                    value,
                },
            },
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Starts a QoS 1 publish (its retained message first, if it carries one) and returns its
/// PUBACK reason to await: on its way when this returns, so publishes started one after
/// another are stored in that order.
async fn start_qos1<T: Transport, L: Qos0Link>(
    pubsub: canal_pubsub::PubSub<T, L>,
    client: String,
    topic: String,
    retained: Option<Retained>,
    req: PublishRequest,
) -> BoxFuture<'static, u8> {
    if let Some(r) = retained
        && let Err(e) = write_retained(&pubsub, &topic, r).await
    {
        tracing::warn!(%client, %topic, error = %e, "MQTT retained message not stored");
        return Box::pin(futures::future::ready(0x80));
    }
    let refused = move |e: PubSubError| {
        tracing::warn!(%client, %topic, error = %e, "MQTT publish refused");
        puback_reason(&e)
    };
    match pubsub.start_publish(req).await {
        Ok(answer) => Box::pin(async move {
            match answer.await {
                Ok(_) => 0,
                Err(e) => refused(e),
            }
        }),
        Err(e) => Box::pin(futures::future::ready(refused(e))),
    }
}

/// The 5.0 PUBACK reason for a publish canal refused.
fn puback_reason(e: &PubSubError) -> u8 {
    match e.kind() {
        "invalid_topic" => 0x90,
        "too_large" => 0x97,
        "too_many_subscribers" => 0x97,
        _ => 0x80,
    }
}

/// The 5.0 SUBACK reason for a subscription canal refused.
fn suback_reason(e: &PubSubError) -> u8 {
    match e.kind() {
        "invalid_filter" => 0x8F,
        "too_many_subscribers" => 0x97,
        _ => 0x80,
    }
}

fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// How many messages a canal `lagged` notice says were missed: `{"dropped":N}` (QoS 0) or a
/// gap `{"from":F,"to":T}` (QoS 1); 1 for a notice of another shape.
fn missed_count(notice: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(notice).unwrap_or_default();
    if let Some(n) = v.get("dropped").and_then(|n| n.as_u64()) {
        return n;
    }
    match (
        v.get("from").and_then(|n| n.as_u64()),
        v.get("to").and_then(|n| n.as_u64()),
    ) {
        (Some(f), Some(t)) => t.saturating_sub(f),
        _ => 1,
    }
}

/// Forwards one canal subscription's deliveries to the connection's queue.
async fn forward<T: Transport>(
    mut rx: FeedRx<Delivery>,
    info: Arc<SubInfo>,
    tx: Arc<FeedTx<Msg>>,
    consensus: canal_consensus::Consensus<T>,
    missed: prometheus_client::metrics::counter::Counter,
) {
    // A shared subscription's members, read again at most this often.
    const MEMBERS_EVERY: Duration = Duration::from_millis(500);
    let mut members: Vec<String> = Vec::new();
    let mut members_at: Option<Instant> = None;
    while let Some(d) = rx.recv().await {
        let e = match d {
            Delivery::Message { event, .. } => event,
            Delivery::Lagged(notice) => {
                missed.inc_by(missed_count(&notice));
                continue;
            }
        };
        // canal's filter matched already; MQTT's `$` rule is stricter.
        let Ok(topic) = canal_proto::Topic::new(&e.topic) else {
            continue;
        };
        if !topics::matches(&info.filter, &topic) {
            continue;
        }
        if let Some((prefix, me)) = &info.share {
            if members_at.is_none_or(|at| at.elapsed() >= MEMBERS_EVERY) {
                members = read_members(&consensus, prefix);
                members_at = Some(Instant::now());
            }
            let offset = e.offset.map(u64::to_be_bytes);
            let key: Vec<&[u8]> = match &offset {
                Some(o) => vec![e.topic.as_bytes(), o],
                None => vec![e.id.as_bytes()],
            };
            if !crate::share::mine(&members, me, &key) {
                continue;
            }
        }
        let m = Msg {
            topic: e.topic.clone(),
            qos: e.qos().min(info.rec.qos),
            retain: false,
            headers: e.headers.clone(),
            time_ms: e.time_ms,
            offset: e.offset,
            sub: info.clone(),
            payload: Bytes::from_owner(PayloadOf(e)),
        };
        if tx.send(m).await.is_err() {
            return;
        }
    }
}

impl<T: Transport, L: Qos0Link> Conn<T, L> {
    fn push(&mut self, p: Outbound) {
        // 3.1.1 has no server DISCONNECT: the connection is just closed.
        if !(self.version == Version::V311 && matches!(p, Outbound::Disconnect { .. })) {
            self.mqtt.metrics.packet(p.kind(), false);
        }
        if let Err(e) = codec::encode(self.version, &p, &mut self.out) {
            tracing::warn!(client = %self.client_id, error = %e, "MQTT packet not written");
        }
    }

    fn persistent(&self) -> bool {
        self.session.is_some()
    }

    /// Starts subscription `rec` (replacing one on the same filter): `Err` with the 5.0
    /// reason code if refused. Retained messages are sent unless `retained` is false.
    async fn start_sub(&mut self, rec: SessionSub, retained: bool) -> Result<u8, u8> {
        let f = topics::filter(&rec.filter).map_err(|e| {
            tracing::warn!(client = %self.client_id, filter = %rec.filter, "MQTT subscription refused: {e}");
            0x8F
        })?;
        let replaced = self.subs.remove(&rec.filter).is_some();
        let share = f.share.as_ref().map(|g| {
            (
                crate::share::prefix(g, f.filter.as_str()),
                self.client_id.clone(),
            )
        });
        if let Some((prefix, me)) = &share
            && let Err(e) = write_member(self.mqtt.pubsub.consensus(), prefix, me, true).await
        {
            tracing::warn!(client = %self.client_id, filter = %rec.filter, error = %e, "MQTT shared subscription refused: membership not stored");
            return Err(0x80);
        }
        // A shared subscription is read from now on by whichever members are connected; it
        // keeps no cursor of its own.
        let durable = match &self.session {
            Some(s) if rec.qos == 1 && share.is_none() => Some(records::durable_name(
                &self.client_id,
                &s.epoch,
                &rec.filter,
            )),
            _ => None,
        };
        let info = Arc::new(SubInfo {
            rec: rec.clone(),
            filter: f.filter.clone(),
            durable: durable.clone(),
            share: share.clone(),
        });
        let now = rfc3339_ms(now_ms());
        // One canal subscription: the committed log (QoS 1 publishes) and, in the same
        // queue, the node's hub (QoS 0 publishes).
        let req = SubscribeRequest {
            filter: Some(f.filter.to_string()),
            qos: Some("1".into()),
            // From now, not `latest`: a publish right after SUBACK must not be missed while
            // the subscription's first read is still to come.
            from: Some(now),
            ack_timeout: durable.as_ref().map(|_| "1h".to_string()),
            durable,
            ..SubscribeRequest::default()
        };
        let rx = self.mqtt.pubsub.subscribe_with_qos0(&req).await.map_err(|e| {
            tracing::warn!(client = %self.client_id, filter = %rec.filter, "MQTT subscription refused: {e}");
            suback_reason(&e)
        })?;
        let consensus = self.mqtt.pubsub.consensus().clone();
        let mut tasks = vec![tokio::spawn(forward(
            rx,
            info.clone(),
            self.tx.clone(),
            consensus.clone(),
            self.mqtt.metrics.missed.clone(),
        ))];
        let mut on_drop: Option<Box<dyn FnOnce() + Send>> = None;
        if let Some((prefix, me)) = share.clone() {
            let (c, p, m) = (consensus.clone(), prefix.clone(), me.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(crate::share::RENEW_MS)).await;
                    if let Err(e) = write_member(&c, &p, &m, true).await {
                        tracing::debug!(error = %e, "shared subscription lease not renewed");
                    }
                }
            }));
            on_drop = Some(Box::new(move || {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        let _ = write_member(&consensus, &prefix, &me, false).await;
                    });
                }
            }));
        }
        let send_retained =
            retained && (rec.retain_handling == 0 || (rec.retain_handling == 1 && !replaced));
        if send_retained {
            tasks.push(tokio::spawn(send_retained_msgs(
                self.mqtt.pubsub.consensus().clone(),
                info.clone(),
                self.tx.clone(),
            )));
        }
        self.subs.insert(
            rec.filter.clone(),
            Sub {
                rec,
                tasks,
                on_drop,
            },
        );
        Ok(info.rec.qos)
    }

    async fn save_session(&mut self) {
        let Some(s) = &mut self.session else { return };
        s.subs = self.subs.values().map(|s| s.rec.clone()).collect();
        let s = s.clone();
        if let Err(e) = write_session(&self.mqtt, &self.client_id, Some(&s)).await {
            tracing::warn!(client = %self.client_id, error = %e, "MQTT session not stored");
        }
    }

    /// The main loop; returns how the connection ended.
    async fn serve<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        &mut self,
        rd: &mut R,
        wr: &mut W,
        mut buf: BytesMut,
        taken_over: &mut watch::Receiver<bool>,
    ) -> End {
        let mut rx = match self.rx.take() {
            Some(rx) => rx,
            None => return End::Abnormal,
        };
        let mut closing = self.mqtt.closing.clone();
        let mut last_in = Instant::now();
        // Whatever came after CONNECT in the same read.
        let first = self.handle_buffer(&mut buf).await;
        if let Next::Close(reason, end) = first {
            self.close(wr, reason).await;
            return end;
        }
        loop {
            if !self.out.is_empty() {
                if wr.write_all(&self.out).await.is_err() {
                    return End::Abnormal;
                }
                self.out.clear();
            }
            let can_send = self.inflight_out.len() < self.window;
            let qos0_full = self.qos0.capacity() == 0;
            let qos0 = self.qos0.clone();
            let can_read =
                self.publishes.len() < usize::from(self.mqtt.config.max_inflight_in) && !qos0_full;
            let deadline = self.keep_alive.map(|k| last_in + k);
            tokio::select! {
                r = rd.read_buf(&mut buf), if can_read => {
                    match r {
                        Ok(0) | Err(_) => return End::Abnormal,
                        Ok(_) => {}
                    }
                    last_in = Instant::now();
                    if let Next::Close(reason, end) = self.handle_buffer(&mut buf).await {
                        self.close(wr, reason).await;
                        return end;
                    }
                }
                m = rx.recv_many(64), if can_send => {
                    let Some(ms) = m else { return End::Abnormal };
                    for m in ms {
                        self.deliver(m);
                    }
                }
                Some((pkid, reason)) = self.publishes.next(), if !self.publishes.is_empty() => {
                    self.push(Outbound::PubAck { pkid, reason });
                    if self.version == Version::V311 && reason != 0 {
                        // 3.1.1 has no way to say a publish failed but to close.
                        self.mqtt.metrics.refuse("publish_failed");
                        self.close(wr, None).await;
                        return End::Abnormal;
                    }
                }
                // Room for QoS 0 publishes again: the socket is read from again.
                _ = qos0.reserve(), if qos0_full => {}
                _ = sleep_until(deadline) => {
                    self.mqtt.metrics.refuse("keep_alive");
                    tracing::info!(client = %self.client_id, "MQTT keep-alive passed without a packet; closing");
                    self.close(wr, Some(0x8D)).await;
                    return End::Abnormal;
                }
                _ = crate::until_true(taken_over) => {
                    self.close(wr, Some(0x8E)).await;
                    return End::TakenOver;
                }
                _ = crate::until_true(&mut closing) => {
                    self.close(wr, Some(0x8B)).await;
                    return End::Abnormal;
                }
            }
        }
    }

    async fn close<W: AsyncWrite + Unpin>(&mut self, wr: &mut W, reason: Option<u8>) {
        if let Some(reason) = reason {
            self.push(Outbound::Disconnect { reason });
        }
        let _ = wr.write_all(&self.out).await;
        self.out.clear();
        let _ = wr.shutdown().await;
    }

    /// Handles every whole packet in `buf`.
    async fn handle_buffer(&mut self, buf: &mut BytesMut) -> Next {
        loop {
            let f = match codec::frame(buf, self.mqtt.config.max_packet_bytes) {
                Ok(Some(f)) => f,
                Ok(None) => return Next::Go,
                Err(e) => {
                    let (reason, code) = match e {
                        codec::DecodeError::TooLarge { .. } => ("too_large", 0x95),
                        _ => ("malformed", 0x81),
                    };
                    self.mqtt.metrics.refuse(reason);
                    tracing::info!(client = %self.client_id, "MQTT packet refused: {e}");
                    return Next::Close(Some(code), End::Abnormal);
                }
            };
            let p = match codec::decode(self.version, &f, buf) {
                Ok(p) => p,
                Err(e) => {
                    self.mqtt.metrics.refuse("malformed");
                    tracing::info!(client = %self.client_id, "MQTT packet refused: {e}");
                    return Next::Close(Some(0x81), End::Abnormal);
                }
            };
            self.mqtt.metrics.packet(p.kind(), true);
            if let Next::Close(r, e) = self.handle(p).await {
                return Next::Close(r, e);
            }
        }
    }

    async fn handle(&mut self, p: Inbound) -> Next {
        match p {
            Inbound::Connect(_) => {
                self.mqtt.metrics.refuse("connect_twice");
                tracing::info!(client = %self.client_id, "MQTT CONNECT sent twice; closing");
                Next::Close(Some(0x82), End::Abnormal)
            }
            Inbound::Publish(p) => self.publish(p).await,
            Inbound::PubAck(pkid) => {
                if let Some(Some((name, topic, offset))) = self.inflight_out.remove(&pkid) {
                    let pubsub = self.mqtt.pubsub.clone();
                    let acks = self.mqtt.metrics.acks.clone();
                    tokio::spawn(async move {
                        let off = offset.to_string();
                        match pubsub.ack(&name, Some(&topic), Some(&off)).await {
                            Ok(_) => {
                                acks.inc();
                            }
                            Err(e) => tracing::debug!(error = %e, "MQTT PUBACK not recorded"),
                        }
                    });
                }
                Next::Go
            }
            Inbound::Qos2(kind) => {
                self.mqtt.metrics.refuse("qos2");
                tracing::info!(client = %self.client_id, kind, "MQTT QoS 2 is not offered; closing");
                Next::Close(Some(0x9B), End::Abnormal)
            }
            Inbound::Subscribe { pkid, filters, id } => {
                catch_up(
                    self.mqtt.pubsub.consensus(),
                    &self.client_id,
                    filters.iter().filter_map(|s| {
                        topics::filter(&s.filter).ok().map(|f| f.filter.to_string())
                    }),
                )
                .await;
                let mut codes = Vec::with_capacity(filters.len());
                for s in filters {
                    if self.subs.len() >= self.mqtt.config.max_subscriptions
                        && !self.subs.contains_key(&s.filter)
                    {
                        self.mqtt.metrics.refuse("subscriptions_limit");
                        codes.push(0x97);
                        continue;
                    }
                    if let Ok(f) = topics::filter(&s.filter)
                        && let Err(why) = self.rights.may_subscribe(&f.filter)
                    {
                        self.mqtt.metrics.refuse("not_authorized");
                        tracing::info!(client = %self.client_id, filter = %s.filter, "MQTT subscription refused: {why}");
                        // 3.1.1's SUBACK can only say 0x80 (failure).
                        codes.push(if self.version == Version::V5 {
                            0x87
                        } else {
                            0x80
                        });
                        continue;
                    }
                    let rec = SessionSub {
                        filter: s.filter,
                        qos: s.qos.min(1),
                        no_local: s.no_local,
                        retain_as_published: s.retain_as_published,
                        id,
                        retain_handling: s.retain_handling,
                    };
                    match self.start_sub(rec, true).await {
                        Ok(q) => codes.push(q),
                        Err(code) => {
                            self.mqtt.metrics.refuse("filter_invalid");
                            codes.push(code)
                        }
                    }
                }
                if self.persistent() {
                    self.save_session().await;
                }
                // 3.1.1 cannot say why a filter was refused; its SUBACK says 0x80.
                self.push(Outbound::SubAck { pkid, codes });
                Next::Go
            }
            Inbound::Unsubscribe { pkid, filters } => {
                let codes = filters
                    .iter()
                    .map(|f| {
                        if self.subs.remove(f).is_some() {
                            0
                        } else {
                            0x11
                        }
                    })
                    .collect();
                if self.persistent() {
                    self.save_session().await;
                }
                self.push(Outbound::UnsubAck { pkid, codes });
                Next::Go
            }
            Inbound::PingReq => {
                self.push(Outbound::PingResp);
                Next::Go
            }
            Inbound::Disconnect {
                reason,
                session_expiry_s,
            } => {
                if let (Some(e), Some(s)) = (session_expiry_s, &mut self.session) {
                    s.expiry_s = e;
                }
                let end = if reason == 0x04 {
                    End::WithWill
                } else {
                    End::Normal
                };
                Next::Close(None, end)
            }
            Inbound::Unexpected(kind) => {
                self.mqtt.metrics.refuse("protocol");
                tracing::info!(client = %self.client_id, kind, "MQTT packet a client may not send; closing");
                Next::Close(Some(0x82), End::Abnormal)
            }
        }
    }

    async fn publish(&mut self, mut p: Publish) -> Next {
        p.topic = match self
            .aliases
            .resolve(std::mem::take(&mut p.topic), p.topic_alias)
        {
            Ok(t) => t,
            Err(e) => {
                self.mqtt.metrics.refuse("topic_alias");
                tracing::info!(client = %self.client_id, "MQTT topic alias refused: {e}; closing");
                return Next::Close(Some(e.code()), End::Abnormal);
            }
        };
        if p.qos > 1 {
            self.mqtt.metrics.refuse("qos2");
            tracing::info!(client = %self.client_id, topic = %p.topic, "MQTT QoS 2 publish refused: the most is QoS 1; closing");
            return Next::Close(Some(0x9B), End::Abnormal);
        }
        let topic = topics::topic(&p.topic).ok();
        if let Some(t) = &topic
            && let Err(why) = self.rights.may_publish(t)
        {
            self.mqtt.metrics.refuse("not_authorized");
            tracing::info!(client = %self.client_id, topic = %p.topic, "MQTT publish refused: {why}");
            if p.qos == 1 {
                // 3.1.1 cannot say why: its PUBACK only ends the exchange; nothing is stored.
                let reason = if self.version == Version::V5 { 0x87 } else { 0 };
                self.push(Outbound::PubAck {
                    pkid: p.pkid,
                    reason,
                });
            }
            return Next::Go;
        }
        if let Err(e) = topics::topic(&p.topic) {
            self.mqtt.metrics.refuse("topic_invalid");
            tracing::warn!(client = %self.client_id, topic = %p.topic, "MQTT publish refused: canal cannot store this topic: {e}");
            if self.version == Version::V5 && p.qos == 1 {
                self.push(Outbound::PubAck {
                    pkid: p.pkid,
                    reason: 0x90,
                });
                return Next::Go;
            }
            return Next::Close(Some(0x90), End::Abnormal);
        }
        if self.version == Version::V5
            && p.qos == 1
            && self.publishes.len() >= usize::from(self.mqtt.config.max_inflight_in)
        {
            self.mqtt.metrics.refuse("inflight_limit");
            tracing::info!(client = %self.client_id, limit = self.mqtt.config.max_inflight_in, "MQTT client passed Receive Maximum (max_inflight_in); closing");
            return Next::Close(Some(0x93), End::Abnormal);
        }
        let headers = crate::session::publish_headers(&p, &self.client_id);
        let req = PublishRequest {
            topic: p.topic.clone(),
            qos: if p.qos == 1 {
                Qos::Committed
            } else {
                Qos::AtMostOnce
            },
            id: None,
            headers,
            payload: p.payload.to_vec(),
        };
        let retained = p.retain.then(|| Retained {
            qos: p.qos,
            payload: p.payload.to_vec(),
            user_properties: p.user_properties.clone(),
            time_ms: now_ms(),
            expiry_s: p.expiry_s,
        });
        let pubsub = self.mqtt.pubsub.clone();
        let client = self.client_id.clone();
        let topic = p.topic.clone();
        if p.qos == 1 {
            // Started here, in packet order, and only the answer awaited with the others':
            // left to the in-flight set to start, a publish that yields before it is queued
            // would be overtaken by the next, and the topic's order broken.
            let answer = start_qos1(pubsub, client, topic, retained, req).await;
            let pkid = p.pkid;
            self.publishes
                .push_back(Box::pin(async move { (pkid, answer.await) }));
            return Next::Go;
        }
        let work = async move {
            if let Some(r) = retained
                && let Err(e) = write_retained(&pubsub, &topic, r).await
            {
                tracing::warn!(%client, %topic, error = %e, "MQTT retained message not stored");
                return 0x80;
            }
            match pubsub.publish(req).await {
                Ok(_) => 0,
                Err(e) => {
                    tracing::warn!(%client, %topic, error = %e, "MQTT publish refused");
                    puback_reason(&e)
                }
            }
        };
        if self.qos0.send(Box::pin(work)).await.is_err() {
            // The task that hands them on is gone only if the runtime is going.
            return Next::Close(Some(0x80), End::Abnormal);
        }
        Next::Go
    }

    /// Sends `m` to the client, if it is still to be sent.
    fn deliver(&mut self, m: Msg) {
        let d = crate::session::Delivery {
            topic: &m.topic,
            payload: &m.payload,
            qos: m.qos,
            retained: m.retain,
            headers: &m.headers,
            time_ms: m.time_ms,
            sub: &m.sub.rec,
        };
        let mut p = match crate::session::outgoing(&d, &self.client_id, now_ms()) {
            crate::session::Verdict::Send(p) => p,
            crate::session::Verdict::Skip(_) => {
                self.ack_unsent(&m);
                return;
            }
        };
        if let Some(max) = self.client_max_packet {
            let mut probe = BytesMut::new();
            if codec::encode(self.version, &Outbound::Publish(p.clone()), &mut probe).is_ok()
                && probe.len() > max as usize
            {
                // The client cannot take it (Maximum Packet Size): it is dropped, as 5.0 says.
                self.mqtt.metrics.refuse("client_max_packet");
                self.ack_unsent(&m);
                return;
            }
        }
        if m.qos == 1 {
            p.pkid = self.next_pkid();
            let target = match (&m.sub.durable, m.offset) {
                (Some(name), Some(off)) => Some((name.clone(), m.topic.clone(), off)),
                _ => None,
            };
            self.inflight_out.insert(p.pkid, target);
        }
        self.push(Outbound::Publish(p));
    }

    /// Acknowledges for the client a message of a persistent session that is not sent to
    /// it (expired, its own under No Local, too large for it), so it does not hold the
    /// cursor back.
    fn ack_unsent(&self, m: &Msg) {
        if let (Some(name), Some(offset)) = (&m.sub.durable, m.offset) {
            let pubsub = self.mqtt.pubsub.clone();
            let (name, topic) = (name.clone(), m.topic.clone());
            tokio::spawn(async move {
                let off = offset.to_string();
                if let Err(e) = pubsub.ack(&name, Some(&topic), Some(&off)).await {
                    // At least once: the event comes back and is skipped again.
                    tracing::debug!(subscription = %name, %topic, offset = %off, error = %e, "a skipped event was not acknowledged");
                }
            });
        }
    }

    fn next_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1);
            if self.next_pkid != 0 && !self.inflight_out.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    /// After the connection: the will, the session record, the subscriptions.
    async fn finish(mut self, end: End) {
        self.subs.clear();
        let mut taken = end == End::TakenOver;
        if !taken && let Some((tag, _)) = &self.owner {
            // Through the leader: a CONNECT elsewhere may have claimed the client id just
            // before this connection ended; then the will is the newer connection's, as
            // on a takeover.
            let group = canal_consensus::routing::mqtt_records();
            let key = records::owner_key(&self.client_id);
            match self
                .mqtt
                .pubsub
                .consensus()
                .read_record(group, &MQTT_SESSIONS, &key, true)
                .await
            {
                Ok(b) => taken = records::taken_over(b.as_deref(), tag),
                Err(e) => {
                    tracing::debug!(client = %self.client_id, error = %e, "MQTT owner record not read at the end")
                }
            }
        }
        // The session's end is written on a takeover too: the newer connection waits for
        // it (await_session_end) before it reads the session, so it lands first.
        if let Some(s) = &mut self.session {
            s.disconnected_ms = Some(now_ms());
            let s = s.clone();
            if let Err(e) = write_session(&self.mqtt, &self.client_id, Some(&s)).await {
                tracing::warn!(client = %self.client_id, error = %e, "MQTT session end not stored");
            }
            if !taken && s.expiry_s != u32::MAX {
                spawn_expiry(self.mqtt.clone(), self.client_id.clone(), s);
            }
        }
        if taken {
            tracing::info!(client = %self.client_id, "MQTT connection ended; a newer one has its session and will");
            return;
        }
        if let Some((tag, _)) = &self.owner {
            release(&self.mqtt, &self.client_id, tag).await;
        }
        let will = match end {
            End::Normal => None,
            End::WithWill | End::Abnormal => self.will.take(),
            End::TakenOver => None,
        };
        if will.is_none()
            && let Some((tag, _)) = &self.owner
        {
            remove_will_record(&self.mqtt, &self.client_id, tag).await;
        }
        if let Some(w) = will {
            let delay = match &self.session {
                Some(s) => w.delay_s.min(s.expiry_s),
                None => 0,
            };
            let mqtt = self.mqtt.clone();
            let client = self.client_id.clone();
            let conn = self.owner.as_ref().map(|(tag, _)| tag.clone());
            let task = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(u64::from(delay))).await;
                send_will(&mqtt, &client, &w, conn.as_deref(), "connection").await;
            });
            self.mqtt
                .lock()
                .wills
                .insert(self.client_id.clone(), task.abort_handle());
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => futures::future::pending().await,
    }
}

/// Publishes `client`'s will, sent `by` its connection's node (`connection`) or a keeper
/// (`keeper`), with message id `will-{conn}` when it is connection `conn`'s (so that two
/// nodes sending it store a QoS 1 will once), then removes its record; false if the
/// publish failed.
async fn send_will<T: Transport, L: Qos0Link>(
    mqtt: &Mqtt<T, L>,
    client: &str,
    w: &Will,
    conn: Option<&str>,
    by: &str,
) -> bool {
    if by == "connection" {
        mqtt.lock().wills.remove(client);
    }
    let mut headers = w.user_properties.clone();
    headers.push((FROM_HEADER.into(), client.to_string()));
    if let Some(e) = w.expiry_s {
        headers.push((EXPIRY_HEADER.into(), e.to_string()));
    }
    if w.retain {
        headers.push((RETAIN_HEADER.into(), "1".into()));
        let r = Retained {
            qos: w.qos.min(1),
            payload: w.payload.to_vec(),
            user_properties: w.user_properties.clone(),
            time_ms: now_ms(),
            expiry_s: w.expiry_s,
        };
        if let Err(e) = write_retained(&mqtt.pubsub, &w.topic, r).await {
            tracing::warn!(%client, error = %e, "MQTT retained will not stored");
        }
    }
    let req = PublishRequest {
        topic: w.topic.clone(),
        qos: if w.qos >= 1 {
            Qos::Committed
        } else {
            Qos::AtMostOnce
        },
        id: conn.map(|c| format!("will-{c}")),
        headers,
        payload: w.payload.to_vec(),
    };
    match mqtt.pubsub.publish(req).await {
        Ok(_) => {
            mqtt.metrics.will_sent(by);
            tracing::info!(%client, topic = %w.topic, by, "MQTT will sent");
            if let Some(c) = conn {
                remove_will_record(mqtt, client, c).await;
            }
            true
        }
        // The record stays: a keeper tries again once this node is gone.
        Err(e) => {
            tracing::warn!(%client, topic = %w.topic, error = %e, "MQTT will not sent");
            false
        }
    }
}

/// Writes connection `conn`'s will as `client`'s will record, or, with no will, removes
/// a record an earlier connection left; nothing without [`Mqtt::with_nodes`].
async fn store_will<T: Transport, L: Qos0Link>(
    mqtt: &Mqtt<T, L>,
    client: &str,
    conn: &str,
    will: Option<&Will>,
    delay_s: u32,
) {
    let Some(nodes) = &mqtt.nodes else { return };
    let group = canal_consensus::routing::mqtt_records();
    let key = records::will_key(client);
    let value = match will {
        Some(w) => {
            let stored = records::StoredWill {
                conn: conn.to_string(),
                node: nodes.me.clone(),
                topic: w.topic.clone(),
                payload: w.payload.to_vec(),
                qos: w.qos.min(1),
                retain: w.retain,
                user_properties: w.user_properties.clone(),
                expiry_s: w.expiry_s,
                delay_s,
            };
            match records::encode(&stored) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::warn!(%client, error = %e, "MQTT will not stored");
                    return;
                }
            }
        }
        None => {
            let left = mqtt
                .pubsub
                .consensus()
                .state_machine(group)
                .ok()
                .and_then(|sm| sm.record(&MQTT_SESSIONS, &key).ok().flatten());
            if left.is_none() {
                return;
            }
            None
        }
    };
    let r = mqtt
        .pubsub
        .consensus()
        .write_batched(
            group,
            Request {
                id: None,
                op: Op::Internal {
                    key: InternalKey::MqttSession(key),
                    value,
                },
            },
        )
        .await;
    if let Err(e) = r {
        tracing::warn!(%client, error = %e, "MQTT will record not written: if this node dies, the will is not sent");
    }
}

/// Removes `client`'s will record if it is still connection `conn`'s (as this replica has
/// it; a newer connection's own write replaces it anyway).
async fn remove_will_record<T: Transport, L: Qos0Link>(
    mqtt: &Mqtt<T, L>,
    client: &str,
    conn: &str,
) {
    if mqtt.nodes.is_none() {
        return;
    }
    remove_record_if::<_, _, records::StoredWill>(
        mqtt,
        client,
        records::will_key(client),
        "will",
        |w| w.conn == conn,
    )
    .await;
}

/// How often a keeper tries to publish a will it claimed.
const WILL_TRIES: usize = 3;

/// Takes the orphaned will record `key` (holding `bytes`, connection `conn`'s will) for
/// this node to send: it is removed by a write whose request id names the connection, so
/// of two keepers that try, one removes it and the other's write is a duplicate. False
/// when another took it, the record changed (the client came back: what was removed is
/// written back), or the write failed (the next pass tries again).
async fn claim_will<T: Transport, L: Qos0Link>(
    mqtt: &Mqtt<T, L>,
    group: canal_consensus::GroupId,
    key: &str,
    conn: &str,
    bytes: &[u8],
) -> bool {
    let consensus = mqtt.pubsub.consensus();
    let take = Request {
        id: Some(format!("mqtt-will-claim/{conn}")),
        op: Op::Internal {
            key: InternalKey::MqttSession(key.to_string()),
            value: None,
        },
    };
    let r = match consensus.write(group, take).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(%key, error = %e, "MQTT orphaned will not claimed; next pass");
            return false;
        }
    };
    if r.duplicate {
        return false;
    }
    if r.previous.as_deref() == Some(bytes) {
        return true;
    }
    if let Some(newer) = r.previous {
        // Not the record this pass read: a newer connection's, put back.
        let back = Request {
            id: None,
            op: Op::Internal {
                key: InternalKey::MqttSession(key.to_string()),
                value: Some(newer),
            },
        };
        if let Err(e) = consensus.write(group, back).await {
            tracing::warn!(%key, error = %e, "a newer MQTT will record removed by a keeper was not put back");
        }
    }
    false
}

/// This node's will keeper ([`crate::wills`]): every [`crate::wills::SCAN_EVERY`] it reads
/// the will records, and sends (once, after their delay) those it is to send of nodes that
/// are gone, until the node closes.
pub(crate) async fn keep_wills<T: Transport, L: Qos0Link>(mqtt: Mqtt<T, L>) {
    let Some(nodes) = mqtt.nodes.clone() else {
        return;
    };
    let mut closing = mqtt.closing.clone();
    // When each orphaned will (by connection) was first seen so, for its delay.
    let mut orphans: HashMap<String, Instant> = HashMap::new();
    let mut first_pass = true;
    loop {
        let mut live: std::collections::BTreeSet<String> = (nodes.live)().into_iter().collect();
        live.insert(nodes.me.clone());
        let mut still = HashMap::new();
        {
            let group = canal_consensus::routing::mqtt_records();
            let Ok(sm) = mqtt.pubsub.consensus().state_machine(group) else {
                continue;
            };
            let Ok(all) = sm.scan_table(&MQTT_SESSIONS) else {
                continue;
            };
            for (key, bytes) in all {
                let Some(client) = key.strip_prefix("$will/") else {
                    continue;
                };
                let Ok(w) = records::decode::<records::StoredWill>(&bytes) else {
                    continue;
                };
                let here = {
                    let l = mqtt.lock();
                    l.conns.contains_key(client) || l.wills.contains_key(client)
                };
                let seen = crate::wills::Seen {
                    me: &nodes.me,
                    live: &live,
                    first_pass,
                    here,
                };
                if !crate::wills::orphaned(&w, seen) || !crate::wills::sender(&w, seen) {
                    continue;
                }
                let since = orphans.get(&w.conn).copied().unwrap_or_else(Instant::now);
                if since.elapsed() < Duration::from_secs(u64::from(w.delay_s)) {
                    still.insert(w.conn.clone(), since);
                    continue;
                }
                if !claim_will(&mqtt, group, &key, &w.conn, &bytes).await {
                    continue;
                }
                tracing::info!(%client, node = %w.node, "MQTT will of a client whose node is gone: sending it");
                let will = Will {
                    topic: w.topic,
                    payload: Bytes::from(w.payload),
                    qos: w.qos,
                    retain: w.retain,
                    delay_s: w.delay_s,
                    expiry_s: w.expiry_s,
                    user_properties: w.user_properties,
                };
                // Claimed: this node is the one to send it, so it tries a few times (the
                // same message id each time, so a QoS 1 will is stored once).
                for _ in 0..WILL_TRIES {
                    if send_will(&mqtt, client, &will, Some(&w.conn), "keeper").await {
                        break;
                    }
                    tokio::time::sleep(crate::wills::SCAN_EVERY).await;
                }
            }
        }
        orphans = still;
        first_pass = false;
        tokio::select! {
            _ = tokio::time::sleep(crate::wills::SCAN_EVERY) => {}
            _ = crate::until_true(&mut closing) => return,
        }
    }
}

/// Removes `client`'s session record once it has expired, unless the client came back.
fn spawn_expiry<T: Transport, L: Qos0Link>(mqtt: Mqtt<T, L>, client: String, s: Session) {
    tokio::spawn(async move {
        let mut closing = mqtt.closing.clone();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(u64::from(s.expiry_s))) => {}
            _ = crate::until_true(&mut closing) => return,
        }
        let group = canal_consensus::routing::mqtt_records();
        let now: Option<Session> = mqtt
            .pubsub
            .consensus()
            .state_machine(group)
            .ok()
            .and_then(|sm| sm.record(&MQTT_SESSIONS, &client).ok().flatten())
            .and_then(|b| records::decode(&b).ok());
        if now.as_ref() == Some(&s) {
            match write_session(&mqtt, &client, None).await {
                Ok(()) => tracing::info!(%client, "MQTT session expired"),
                Err(e) => tracing::debug!(%client, error = %e, "MQTT session expiry not stored"),
            }
        }
    });
}

/// Waits until this node's replica of the groups of `filters` has applied everything
/// committed before now: a no-op write (removing the record `$barrier/{client}`, which no
/// client id can name) gives the log index to wait for. A subscription that starts after
/// it resolves "from now" and reads retained messages against an up-to-date log, so an
/// event or a retained message committed on another node just before is not taken for a
/// new one (or missed). Best effort: past 10 s, or without a leader, it goes on.
async fn catch_up<T: Transport>(
    consensus: &canal_consensus::Consensus<T>,
    client: &str,
    filters: impl Iterator<Item = String>,
) {
    // The retained messages' group, and the log of each exact filter this node reads from
    // its own replica.
    let route = consensus.route().ok();
    let mut groups = std::collections::BTreeSet::from([canal_consensus::routing::mqtt_records()]);
    for f in filters {
        if let (Some(r), Ok(filter)) = (route, canal_proto::TopicFilter::new(&f))
            && filter.is_exact()
        {
            groups.insert(r.topic(&f));
        }
    }
    for group in groups {
        let Ok(sm) = consensus.state_machine(group) else {
            continue;
        };
        let noop = Request {
            id: None,
            op: Op::Internal {
                key: InternalKey::MqttSession(format!("$barrier/{client}")),
                value: None,
            },
        };
        match consensus.write_batched(group, noop).await {
            Ok(r) => {
                let mut applied = sm.watch_applied();
                let caught_up = tokio::time::timeout(
                    Duration::from_secs(10),
                    applied.wait_for(|i| *i >= r.index),
                )
                .await
                .is_ok_and(|r| r.is_ok());
                if !caught_up {
                    tracing::debug!(index = r.index, "subscribing before this replica caught up");
                }
            }
            Err(e) => tracing::debug!(error = %e, "subscribing on this replica as it is"),
        }
    }
}

/// Sends the retained messages that `info`'s filter matches.
///
/// They are read from this node's replica, which [`catch_up`] brought up to date before the
/// subscription started.
async fn send_retained_msgs<T: Transport>(
    consensus: canal_consensus::Consensus<T>,
    info: Arc<SubInfo>,
    tx: Arc<FeedTx<Msg>>,
) {
    let group = canal_consensus::routing::mqtt_records();
    let Ok(sm) = consensus.state_machine(group) else {
        return;
    };
    let Ok(all) = sm.scan_table(&RETAINED) else {
        return;
    };
    let now = now_ms();
    for (topic, bytes) in all {
        let Ok(t) = canal_proto::Topic::new(&topic) else {
            continue;
        };
        if !topics::matches(&info.filter, &t) {
            continue;
        }
        let Ok(r) = records::decode::<Retained>(&bytes) else {
            continue;
        };
        if let Some(e) = r.expiry_s
            && now.saturating_sub(r.time_ms) / 1000 >= u64::from(e)
        {
            continue;
        }
        let mut headers = r.user_properties;
        if let Some(e) = r.expiry_s {
            headers.push((EXPIRY_HEADER.into(), e.to_string()));
        }
        let m = Msg {
            topic,
            payload: Bytes::from(r.payload),
            qos: r.qos.min(info.rec.qos),
            retain: true,
            headers,
            time_ms: r.time_ms,
            offset: None,
            sub: info.clone(),
        };
        if tx.send(m).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missed_notices_are_counted() {
        assert_eq!(missed_count(r#"{"dropped":7}"#), 7);
        assert_eq!(missed_count(r#"{"topic":"a","from":3,"to":10}"#), 7);
        assert_eq!(missed_count("not json"), 1);
    }
}
