//! Publish and subscribe over the client API.
//!
//! QoS 1: a publish is a Raft write to the data group's topic log; the answer carries the
//! event's offset and comes after commit. A subscriber reads its node's replica of the logs
//! from a cursor per topic (earliest, latest, an offset or a time) and is woken whenever
//! entries are applied, so it gets every event once, in offset order, and a slow subscriber
//! only slows its own stream (the log is the buffer; nothing is skipped unless retention
//! dropped it first, which the subscriber is told as a `lagged` event with the gap).
//!
//! QoS 0: never touches Raft; the accepting node hands the event to its own QoS 0
//! subscribers and sends it to every other live peer, which do the same. At most once.

use crate::http::{ApiError, ApiState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use base64::Engine;
use canal_consensus::topics::{PublishOp, StoredEvent};
use canal_consensus::{GroupId, Op, Request};
use canal_proto::api::{Event, Lagged, Published};
use canal_proto::settings::{SettingsAnswer, SettingsRequest, TopicSettings};
use canal_proto::{Topic, TopicFilter, wire};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, mpsc};

/// The largest payload accepted (a topic's settings may lower it).
pub const MAX_PAYLOAD_BYTES: usize = canal_proto::settings::MAX_PAYLOAD_BYTES as usize;
/// The data group that holds every topic log on a small cluster.
pub const TOPIC_GROUP: GroupId = GroupId(1);

/// A QoS 0 event as sent between peers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Qos0Message {
    /// The event.
    pub topic: String,
    /// Message id.
    pub id: String,
    /// The node that accepted it.
    pub source: String,
    /// Accepted at, ms since the epoch.
    pub time_ms: u64,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Payload (read and written as one slice; the same bytes as a plain `Vec<u8>`).
    #[serde(with = "canal_proto::wire::bytes")]
    pub payload: Vec<u8>,
}

/// The node's QoS 0 fan-out point: its local QoS 0 subscribers listen here, and say what
/// they listen to, which the node advertises so publishers send it only what it wants.
#[derive(Clone)]
pub struct Qos0Hub {
    tx: broadcast::Sender<Arc<Qos0Message>>,
    live: Arc<crate::caps::LoadCounters>,
}

/// A QoS 0 subscriber's registered interest; dropping it withdraws the interest.
pub struct Interest {
    live: Arc<crate::caps::LoadCounters>,
    filter: String,
}

impl Drop for Interest {
    fn drop(&mut self) {
        let mut m = self
            .live
            .subscribed
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.filter) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.filter);
            }
        }
    }
}

impl Qos0Hub {
    /// A hub whose interest is advertised through `live`.
    pub fn new(live: Arc<crate::caps::LoadCounters>) -> Self {
        Qos0Hub {
            tx: broadcast::channel(4096).0,
            live,
        }
    }

    /// Registers a local subscriber's filter for as long as the guard lives.
    pub fn register(&self, filter: &TopicFilter) -> Interest {
        *self
            .live
            .subscribed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(filter.to_string())
            .or_insert(0) += 1;
        Interest {
            live: self.live.clone(),
            filter: filter.to_string(),
        }
    }

    /// Sets the filters of the QoS 0 triggers this node executes.
    pub fn set_trigger_filters(&self, filters: Vec<String>) {
        *self
            .live
            .trigger_filters
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = filters;
    }

    /// Listens to every QoS 0 event that passes this node.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Qos0Message>> {
        self.tx.subscribe()
    }

    /// Hands an event to this node's QoS 0 subscribers.
    pub fn deliver(&self, m: Qos0Message) {
        let _ = self.tx.send(Arc::new(m));
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn to_event(
    topic: &str,
    id: String,
    source: String,
    time_ms: u64,
    headers: &[(String, String)],
    payload: &[u8],
    offset: Option<u64>,
) -> Event {
    let (ct, data, data_base64) = match std::str::from_utf8(payload) {
        Ok(text) => ("text/plain; charset=utf-8", Some(text.to_string()), None),
        Err(_) => (
            "application/octet-stream",
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(payload)),
        ),
    };
    Event {
        specversion: "1.0".into(),
        id,
        source,
        kind: "canal.event".into(),
        time: rfc3339(time_ms),
        datacontenttype: ct.into(),
        data,
        data_base64,
        topic: topic.to_string(),
        offset,
        qos: if offset.is_some() { 1 } else { 0 },
        headers: headers.iter().cloned().collect::<BTreeMap<_, _>>(),
    }
}

fn stored_event(topic: &str, e: &StoredEvent) -> Event {
    let id =
        e.id.clone()
            .unwrap_or_else(|| format!("{topic}:{}", e.offset));
    to_event(
        topic,
        id,
        format!("canal://topic/{topic}"),
        e.time_ms,
        &e.headers,
        &e.payload,
        Some(e.offset),
    )
}

/// QoS, message id and custom headers of a publish.
type PublishHeaders = (u8, Option<String>, Vec<(String, String)>);

/// Reads the publish headers: `canal-qos`, `canal-id`, `canal-header-*`.
fn publish_headers(headers: &HeaderMap) -> Result<PublishHeaders, ApiError> {
    let qos = match headers.get("canal-qos").map(|v| v.to_str().unwrap_or("?")) {
        None | Some("1") => 1,
        Some("0") => 0,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_qos",
                format!(
                    "QoS {other:?} is not known: use 0 (at most once) or 1 (committed before the answer)"
                ),
            ));
        }
    };
    let id = match headers.get("canal-id") {
        None => None,
        Some(v) => {
            let v = v
                .to_str()
                .ok()
                .filter(|v| !v.is_empty() && v.len() <= 256)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_id",
                        "canal-id must be 1 to 256 printable ASCII characters",
                    )
                })?;
            Some(v.to_string())
        }
    };
    Ok((qos, id, custom_headers(headers)?))
}

/// The custom headers of a request: `canal-header-NAME: VALUE`, each.
pub fn custom_headers(headers: &HeaderMap) -> Result<Vec<(String, String)>, ApiError> {
    let mut custom = Vec::new();
    for (k, v) in headers {
        if let Some(name) = k.as_str().strip_prefix("canal-header-") {
            let v = v.to_str().map_err(|_| {
                ApiError::bad_request(
                    "invalid_header",
                    format!("header {name:?} must be printable ASCII"),
                )
            })?;
            custom.push((name.to_string(), v.to_string()));
        }
    }
    Ok(custom)
}

/// `POST /v1/topics/{topic}/events`: body = payload.
pub async fn publish(
    st: &ApiState,
    topic: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Published, ApiError> {
    let topic =
        Topic::new(topic).map_err(|e| ApiError::bad_request("invalid_topic", e.to_string()))?;
    let (qos, id, custom) = publish_headers(headers)?;
    let settings = topic_settings(&st.consensus, &topic)?;
    if body.len() as u64 > settings.max_payload_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "payload is {} bytes: at most {} are allowed on {topic}",
                body.len(),
                settings.max_payload_bytes
            ),
        ));
    }
    let time_ms = now_ms();
    if qos == 0 {
        let m = Qos0Message {
            topic: topic.to_string(),
            id: id.unwrap_or_else(|| crate::http::fresh_id(st)),
            source: format!("canal://{}", st.dht.local_peer_id()),
            time_ms,
            headers: custom,
            payload: body.to_vec(),
        };
        publish_qos0(&st.dht, &st.qos0, m);
        return Ok(Published {
            topic: topic.to_string(),
            qos: 0,
            offset: None,
            duplicate: false,
        });
    }
    // The message id is the Raft request id, so a retried publish is stored once.
    let request_id = match &id {
        Some(id) => format!("pub/{topic}/{id}"),
        None => crate::http::fresh_id(st),
    };
    let r = st
        .consensus
        .write_batched(
            TOPIC_GROUP,
            Request {
                id: Some(request_id),
                op: Op::Publish(PublishOp {
                    topic: topic.to_string(),
                    id,
                    headers: custom,
                    payload: body.to_vec(),
                    retention: settings.retention,
                }),
            },
        )
        .await?;
    Ok(Published {
        topic: topic.to_string(),
        qos: 1,
        offset: r.offset,
        duplicate: r.duplicate,
    })
}

/// Every topic and filter setting, from this node's replica of the metadata group.
pub fn all_settings(
    consensus: &canal_consensus::Consensus<crate::cluster::MeshTransport>,
) -> Result<Vec<(TopicFilter, TopicSettings)>, ApiError> {
    let sm = consensus.state_machine(GroupId::METADATA)?;
    let internal = |e: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e);
    let mut out = Vec::new();
    for (k, v) in sm
        .scan(canal_consensus::topics::SETTINGS_PREFIX)
        .map_err(|e| internal(e.to_string()))?
    {
        let Some(filter) = k.strip_prefix(canal_consensus::topics::SETTINGS_PREFIX) else {
            continue;
        };
        let Ok(filter) = TopicFilter::new(filter) else {
            continue;
        };
        out.push((
            filter,
            wire::decode(&v).map_err(|e| internal(e.to_string()))?,
        ));
    }
    Ok(out)
}

/// The settings in force for `topic`.
pub fn topic_settings(
    consensus: &canal_consensus::Consensus<crate::cluster::MeshTransport>,
    topic: &Topic,
) -> Result<TopicSettings, ApiError> {
    Ok(canal_proto::settings::settings_for(
        topic,
        &all_settings(consensus)?,
    ))
}

/// `GET /v1/topics/{topic-or-filter}/settings`: what applies, and from which filter.
pub fn get_settings(st: &ApiState, filter: &TopicFilter) -> Result<SettingsAnswer, ApiError> {
    let all = all_settings(&st.consensus)?;
    if let Some((f, s)) = all.iter().find(|(f, _)| f == filter) {
        return Ok(SettingsAnswer {
            topic: filter.to_string(),
            from: Some(f.to_string()),
            settings: *s,
        });
    }
    // A topic gets what its most specific filter says; a filter without settings of its
    // own, the defaults.
    let found = Topic::new(filter.as_str())
        .ok()
        .and_then(|topic| canal_proto::settings::most_specific(&topic, &all).cloned());
    Ok(SettingsAnswer {
        topic: filter.to_string(),
        from: found.as_ref().map(|(f, _)| f.to_string()),
        settings: found.map(|(_, s)| s).unwrap_or_default(),
    })
}

/// `PUT /v1/topics/{topic-or-filter}/settings`: sets the fields given, keeps the others.
pub async fn put_settings(
    st: &ApiState,
    filter: &TopicFilter,
    req: SettingsRequest,
) -> Result<SettingsAnswer, ApiError> {
    let bad = |m: String| ApiError::bad_request("invalid_settings", m);
    let current = get_settings(st, filter)?.settings;
    let mut s = current;
    if let Some(n) = req.retain_events {
        s.retention.max_events = n;
    }
    if let Some(b) = &req.retain_bytes {
        s.retention.max_bytes =
            canal_proto::size::parse_bytes(b).map_err(|e| bad(format!("retain-bytes: {e}")))?;
    }
    if let Some(a) = &req.retain_age {
        s.retention.max_age_ms = humantime::parse_duration(a)
            .map_err(|e| {
                bad(format!(
                    "retain-age {a:?} is not a duration ({e}): write 90s, 24h or 7days"
                ))
            })?
            .as_millis()
            .min(u64::MAX as u128) as u64;
    }
    if let Some(w) = &req.dedup_window {
        s.retention.dedup_window_ms = humantime::parse_duration(w)
            .map_err(|e| {
                bad(format!(
                    "dedup-window {w:?} is not a duration ({e}): write 5s, 90s or 2m"
                ))
            })?
            .as_millis()
            .min(u64::MAX as u128) as u64;
    }
    if let Some(m) = &req.max_payload {
        s.max_payload_bytes =
            canal_proto::size::parse_bytes(m).map_err(|e| bad(format!("max-payload: {e}")))?;
    }
    s.validate().map_err(|e| bad(e.0))?;
    st.consensus
        .write_op(
            GroupId::METADATA,
            Op::Internal {
                key: canal_consensus::InternalKey::Settings(filter.to_string()),
                value: Some(wire::encode(&s).map_err(|e| {
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                })?),
            },
        )
        .await?;
    Ok(SettingsAnswer {
        topic: filter.to_string(),
        from: Some(filter.to_string()),
        settings: s,
    })
}

/// `DELETE /v1/topics/{topic-or-filter}/settings`: back to what broader filters or the
/// defaults say.
pub async fn delete_settings(st: &ApiState, filter: &TopicFilter) -> Result<(), ApiError> {
    st.consensus
        .write_op(
            GroupId::METADATA,
            Op::Internal {
                key: canal_consensus::InternalKey::Settings(filter.to_string()),
                value: None,
            },
        )
        .await?;
    Ok(())
}

/// While this node leads the data group, applies age limits to quiet topics every few
/// seconds (a busy topic is trimmed as events are appended).
pub fn spawn_trimmer(
    consensus: canal_consensus::Consensus<crate::cluster::MeshTransport>,
    mut closing: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = closing.wait_for(|c| *c) => return,
            }
            let leads = consensus
                .metrics(TOPIC_GROUP)
                .map(|m| m.current_leader == Some(consensus.node_id()))
                .unwrap_or(false);
            if !leads {
                continue;
            }
            let (Ok(all), Ok(sm)) = (
                all_settings(&consensus),
                consensus.state_machine(TOPIC_GROUP),
            ) else {
                continue;
            };
            if all.iter().all(|(_, s)| s.retention.max_age_ms == 0) {
                continue;
            }
            // The clock the leader stamps entries with, so the trims it proposes are the
            // ones its entries will find due.
            let now = consensus.now_ms();
            for (topic, meta) in sm.topics().unwrap_or_default() {
                let Ok(t) = Topic::new(&topic) else { continue };
                let retention = canal_proto::settings::settings_for(&t, &all).retention;
                if retention.max_age_ms == 0 || meta.next - meta.first <= 1 {
                    continue;
                }
                let oldest = sm
                    .events(&topic, meta.first, 1)
                    .ok()
                    .and_then(|e| e.first().map(|e| e.time_ms));
                if oldest.is_some_and(|t| t.saturating_add(retention.max_age_ms) < now) {
                    let trim = Request {
                        id: None,
                        op: Op::Trim {
                            topic: topic.clone(),
                            retention,
                        },
                    };
                    if let Err(e) = consensus.write(TOPIC_GROUP, trim).await {
                        tracing::debug!(%topic, error = %e, "trim not committed; next round");
                    }
                }
            }
        }
    })
}

/// Publishes a QoS 0 event from this node: to its own subscribers and to every other live
/// peer that wants it, once, without waiting. Each peer's copy goes on the mesh's QoS 0 lane
/// (its own protocol and a bounded queue per peer, apart from Raft's RPCs); a full queue drops
/// the copy and counts it (`canal_qos0_dropped_total`), as at-most-once allows.
pub fn publish_qos0(dht: &canal_dht::DhtHandle, hub: &Qos0Hub, m: Qos0Message) {
    if let (Ok(body), Ok(topic)) = (wire::encode(&m), Topic::new(&m.topic)) {
        // Only to peers that want it: their advertised interest matches the topic.
        let wants = |p: &canal_dht::PeerView| {
            p.caps
                .interest
                .iter()
                .filter_map(|f| TopicFilter::new(f).ok())
                .any(|f| f.matches(&topic))
        };
        for p in dht.peers().into_iter().filter(|p| !p.is_self && wants(p)) {
            dht.send_qos0(p.peer_id, body.clone());
        }
    }
    hub.deliver(m);
}

/// Why a QoS 0 message from a peer was refused.
fn check_qos0(peer: &libp2p::PeerId, body: &[u8]) -> Result<Qos0Message, (&'static str, String)> {
    let m: Qos0Message = wire::decode_with_limit(body, canal_dht::rpc::MAX_QOS0_BYTES)
        .map_err(|e| ("qos0-decode", format!("undecodable QoS 0 event: {e}")))?;
    // Events are sent by the node that accepted them, never relayed.
    if m.source != format!("canal://{peer}") {
        return Err((
            "qos0-forged",
            format!(
                "QoS 0 event from {peer} claims source {:?}",
                m.source.chars().take(80).collect::<String>()
            ),
        ));
    }
    Topic::new(&m.topic).map_err(|e| ("qos0-invalid", format!("QoS 0 event topic: {e}")))?;
    if m.payload.len() > MAX_PAYLOAD_BYTES {
        return Err((
            "qos0-invalid",
            format!(
                "QoS 0 payload of {} bytes is over the limit of {MAX_PAYLOAD_BYTES}",
                m.payload.len()
            ),
        ));
    }
    Ok(m)
}

/// Hands the QoS 0 events other peers send on the QoS 0 lane to this node's subscribers; a
/// message that does not decode or claims another source is refused and reported against the
/// peer that sent it.
///
/// Only members of the cluster publish into it: once this node is a member, events from a
/// peer that is neither a voter nor a learner of the metadata group are dropped and counted
/// in `not_members` (not reported as offences: a peer about to be added may send a few).
pub fn serve_qos0(
    dht: canal_dht::DhtHandle,
    hub: Qos0Hub,
    consensus: canal_consensus::Consensus<crate::cluster::MeshTransport>,
    not_members: prometheus_client::metrics::counter::Counter,
    mut inbound: mpsc::Receiver<canal_dht::InboundQos0>,
) {
    tokio::spawn(async move {
        while let Some(ev) = inbound.recv().await {
            if !sent_by_member(&consensus, &ev.peer) {
                not_members.inc();
                tracing::debug!(peer = %ev.peer, "QoS 0 event from a peer that is no member dropped");
                continue;
            }
            match check_qos0(&ev.peer, &ev.body) {
                Ok(m) => hub.deliver(m),
                Err((kind, detail)) => dht.report_bad(ev.peer, kind, detail),
            }
        }
    });
}

/// Whether `peer` is a member (voter or learner) of the metadata group as this node knows
/// it; a node that is no member itself yet takes events from anyone it is connected to.
fn sent_by_member<T: canal_consensus::Transport>(
    consensus: &canal_consensus::Consensus<T>,
    peer: &libp2p::PeerId,
) -> bool {
    let Ok(m) = consensus.metrics(GroupId::METADATA) else {
        return true;
    };
    let mut nodes = m.membership_config.nodes().peekable();
    if nodes.peek().is_none() {
        return true;
    }
    let id = crate::cluster::node_id(peer);
    nodes.any(|(n, _)| *n == id)
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// The oldest stored event of every topic.
    Earliest,
    /// Only events published after the subscription started.
    Latest,
    /// This offset of every matching topic (clamped into what is stored).
    Offset(u64),
    /// The first event accepted at or after this time (ms since the epoch).
    Time(u64),
}

fn parse_from(s: Option<&String>) -> Result<From, ApiError> {
    let Some(s) = s else { return Ok(From::Latest) };
    match s.as_str() {
        "earliest" => Ok(From::Earliest),
        "latest" => Ok(From::Latest),
        _ => {
            if let Ok(n) = s.parse::<u64>() {
                return Ok(From::Offset(n));
            }
            humantime::parse_rfc3339_weak(s)
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| From::Time(d.as_millis() as u64))
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_from",
                        format!("from={s:?} is not a start: use earliest, latest, an offset (0, 42) or an RFC 3339 time (2026-11-24T08:00:00Z)"),
                    )
                })
        }
    }
}

/// One thing a subscription hands its client: an event, or news of events it missed.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// An event: its SSE id (`topic:offset` for QoS 1) and its JSON.
    Message {
        /// `topic:offset`, for QoS 1 events.
        id: Option<String>,
        /// The event as CloudEvents structured JSON.
        json: String,
    },
    /// Events the subscriber missed, as JSON (a [`Lagged`] gap, or `{"dropped":N}` for
    /// QoS 0).
    Lagged(String),
}

impl crate::feed::Weighed for Delivery {
    fn weight(&self) -> usize {
        match self {
            Delivery::Message { id, json } => json.len() + id.as_ref().map_or(0, String::len),
            Delivery::Lagged(json) => json.len(),
        }
    }
}

fn message(id: Option<String>, e: &Event) -> Option<Delivery> {
    serde_json::to_string(e)
        .ok()
        .map(|json| Delivery::Message { id, json })
}

/// `GET /v1/subscribe?filter=F&qos=0|1&from=...`: Server-Sent Events, one `message` event
/// per event (data: the event's JSON), `lagged` when retention dropped events first.
pub async fn subscribe(
    st: ApiState,
    q: HashMap<String, String>,
) -> Result<Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let rx = start(st, &q).await?;
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let d = rx.recv().await?;
        let sse = match d {
            Delivery::Message { id, json } => {
                let e = SseEvent::default().event("message").data(json);
                match id {
                    Some(id) => e.id(id),
                    None => e,
                }
            }
            Delivery::Lagged(json) => SseEvent::default().event("lagged").data(json),
        };
        Some((Ok(sse), rx))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// `GET /v1/subscribe` with a WebSocket upgrade: the same parameters; each event is a text
/// frame holding its JSON, missed events a text frame `{"lagged": ...}`. A durable
/// subscriber acknowledges with text frames `{"ack": {"topic": T, "offset": N}}`.
pub async fn subscribe_ws(
    st: ApiState,
    q: HashMap<String, String>,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> Result<axum::response::Response, ApiError> {
    use axum::extract::ws::Message;
    // Everything is checked before the upgrade, so bad input is a plain HTTP error.
    let mut rx = start(st.clone(), &q).await?;
    let durable = q.get("durable").cloned();
    Ok(ws.on_upgrade(move |mut socket| async move {
        loop {
            tokio::select! {
                d = rx.recv() => {
                    let text = match d {
                        Some(Delivery::Message { json, .. }) => json,
                        Some(Delivery::Lagged(json)) => format!("{{\"lagged\":{json}}}"),
                        None => break,
                    };
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                m = socket.recv() => match m {
                    Some(Ok(Message::Text(t))) => {
                        if let Err(e) = ws_ack(&st, durable.as_deref(), t.as_str()).await {
                            let body = serde_json::json!({"error": e.to_string()}).to_string();
                            if socket.send(Message::Text(body.into())).await.is_err() {
                                break;
                            }
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
            }
        }
    }))
}

/// An acknowledgement sent over a WebSocket by a durable subscriber.
#[derive(Debug, Deserialize)]
struct WsAck {
    ack: WsAckBody,
}

#[derive(Debug, Deserialize)]
struct WsAckBody {
    topic: String,
    offset: u64,
}

async fn ws_ack(st: &ApiState, durable: Option<&str>, text: &str) -> Result<(), String> {
    let Some(name) = durable else {
        return Err("acks are for durable subscriptions: subscribe with ?durable=NAME".into());
    };
    let a: WsAck = serde_json::from_str(text)
        .map_err(|e| format!("{e}: send {{\"ack\": {{\"topic\": TOPIC, \"offset\": N}}}}"))?;
    let q: HashMap<String, String> = [
        ("topic".to_string(), a.ack.topic),
        ("offset".to_string(), a.ack.offset.to_string()),
    ]
    .into_iter()
    .collect();
    ack(st, name, &q)
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

/// Checks a subscription's parameters and starts feeding it; the receiver ends when the
/// node shuts down.
async fn start(
    st: ApiState,
    q: &HashMap<String, String>,
) -> Result<crate::feed::FeedRx<Delivery>, ApiError> {
    // A slot first: past the node's limit, nothing else is worth checking.
    let slot = st.subscribers.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_subscribers",
            format!(
                "this node already serves its limit of {} subscribers (max_subscribers): subscribe through another node, or later",
                st.max_subscribers
            ),
        )
    })?;
    let filter = q.get("filter").ok_or_else(|| {
        ApiError::bad_request(
            "invalid_filter",
            "filter is missing: add ?filter=sensors/+/temp",
        )
    })?;
    let filter = TopicFilter::new(filter)
        .map_err(|e| ApiError::bad_request("invalid_filter", e.to_string()))?;
    let qos = match q.get("qos").map(String::as_str) {
        None | Some("1") => 1,
        Some("0") => 0,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_qos",
                format!("QoS {other:?} is not known: use 0 or 1"),
            ));
        }
    };
    let from = parse_from(q.get("from"))?;
    let durable = match q.get("durable") {
        Some(name) => Some(check_subscription_name(name)?),
        None => None,
    };
    let redelivery = redelivery_settings(q, durable.is_some())?;
    if durable.is_some() && qos == 0 {
        return Err(ApiError::bad_request(
            "invalid_durable",
            "durable subscriptions read the committed log: use them with QoS 1",
        ));
    }
    let (tx, rx) = crate::feed::feed::<Delivery>(slot);
    let mut closing = st.closing.clone();
    if qos == 0 {
        let mut events = st.qos0.tx.subscribe();
        let interest = st.qos0.register(&filter);
        tokio::spawn(async move {
            let _interest = interest;
            loop {
                let next = tokio::select! {
                    next = events.recv() => next,
                    _ = closing.wait_for(|c| *c) => return,
                };
                match next {
                    Ok(m) => {
                        let Ok(topic) = Topic::new(&m.topic) else {
                            continue;
                        };
                        if !filter.matches(&topic) {
                            continue;
                        }
                        let e = to_event(
                            &m.topic,
                            m.id.clone(),
                            m.source.clone(),
                            m.time_ms,
                            &m.headers,
                            &m.payload,
                            None,
                        );
                        let Some(d) = message(None, &e) else {
                            continue;
                        };
                        if tx.send(d).await.is_err() {
                            return;
                        }
                    }
                    // QoS 0 is at most once: a subscriber that falls behind loses events,
                    // and is told how many.
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let d = Delivery::Lagged(format!("{{\"dropped\":{n}}}"));
                        if tx.send(d).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    } else {
        let sm = st.consensus.state_machine(TOPIC_GROUP)?;
        // A durable subscription keeps the start it was created with, for topics it has not
        // acknowledged anything on yet.
        let from = match &durable {
            Some(name) => durable_start(&st, &sm, name, from).await?,
            None => from,
        };
        // An offset past the end of an exact topic is a mistake worth saying.
        if let From::Offset(n) = from
            && filter.is_exact()
        {
            let next = sm
                .topic_meta(filter.as_str())
                .map_err(|e| {
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                })?
                .map(|m| m.next)
                .unwrap_or(0);
            if n > next {
                return Err(ApiError::bad_request(
                    "invalid_from",
                    format!(
                        "offset {n} is beyond the end of topic {filter}: its next offset is {next}"
                    ),
                ));
            }
        }
        let durable = durable.map(|name| Durable {
            name,
            consensus: st.consensus.clone(),
            redelivery,
        });
        tokio::spawn(async move {
            tokio::select! {
                _ = stream_qos1(sm, filter, from, durable, tx) => {}
                _ = closing.wait_for(|c| *c) => {}
            }
        });
    }
    Ok(rx)
}

/// How a durable subscription redelivers what its client did not acknowledge.
#[derive(Debug, Clone, Copy)]
struct Redelivery {
    /// An event not acknowledged this long after it was sent is sent again.
    ack_timeout: Duration,
    /// After this many deliveries an event is given up on: acknowledged on the client's
    /// behalf and announced as undeliverable, so one poison event cannot stall the rest.
    max_deliveries: u32,
    /// At most this many events are sent and not yet acknowledged, per topic.
    max_pending: u64,
}

/// A durable subscription's name, and what it needs to redeliver.
struct Durable {
    name: String,
    consensus: canal_consensus::Consensus<crate::cluster::MeshTransport>,
    redelivery: Redelivery,
}

fn redelivery_settings(q: &HashMap<String, String>, durable: bool) -> Result<Redelivery, ApiError> {
    let bad = |m: String| ApiError::bad_request("invalid_durable", m);
    let given = ["ack_timeout", "max_deliveries", "max_pending"]
        .iter()
        .any(|k| q.contains_key(*k));
    if given && !durable {
        return Err(bad(
            "ack_timeout, max_deliveries and max_pending are for durable subscriptions: add durable=NAME".into(),
        ));
    }
    let mut r = Redelivery {
        ack_timeout: Duration::from_secs(30),
        max_deliveries: 5,
        max_pending: 1000,
    };
    if let Some(t) = q.get("ack_timeout") {
        r.ack_timeout = humantime::parse_duration(t)
            .ok()
            .filter(|d| *d >= Duration::from_millis(100) && *d <= Duration::from_secs(3600))
            .ok_or_else(|| {
                bad(format!(
                    "ack_timeout {t:?} is not allowed: use 100ms to 1h, such as 30s"
                ))
            })?;
    }
    if let Some(n) = q.get("max_deliveries") {
        r.max_deliveries = n
            .parse()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| {
                bad(format!(
                    "max_deliveries {n:?} is not allowed: use 1 to 1000"
                ))
            })?;
    }
    if let Some(n) = q.get("max_pending") {
        r.max_pending = n
            .parse()
            .ok()
            .filter(|n| (1..=100_000).contains(n))
            .ok_or_else(|| bad(format!("max_pending {n:?} is not allowed: use 1 to 100000")))?;
    }
    Ok(r)
}

/// What a durable subscription tracks per topic beyond its cursor: where it started (the
/// floor before any ack), and for each event sent and not acknowledged, when it was last
/// sent and how often.
#[derive(Debug, Default)]
struct Unacked {
    start: u64,
    sent: std::collections::BTreeMap<u64, (Instant, u32)>,
    /// The offset given up on, until its acknowledgement is applied here.
    given_up: Option<u64>,
}

async fn stream_qos1(
    sm: canal_consensus::StateMachine,
    filter: TopicFilter,
    from: From,
    durable: Option<Durable>,
    tx: crate::feed::FeedTx<Delivery>,
) {
    let mut applied = sm.watch_applied();
    let mut cursors: HashMap<String, u64> = HashMap::new();
    let mut unacked: HashMap<String, Unacked> = HashMap::new();
    let mut first_pass = true;
    loop {
        applied.borrow_and_update();
        let Ok(topics) = sm.topics() else { return };
        let mut waiting_for_acks = false;
        for (topic, meta) in topics {
            let Ok(t) = Topic::new(&topic) else { continue };
            if !filter.matches(&t) {
                continue;
            }
            // A durable subscription continues after its last acknowledged event.
            let acked = durable
                .as_ref()
                .and_then(|d| sm.cursor(&d.name, &topic).ok().flatten());
            let cursor = cursors
                .entry(topic.clone())
                .or_insert_with(|| match (acked, from) {
                    (Some(next), _) => next.clamp(meta.first, meta.next),
                    (None, from) => match from {
                        From::Earliest => meta.first,
                        // Topics that appear after the subscription started are new: all of them.
                        From::Latest if first_pass => meta.next,
                        From::Latest => meta.first,
                        From::Offset(n) => n.clamp(meta.first, meta.next),
                        From::Time(ms) => sm.offset_at(&topic, ms).unwrap_or(meta.next),
                    },
                });
            let track = unacked.entry(topic.clone()).or_insert_with(|| Unacked {
                start: *cursor,
                sent: Default::default(),
                given_up: None,
            });
            // The oldest event sent and not acknowledged, and how far sending may run ahead.
            let mut limit = meta.next;
            if let Some(d) = &durable {
                let floor = acked.unwrap_or(track.start).max(meta.first);
                limit = meta
                    .next
                    .min(floor.saturating_add(d.redelivery.max_pending));
                track.sent = track.sent.split_off(&floor);
                if *cursor > floor && track.given_up != Some(floor) {
                    waiting_for_acks = true;
                    let (at, sends) = *track.sent.entry(floor).or_insert((Instant::now(), 1));
                    if at.elapsed() >= d.redelivery.ack_timeout {
                        if sends >= d.redelivery.max_deliveries {
                            // Give up on it: acknowledge it for the client and say so.
                            let notice = serde_json::json!({
                                "topic": topic, "from": floor, "to": floor + 1,
                                "reason": format!("not acknowledged after {sends} deliveries"),
                            });
                            if tx.send(Delivery::Lagged(notice.to_string())).await.is_err() {
                                return;
                            }
                            let ack = Request {
                                id: None,
                                op: Op::Ack {
                                    subscription: d.name.clone(),
                                    topic: topic.clone(),
                                    offset: floor,
                                },
                            };
                            match d.consensus.write_batched(TOPIC_GROUP, ack).await {
                                Ok(_) => track.given_up = Some(floor),
                                Err(e) => {
                                    tracing::debug!(error = %e, "giving up on an event not committed; later")
                                }
                            }
                        } else {
                            // Go back to the oldest unacknowledged event and send on from there.
                            *cursor = floor;
                        }
                    }
                }
            }
            if *cursor < meta.first {
                let gap = Lagged {
                    topic: topic.clone(),
                    from: *cursor,
                    to: meta.first,
                };
                let Ok(json) = serde_json::to_string(&gap) else {
                    return;
                };
                if tx.send(Delivery::Lagged(json)).await.is_err() {
                    return;
                }
                *cursor = meta.first;
            }
            while *cursor < limit {
                let Ok(batch) = sm.events(&topic, *cursor, 256) else {
                    return;
                };
                if batch.is_empty() {
                    break;
                }
                for e in batch.iter().take_while(|e| e.offset < limit) {
                    let Some(d) = message(
                        Some(format!("{topic}:{}", e.offset)),
                        &stored_event(&topic, e),
                    ) else {
                        return;
                    };
                    // Waits while the client is slow: backpressure, not loss.
                    if tx.send(d).await.is_err() {
                        return;
                    }
                    if durable.is_some() {
                        let entry = track.sent.entry(e.offset).or_insert((Instant::now(), 0));
                        *entry = (Instant::now(), entry.1 + 1);
                    }
                    *cursor = e.offset + 1;
                }
            }
            if durable.is_some() && *cursor > acked.unwrap_or(track.start).max(meta.first) {
                waiting_for_acks = true;
            }
        }
        first_pass = false;
        // Redelivery needs a clock; a subscription with nothing unacknowledged does not.
        let tick = match &durable {
            Some(d) if waiting_for_acks => d.redelivery.ack_timeout / 4,
            _ => Duration::from_secs(3600),
        };
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(tick) => {}
            _ = tx.closed() => return,
        }
    }
}

/// The start of durable subscription `name`: as stored when it was created, or `from`
/// (with `latest` fixed to now) stored now if it is new.
async fn durable_start(
    st: &ApiState,
    sm: &canal_consensus::StateMachine,
    name: &str,
    from: From,
) -> Result<From, ApiError> {
    let key = canal_consensus::topics::subscription_key(name);
    let internal = |e: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e);
    let decode = |b: &[u8]| -> Option<From> {
        let s = std::str::from_utf8(b).ok()?;
        match s.split_once(':') {
            Some(("offset", n)) => n.parse().ok().map(From::Offset),
            Some(("time", t)) => t.parse().ok().map(From::Time),
            _ if s == "earliest" => Some(From::Earliest),
            _ => None,
        }
    };
    if let Some(b) = sm.get(&key).map_err(|e| internal(e.to_string()))? {
        return decode(&b)
            .ok_or_else(|| internal(format!("durable subscription {name} has a damaged start")));
    }
    let spec = match from {
        From::Earliest => "earliest".to_string(),
        From::Latest => format!("time:{}", now_ms()),
        From::Offset(n) => format!("offset:{n}"),
        From::Time(t) => format!("time:{t}"),
    };
    // The request id makes the first creation win if two race.
    st.consensus
        .write(
            TOPIC_GROUP,
            Request {
                id: Some(format!("durable-start/{name}")),
                op: Op::Internal {
                    key: canal_consensus::InternalKey::Subscription(name.to_string()),
                    value: Some(spec.into_bytes()),
                },
            },
        )
        .await?;
    let stored = sm.get(&key).map_err(|e| internal(e.to_string()))?;
    Ok(stored.as_deref().and_then(decode).unwrap_or(from))
}

/// Checks a durable subscription's name.
pub fn check_subscription_name(name: &str) -> Result<String, ApiError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ApiError::bad_request(
            "invalid_durable",
            format!(
                "subscription name {name:?} is not allowed: use 1-64 letters, digits, `-`, `_` or `.`"
            ),
        ));
    }
    Ok(name.to_string())
}

/// `POST /v1/subscriptions/{name}/ack?topic=T&offset=N`: durable subscription `name` has
/// processed `topic` up to and including `offset`; it resumes after it, on any node.
pub async fn ack(st: &ApiState, name: &str, q: &HashMap<String, String>) -> Result<u64, ApiError> {
    let name = check_subscription_name(name)?;
    let topic = q.get("topic").ok_or_else(|| {
        ApiError::bad_request("invalid_ack", "topic is missing: add ?topic=T&offset=N")
    })?;
    let topic =
        Topic::new(topic).map_err(|e| ApiError::bad_request("invalid_topic", e.to_string()))?;
    let offset: u64 = q
        .get("offset")
        .and_then(|o| o.parse().ok())
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_ack",
                "offset must be a whole number: add ?topic=T&offset=N",
            )
        })?;
    let r = st
        .consensus
        .write_batched(
            TOPIC_GROUP,
            Request {
                // Acks are idempotent (a cursor only moves forward), so need no id.
                id: None,
                op: Op::Ack {
                    subscription: name,
                    topic: topic.to_string(),
                    offset,
                },
            },
        )
        .await?;
    if let Some(why) = r.refused {
        return Err(ApiError::bad_request("invalid_ack", why));
    }
    Ok(r.offset.unwrap_or(offset + 1))
}

#[cfg(test)]
mod qos0_tests {
    use super::*;

    fn event(source: String) -> Qos0Message {
        Qos0Message {
            topic: "a/b".into(),
            id: "1".into(),
            source,
            time_ms: 1,
            headers: vec![],
            payload: b"x".to_vec(),
        }
    }

    #[test]
    fn qos0_events_are_checked() {
        let peer = libp2p::PeerId::random();
        let good = wire::encode(&event(format!("canal://{peer}"))).unwrap_or_default();
        assert!(check_qos0(&peer, &good).is_ok());
        let forged = wire::encode(&event(format!("canal://{}", libp2p::PeerId::random())))
            .unwrap_or_default();
        assert_eq!(
            check_qos0(&peer, &forged).err().map(|e| e.0),
            Some("qos0-forged")
        );
        assert_eq!(
            check_qos0(&peer, &good[..good.len() - 1])
                .err()
                .map(|e| e.0),
            Some("qos0-decode")
        );
        let mut bad_topic = event(format!("canal://{peer}"));
        bad_topic.topic = "a/#".into();
        let bytes = wire::encode(&bad_topic).unwrap_or_default();
        assert_eq!(
            check_qos0(&peer, &bytes).err().map(|e| e.0),
            Some("qos0-invalid")
        );
    }
}
