//! The HTTP client API, on top of the node's services: the axum router, the state its
//! handlers share, request parsing and the error answer. Nothing below this module names an
//! HTTP type.
//!
//! Every error answer is JSON `{ "error": "...", "kind": "..." }` with a fitting status code.
//!
//! - [`error`]: [`ApiError`] and how each service's error maps to a status and kind.
//! - [`parse`]: headers and query parameters into typed values.
//! - [`health`], [`cluster`], [`kv`], [`functions`], [`topics`], [`publish`], [`subscribe`]: the handlers,
//!   by area.

pub mod auth;
pub mod cluster;
pub mod error;
pub mod functions;
pub mod health;
pub mod kv;
mod metrics_text;
mod mqtt_ws;
pub mod parse;
pub mod publish;
pub mod subscribe;
pub mod tls;
pub mod topics;

pub use error::ApiError;
pub use kv::{MAX_KEY_BYTES, MAX_VALUE_BYTES};
pub use parse::fresh_id;
pub use topics::locate;

use crate::NodeTransport;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::get;
use canal_consensus::Consensus;
use canal_dht::DhtHandle;
use cluster::{cluster_admit, cluster_digest, cluster_remove, cluster_shards, cluster_status};
use functions::{
    fn_deploy, fn_get, fn_invoke, fn_list, fn_placement, fn_remove, fn_state_get, fn_state_list,
    trigger_delete, trigger_get, trigger_list, trigger_put,
};
use health::{health, metrics, peers};
use kv::{kv_add, kv_get, kv_put};
use libp2p::metrics::Registry;
use std::sync::Arc;
use std::time::Instant;
use subscribe::subscribe;
use topics::{ack, events_post, topic_delete, topic_get, topic_post, topic_put};

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The peer mesh.
    pub dht: DhtHandle,
    /// The Raft groups.
    pub consensus: Consensus<NodeTransport>,
    /// Publishing and subscribing (QoS 0 through this node's hub).
    pub pubsub: crate::pubsub::PubSub,
    /// MQTT over WebSocket (`/mqtt`), on the same service as the MQTT listener.
    pub mqtt: crate::pubsub::Mqtt,
    /// The MQTT listener's address, if MQTT over TCP is on.
    pub mqtt_addr: Option<std::net::SocketAddr>,
    /// The MQTT-over-TLS listener's address, if it is on.
    pub mqtts_addr: Option<std::net::SocketAddr>,
    /// Functions and triggers.
    pub functions: Arc<crate::functions::Functions<NodeTransport>>,
    /// Prometheus metrics of every part of the node.
    pub registry: Arc<Registry>,
    /// When the node started.
    pub started: Instant,
    /// Becomes true when the node shuts down; long-lived streams end then.
    pub closing: tokio::sync::watch::Receiver<bool>,
    /// One permit per publish stream this node may serve at once.
    pub publish_streams: Arc<tokio::sync::Semaphore>,
    /// How many that is (`max_publish_streams`), for the error that says so.
    pub max_publish_streams: usize,
    /// Tokens: the gate every request passes, issuing and revoking.
    pub tokens: Arc<crate::tokens::Tokens<NodeTransport>>,
}

/// Builds the router.
pub fn router(state: ApiState) -> Router {
    let gate = axum::middleware::from_fn_with_state(state.clone(), auth::authenticate);
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
        .route("/v1/events", axum::routing::post(events_post))
        .route("/v1/publish", get(publish::publish_stream))
        .route("/v1/subscribe", get(subscribe))
        .route("/mqtt", get(mqtt_ws::mqtt_ws))
        .route("/v1/subscriptions/{name}/ack", axum::routing::post(ack))
        .route("/v1/cluster/status", get(cluster_status))
        .route("/v1/cluster/digest", get(cluster_digest))
        .route("/v1/cluster/shards", get(cluster_shards))
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
        .route(
            "/v1/tokens",
            get(auth::token_list).post(auth::token_create),
        )
        .route(
            "/v1/tokens/{id}",
            axum::routing::delete(auth::token_revoke),
        )
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
                "no such endpoint: the API has /v1/health, /v1/peers, /v1/topics/{topic}/locate, POST /v1/topics/{topic}/events, POST /v1/events, /v1/publish (WebSocket), /v1/subscribe, /mqtt (MQTT over WebSocket), /v1/cluster/status, /v1/cluster/digest, /v1/cluster/shards, /v1/cluster/admit/{peer}, /v1/cluster/remove/{peer}, /v1/kv/{key}, /v1/functions[/{name}[/invoke|/state|/placement]], /v1/triggers[/{name}], /v1/tokens[/{id}] and /metrics",
            )
        })
        .layer(gate)
        .with_state(state)
}

/// Serves the API on `listener` (over TLS when `tls` is given) until `closing` turns true;
/// requests in flight are finished then (the caller bounds how long it waits for that).
pub fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<(Arc<rustls::ServerConfig>, tls::TlsMetrics)>,
    state: ApiState,
    closing: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let app = router(state);
    let mut stopped = closing.clone();
    let shutdown = async move {
        let _ = stopped.wait_for(|c| *c).await;
    };
    Ok(match tls {
        Some((config, metrics)) => {
            let listener = tls::TlsListener::new(listener, config, metrics, closing)?;
            tokio::spawn(async move {
                let serve = axum::serve(listener, app).with_graceful_shutdown(shutdown);
                if let Err(e) = serve.await {
                    tracing::error!(error = %e, "API server failed");
                }
            })
        }
        None => tokio::spawn(async move {
            // Without TCP_NODELAY a small write (an SSE event, a publish ack) waits behind an
            // unacknowledged one for the client's delayed ACK: tens of milliseconds.
            use axum::serve::ListenerExt;
            let listener = listener.tap_io(|tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "TCP_NODELAY not set on an API connection");
                }
            });
            let serve = axum::serve(listener, app).with_graceful_shutdown(shutdown);
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "API server failed");
            }
        }),
    })
}
