//! `/v1/functions/*` and `/v1/triggers/*`: deploy, list, remove, invoke, placement, state;
//! the work is [`crate::functions`]' and [`crate::placer`]'s. The deploy's query and the
//! invocation's headers are read here into the service's typed requests.

use super::error::too_large;
use super::parse::linearizable;
use super::{ApiError, ApiState};
use crate::functions::{DeployRequest, DeploySettings, FunctionsError, InvokeRequest};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use canal_proto::Topic;
use canal_proto::function::Limits;
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

/// `PUT /v1/functions/{name}`: body = the component; the query holds its settings.
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
    // The name before the settings, as the answer to a request wrong in both says.
    canal_proto::function::check_function_name(&name)
        .map_err(|e| FunctionsError::InvalidName(e.0))?;
    let settings = deploy_settings(&q)?;
    let deployed = st
        .functions
        .deploy(DeployRequest {
            name,
            settings,
            module: body.to_vec(),
        })
        .await?;
    let status = if deployed.replaced.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, axum::Json(deployed)).into_response())
}

pub(super) async fn fn_remove(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    st.functions.remove(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/functions/{name}/invoke`: body = the payload; `canal-topic` and
/// `canal-header-NAME` headers say what the event claims.
pub(super) async fn fn_invoke(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<canal_proto::function::InvokeResult>, ApiError> {
    let body = body.map_err(too_large)?;
    let topic = match headers.get("canal-topic") {
        Some(v) => Some(
            Topic::new(v.to_str().unwrap_or("\u{0}"))
                .map_err(|e| ApiError::bad_request("invalid_topic", e.to_string()))?,
        ),
        None => None,
    };
    let custom = super::parse::custom_headers(&headers)?;
    Ok(axum::Json(
        st.functions
            .invoke(InvokeRequest {
                function: name,
                topic,
                headers: custom,
                payload: body.to_vec(),
            })
            .await?,
    ))
}

pub(super) async fn fn_placement(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<axum::Json<canal_proto::api::PlacementAnswer>, ApiError> {
    let spec = st
        .functions
        .function(&name)?
        .ok_or_else(|| ApiError::not_found(format!("no function named {name}")))?;
    Ok(axum::Json(canal_proto::api::PlacementAnswer {
        function: spec.name.clone(),
        policy: crate::placement::policy_of(&spec).to_string(),
        committed: crate::placement::placed(&st.consensus, &spec.name),
        live: crate::placement::decide_now(&st.consensus, &st.dht, &spec),
        answered_by: st.functions.peer_id.clone(),
    }))
}

pub(super) async fn fn_state_get(
    State(st): State<ApiState>,
    Path((name, key)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let local = !linearizable(&q)?;
    match st.functions.state_get(&name, &key, !local).await? {
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
) -> Result<axum::Json<canal_proto::api::StateList>, ApiError> {
    let prefix = q.get("prefix").map(String::as_str).unwrap_or("");
    Ok(axum::Json(st.functions.state_list(&name, prefix)?))
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
    axum::Extension(caller): axum::Extension<crate::tokens::Caller>,
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
    // The trigger's function publishes with its creator's rights, checked at run time; an
    // output topic the creator may not publish to is refused now.
    let owner = caller
        .publish_rights()
        .map(|p| canal_proto::function::TriggerOwner {
            subject: caller.subject().unwrap_or_default().to_string(),
            publish_allow: p.allow.clone(),
            publish_deny: p.deny.clone(),
        });
    if let Some(out) = &req.out {
        super::auth::check_publish(&st, &caller, out)?;
    }
    let spec = st.functions.trigger_add_owned(&name, req, owner).await?;
    Ok((StatusCode::CREATED, axum::Json(spec)).into_response())
}

pub(super) async fn trigger_delete(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    st.functions.trigger_remove(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Reads limits and requirements from the deploy's query.
pub(super) fn deploy_settings(
    q: &HashMap<String, String>,
) -> Result<DeploySettings, FunctionsError> {
    const KNOWN: [&str; 12] = [
        "memory",
        "timeout",
        "fuel",
        "max-outputs",
        "max-output-bytes",
        "max-state-bytes",
        "gpu",
        "tier",
        "labels",
        "replicas",
        "hard",
        "policy",
    ];
    if let Some(k) = q.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(FunctionsError::UnknownSetting {
            name: k.clone(),
            known: KNOWN.join(", "),
        });
    }
    let mut limits = Limits::default();
    if let Some(m) = q.get("memory") {
        limits.memory_bytes = canal_proto::size::parse_bytes(m)
            .map_err(|e| FunctionsError::InvalidLimits(format!("memory: {e}")))?;
    }
    if let Some(t) = q.get("timeout") {
        let d = humantime::parse_duration(t).map_err(|e| {
            FunctionsError::InvalidLimits(format!(
                "timeout {t:?} is not a duration ({e}): write 500ms, 2s or 1m"
            ))
        })?;
        limits.timeout_ms = d.as_millis().min(u64::MAX as u128) as u64;
    }
    if let Some(f) = q.get("fuel") {
        limits.fuel = Some(f.parse().map_err(|_| {
            FunctionsError::InvalidLimits(format!(
                "fuel {f:?} is not a whole number of instructions"
            ))
        })?);
    }
    if let Some(n) = q.get("max-outputs") {
        limits.max_outputs = n.trim().parse().map_err(|_| {
            FunctionsError::InvalidLimits(format!(
                "max-outputs {n:?} is not a whole number: use 0 to {}",
                canal_proto::function::MAX_MAX_OUTPUTS
            ))
        })?;
    }
    for (key, field) in [
        ("max-output-bytes", &mut limits.max_output_bytes),
        ("max-state-bytes", &mut limits.max_state_bytes),
    ] {
        if let Some(v) = q.get(key) {
            *field = canal_proto::size::parse_bytes(v)
                .map_err(|e| FunctionsError::InvalidLimits(format!("{key}: {e}")))?;
        }
    }
    limits
        .validate()
        .map_err(|e| FunctionsError::InvalidLimits(e.0))?;
    let mut req = DeploySettings::default().requirements;
    match q.get("gpu").map(String::as_str) {
        None | Some("false") => {}
        Some("true") | Some("") => req.gpu = true,
        Some(mem) => {
            req.gpu = true;
            req.gpu_memory_bytes = Some(
                canal_proto::size::parse_bytes(mem)
                    .map_err(|e| FunctionsError::InvalidRequirements(format!("gpu: {e}")))?,
            );
        }
    }
    if let Some(t) = q.get("tier") {
        req.tier = Some(t.clone());
    }
    if let Some(labels) = q.get("labels").filter(|l| !l.is_empty()) {
        for pair in labels.split(',') {
            let (k, v) =
                canal_proto::parse_label(pair).map_err(FunctionsError::InvalidRequirements)?;
            req.labels.insert(k, v);
        }
    }
    if let Some(r) = q.get("replicas") {
        req.replicas = r
            .parse()
            .ok()
            .filter(|n| (1..=16).contains(n))
            .ok_or_else(|| {
                FunctionsError::InvalidRequirements(format!(
                    "replicas {r:?} is not allowed: use 1 to 16"
                ))
            })?;
    }
    match q.get("hard").map(String::as_str) {
        None | Some("true") => {}
        Some("false") => req.hard = false,
        Some(other) => {
            return Err(FunctionsError::InvalidRequirements(format!(
                "hard={other:?}: use true (fail if unmet) or false (prefer)"
            )));
        }
    }
    let policy = match q.get("policy") {
        None => canal_placement::Policy::default(),
        Some(p) => p.parse().map_err(|e: canal_placement::PolicyError| {
            FunctionsError::InvalidPolicy(e.to_string())
        })?,
    };
    Ok(DeploySettings {
        limits,
        requirements: req,
        policy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn deploy_settings_are_read_and_checked() {
        let DeploySettings {
            limits: l,
            requirements: r,
            policy: p,
        } = deploy_settings(&q(&[
            ("memory", "32MiB"),
            ("timeout", "250ms"),
            ("fuel", "1000000"),
            ("max-outputs", "10"),
            ("max-output-bytes", "64KiB"),
            ("max-state-bytes", "0"),
            ("gpu", "16GiB"),
            ("tier", "edge"),
            ("labels", "zone=eu,rack=2"),
            ("replicas", "2"),
            ("hard", "false"),
            ("policy", "latency"),
        ]))
        .unwrap();
        assert_eq!(p, canal_placement::Policy::Latency);
        assert_eq!(l.memory_bytes, 32 << 20);
        assert_eq!(l.timeout_ms, 250);
        assert_eq!(l.fuel, Some(1_000_000));
        assert_eq!(
            (l.max_outputs, l.max_output_bytes, l.max_state_bytes),
            (10, 64 << 10, 0)
        );
        let d = deploy_settings(&q(&[])).unwrap().limits;
        assert_eq!(d, Limits::default());
        assert!(r.gpu && r.gpu_memory_bytes == Some(16 << 30));
        assert_eq!(r.tier.as_deref(), Some("edge"));
        assert_eq!(r.labels.len(), 2);
        assert_eq!(r.replicas, 2);
        assert!(!r.hard);
        for bad in [
            q(&[("memory", "lots")]),
            q(&[("memory", "10GiB")]),
            q(&[("timeout", "soon")]),
            q(&[("fuel", "-1")]),
            q(&[("max-outputs", "1001")]),
            q(&[("max-outputs", "many")]),
            q(&[("max-output-bytes", "5MiB")]),
            q(&[("max-state-bytes", "lots")]),
            q(&[("replicas", "0")]),
            q(&[("labels", "novalue")]),
            q(&[("colour", "red")]),
            q(&[("policy", "fastest")]),
        ] {
            assert!(deploy_settings(&bad).is_err(), "{bad:?}");
        }
    }
}
