//! HTTPS for the client API (`--tls-cert`, `--tls-key`, `--tls-client-ca`), and MQTT over
//! TLS with the same settings (`--mqtts-listen`), with rustls (the version and aws-lc-rs
//! provider libp2p already brings in).
//!
//! Handshakes run in tasks of their own, each bounded by [`HANDSHAKE_TIMEOUT`], and only
//! finished connections reach the server ([`TlsListener`], [`serve_mqtts`]), so a client
//! that stalls its handshake holds up no one else.

use crate::config::TlsFiles;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

/// How long a client may take over its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Failed TLS handshakes, counted in `canal_tls_handshake_failures_total{listener,reason}`:
/// `listener` is `api` or `mqtt`, `reason` is `refused` (no shared version or cipher, an
/// unverifiable or missing client certificate, not TLS at all) or `timeout` (past
/// [`HANDSHAKE_TIMEOUT`]).
#[derive(Clone)]
pub struct TlsMetrics {
    failures: Family<Vec<(String, String)>, Counter>,
}

impl TlsMetrics {
    /// Registers `canal_tls_handshake_failures` in `registry`.
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> TlsMetrics {
        let m = TlsMetrics {
            failures: Family::default(),
        };
        registry.register(
            "canal_tls_handshake_failures",
            "TLS handshakes that failed, by listener (api, mqtt) and reason (refused, timeout)",
            m.failures.clone(),
        );
        m
    }

    fn failed(&self, listener: &str, reason: &str) {
        self.failures
            .get_or_create(&vec![
                ("listener".into(), listener.into()),
                ("reason".into(), reason.into()),
            ])
            .inc();
    }
}

/// Runs the handshake of `stream` within [`HANDSHAKE_TIMEOUT`]; a failure is logged and
/// counted under `listener`.
async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    listener: &'static str,
    metrics: &TlsMetrics,
) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(%peer, listener, error = %e, "TLS handshake refused");
            metrics.failed(listener, "refused");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, listener, "TLS handshake timed out");
            metrics.failed(listener, "timeout");
            None
        }
    }
}
/// How many finished handshakes may wait for the server to take them.
const BACKLOG: usize = 256;

/// Why the API's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file does not read.
    #[error("{what} {path}: {why}")]
    File {
        /// Which file (`--tls-cert`, ...).
        what: &'static str,
        /// Its path.
        path: String,
        /// What is wrong and what is expected.
        why: String,
    },
    /// rustls refused the certificate, key or CAs.
    #[error("the API's TLS settings are refused: {0}")]
    Config(String),
}

fn pem_err(what: &'static str, path: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        what,
        path: path.display().to_string(),
        why: why.to_string(),
    }
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(what, path, e))?;
    if certs.is_empty() {
        return Err(pem_err(
            what,
            path,
            "holds no certificate: it must hold PEM `BEGIN CERTIFICATE` blocks",
        ));
    }
    Ok(certs)
}

/// The rustls server settings of `files`.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = certs("--tls-cert", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        pem_err(
            "--tls-key",
            &files.key,
            format!("{e}: it must hold one PEM private key (PKCS#8, PKCS#1 or SEC1)"),
        )
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs("--tls-client-ca", ca)? {
                roots
                    .add(c)
                    .map_err(|e| pem_err("--tls-client-ca", ca, e))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A listener that hands the server only connections whose TLS handshake finished.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `tcp` with `config`, until `closing` turns true.
    pub fn new(
        tcp: TcpListener,
        config: Arc<rustls::ServerConfig>,
        metrics: TlsMetrics,
        mut closing: tokio::sync::watch::Receiver<bool>,
    ) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(BACKLOG);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    r = tcp.accept() => match r {
                        Ok(c) => c,
                        Err(e) => {
                            // Out of file descriptors and the like: wait, do not spin.
                            tracing::warn!(error = %e, "API accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                    // The watch's guard is not Send: dropped inside, not held by the select.
                    () = async { let _ = closing.wait_for(|c| *c).await; } => break,
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    if let Some(tls) = handshake(&acceptor, stream, peer, "api", &metrics).await {
                        let _ = tx.send((tls, peer)).await;
                    }
                });
            }
        });
        Ok(TlsListener { rx, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The acceptor stopped (shutdown): no connection comes any more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// The settings of MQTT over TLS: the API's certificate, key and client CAs, offering the
/// `mqtt` ALPN protocol (IANA's name) in place of HTTP's, so that a client naming `mqtt`
/// is not refused and one naming `http/1.1` does not take the MQTT port for the API.
pub fn mqtt_config(api: &rustls::ServerConfig) -> Arc<rustls::ServerConfig> {
    let mut config = api.clone();
    config.alpn_protocols = vec![b"mqtt".to_vec()];
    Arc::new(config)
}

/// Serves MQTT over TLS on `tcp` until `closing` turns true: each connection's handshake
/// in a task of its own, bounded by [`HANDSHAKE_TIMEOUT`], then its MQTT session there.
pub async fn serve_mqtts(
    tcp: TcpListener,
    config: Arc<rustls::ServerConfig>,
    mqtt: crate::pubsub::Mqtt,
    metrics: TlsMetrics,
    mut closing: tokio::sync::watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let (stream, peer) = tokio::select! {
            r = tcp.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "MQTT over TLS accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = async { let _ = closing.wait_for(|c| *c).await; } => return,
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let mqtt = mqtt.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Some(tls) = handshake(&acceptor, stream, peer, "mqtt", &metrics).await {
                mqtt.connection(tls, peer.to_string()).await;
            }
        });
    }
}
