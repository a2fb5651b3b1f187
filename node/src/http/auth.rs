//! The token check in front of every route, and `/v1/tokens`.
//!
//! [`authenticate`] is a middleware on the whole router: it takes the token from
//! `Authorization: Bearer TOKEN` or, for browsers' EventSource and WebSocket (which cannot
//! set headers), a `token` query parameter; lets the holder in or answers 401 naming why;
//! answers 403 for an admin route the token holds no admin rights for; and hands the
//! [`Caller`] to the handlers, which check per-topic rights themselves (only they know the
//! topics: a batch's lines, a stream's frames). Only `GET /v1/health` is open, for probes,
//! and `/mqtt`, whose MQTT CONNECT carries the token as its password (browsers cannot set
//! headers on a WebSocket; the MQTT layer checks it and every topic after).
//!
//! | routes                                                        | right          |
//! |---------------------------------------------------------------|----------------|
//! | `/v1/health`                                                   | none           |
//! | `/mqtt` (MQTT over WebSocket)                                  | checked by MQTT's CONNECT |
//! | `POST /v1/topics/{t}/events`, `POST /v1/events`, `/v1/publish` | publish on t   |
//! | `/v1/subscribe?filter=F`                                       | subscribe to F |
//! | `/v1/subscriptions/{name}/ack?topic=T`, `GET /v1/topics/{t}/log` | read t       |
//! | `GET /v1/topics/{t}/locate`, `GET /v1/topics/{f}/settings`     | any token      |
//! | everything else (functions, triggers, settings changes, cluster, peers, KV, tokens, metrics) | admin |

use super::{ApiError, ApiState};
use crate::tokens::{Caller, TokenError};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use canal_auth::{Forbidden, Unauthorized};
use canal_proto::api::{TokenInfo, TokenIssued, TokenRequest};

/// The token a request carries: the bearer header, else the `token` query parameter.
pub fn request_token<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<&'a str> {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    header.or_else(|| {
        query?
            .split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .filter(|t| !t.is_empty())
    })
}

/// Whether `method` on `path` needs admin rights (see the module's table).
pub fn needs_admin(method: &Method, path: &str) -> bool {
    if path == "/v1/health" || path == "/mqtt" {
        return false;
    }
    // Decided on the method, not on the path's end: the topic part is percent-decoded only
    // by the handler, so `/v1/topics/a%2Fsettings` is a settings change too. Only settings
    // take PUT and DELETE there; GET and POST are checked per topic by the handlers.
    if path.starts_with("/v1/topics/") {
        return method != Method::GET && method != Method::POST;
    }
    let topic_route = matches!(
        (method, path),
        (&Method::POST, "/v1/events") | (&Method::GET, "/v1/publish" | "/v1/subscribe")
    ) || (method == Method::POST && path.starts_with("/v1/subscriptions/"));
    !topic_route
}

/// The 401 answer for `e`.
pub fn unauthorized(e: &Unauthorized) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
}

/// The 403 answer for `f`: it names the right and the topic refused.
pub fn forbidden(f: &Forbidden) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", f.to_string())
}

/// Lets the request in (with its [`Caller`]) or answers 401/403.
pub(super) async fn authenticate(
    State(st): State<ApiState>,
    mut req: Request,
    next: Next,
) -> Response {
    if matches!(req.uri().path(), "/v1/health" | "/mqtt") {
        return next.run(req).await;
    }
    let gate = &st.tokens.gate;
    let caller = match gate.check(request_token(req.headers(), req.uri().query())) {
        Ok(c) => c,
        Err(e) => {
            gate.count_refusal(e.kind());
            return unauthorized(&e).into_response();
        }
    };
    if needs_admin(req.method(), req.uri().path())
        && let Err(f) = caller.may_admin()
    {
        gate.count_refusal(f.right.as_str());
        return forbidden(&f).into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// Checks that `caller` may publish to `topic`, counting a refusal.
pub(super) fn check_publish(st: &ApiState, caller: &Caller, topic: &str) -> Result<(), ApiError> {
    if matches!(caller, Caller::Open) {
        return Ok(());
    }
    let topic = canal_proto::Topic::new(topic)
        .map_err(|e| ApiError::bad_request("invalid_topic", e.to_string()))?;
    caller.may_publish(&topic).map_err(|f| {
        st.tokens.gate.count_refusal(f.right.as_str());
        forbidden(&f)
    })
}

/// Checks that `caller` may read what was published to `topic`, counting a refusal.
pub(super) fn check_read(st: &ApiState, caller: &Caller, topic: &str) -> Result<(), ApiError> {
    if matches!(caller, Caller::Open) {
        return Ok(());
    }
    let topic = canal_proto::Topic::new(topic)
        .map_err(|e| ApiError::bad_request("invalid_topic", e.to_string()))?;
    caller.may_read(&topic).map_err(|f| {
        st.tokens.gate.count_refusal(f.right.as_str());
        forbidden(&f)
    })
}

/// Checks that `caller` may subscribe with `filter`, counting a refusal.
pub(super) fn check_subscribe(
    st: &ApiState,
    caller: &Caller,
    filter: &str,
) -> Result<(), ApiError> {
    if matches!(caller, Caller::Open) {
        return Ok(());
    }
    let filter = canal_proto::TopicFilter::new(filter)
        .map_err(|e| ApiError::bad_request("invalid_filter", e.to_string()))?;
    caller.may_subscribe(&filter).map_err(|f| {
        st.tokens.gate.count_refusal(f.right.as_str());
        forbidden(&f)
    })
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> ApiError {
        match e {
            TokenError::Invalid(m) => ApiError::bad_request("invalid_token_request", m),
            TokenError::NoSigningKey => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_signing_key",
                e.to_string(),
            ),
            TokenError::AuthOff => ApiError::new(StatusCode::CONFLICT, "auth_off", e.to_string()),
            TokenError::Consensus(c) => ApiError::from(c),
            TokenError::Key(_) | TokenError::Stored(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            }
        }
    }
}

/// `POST /v1/tokens`: issues a token (admin).
pub(super) async fn token_create(
    State(st): State<ApiState>,
    body: axum::body::Bytes,
) -> Result<axum::Json<TokenIssued>, ApiError> {
    let req: TokenRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_token_request",
            format!("the token request is not JSON of the expected shape ({e}): send {{\"subject\": NAME, \"ttl_s\": SECONDS, \"publish\"?: [FILTER], \"publish_deny\"?: [FILTER], \"subscribe\"?: [FILTER], \"subscribe_deny\"?: [FILTER], \"admin\"?: BOOL}}"),
        )
    })?;
    Ok(axum::Json(st.tokens.issue(&req).await?))
}

/// `GET /v1/tokens`: what every issued token says (admin).
pub(super) async fn token_list(
    State(st): State<ApiState>,
) -> Result<axum::Json<Vec<TokenInfo>>, ApiError> {
    Ok(axum::Json(st.tokens.list()?))
}

/// `DELETE /v1/tokens/{id}`: revokes a token on every node (admin).
pub(super) async fn token_revoke(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    st.tokens.revoke(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_from_the_header_or_the_query() {
        let mut h = HeaderMap::new();
        assert_eq!(request_token(&h, Some("filter=a&token=xyz")), Some("xyz"));
        assert_eq!(request_token(&h, Some("filter=a&token=")), None);
        assert_eq!(request_token(&h, None), None);
        h.insert(
            "authorization",
            "Bearer abc".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(request_token(&h, Some("token=xyz")), Some("abc"));
        h.insert(
            "authorization",
            "Basic abc".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(request_token(&h, None), None);
    }

    #[test]
    fn admin_routes_are_all_but_topics_and_health() {
        for (m, p) in [
            (Method::PUT, "/v1/functions/f"),
            (Method::GET, "/v1/functions"),
            (Method::PUT, "/v1/triggers/t"),
            (Method::GET, "/v1/cluster/status"),
            (Method::GET, "/v1/peers"),
            (Method::GET, "/v1/kv/k"),
            (Method::GET, "/metrics"),
            (Method::GET, "/v1/cluster/shards"),
            (Method::POST, "/v1/tokens"),
            (Method::PUT, "/v1/topics/a/#/settings"),
            (Method::DELETE, "/v1/topics/a/settings"),
            (Method::PUT, "/v1/topics/a%2Fsettings"),
            (Method::GET, "/v1/events"),
            (Method::GET, "/v1/no-such-route"),
        ] {
            assert!(needs_admin(&m, p), "{m} {p}");
        }
        for (m, p) in [
            (Method::GET, "/v1/health"),
            (Method::POST, "/v1/topics/a/events"),
            (Method::GET, "/v1/topics/a/settings"),
            (Method::GET, "/v1/topics/a/locate"),
            (Method::POST, "/v1/events"),
            (Method::GET, "/v1/publish"),
            (Method::GET, "/v1/subscribe"),
            (Method::POST, "/v1/subscriptions/s/ack"),
        ] {
            assert!(!needs_admin(&m, p), "{m} {p}");
        }
    }
}
