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
    } else if let Some(shard) = s.strip_prefix("shard-") {
        shard
            .parse::<u32>()
            .ok()
            .filter(|n| *n < canal_proto::shards::MAX_SHARDS)
            .map(|n| canal_consensus::routing::shard_group(n).0)
    } else {
        s.strip_prefix("data-").unwrap_or(s).parse::<u32>().ok()
    };
    n.map(GroupId).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_group",
            format!(
                "group {s:?} is not a group: write metadata, data-N (data-1) or shard-N (shard-0 to shard-{})",
                canal_proto::shards::MAX_SHARDS - 1
            ),
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

/// Whether a request body is NDJSON (`Content-Type: application/x-ndjson`), a batch.
pub(super) fn is_ndjson(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/x-ndjson"))
}

/// What a batch line or stream frame looks like, for the errors that say so.
const LINE_SHAPE: &str = r#"{"topic"?: T, "payload": TEXT | "payload_base64": BASE64, "id"?: ID, "headers"?: {NAME: VALUE}}"#;

/// The lines of an NDJSON batch publish, each checked like a single publish (blank lines are
/// skipped, but counted). `path_topic` is the topic of `POST /v1/topics/{topic}/events`: a
/// line may leave its topic out there, or must name the same one; on `POST /v1/events`
/// (`None`) every line names its topic. The QoS is the `canal-qos` header's, for all lines.
/// Any bad line refuses the batch, naming the line.
pub(super) fn publish_batch(
    path_topic: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Vec<canal_pubsub::PublishRequest>, ApiError> {
    let qos = canal_pubsub::parse_qos(headers.get("canal-qos").map(|v| v.to_str().unwrap_or("?")))?;
    let limit = canal_pubsub::MAX_BATCH_EVENTS;
    let mut out = Vec::new();
    for (i, line) in body.split(|b| *b == b'\n').enumerate() {
        let n = i + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if out.len() == limit {
            return Err(ApiError::new(
                axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_events",
                format!(
                    "line {n}: a batch holds at most {limit} events (MAX_BATCH_EVENTS): split it"
                ),
            ));
        }
        let l: canal_proto::api::PublishLine = serde_json::from_slice(line).map_err(|e| {
            ApiError::bad_request(
                "invalid_event",
                format!("line {n} is not a publish ({e}): each line is {LINE_SHAPE}"),
            )
        })?;
        let req = publish_line(path_topic, qos, l).map_err(|e| {
            ApiError::new(e.status(), e.kind(), format!("line {n}: {}", e.message()))
        })?;
        out.push(req);
    }
    if out.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_event",
            format!("the batch holds no events: send one publish per line, each {LINE_SHAPE}"),
        ));
    }
    Ok(out)
}

/// One batch line or stream frame as a publish, checked: the topic (from the line, or the
/// path's), the id, the headers and the payload.
pub(crate) fn publish_line(
    path_topic: Option<&str>,
    qos: canal_pubsub::Qos,
    l: canal_proto::api::PublishLine,
) -> Result<canal_pubsub::PublishRequest, ApiError> {
    let topic = match (path_topic, l.topic.as_deref()) {
        (Some(p), Some(t)) if p != t => {
            return Err(ApiError::bad_request(
                "invalid_topic",
                format!(
                    "topic {t:?} is not the path's topic {p:?}: leave it out, or publish with POST /v1/events"
                ),
            ));
        }
        (Some(p), _) => p,
        (None, Some(t)) => t,
        (None, None) => {
            return Err(ApiError::bad_request(
                "invalid_topic",
                format!("the topic is missing: each publish is {LINE_SHAPE} with its topic"),
            ));
        }
    };
    let topic = canal_pubsub::check_topic(topic)?;
    let id = match l.id {
        None => None,
        Some(id) => Some(canal_pubsub::check_id(Some(&id))?),
    };
    let mut custom = Vec::with_capacity(l.headers.len());
    for (k, v) in l.headers {
        let printable = |s: &str| s.bytes().all(|b| (0x20..0x7f).contains(&b));
        if k.is_empty() || !printable(&k) || !printable(&v) {
            return Err(canal_pubsub::PubSubError::InvalidHeader(format!(
                "header {k:?}: names (not empty) and values must be printable ASCII"
            ))
            .into());
        }
        custom.push((k, v));
    }
    let payload = match (l.payload, l.payload_base64) {
        (Some(p), None) => p.into_bytes(),
        (None, Some(b)) => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(b.as_bytes())
                .map_err(|e| {
                    ApiError::bad_request(
                        "invalid_payload",
                        format!("payload_base64 is not standard base64 ({e})"),
                    )
                })?
        }
        _ => {
            return Err(ApiError::bad_request(
                "invalid_payload",
                "give exactly one of payload (text) and payload_base64",
            ));
        }
    };
    Ok(canal_pubsub::PublishRequest {
        topic: topic.to_string(),
        qos,
        id,
        headers: custom,
        payload,
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ndjson() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            "application/x-ndjson".parse().expect("a header value"),
        );
        h
    }

    #[test]
    fn a_good_batch_reads_in_line_order() {
        let body = concat!(
            "{\"payload\": \"one\", \"id\": \"m-1\"}\n",
            "\n",
            "{\"payload_base64\": \"AAE=\", \"headers\": {\"k\": \"v\"}}\n",
        );
        let reqs = publish_batch(Some("a/b"), &ndjson(), body.as_bytes()).expect("a good batch");
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[0].payload, b"one");
        assert_eq!(reqs[0].id.as_deref(), Some("m-1"));
        assert_eq!(reqs[1].payload, vec![0u8, 1]);
        assert_eq!(reqs[1].headers, vec![("k".to_string(), "v".to_string())]);
        assert!(reqs.iter().all(|r| r.topic == "a/b"));
    }

    #[test]
    fn a_bad_line_is_named_by_its_number() {
        let body =
            "{\"topic\": \"a\", \"payload\": \"x\"}\n\n{\"topic\": \"a\", \"paylod\": \"x\"}\n";
        let e = publish_batch(None, &ndjson(), body.as_bytes()).expect_err("line 3 is bad");
        assert_eq!(e.kind(), "invalid_event");
        assert!(e.message().starts_with("line 3 "), "{}", e.message());
        let body = "{\"payload\": \"x\"}\n{\"payload\": \"x\", \"id\": \"\"}";
        let e = publish_batch(Some("a"), &ndjson(), body.as_bytes()).expect_err("empty id");
        assert_eq!(e.kind(), "invalid_id");
        assert!(e.message().starts_with("line 2: "), "{}", e.message());
    }

    #[test]
    fn each_line_names_a_topic_on_v1_events_and_the_paths_on_a_topic() {
        let e = publish_batch(None, &ndjson(), b"{\"payload\": \"x\"}").expect_err("no topic");
        assert_eq!(e.kind(), "invalid_topic");
        let e = publish_batch(
            Some("a"),
            &ndjson(),
            b"{\"topic\": \"b\", \"payload\": \"x\"}",
        )
        .expect_err("another topic");
        assert_eq!(e.kind(), "invalid_topic");
        let e = publish_batch(
            None,
            &ndjson(),
            b"{\"topic\": \"a\", \"payload\": \"x\", \"payload_base64\": \"\"}",
        )
        .expect_err("two payloads");
        assert_eq!(e.kind(), "invalid_payload");
    }

    #[test]
    fn a_batch_holds_at_most_max_batch_events() {
        let line = "{\"payload\": \"x\"}\n";
        let full = line.repeat(canal_pubsub::MAX_BATCH_EVENTS);
        let reqs = publish_batch(Some("a"), &ndjson(), full.as_bytes()).expect("exactly the limit");
        assert_eq!(reqs.len(), canal_pubsub::MAX_BATCH_EVENTS);
        let over = line.repeat(canal_pubsub::MAX_BATCH_EVENTS + 1);
        let e = publish_batch(Some("a"), &ndjson(), over.as_bytes()).expect_err("one over");
        assert_eq!(e.kind(), "too_many_events");
        assert!(e.message().contains("MAX_BATCH_EVENTS"), "{}", e.message());
        let e = publish_batch(Some("a"), &ndjson(), b"\n\n").expect_err("empty");
        assert_eq!(e.kind(), "invalid_event");
    }

    #[test]
    fn the_content_type_decides_what_a_batch_is() {
        assert!(is_ndjson(&ndjson()));
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            "application/x-ndjson; charset=utf-8"
                .parse()
                .expect("a header value"),
        );
        assert!(is_ndjson(&h));
        h.insert(
            "content-type",
            "application/octet-stream".parse().expect("a header value"),
        );
        assert!(!is_ndjson(&h));
        assert!(!is_ndjson(&HeaderMap::new()));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4000, rng_seed: proptest::test_runner::RngSeed::Fixed(13), ..ProptestConfig::default() })]

        /// Any bytes are either a batch or a refusal, never a panic; a refusal of a line
        /// names a line the body has.
        #[test]
        fn any_body_reads_or_is_refused(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            match publish_batch(None, &ndjson(), &body) {
                Ok(reqs) => prop_assert!(!reqs.is_empty()),
                Err(e) => {
                    if let Some(rest) = e.message().strip_prefix("line ") {
                        let n: usize = rest.split(|c: char| !c.is_ascii_digit()).next()
                            .and_then(|d| d.parse().ok()).unwrap_or(0);
                        prop_assert!(n >= 1 && n <= body.split(|b| *b == b'\n').count());
                    }
                }
            }
        }
    }
}
