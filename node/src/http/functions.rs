//! `/v1/functions/*` and `/v1/triggers/*`: deploy, list, remove, invoke, placement, state;
//! the work is [`crate::functions`]' and [`crate::placer`]'s.

use super::error::too_large;
use super::parse::linearizable;
use super::{ApiError, ApiState};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;

pub(super) async fn fn_list(
    State(st): State<ApiState>,
) -> Result<axum::Json<canal_proto::function::FunctionList>, ApiError> {
    Ok(axum::Json(canal_proto::function::FunctionList {
        functions: st.functions.functions()?,
    }))
}

pub(super) async fn fn_get(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<axum::Json<canal_proto::function::FunctionSpec>, ApiError> {
    st.functions
        .function(&name)?
        .map(axum::Json)
        .ok_or_else(|| ApiError::not_found(format!("no function named {name}")))
}

pub(super) async fn fn_deploy(
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

pub(super) async fn fn_remove(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    crate::functions::remove(&st, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn fn_invoke(
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

pub(super) async fn fn_placement(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<axum::Json<crate::placer::PlacementAnswer>, ApiError> {
    let spec = st
        .functions
        .function(&name)?
        .ok_or_else(|| ApiError::not_found(format!("no function named {name}")))?;
    Ok(axum::Json(crate::placer::PlacementAnswer {
        function: spec.name.clone(),
        policy: crate::placer::policy_of(&spec).to_string(),
        committed: crate::placer::placed(&st.functions, &spec.name),
        live: crate::placer::decide_now(&st.functions, &st.dht, &spec),
        answered_by: st.functions.peer_id.clone(),
    }))
}

pub(super) async fn fn_state_get(
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

pub(super) async fn fn_state_list(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<axum::Json<crate::functions::StateList>, ApiError> {
    let prefix = q.get("prefix").map(String::as_str).unwrap_or("");
    Ok(axum::Json(crate::functions::state_list(
        &st, &name, prefix,
    )?))
}

pub(super) async fn trigger_list(
    State(st): State<ApiState>,
) -> Result<axum::Json<canal_proto::function::TriggerList>, ApiError> {
    Ok(axum::Json(canal_proto::function::TriggerList {
        triggers: st.functions.triggers()?,
    }))
}

pub(super) async fn trigger_get(
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

pub(super) async fn trigger_put(
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

pub(super) async fn trigger_delete(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    crate::functions::trigger_remove(&st, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
