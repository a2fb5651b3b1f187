//! `/v1/topics/*` and `/v1/subscriptions/{name}/ack`: what the client API says about topics,
//! publishing and acknowledging; the work is [`canal_pubsub`]'s (subscribing is in
//! [`super::subscribe`]).

use super::auth::{check_publish, check_read};
use super::error::too_large;
use super::{ApiError, ApiState};
use crate::NodeTransport;
use crate::tokens::Caller;
use axum::Extension;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use canal_consensus::Consensus;
use canal_dht::DhtHandle;
use canal_proto::Topic;
use canal_proto::api::{HomePeer, Locate};
use std::collections::HashMap;

/// `/v1/topics/{topic}/{action}`: the topic may contain `/` (raw, or percent-encoded as
/// `%2F`), so the action is taken from the end of the path.
pub(super) async fn topic_get(
    State(st): State<ApiState>,
    Extension(caller): Extension<Caller>,
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
        let answer = canal_pubsub::settings::get_settings(&st.consensus, &filter)?;
        return Ok(axum::Json(answer).into_response());
    }
    if let Some(topic) = rest.strip_suffix("/log") {
        let topic =
            Topic::new(topic).map_err(|e| ApiError::bad_request("invalid_topic", e.to_string()))?;
        check_read(&st, &caller, topic.as_str())?;
        let group = st.consensus.routing().await?.topic(topic.as_str());
        let meta = st
            .consensus
            .reader(group)?
            .topic_meta(topic.as_str())
            .await
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
    Ok(axum::Json(locate(&st.dht, &st.consensus, &topic).await).into_response())
}

pub(super) fn settings_filter(s: &str) -> Result<canal_proto::TopicFilter, ApiError> {
    canal_proto::TopicFilter::new(s)
        .map_err(|e| ApiError::bad_request("invalid_filter", e.to_string()))
}

pub(super) fn no_topic_endpoint(rest: &str) -> ApiError {
    ApiError::not_found(format!(
        "no such topic endpoint {rest:?}: PUT and DELETE take /v1/topics/{{topic-or-filter}}/settings"
    ))
}

/// `PUT /v1/topics/{topic-or-filter}/settings`.
pub(super) async fn topic_put(
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
    let answer = canal_pubsub::settings::put_settings(&st.consensus, &filter, &req).await?;
    Ok(axum::Json(answer).into_response())
}

/// `DELETE /v1/topics/{topic-or-filter}/settings`.
pub(super) async fn topic_delete(
    State(st): State<ApiState>,
    Path(rest): Path<String>,
) -> Result<StatusCode, ApiError> {
    let filter = settings_filter(
        rest.strip_suffix("/settings")
            .ok_or_else(|| no_topic_endpoint(&rest))?,
    )?;
    canal_pubsub::settings::delete_settings(&st.consensus, &filter).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/topics/{topic}/events`: publish; with `Content-Type: application/x-ndjson`,
/// a batch (one publish per line), answered with a JSON array of `Published` in line order.
pub(super) async fn topic_post(
    State(st): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(rest): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(too_large)?;
    let Some(topic) = rest.strip_suffix("/events") else {
        return Err(ApiError::not_found(format!(
            "no such topic endpoint {rest:?}: publish with POST /v1/topics/{{topic}}/events"
        )));
    };
    if super::parse::is_ndjson(&headers) {
        let reqs = super::parse::publish_batch(Some(topic), &headers, &body).inspect_err(|_| {
            st.pubsub.metrics().batches_refused.inc();
        })?;
        // Every line is checked before any is published: a refusal stores nothing.
        for r in &reqs {
            check_publish(&st, &caller, &r.topic)?;
        }
        return Ok(axum::Json(st.pubsub.publish_many(reqs).await?).into_response());
    }
    let req = super::parse::publish_request(topic, &headers, &body)?;
    check_publish(&st, &caller, &req.topic)?;
    Ok(axum::Json(st.pubsub.publish(req).await?).into_response())
}

/// `POST /v1/events`: a batch publish to any topics (NDJSON, each line naming its
/// `"topic"`), answered with a JSON array of `Published` in line order.
pub(super) async fn events_post(
    State(st): State<ApiState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<Vec<canal_proto::api::Published>>, ApiError> {
    let body = body.map_err(too_large)?;
    let reqs = super::parse::publish_batch(None, &headers, &body).inspect_err(|_| {
        st.pubsub.metrics().batches_refused.inc();
    })?;
    for r in &reqs {
        check_publish(&st, &caller, &r.topic)?;
    }
    Ok(axum::Json(st.pubsub.publish_many(reqs).await?))
}

/// `POST /v1/subscriptions/{name}/ack?topic=T&offset=N`.
pub(super) async fn ack(
    State(st): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    if let Some(topic) = q.get("topic") {
        check_read(&st, &caller, topic)?;
    }
    let next = st
        .pubsub
        .ack(
            &name,
            q.get("topic").map(String::as_str),
            q.get("offset").map(String::as_str),
        )
        .await?;
    Ok(axum::Json(
        serde_json::json!({ "subscription": name, "next_offset": next }),
    ))
}

/// The locate answer for `topic`: the shard it falls in (of the committed shard map's
/// count, else this node's `--shards`), that shard's planned replicas in the committed map,
/// the DHT home peers of the shard from the peers this node knows alive, and the Raft group
/// that holds its events today with that group's leader and members as this node's replica
/// knows them (or, where this node hosts no such group, as its replicas know them).
pub async fn locate(
    dht: &DhtHandle,
    consensus: &Consensus<NodeTransport>,
    topic: &Topic,
) -> Locate {
    let group = consensus
        .route()
        .map_or(canal_consensus::routing::DEFAULT_GROUP, |r| {
            r.topic(topic.as_str())
        });
    // This node's own view where it hosts the group, else what its replicas say (the
    // first that knows a leader).
    let raft = match consensus.local_status(group) {
        Ok(s) => Some(s),
        Err(_) => consensus.status(group).await.ok().and_then(|all| {
            let mut views: Vec<_> = all.into_iter().filter_map(|(_, r)| r.ok()).collect();
            views.sort_by_key(|s| s.leader.is_none());
            views.into_iter().next()
        }),
    };
    let peer_of = |id: u64| {
        raft.as_ref()
            .and_then(|s| s.nodes.iter().find(|(n, _)| *n == id))
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| format!("node {id}"))
    };
    let map = crate::shard_map::committed(consensus);
    // The committed count wins over this node's flag: every node must agree on a topic's
    // shard, and the count is fixed when the cluster is created.
    let space = canal_dht::TopicSpace {
        shards: map.as_ref().map_or(dht.topic_space().shards, |m| m.shards),
        ..dht.topic_space()
    };
    let alive: Vec<libp2p::PeerId> = dht.peers().iter().map(|p| p.peer_id).collect();
    let members = alive.len();
    let placement = space.locate(topic, alive);
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
        group: group.to_string(),
        leader: raft.as_ref().and_then(|s| s.leader).map(peer_of),
        voters: raft
            .as_ref()
            .map(|s| s.voters.iter().map(|v| peer_of(*v)).collect())
            .unwrap_or_default(),
        learners: raft
            .as_ref()
            .map(|s| s.learners.iter().map(|v| peer_of(*v)).collect())
            .unwrap_or_default(),
        map_epoch: map.as_ref().map(|m| m.epoch),
        planned_replicas: map
            .as_ref()
            .map(|m| m.replicas(placement.shard).to_vec())
            .unwrap_or_default(),
    }
}
