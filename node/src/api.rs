//! The HTTP client API: `/v1/health`, `/v1/peers`, `/v1/topics/{topic}/locate`, `/metrics`.
//!
//! Every error answer is JSON `{ "error": "...", "kind": "..." }` with a fitting status code.

use crate::cluster::{MeshTransport, node_id};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use canal_consensus::{ClientError, Consensus, GroupId, Op, Request};
use canal_dht::DhtHandle;
use canal_proto::Topic;
use canal_proto::api::{
    ClusterStatus, ErrorBody, GroupStatus, Health, HomePeer, KvWritten, Locate, MemberReport,
    PeerInfo, Peers, StateDigest,
};
use libp2p::metrics::Registry;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The peer mesh.
    pub dht: DhtHandle,
    /// The Raft groups.
    pub consensus: Consensus<MeshTransport>,
    /// This node's QoS 0 subscribers.
    pub qos0: crate::pubsub::Qos0Hub,
    /// Functions and triggers.
    pub functions: Arc<crate::functions::Functions>,
    /// Prometheus metrics of every part of the node.
    pub registry: Arc<Registry>,
    /// When the node started.
    pub started: Instant,
    /// Becomes true when the node shuts down; long-lived streams end then.
    pub closing: tokio::sync::watch::Receiver<bool>,
    /// One permit per subscriber this node may serve at once (SSE and WebSocket).
    pub subscribers: Arc<tokio::sync::Semaphore>,
    /// How many that is, for the error that says so.
    pub max_subscribers: usize,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    /// An answer with the given status, kind and message.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }

    /// A 400 answer of the given kind.
    pub fn bad_request(kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind,
            message: message.into(),
        }
    }

    /// A 404 answer.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "not_found",
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
            kind: self.kind.to_string(),
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// Builds the router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/peers", get(peers))
        .route(
            "/v1/topics/{*rest}",
            get(topic_get)
                .post(topic_post)
                .put(topic_put)
                .delete(topic_delete),
        )
        .route("/v1/subscribe", get(subscribe))
        .route("/v1/subscriptions/{name}/ack", axum::routing::post(ack))
        .route("/v1/cluster/status", get(cluster_status))
        .route("/v1/cluster/digest", get(cluster_digest))
        .route("/v1/cluster/remove/{peer}", axum::routing::post(cluster_remove))
        .route("/v1/cluster/admit/{peer}", axum::routing::post(cluster_admit))
        .route("/v1/kv/{*key}", get(kv_get).put(kv_put).post(kv_add))
        .route("/metrics", get(metrics))
        .route("/v1/functions", get(fn_list))
        .route(
            "/v1/functions/{name}",
            get(fn_get)
                .put(fn_deploy)
                .delete(fn_remove)
                .layer(DefaultBodyLimit::max(
                    canal_proto::function::MAX_MODULE_BYTES + 1024,
                )),
        )
        .route("/v1/functions/{name}/invoke", axum::routing::post(fn_invoke))
        .route("/v1/functions/{name}/placement", get(fn_placement))
        .route("/v1/functions/{name}/state", get(fn_state_list))
        .route("/v1/functions/{name}/state/{*key}", get(fn_state_get))
        .route("/v1/triggers", get(trigger_list))
        .route(
            "/v1/triggers/{name}",
            get(trigger_get).put(trigger_put).delete(trigger_delete),
        )
        .layer(DefaultBodyLimit::max(MAX_VALUE_BYTES + 1024))
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method: see the API list in README.md",
            )
        })
        .fallback(|| async {
            ApiError::not_found(
                "no such endpoint: the API has /v1/health, /v1/peers, /v1/topics/{topic}/locate, POST /v1/topics/{topic}/events, /v1/subscribe, /v1/cluster/status, /v1/cluster/digest, /v1/cluster/admit/{peer}, /v1/cluster/remove/{peer}, /v1/kv/{key}, /v1/functions[/{name}[/invoke|/state|/placement]], /v1/triggers[/{name}] and /metrics",
            )
        })
        .with_state(state)
}

async fn health(State(st): State<ApiState>) -> Response {
    // A Raft group that stopped no longer replicates: the node must not pass as healthy.
    let readiness = st.dht.readiness().and_then(|()| st.consensus.health());
    let body = Health {
        peer_id: st.dht.local_peer_id().to_base58(),
        version: canal_proto::VERSION.to_string(),
        ready: readiness.is_ok(),
        reason: readiness.err(),
        uptime_s: st.started.elapsed().as_secs(),
        listen_addrs: st
            .dht
            .listen_addrs()
            .iter()
            .map(|a| a.to_string())
            .collect(),
        peers: st.dht.peers().len(),
        connections: st.dht.connections(),
    };
    // Load balancers and compose health checks read the status; people read the body.
    let status = if body.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn peers(State(st): State<ApiState>) -> axum::Json<Peers> {
    let peers = st
        .dht
        .peers()
        .into_iter()
        .map(|p| PeerInfo {
            caps: p.caps,
            is_self: p.is_self,
            connected: p.connected,
            last_seen_ms: p.last_seen.as_millis() as u64,
            rtt_ms: p.rtt.map(|d| d.as_secs_f64() * 1000.0),
        })
        .collect();
    axum::Json(Peers {
        local_peer_id: st.dht.local_peer_id().to_base58(),
        peers,
    })
}

/// `/v1/topics/{topic}/{action}`: the topic may contain `/` (raw, or percent-encoded as
/// `%2F`), so the action is taken from the end of the path.
async fn topic_get(
    State(st): State<ApiState>,
    rest: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Response, ApiError> {
    let Path(rest) = rest.map_err(|e| {
        ApiError::bad_request(
            "invalid_topic",
            format!("the topic in the path does not read: {e}"),
        )
    })?;
    // `/v1/topics/locate` names an empty topic.
    let rest = if rest == "locate" {
        "/locate".to_string()
    } else {
        rest
    };
    if let Some(filter) = rest.strip_suffix("/settings") {
        let filter = settings_filter(filter)?;
        return Ok(axum::Json(crate::pubsub::get_settings(&st, &filter)?).into_response());
    }
    if let Some(topic) = rest.strip_suffix("/log") {
        let topic =
            Topic::new(topic).map_err(|e| ApiError::bad_request("invalid_topic", e.to_string()))?;
        let sm = st.consensus.state_machine(crate::pubsub::TOPIC_GROUP)?;
        let meta = sm
            .topic_meta(topic.as_str())
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })?
            .unwrap_or_default();
        return Ok(axum::Json(canal_proto::api::TopicLog {
            topic: topic.to_string(),
            first: meta.first,
            next: meta.next,
        })
        .into_response());
    }
    let Some(topic) = rest.strip_suffix("/locate") else {
        return Err(ApiError::not_found(format!(
            "no such topic endpoint {rest:?}: use /v1/topics/{{topic}}/locate, /v1/topics/{{topic}}/log or /v1/topics/{{topic-or-filter}}/settings"
        )));
    };
    let topic =
        Topic::new(topic).map_err(|e| ApiError::bad_request("invalid_topic", e.to_string()))?;
    Ok(axum::Json(locate(&st.dht, &topic)).into_response())
}

fn settings_filter(s: &str) -> Result<canal_proto::TopicFilter, ApiError> {
    canal_proto::TopicFilter::new(s)
        .map_err(|e| ApiError::bad_request("invalid_filter", e.to_string()))
}

fn no_topic_endpoint(rest: &str) -> ApiError {
    ApiError::not_found(format!(
        "no such topic endpoint {rest:?}: PUT and DELETE take /v1/topics/{{topic-or-filter}}/settings"
    ))
}

/// `PUT /v1/topics/{topic-or-filter}/settings`.
async fn topic_put(
    State(st): State<ApiState>,
    Path(rest): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(too_large)?;
    let filter = settings_filter(
        rest.strip_suffix("/settings")
            .ok_or_else(|| no_topic_endpoint(&rest))?,
    )?;
    let req: canal_proto::settings::SettingsRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_settings",
            format!("the settings are not JSON of the expected shape ({e}): send {{\"retain_events\"?: N, \"retain_bytes\"?: SIZE, \"retain_age\"?: DURATION, \"max_payload\"?: SIZE}}"),
        )
    })?;
    Ok(axum::Json(crate::pubsub::put_settings(&st, &filter, req).await?).into_response())
}

/// `DELETE /v1/topics/{topic-or-filter}/settings`.
async fn topic_delete(
    State(st): State<ApiState>,
    Path(rest): Path<String>,
) -> Result<StatusCode, ApiError> {
    let filter = settings_filter(
        rest.strip_suffix("/settings")
            .ok_or_else(|| no_topic_endpoint(&rest))?,
    )?;
    crate::pubsub::delete_settings(&st, &filter).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A body that could not be read: almost always one over the size limit.
fn too_large(r: BytesRejection) -> ApiError {
    ApiError::new(
        r.status(),
        "too_large",
        format!(
            "the request body was refused ({}): payloads and values may be at most {} bytes",
            r.body_text(),
            crate::pubsub::MAX_PAYLOAD_BYTES
        ),
    )
}

/// `POST /v1/topics/{topic}/events`: publish.
async fn topic_post(
    State(st): State<ApiState>,
    Path(rest): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<canal_proto::api::Published>, ApiError> {
    let body = body.map_err(too_large)?;
    let Some(topic) = rest.strip_suffix("/events") else {
        return Err(ApiError::not_found(format!(
            "no such topic endpoint {rest:?}: publish with POST /v1/topics/{{topic}}/events"
        )));
    };
    Ok(axum::Json(
        crate::pubsub::publish(&st, topic, &headers, &body).await?,
    ))
}

async fn ack(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let next = crate::pubsub::ack(&st, &name, &q).await?;
    Ok(axum::Json(
        serde_json::json!({ "subscription": name, "next_offset": next }),
    ))
}

async fn subscribe(
    State(st): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
    ws: Result<
        axum::extract::ws::WebSocketUpgrade,
        axum::extract::ws::rejection::WebSocketUpgradeRejection,
    >,
) -> Result<Response, ApiError> {
    match ws {
        // A WebSocket upgrade request gets a WebSocket; anything else Server-Sent Events.
        Ok(ws) => crate::pubsub::subscribe_ws(st, q, ws).await,
        Err(_) => Ok(crate::pubsub::subscribe(st, q).await?.into_response()),
    }
}

/// The locate answer for `topic`, from the peers this node knows alive.
pub fn locate(dht: &DhtHandle, topic: &Topic) -> Locate {
    let space = dht.topic_space();
    let (placement, members) = dht.locate(topic);
    let home: Vec<HomePeer> = placement
        .home
        .iter()
        .map(|(p, d)| HomePeer {
            peer_id: p.to_base58(),
            distance: hex::encode(d),
        })
        .collect();
    Locate {
        topic: topic.to_string(),
        key: hex::encode(placement.key),
        shard: placement.shard,
        shards: space.shards,
        shard_key: hex::encode(placement.shard_key),
        replication_factor: space.replication,
        // Until a placement decision is committed for the shard, the `topology` policy
        // (the DHT's own answer) decides, so the replicas are the home peers.
        replicas: home.iter().map(|h| h.peer_id.clone()).collect(),
        policy: "topology".to_string(),
        home,
        members,
    }
}

/// `GET /metrics`: OpenMetrics to scrapers that ask for it (Prometheus does), the
/// Prometheus text format to everyone else (`promtool check metrics`, `curl`).
async fn metrics(State(st): State<ApiState>, headers: HeaderMap) -> Result<Response, ApiError> {
    use crate::metrics_text::{
        OPENMETRICS_TEXT, PROMETHEUS_TEXT, to_prometheus_text, wants_openmetrics,
    };
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &st.registry).map_err(|e| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        kind: "internal",
        message: format!("cannot encode metrics: {e}"),
    })?;
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    if wants_openmetrics(accept) {
        return Ok(([(header::CONTENT_TYPE, OPENMETRICS_TEXT)], text).into_response());
    }
    Ok((
        [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
        to_prometheus_text(&text),
    )
        .into_response())
}

/// The largest value `PUT /v1/kv/{key}` accepts.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// The longest key accepted.
pub const MAX_KEY_BYTES: usize = 1024;

fn parse_group(s: Option<&String>, default: GroupId) -> Result<GroupId, ApiError> {
    let Some(s) = s else { return Ok(default) };
    let n = if s == "metadata" {
        Some(0)
    } else {
        s.strip_prefix("data-").unwrap_or(s).parse::<u32>().ok()
    };
    n.map(GroupId).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_group",
            format!("group {s:?} is not a group: write metadata, or data-N (data-1)"),
        )
    })
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        let (status, kind) = match &e {
            ClientError::NotInitialized(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_formed"),
            ClientError::NoLeader { .. } | ClientError::NotLeader { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "no_leader")
            }
            ClientError::UnknownGroup(_) => (StatusCode::NOT_FOUND, "not_found"),
            ClientError::Other(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            ClientError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ClientError::Refused { .. } => (StatusCode::FORBIDDEN, "refused"),
        };
        ApiError {
            status,
            kind,
            message: e.to_string(),
        }
    }
}

async fn cluster_status(State(st): State<ApiState>) -> Result<axum::Json<ClusterStatus>, ApiError> {
    let mut groups = Vec::new();
    for g in st.consensus.groups() {
        let members = st
            .consensus
            .status(g)
            .await?
            .into_iter()
            .map(|(id, r)| match r {
                Ok(s) => MemberReport {
                    node_id: id,
                    status: Some(s),
                    error: None,
                },
                Err(e) => MemberReport {
                    node_id: id,
                    status: None,
                    error: Some(e),
                },
            })
            .collect();
        groups.push(GroupStatus {
            group: g.to_string(),
            members,
        });
    }
    Ok(axum::Json(ClusterStatus {
        node_id: st.consensus.node_id(),
        groups,
    }))
}

async fn cluster_digest(
    State(st): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<axum::Json<StateDigest>, ApiError> {
    let g = parse_group(q.get("group"), GroupId(1))?;
    let sm = st.consensus.state_machine(g)?;
    let internal = |e: openraft_error::E| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        kind: "internal",
        message: e.to_string(),
    };
    Ok(axum::Json(StateDigest {
        group: g.to_string(),
        digest: sm.digest().map_err(internal)?,
        applied_index: sm.applied().map_err(internal)?.map(|l| l.index),
        keys: sm.scan("").map_err(internal)?.len(),
    }))
}

/// The storage error type of the state machine, named once.
mod openraft_error {
    pub(super) type E = canal_consensus::store::StorageErrorOf;
}

fn parse_peer(peer: &str) -> Result<libp2p::PeerId, ApiError> {
    peer.parse().map_err(|e| {
        ApiError::bad_request(
            "invalid_peer",
            format!("{peer:?} is not a peer id ({e}): copy one from `canal peers` or `canal cluster status`"),
        )
    })
}

/// Records that a peer may join (meshes without a cluster key admit nobody on their own);
/// the membership job of the metadata leader adds it as a learner once it is seen.
async fn cluster_admit(
    State(st): State<ApiState>,
    Path(peer): Path<String>,
) -> Result<StatusCode, ApiError> {
    let peer = parse_peer(&peer)?;
    st.consensus
        .write_op(
            GroupId::METADATA,
            Op::Internal {
                key: canal_consensus::InternalKey::Admitted(peer.to_base58()),
                value: Some(b"admitted".to_vec()),
            },
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn cluster_remove(
    State(st): State<ApiState>,
    Path(peer): Path<String>,
) -> Result<StatusCode, ApiError> {
    let peer = parse_peer(&peer)?;
    let id = node_id(&peer);
    // First the tombstone, so the membership job never adds the peer back as a learner.
    st.consensus
        .write_op(
            GroupId::METADATA,
            Op::Internal {
                key: canal_consensus::InternalKey::Removed(peer.to_base58()),
                value: Some(b"removed".to_vec()),
            },
        )
        .await?;
    for g in st.consensus.groups() {
        st.consensus.remove(g, id).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

fn check_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES || key.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_key",
            format!(
                "key {key:?} is not allowed: 1 to {MAX_KEY_BYTES} bytes, no control characters"
            ),
        ));
    }
    Ok(())
}

/// The read mode a request asks for with `?read=`: linearizable (the default, through the
/// leader) or local (this node's replica, which may lag).
fn linearizable(q: &HashMap<String, String>) -> Result<bool, ApiError> {
    match q.get("read").map(String::as_str) {
        None | Some("linearizable") => Ok(true),
        Some("local") => Ok(false),
        Some(other) => Err(ApiError::bad_request(
            "invalid_read",
            format!("read={other:?} is not a read mode: use linearizable (the default) or local"),
        )),
    }
}

static REQUEST_SEQ: AtomicU64 = AtomicU64::new(0);

/// The write's request id: the client's `canal-request-id` header, or a fresh one. Every write
/// carries an id, so that the forwarding layer may retry it safely; a client that retries
/// itself gives its own.
fn request_id(st: &ApiState, headers: &HeaderMap) -> Result<String, ApiError> {
    match headers.get("canal-request-id") {
        Some(v) => {
            let v = v.to_str().map_err(|_| {
                ApiError::bad_request(
                    "invalid_request_id",
                    "canal-request-id must be printable ASCII",
                )
            })?;
            if v.is_empty() || v.len() > 256 {
                return Err(ApiError::bad_request(
                    "invalid_request_id",
                    "canal-request-id must be 1 to 256 characters",
                ));
            }
            Ok(v.to_string())
        }
        None => Ok(fresh_id(st)),
    }
}

/// A request id no other request of any node has: peer id, time, sequence.
pub fn fresh_id(st: &ApiState) -> String {
    format!(
        "{}-{}-{}",
        st.dht.local_peer_id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
        REQUEST_SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// `POST /v1/kv/{key}?add=N`: adds N to the number at `key`, atomically.
async fn kv_add(
    State(st): State<ApiState>,
    Path(key): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<axum::Json<KvWritten>, ApiError> {
    check_key(&key)?;
    let g = parse_group(q.get("group"), GroupId(1))?;
    let delta: i64 = q
        .get("add")
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_op",
                "POST /v1/kv/{key} needs ?add=N (a whole number)",
            )
        })?
        .parse()
        .map_err(|_| {
            ApiError::bad_request(
                "invalid_op",
                "add=N must be a whole number, such as 1 or -5",
            )
        })?;
    kv_write(&st, g, &headers, Op::Add { key, delta }).await
}

async fn kv_put(
    State(st): State<ApiState>,
    Path(key): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<KvWritten>, ApiError> {
    let body = body.map_err(too_large)?;
    check_key(&key)?;
    let g = parse_group(q.get("group"), GroupId(1))?;
    if body.len() > MAX_VALUE_BYTES {
        return Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            kind: "too_large",
            message: format!(
                "value is {} bytes: at most {MAX_VALUE_BYTES} are allowed",
                body.len()
            ),
        });
    }
    kv_write(
        &st,
        g,
        &headers,
        Op::Put {
            key,
            value: body.to_vec(),
        },
    )
    .await
}

/// Commits one KV operation with the request's id and answers where it landed; an operation
/// the state machine refused (an add to a non-number) is a 409.
async fn kv_write(
    st: &ApiState,
    g: GroupId,
    headers: &HeaderMap,
    op: Op,
) -> Result<axum::Json<KvWritten>, ApiError> {
    let id = request_id(st, headers)?;
    let r = st
        .consensus
        .write_batched(g, Request { id: Some(id), op })
        .await?;
    if let Some(why) = r.refused {
        return Err(ApiError::new(StatusCode::CONFLICT, "refused", why));
    }
    Ok(axum::Json(KvWritten {
        index: r.index,
        duplicate: r.duplicate,
    }))
}

async fn kv_get(
    State(st): State<ApiState>,
    Path(key): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    check_key(&key)?;
    let g = parse_group(q.get("group"), GroupId(1))?;
    let linearizable = linearizable(&q)?;
    let mode = if linearizable {
        "linearizable"
    } else {
        "local"
    };
    match st.consensus.read(g, &key, linearizable).await? {
        Some(v) => Ok(([("canal-read", mode)], v).into_response()),
        None => Err(ApiError::not_found(format!("no key {key:?} in group {g}"))),
    }
}

async fn fn_list(
    State(st): State<ApiState>,
) -> Result<axum::Json<canal_proto::function::FunctionList>, ApiError> {
    Ok(axum::Json(canal_proto::function::FunctionList {
        functions: st.functions.functions()?,
    }))
}

async fn fn_get(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<axum::Json<canal_proto::function::FunctionSpec>, ApiError> {
    st.functions
        .function(&name)?
        .map(axum::Json)
        .ok_or_else(|| ApiError::not_found(format!("no function named {name}")))
}

async fn fn_deploy(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| {
        ApiError::new(
            r.status(),
            "too_large",
            format!(
                "the module was refused ({}): modules may be at most {} bytes",
                r.body_text(),
                canal_proto::function::MAX_MODULE_BYTES
            ),
        )
    })?;
    let (status, deployed) = crate::functions::deploy(&st, &name, &q, &body).await?;
    Ok((status, axum::Json(deployed)).into_response())
}

async fn fn_remove(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    crate::functions::remove(&st, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn fn_invoke(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<canal_proto::function::InvokeResult>, ApiError> {
    let body = body.map_err(too_large)?;
    Ok(axum::Json(
        crate::functions::invoke(&st, &name, &headers, &body).await?,
    ))
}

async fn fn_placement(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<axum::Json<canal_proto::api::PlacementAnswer>, ApiError> {
    let spec = st
        .functions
        .function(&name)?
        .ok_or_else(|| ApiError::not_found(format!("no function named {name}")))?;
    Ok(axum::Json(canal_proto::api::PlacementAnswer {
        function: spec.name.clone(),
        policy: crate::placer::policy_of(&spec).to_string(),
        committed: crate::placer::placed(&st.functions, &spec.name),
        live: crate::placer::decide_now(&st.functions, &st.dht, &spec),
        answered_by: st.functions.peer_id.clone(),
    }))
}

async fn fn_state_get(
    State(st): State<ApiState>,
    Path((name, key)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let local = !linearizable(&q)?;
    match crate::functions::state_get(&st, &name, &key, local).await? {
        Some(v) => Ok(v.into_response()),
        None => Err(ApiError::not_found(format!(
            "function {name} has no state at {key:?}"
        ))),
    }
}

async fn fn_state_list(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<axum::Json<canal_proto::api::StateList>, ApiError> {
    let prefix = q.get("prefix").map(String::as_str).unwrap_or("");
    Ok(axum::Json(crate::functions::state_list(
        &st, &name, prefix,
    )?))
}

async fn trigger_list(
    State(st): State<ApiState>,
) -> Result<axum::Json<canal_proto::function::TriggerList>, ApiError> {
    Ok(axum::Json(canal_proto::function::TriggerList {
        triggers: st.functions.triggers()?,
    }))
}

async fn trigger_get(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<axum::Json<canal_proto::function::TriggerSpec>, ApiError> {
    st.functions
        .triggers()?
        .into_iter()
        .find(|t| t.name == name)
        .map(axum::Json)
        .ok_or_else(|| ApiError::not_found(format!("no trigger named {name}")))
}

async fn trigger_put(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(too_large)?;
    // Any content type: curl users should not have to say it is JSON.
    let req: canal_proto::function::TriggerRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_trigger",
            format!("the trigger is not JSON of the expected shape ({e}): send {{\"on\": FILTER, \"fn\": FUNCTION, \"out\"?: TOPIC, \"qos\"?: 0|1, \"retries\"?: N, \"dead_letter\"?: TOPIC}}"),
        )
    })?;
    let spec = crate::functions::trigger_add(&st, &name, req).await?;
    Ok((StatusCode::CREATED, axum::Json(spec)).into_response())
}

async fn trigger_delete(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    crate::functions::trigger_remove(&st, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
