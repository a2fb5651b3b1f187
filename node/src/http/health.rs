//! `/v1/health`, `/v1/peers` and `/metrics`.

use super::{ApiError, ApiState};
use axum::extract::State;
use axum::http::{StatusCode, header};
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

pub(super) async fn metrics(State(st): State<ApiState>) -> Result<Response, ApiError> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &st.registry).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("cannot encode metrics: {e}"),
        )
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
