//! `/v1/kv/{key}`: read, put and add, in a chosen group.

use super::error::too_large;
use super::parse::{check_key, linearizable, parse_group, request_id};
use super::{ApiError, ApiState};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use canal_consensus::{GroupId, Op, Request};
use canal_proto::api::KvWritten;
use std::collections::HashMap;

/// The largest value `PUT /v1/kv/{key}` accepts.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// The longest key accepted.
pub const MAX_KEY_BYTES: usize = 1024;

/// `POST /v1/kv/{key}?add=N`: adds N to the number at `key`, atomically.
pub(super) async fn kv_add(
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

pub(super) async fn kv_put(
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
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "value is {} bytes: at most {MAX_VALUE_BYTES} are allowed",
                body.len()
            ),
        ));
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
pub(super) async fn kv_write(
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

pub(super) async fn kv_get(
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
