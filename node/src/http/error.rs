//! The error answer of the client API: JSON `{ "error": "...", "kind": "..." }` with a fitting
//! status code, and how each service's error becomes one.

use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use canal_consensus::ClientError;
use canal_proto::api::ErrorBody;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    /// An answer with the given status, kind and message.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }

    /// A 400 answer of the given kind.
    pub fn bad_request(kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind,
            message: message.into(),
        }
    }

    /// The error's stable name, as clients see it.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// What was wrong and what is allowed.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The status code answered.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// A 404 answer.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "not_found",
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
            kind: self.kind.to_string(),
        };
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        let (status, kind) = match &e {
            ClientError::NotInitialized(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_formed"),
            ClientError::NoLeader { .. } | ClientError::NotLeader { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "no_leader")
            }
            ClientError::UnknownGroup(_) => (StatusCode::NOT_FOUND, "not_found"),
            ClientError::Other(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            ClientError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ClientError::Refused { .. } => (StatusCode::FORBIDDEN, "refused"),
        };
        ApiError {
            status,
            kind,
            message: e.to_string(),
        }
    }
}

impl From<canal_pubsub::PubSubError> for ApiError {
    fn from(e: canal_pubsub::PubSubError) -> Self {
        ApiError {
            status: pubsub_status(&e),
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

/// The status code of a pubsub error; a refused batch line answers as that line alone would.
fn pubsub_status(e: &canal_pubsub::PubSubError) -> StatusCode {
    use canal_pubsub::PubSubError as E;
    match e {
        E::Consensus(c) => ApiError::from(c.clone()).status,
        E::BatchLine { source, .. } => pubsub_status(source),
        E::InvalidTopic(_)
        | E::InvalidFilter(_)
        | E::InvalidQos(_)
        | E::InvalidId(_)
        | E::InvalidHeader(_)
        | E::InvalidFrom(_)
        | E::InvalidDurable(_)
        | E::InvalidAck(_)
        | E::InvalidSettings(_) => StatusCode::BAD_REQUEST,
        E::TooLarge { .. } | E::TooManyEvents { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        E::TooManySubscribers { .. } => StatusCode::SERVICE_UNAVAILABLE,
        E::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A body that could not be read: almost always one over the size limit.
pub(super) fn too_large(r: BytesRejection) -> ApiError {
    ApiError::new(
        r.status(),
        "too_large",
        format!(
            "the request body was refused ({}): payloads and values may be at most {} bytes",
            r.body_text(),
            crate::pubsub::MAX_PAYLOAD_BYTES
        ),
    )
}

impl From<crate::functions::FunctionsError> for ApiError {
    fn from(e: crate::functions::FunctionsError) -> Self {
        use crate::functions::FunctionsError as E;
        let e = match e {
            E::Consensus(c) => return ApiError::from(c),
            other => other,
        };
        let (status, kind) = match &e {
            E::Consensus(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            E::InvalidName(_) => (StatusCode::BAD_REQUEST, "invalid_name"),
            E::UnknownSetting { .. } => (StatusCode::BAD_REQUEST, "invalid_setting"),
            E::InvalidLimits(_) => (StatusCode::BAD_REQUEST, "invalid_limits"),
            E::InvalidRequirements(_) => (StatusCode::BAD_REQUEST, "invalid_requirements"),
            E::InvalidPolicy(_) => (StatusCode::BAD_REQUEST, "invalid_policy"),
            E::ModuleTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            E::InvalidModule(_) => (StatusCode::BAD_REQUEST, "invalid_module"),
            E::ModuleMissing { .. } => (StatusCode::SERVICE_UNAVAILABLE, "module_missing"),
            E::NoFunction(_) | E::NoTrigger(_) => (StatusCode::NOT_FOUND, "not_found"),
            E::InUse { .. } => (StatusCode::CONFLICT, "in_use"),
            E::InvalidTrigger(_) => (StatusCode::BAD_REQUEST, "invalid_trigger"),
            E::InvalidFilter(_) => (StatusCode::BAD_REQUEST, "invalid_filter"),
            E::InvalidTopic(_) => (StatusCode::BAD_REQUEST, "invalid_topic"),
            E::UnknownFunction(_) => (StatusCode::BAD_REQUEST, "unknown_function"),
            E::TriggerExists(_) => (StatusCode::CONFLICT, "exists"),
            E::Placement(_) | E::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, kind, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::functions::FunctionsError as E;

    fn answer(e: E) -> (StatusCode, &'static str, String) {
        let a = ApiError::from(e);
        (a.status, a.kind, a.message)
    }

    #[test]
    fn each_functions_error_keeps_its_status_kind_and_text() {
        let cases = [
            (
                E::InUse {
                    function: "f".into(),
                    triggers: vec!["a".into(), "b".into()],
                },
                StatusCode::CONFLICT,
                "in_use",
                "function f is run by trigger(s) a, b: remove them first with `canal trigger rm`",
            ),
            (
                E::NoFunction("f".into()),
                StatusCode::NOT_FOUND,
                "not_found",
                "no function named f",
            ),
            (
                E::NoTrigger("t".into()),
                StatusCode::NOT_FOUND,
                "not_found",
                "no trigger named t",
            ),
            (
                E::TriggerExists("t".into()),
                StatusCode::CONFLICT,
                "exists",
                "trigger t exists: remove it first with `canal trigger rm t`",
            ),
            (
                E::UnknownFunction("f".into()),
                StatusCode::BAD_REQUEST,
                "unknown_function",
                "no function named f: deploy it first with `canal fn deploy`",
            ),
            (
                E::UnknownSetting {
                    name: "colour".into(),
                    known: "memory, timeout".into(),
                },
                StatusCode::BAD_REQUEST,
                "invalid_setting",
                "\"colour\" is not a deploy setting: use memory, timeout",
            ),
            (
                E::ModuleTooLarge { size: 9, limit: 8 },
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "the module is 9 bytes: at most 8 are allowed",
            ),
            (
                E::ModuleMissing {
                    hash: "h".into(),
                    function: "f".into(),
                },
                StatusCode::SERVICE_UNAVAILABLE,
                "module_missing",
                "this node has not received module h of f yet: it is replicated with the metadata group",
            ),
            (
                E::InvalidModule("m".into()),
                StatusCode::BAD_REQUEST,
                "invalid_module",
                "m",
            ),
            (
                E::InvalidName("n".into()),
                StatusCode::BAD_REQUEST,
                "invalid_name",
                "n",
            ),
            (
                E::InvalidLimits("l".into()),
                StatusCode::BAD_REQUEST,
                "invalid_limits",
                "l",
            ),
            (
                E::InvalidRequirements("r".into()),
                StatusCode::BAD_REQUEST,
                "invalid_requirements",
                "r",
            ),
            (
                E::InvalidPolicy("p".into()),
                StatusCode::BAD_REQUEST,
                "invalid_policy",
                "p",
            ),
            (
                E::InvalidTrigger("t".into()),
                StatusCode::BAD_REQUEST,
                "invalid_trigger",
                "t",
            ),
            (
                E::InvalidFilter("f".into()),
                StatusCode::BAD_REQUEST,
                "invalid_filter",
                "f",
            ),
            (
                E::InvalidTopic("t".into()),
                StatusCode::BAD_REQUEST,
                "invalid_topic",
                "t",
            ),
            (
                E::Internal("x".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "x",
            ),
        ];
        for (e, status, kind, text) in cases {
            assert_eq!(answer(e), (status, kind, text.to_string()));
        }
        // A Raft error answers as it does from any other handler.
        let raft = ClientError::Other("down".into());
        let direct = ApiError::from(ClientError::Other("down".into()));
        let (status, kind, text) = answer(E::Consensus(raft));
        assert_eq!(
            (status, kind, text),
            (direct.status, direct.kind, direct.message)
        );
    }
}

#[cfg(test)]
mod pubsub_tests {
    use super::*;
    use canal_consensus::GroupId;
    use canal_pubsub::PubSubError as E;

    /// The status codes and kinds clients have always seen for pubsub refusals.
    #[test]
    fn pubsub_errors_keep_their_status_and_kind() {
        let cases = [
            (E::InvalidTopic("t".into()), 400, "invalid_topic"),
            (E::InvalidFilter("f".into()), 400, "invalid_filter"),
            (E::InvalidQos("q".into()), 400, "invalid_qos"),
            (E::InvalidId("i".into()), 400, "invalid_id"),
            (E::InvalidHeader("h".into()), 400, "invalid_header"),
            (E::InvalidFrom("f".into()), 400, "invalid_from"),
            (E::InvalidDurable("d".into()), 400, "invalid_durable"),
            (E::InvalidAck("a".into()), 400, "invalid_ack"),
            (E::InvalidSettings("s".into()), 400, "invalid_settings"),
            (
                E::TooLarge {
                    topic: "t".into(),
                    bytes: 2,
                    limit: 1,
                },
                413,
                "too_large",
            ),
            (
                E::TooManySubscribers { limit: 1 },
                503,
                "too_many_subscribers",
            ),
            (
                E::Consensus(ClientError::NotInitialized(GroupId(1))),
                503,
                "not_formed",
            ),
            (
                E::Consensus(ClientError::NoLeader {
                    group: GroupId(1),
                    reason: "r".into(),
                }),
                503,
                "no_leader",
            ),
            (E::Internal("x".into()), 500, "internal"),
        ];
        for (e, status, kind) in cases {
            let text = e.to_string();
            let a = ApiError::from(e);
            assert_eq!((a.status.as_u16(), a.kind), (status, kind), "{text}");
            assert_eq!(a.message, text);
        }
    }
}
