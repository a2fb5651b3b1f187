//! # canal-client — one client of canal's HTTP API
//!
//! The CLI's client commands, the testnet harness and the benches all talk to nodes through
//! [`Client`]: a base URL, an optional bearer token, timeouts, errors that carry the node's
//! [`ErrorBody`] message, path segment encoding, JSON bodies and Server-Sent Event streams
//! ([`sse`]). It does no retries and has no opinion on what a status means beyond success.

pub mod publish;
pub mod sse;

use canal_proto::api::ErrorBody;
use futures::{Stream, StreamExt};
pub mod tls;
pub use publish::{PublishAcks, PublishSender, PublishStream};
use serde::de::DeserializeOwned;
use sse::{SseError, SseEvent, SseParser};
use std::collections::VecDeque;
use std::time::Duration;

pub use reqwest::{Method, Response, StatusCode};

/// How long a request may take in all, unless the client was built otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What went wrong talking to a node.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The base URL is not an HTTP one.
    #[error(
        "--api {base:?} is not an http:// or https:// URL: write, for example, http://127.0.0.1:7070"
    )]
    BadUrl {
        /// The URL as given.
        base: String,
    },
    /// The HTTP client could not be set up.
    #[error("cannot build the HTTP client: {cause}")]
    Build {
        /// Why.
        cause: String,
    },
    /// Nothing answered at the base URL in time.
    #[error(
        "cannot reach the canal API at {base}: {cause} (is a node running there? set --api or CANAL_API)"
    )]
    Unreachable {
        /// The base URL.
        base: String,
        /// The innermost cause (connection refused, timed out).
        cause: String,
    },
    /// The request failed after the connection was made.
    #[error("request to {url} failed: {cause}")]
    Request {
        /// The full URL.
        url: String,
        /// The innermost cause.
        cause: String,
    },
    /// The answer's body could not be read.
    #[error("reading the answer from {url}: {cause}")]
    Read {
        /// The full URL.
        url: String,
        /// The innermost cause.
        cause: String,
    },
    /// The node answered with an error status.
    #[error("{message} (HTTP {status})")]
    Api {
        /// The status.
        status: StatusCode,
        /// The error's kind (`invalid_topic`), when the body was an [`ErrorBody`].
        kind: Option<String>,
        /// The node's message, or the body's text when it was not an [`ErrorBody`].
        message: String,
    },
    /// A successful answer whose body is not the JSON expected.
    #[error("the answer from {url} is not what this canal version expects: {cause}")]
    Decode {
        /// The full URL.
        url: String,
        /// The decoder's complaint.
        cause: String,
    },
    /// An event stream broke or carried something that is not an event stream.
    #[error("the event stream from {url} broke: {cause}")]
    Stream {
        /// The full URL.
        url: String,
        /// Why.
        cause: String,
    },
    /// An event stream carried an event past the parser's limit.
    #[error("the event stream from {url}: {source}")]
    Sse {
        /// The full URL.
        url: String,
        /// The parser's complaint.
        source: SseError,
    },
}

impl ClientError {
    /// The HTTP status of an error answer, if the node gave one.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Percent-encodes a path segment (topics contain `/`, which is encoded too).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-encodes a path of several segments, such as a state key (`mean/sensors/r1/temp`):
/// like [`encode_segment`], but `/` stays a separator.
pub fn encode_path(s: &str) -> String {
    s.split('/')
        .map(encode_segment)
        .collect::<Vec<_>>()
        .join("/")
}

/// A client of one node's API. Cloning is cheap and shares the connection pool.
#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// A client of the API at `base` (`http://127.0.0.1:7070`) whose requests may take
    /// [`DEFAULT_TIMEOUT`] each.
    pub fn new(base: &str, token: Option<&str>) -> Result<Client, ClientError> {
        Self::build(base, token, Some(DEFAULT_TIMEOUT))
    }

    /// A client whose requests may take up to `timeout` in all (a deploy that compiles, an
    /// invocation with a long time limit).
    pub fn with_timeout(
        base: &str,
        token: Option<&str>,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        Self::build(base, token, Some(timeout))
    }

    /// A client for long-lived streams: no limit on the whole request.
    pub fn streaming(base: &str, token: Option<&str>) -> Result<Client, ClientError> {
        Self::build(base, token, None)
    }

    fn build(
        base: &str,
        token: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<Client, ClientError> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::BadUrl { base });
        }
        tls::install_provider();
        let mut builder = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT);
        // Always our own rustls settings: reqwest's default would look for the system's
        // roots even for an http:// base, and fail where there are none (a FROM scratch
        // image).
        let config = tls::client_config(base.starts_with("https://"))
            .map_err(|cause| ClientError::Build { cause })?;
        builder = builder.tls_backend_preconfigured(config);
        if let Some(t) = timeout {
            builder = builder.timeout(t);
        }
        let http = builder.build().map_err(|e| ClientError::Build {
            cause: root_cause(&e),
        })?;
        Ok(Client {
            base,
            token: token.map(str::to_string),
            http,
        })
    }

    /// The base URL this client talks to, without a trailing `/`.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GETs `path` and decodes the JSON answer.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let bytes = self.send(Method::GET, path).await?;
        self.decode(path, &bytes)
    }

    /// POSTs to `path` with an empty body; the answer's body is ignored.
    pub async fn post(&self, path: &str) -> Result<(), ClientError> {
        self.send(Method::POST, path).await.map(|_| ())
    }

    /// POSTs `body` with `headers` and decodes the JSON answer.
    pub async fn post_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Vec<u8>,
        headers: &[(String, String)],
    ) -> Result<T, ClientError> {
        self.send_json(Method::POST, path, body, headers).await
    }

    /// PUTs `body` with `headers` and decodes the JSON answer.
    pub async fn put_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Vec<u8>,
        headers: &[(String, String)],
    ) -> Result<T, ClientError> {
        self.send_json(Method::PUT, path, body, headers).await
    }

    /// DELETEs `path`; the answer's body is ignored.
    pub async fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.send(Method::DELETE, path).await.map(|_| ())
    }

    /// GETs `path` and returns the raw body, or `None` when the node answers 404.
    pub async fn get_bytes_or_none(&self, path: &str) -> Result<Option<Vec<u8>>, ClientError> {
        let resp = self.request(Method::GET, path, Vec::new(), &[]).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        self.body(path, resp).await.map(Some)
    }

    /// Sends a request and returns the status and body whatever the status, for callers
    /// that decide by status (404 as "none", 503 as "try again").
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        headers: &[(String, String)],
    ) -> Result<(StatusCode, Vec<u8>), ClientError> {
        let resp = self.request(method, path, body, headers).await?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| ClientError::Read {
            url: self.url(path),
            cause: root_cause(&e),
        })?;
        Ok((status, bytes.to_vec()))
    }

    /// GETs `path` and returns the response once its status is known good, for callers that
    /// read the body as it comes.
    pub async fn stream(&self, path: &str) -> Result<reqwest::Response, ClientError> {
        let resp = self.request(Method::GET, path, Vec::new(), &[]).await?;
        if !resp.status().is_success() {
            return Err(self.error_of(path, resp).await);
        }
        Ok(resp)
    }

    /// GETs `path` (a `/v1/subscribe` or other `text/event-stream` endpoint) and returns its
    /// events as they come; the stream ends when the node closes it.
    pub async fn events(
        &self,
        path: &str,
    ) -> Result<impl Stream<Item = Result<SseEvent, ClientError>> + Send + 'static, ClientError>
    {
        let resp = self.stream(path).await?;
        Ok(sse_events(resp))
    }

    async fn send_json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        headers: &[(String, String)],
    ) -> Result<T, ClientError> {
        let resp = self.request(method, path, body, headers).await?;
        let bytes = self.body(path, resp).await?;
        self.decode(path, &bytes)
    }

    fn decode<T: DeserializeOwned>(&self, path: &str, bytes: &[u8]) -> Result<T, ClientError> {
        serde_json::from_slice(bytes).map_err(|e| ClientError::Decode {
            url: self.url(path),
            cause: e.to_string(),
        })
    }

    async fn send(&self, method: Method, path: &str) -> Result<Vec<u8>, ClientError> {
        let resp = self.request(method, path, Vec::new(), &[]).await?;
        self.body(path, resp).await
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        headers: &[(String, String)],
    ) -> Result<reqwest::Response, ClientError> {
        let url = self.url(path);
        let mut req = self.http.request(method, &url).body(body);
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        req.send().await.map_err(|e| {
            if e.is_connect() || e.is_timeout() {
                ClientError::Unreachable {
                    base: self.base.clone(),
                    cause: root_cause(&e),
                }
            } else {
                ClientError::Request {
                    url,
                    cause: root_cause(&e),
                }
            }
        })
    }

    /// The body of a successful answer, or the error it carries.
    async fn body(&self, path: &str, resp: reqwest::Response) -> Result<Vec<u8>, ClientError> {
        if !resp.status().is_success() {
            return Err(self.error_of(path, resp).await);
        }
        let bytes = resp.bytes().await.map_err(|e| ClientError::Read {
            url: self.url(path),
            cause: root_cause(&e),
        })?;
        Ok(bytes.to_vec())
    }

    /// The error an unsuccessful answer carries.
    async fn error_of(&self, path: &str, resp: reqwest::Response) -> ClientError {
        let status = resp.status();
        match resp.bytes().await {
            Ok(bytes) => api_error(status, &bytes),
            Err(e) => ClientError::Read {
                url: self.url(path),
                cause: root_cause(&e),
            },
        }
    }
}

/// The error of an answer with `status` and `body`: the node's [`ErrorBody`] when the body is
/// one, else the body's text.
pub fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => ClientError::Api {
            status,
            kind: Some(b.kind),
            message: b.error,
        },
        Err(_) => ClientError::Api {
            status,
            kind: None,
            message: String::from_utf8_lossy(body).trim().to_string(),
        },
    }
}

/// The events of a `text/event-stream` response, parsed as the body comes.
pub fn sse_events(
    resp: reqwest::Response,
) -> impl Stream<Item = Result<SseEvent, ClientError>> + Send + 'static {
    let url = resp.url().to_string();
    let state = (
        resp.bytes_stream(),
        SseParser::new(),
        VecDeque::<SseEvent>::new(),
        url,
        false,
    );
    futures::stream::unfold(
        state,
        |(mut body, mut parser, mut ready, url, failed)| async move {
            if failed {
                return None;
            }
            loop {
                if let Some(e) = ready.pop_front() {
                    return Some((Ok(e), (body, parser, ready, url, false)));
                }
                match body.next().await {
                    None => return None,
                    Some(Err(e)) => {
                        let err = ClientError::Stream {
                            url: url.clone(),
                            cause: root_cause(&e),
                        };
                        return Some((Err(err), (body, parser, ready, url, true)));
                    }
                    Some(Ok(chunk)) => match parser.push(&chunk) {
                        Ok(events) => ready.extend(events),
                        Err(source) => {
                            let err = ClientError::Sse {
                                url: url.clone(),
                                source,
                            };
                            return Some((Err(err), (body, parser, ready, url, true)));
                        }
                    },
                }
            }
        },
    )
}

/// The innermost error of a chain: reqwest's own message is "error sending request", the
/// useful part ("connection refused") is at the bottom.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    tls_hint(cur.to_string())
}

/// `cause`, with the flag that fixes it when it is a TLS refusal the user can act on
/// (rustls names them in its messages).
pub(crate) fn tls_hint(cause: String) -> String {
    if cause.contains("CertificateRequired") {
        format!("{cause} (the node asks for a client certificate: give --cert and --key)")
    } else if cause.contains("UnknownIssuer") {
        format!("{cause} (give --ca with the CA that signed the node's certificate)")
    } else if tls::ca_configured() && !tls::has_client_identity() && closed_early(&cause) {
        // With TLS 1.3 a client learns that the server wanted its certificate only after
        // its own side of the handshake is done: the refusal often arrives as a closed
        // connection instead of the alert.
        format!("{cause} (if the node asks for a client certificate: give --cert and --key)")
    } else {
        cause
    }
}

/// Whether `cause` says the connection ended before an answer came.
fn closed_early(cause: &str) -> bool {
    let c = cause.to_ascii_lowercase();
    [
        "not ready",
        "connection closed",
        "reset by peer",
        "broken pipe",
        "unexpected eof",
        "end of file",
    ]
    .iter()
    .any(|p| c.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_refusals_name_the_flag_that_fixes_them() {
        let hint = tls_hint("received fatal alert: CertificateRequired".into());
        assert!(hint.contains("--cert and --key"), "{hint}");
        let hint = tls_hint("invalid peer certificate: UnknownIssuer".into());
        assert!(hint.contains("--ca"), "{hint}");
        assert_eq!(tls_hint("connection refused".into()), "connection refused");
        assert!(closed_early("connection was not ready"));
        assert!(closed_early("Connection reset by peer (os error 104)"));
        assert!(!closed_early("connection refused"));
    }

    #[test]
    fn encodes_topics_for_paths() {
        assert_eq!(
            encode_segment("sensors/room 1/temp"),
            "sensors%2Froom%201%2Ftemp"
        );
        assert_eq!(encode_segment("a-b_c.d~e"), "a-b_c.d~e");
        assert_eq!(encode_segment("+/#"), "%2B%2F%23");
    }

    #[test]
    fn encodes_keys_keeping_slashes() {
        assert_eq!(
            encode_path("mean/sensors/r 1/t?x#y"),
            "mean/sensors/r%201/t%3Fx%23y"
        );
        assert_eq!(encode_path("caf\u{e9}/%"), "caf%C3%A9/%25");
    }

    #[test]
    fn a_base_that_is_not_http_is_refused_by_name() {
        let e = Client::new("127.0.0.1:7070", None).expect_err("not a URL");
        assert!(matches!(e, ClientError::BadUrl { .. }));
        assert!(e.to_string().contains("http://"), "{e}");
        let c = Client::new("http://127.0.0.1:7070/", Some("t")).expect("an http URL");
        assert_eq!(c.base(), "http://127.0.0.1:7070");
    }

    #[test]
    fn error_answers_carry_the_nodes_message() {
        let e = api_error(
            StatusCode::BAD_REQUEST,
            br#"{"error": "topic \"\" is empty", "kind": "invalid_topic"}"#,
        );
        assert_eq!(e.to_string(), "topic \"\" is empty (HTTP 400 Bad Request)");
        assert!(matches!(&e, ClientError::Api { kind: Some(k), .. } if k == "invalid_topic"));
        assert_eq!(e.status(), Some(StatusCode::BAD_REQUEST));
        let e = api_error(StatusCode::BAD_GATEWAY, b" upstream down\n");
        assert_eq!(e.to_string(), "upstream down (HTTP 502 Bad Gateway)");
    }

    #[tokio::test]
    async fn nothing_listening_is_unreachable() {
        // Port 9 (discard) has no listener on a test machine.
        let c = Client::new("http://127.0.0.1:9", None).expect("an http URL");
        let e = c
            .get::<serde_json::Value>("/v1/health")
            .await
            .expect_err("nothing there");
        assert!(
            e.to_string()
                .starts_with("cannot reach the canal API at http://127.0.0.1:9"),
            "{e}"
        );
    }
}
