//! The HTTP client every client command uses, with errors a person can act on.

use anyhow::{Context, anyhow, bail};
use canal_proto::api::ErrorBody;
use serde::de::DeserializeOwned;
use std::time::Duration;

/// A command-line value that is not allowed (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub(crate) String);

/// Percent-encodes a path of several segments, such as a state key (`mean/sensors/r1/temp`):
/// like [`encode_segment`], but `/` stays a separator.
pub(crate) fn encode_path(s: &str) -> String {
    s.split('/')
        .map(encode_segment)
        .collect::<Vec<_>>()
        .join("/")
}

/// A client of one node's API.
#[derive(Clone)]
pub(crate) struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// Percent-encodes a path segment (topics contain `/`).
pub(crate) fn encode_segment(s: &str) -> String {
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

impl Client {
    pub(crate) fn new(base: &str, token: Option<&str>) -> anyhow::Result<Client> {
        Self::build(base, token, Some(Duration::from_secs(30)))
    }

    /// A client whose requests may take up to `timeout` in all (a deploy that compiles, an
    /// invocation with a long time limit).
    pub(crate) fn with_timeout(
        base: &str,
        token: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<Client> {
        Self::build(base, token, Some(timeout))
    }

    /// A client for long-lived streams: no limit on the whole request.
    pub(crate) fn streaming(base: &str, token: Option<&str>) -> anyhow::Result<Client> {
        Self::build(base, token, None)
    }

    fn build(base: &str, token: Option<&str>, timeout: Option<Duration>) -> anyhow::Result<Client> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(UsageError(format!(
                "--api {base:?} is not an http:// or https:// URL: write, for example, http://127.0.0.1:7070"
            ))
            .into());
        }
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
        if let Some(t) = timeout {
            builder = builder.timeout(t);
        }
        let http = builder.build().context("cannot build the HTTP client")?;
        Ok(Client {
            base,
            token: token.map(str::to_string),
            http,
        })
    }

    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let bytes = self.send(reqwest::Method::GET, path).await?;
        let url = format!("{}{path}", self.base);
        serde_json::from_slice(&bytes).with_context(|| {
            format!("the answer from {url} is not what this canal version expects")
        })
    }

    /// POSTs to `path` with an empty body; the answer's body is ignored.
    pub(crate) async fn post(&self, path: &str) -> anyhow::Result<()> {
        self.send(reqwest::Method::POST, path).await.map(|_| ())
    }

    /// POSTs `body` with `headers` and decodes the JSON answer.
    pub(crate) async fn post_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Vec<u8>,
        headers: &[(String, String)],
    ) -> anyhow::Result<T> {
        self.send_json(reqwest::Method::POST, path, body, headers)
            .await
    }

    /// PUTs `body` with `headers` and decodes the JSON answer.
    pub(crate) async fn put_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Vec<u8>,
        headers: &[(String, String)],
    ) -> anyhow::Result<T> {
        self.send_json(reqwest::Method::PUT, path, body, headers)
            .await
    }

    /// DELETEs `path`; the answer's body is ignored.
    pub(crate) async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.send(reqwest::Method::DELETE, path).await.map(|_| ())
    }

    /// GETs `path` and returns the raw body, or `None` when the node answers 404.
    pub(crate) async fn get_bytes_or_none(&self, path: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .request(reqwest::Method::GET, path, Vec::new(), &[])
            .await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Self::body(resp, &url).await.map(Some)
    }

    async fn send_json<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Vec<u8>,
        headers: &[(String, String)],
    ) -> anyhow::Result<T> {
        let resp = self.request(method, path, body, headers).await?;
        let url = format!("{}{path}", self.base);
        serde_json::from_slice(&Self::body(resp, &url).await?).with_context(|| {
            format!("the answer from {url} is not what this canal version expects")
        })
    }

    /// Sends a request and returns the status and body whatever the status, for callers
    /// that decide by status (404 as "none", 503 as "try again").
    pub(crate) async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Vec<u8>,
        headers: &[(String, String)],
    ) -> anyhow::Result<(reqwest::StatusCode, Vec<u8>)> {
        let url = format!("{}{path}", self.base);
        let resp = self.request(method, path, body, headers).await?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .with_context(|| format!("reading the answer from {url}"))?;
        Ok((status, bytes.to_vec()))
    }

    /// The base URL this client talks to.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// GETs `path` and returns the response once its status is known good, for streaming.
    pub(crate) async fn stream(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let resp = self
            .request(reqwest::Method::GET, path, Vec::new(), &[])
            .await?;
        if !resp.status().is_success() {
            let url = format!("{}{path}", self.base);
            Self::body(resp, &url).await?;
            bail!("{url} did not answer with a stream");
        }
        Ok(resp)
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Vec<u8>,
        headers: &[(String, String)],
    ) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).body(body);
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        req.send().await.map_err(|e| {
            if e.is_connect() || e.is_timeout() {
                anyhow!(
                    "cannot reach the canal API at {}: {} (is a node running there? set --api or CANAL_API)",
                    self.base,
                    root_cause(&e)
                )
            } else {
                anyhow!("request to {url} failed: {}", root_cause(&e))
            }
        })
    }

    /// The body of a successful answer, or the error it carries.
    async fn body(resp: reqwest::Response, url: &str) -> anyhow::Result<Vec<u8>> {
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .with_context(|| format!("reading the answer from {url}"))?;
        if !status.is_success() {
            let msg = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).trim().to_string());
            bail!("{msg} (HTTP {status})");
        }
        Ok(bytes.to_vec())
    }

    async fn send(&self, method: reqwest::Method, path: &str) -> anyhow::Result<Vec<u8>> {
        let url = format!("{}{path}", self.base);
        let resp = self.request(method, path, Vec::new(), &[]).await?;
        Self::body(resp, &url).await
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_topics_for_paths() {
        assert_eq!(
            encode_segment("sensors/room 1/temp"),
            "sensors%2Froom%201%2Ftemp"
        );
        assert_eq!(encode_segment("a-b_c.d~e"), "a-b_c.d~e");
    }

    #[test]
    fn encodes_keys_keeping_slashes() {
        assert_eq!(
            encode_path("mean/sensors/r 1/t?x#y"),
            "mean/sensors/r%201/t%3Fx%23y"
        );
        assert_eq!(encode_path("caf\u{e9}/%"), "caf%C3%A9/%25");
    }
}
