//! The HTTP client API: `/v1/health`, `/v1/peers`, `/v1/topics/{topic}/locate`, `/metrics`.
//!
//! Every error answer is JSON `{ "error": "...", "kind": "..." }` with a fitting status code.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use canal_dht::DhtHandle;
use canal_proto::Topic;
use canal_proto::api::{ErrorBody, Health, HomePeer, Locate, PeerInfo, Peers};
use libp2p::metrics::Registry;
use std::sync::Arc;
use std::time::Instant;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The peer mesh.
    pub dht: DhtHandle,
    /// Prometheus metrics of every part of the node.
    pub registry: Arc<Registry>,
    /// When the node started.
    pub started: Instant,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
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
        .route("/v1/topics/{*rest}", get(topic_get))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::not_found(
                "no such endpoint: the API has /v1/health, /v1/peers, /v1/topics/{topic}/locate and /metrics",
            )
        })
        .with_state(state)
}

async fn health(State(st): State<ApiState>) -> Response {
    let readiness = st.dht.readiness();
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
    Path(rest): Path<String>,
) -> Result<Response, ApiError> {
    let Some(topic) = rest.strip_suffix("/locate") else {
        return Err(ApiError::not_found(format!(
            "no such topic endpoint {rest:?}: use /v1/topics/{{topic}}/locate"
        )));
    };
    let topic =
        Topic::new(topic).map_err(|e| ApiError::bad_request("invalid_topic", e.to_string()))?;
    Ok(axum::Json(locate(&st.dht, &topic)).into_response())
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

async fn metrics(State(st): State<ApiState>) -> Result<Response, ApiError> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &st.registry).map_err(|e| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        kind: "internal",
        message: format!("cannot encode metrics: {e}"),
    })?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
