//! Reading requests: headers and query parameters into typed values (request id, read mode,
//! group, key and peer checks), each refusal naming what was wrong and what is allowed.

use super::{ApiError, ApiState, MAX_KEY_BYTES};
use axum::http::HeaderMap;
use canal_consensus::GroupId;
use std::collections::HashMap;

pub(super) fn parse_group(s: Option<&String>, default: GroupId) -> Result<GroupId, ApiError> {
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

pub(super) fn parse_peer(peer: &str) -> Result<libp2p::PeerId, ApiError> {
    peer.parse().map_err(|e| {
        ApiError::bad_request(
            "invalid_peer",
            format!("{peer:?} is not a peer id ({e}): copy one from `canal peers` or `canal cluster status`"),
        )
    })
}

pub(super) fn check_key(key: &str) -> Result<(), ApiError> {
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
pub(super) fn linearizable(q: &HashMap<String, String>) -> Result<bool, ApiError> {
    match q.get("read").map(String::as_str) {
        None | Some("linearizable") => Ok(true),
        Some("local") => Ok(false),
        Some(other) => Err(ApiError::bad_request(
            "invalid_read",
            format!("read={other:?} is not a read mode: use linearizable (the default) or local"),
        )),
    }
}

/// The write's request id: the client's `canal-request-id` header, or a fresh one. Every write
/// carries an id, so that the forwarding layer may retry it safely; a client that retries
/// itself gives its own.
pub(super) fn request_id(st: &ApiState, headers: &HeaderMap) -> Result<String, ApiError> {
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
    canal_proto::time::fresh_id(&st.dht.local_peer_id().to_base58())
}

/// The custom headers of a request: `canal-header-NAME: VALUE`, each.
pub fn custom_headers(headers: &HeaderMap) -> Result<Vec<(String, String)>, ApiError> {
    let mut custom = Vec::new();
    for (k, v) in headers {
        if let Some(name) = k.as_str().strip_prefix("canal-header-") {
            let v = v.to_str().map_err(|_| {
                ApiError::from(canal_pubsub::PubSubError::InvalidHeader(format!(
                    "header {name:?} must be printable ASCII"
                )))
            })?;
            custom.push((name.to_string(), v.to_string()));
        }
    }
    Ok(custom)
}

/// A publish to `topic` from its headers (`canal-qos`, `canal-id`, `canal-header-*`) and
/// body, checked in the order clients are told: the topic, the QoS, the id, the headers.
pub(super) fn publish_request(
    topic: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<canal_pubsub::PublishRequest, ApiError> {
    let topic = canal_pubsub::check_topic(topic)?;
    let qos = canal_pubsub::parse_qos(headers.get("canal-qos").map(|v| v.to_str().unwrap_or("?")))?;
    let id = match headers.get("canal-id") {
        None => None,
        // Bytes that are no text are refused the way an empty id is.
        Some(v) => Some(canal_pubsub::check_id(v.to_str().ok())?),
    };
    Ok(canal_pubsub::PublishRequest {
        topic: topic.to_string(),
        qos,
        id,
        headers: custom_headers(headers)?,
        payload: body.to_vec(),
    })
}

/// A subscription from its query parameters.
pub(super) fn subscribe_request(q: &HashMap<String, String>) -> canal_pubsub::SubscribeRequest {
    canal_pubsub::SubscribeRequest {
        filter: q.get("filter").cloned(),
        qos: q.get("qos").cloned(),
        from: q.get("from").cloned(),
        durable: q.get("durable").cloned(),
        ack_timeout: q.get("ack_timeout").cloned(),
        max_deliveries: q.get("max_deliveries").cloned(),
        max_pending: q.get("max_pending").cloned(),
    }
}
