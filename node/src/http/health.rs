//! `/v1/health`, `/v1/peers` and `/metrics`.

use super::{ApiError, ApiState};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use canal_proto::api::{Health, PeerInfo, Peers};

pub(super) async fn health(State(st): State<ApiState>) -> Response {
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
        mqtt_addr: st.mqtt_addr.map(|a| a.to_string()),
        mqtts_addr: st.mqtts_addr.map(|a| a.to_string()),
    };
    // Load balancers and compose health checks read the status; people read the body.
    let status = if body.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

pub(super) async fn peers(State(st): State<ApiState>) -> axum::Json<Peers> {
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

/// `GET /metrics`: OpenMetrics to scrapers that ask for it (Prometheus does), the
/// Prometheus text format to everyone else (`promtool check metrics`, `curl`).
pub(super) async fn metrics(
    State(st): State<ApiState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    use super::metrics_text::{
        OPENMETRICS_TEXT, PROMETHEUS_TEXT, to_prometheus_text, wants_openmetrics,
    };
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &st.registry).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("cannot encode metrics: {e}"),
        )
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
