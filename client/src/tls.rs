//! How the client verifies an `https://` node: against the CA certificates of `--ca` (set
//! once per process with [`set_ca_file`]), else against the system's roots; and the client
//! certificate it shows a node that asks for one (mutual TLS, `--cert` and `--key`, set once
//! per process with [`set_client_identity`]). Plain `http://` bases use no TLS at all.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::{Arc, OnceLock};

static CA: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
static IDENTITY: OnceLock<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> = OnceLock::new();

/// Trusts only the CA certificates in the PEM file `path` for every `https://` client this
/// process makes from now on (the CLI's `--ca`).
pub fn set_ca_file(path: &Path) -> Result<(), String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "--ca {}: {e}: it must hold PEM certificates",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "--ca {}: holds no certificate: it must hold PEM `BEGIN CERTIFICATE` blocks",
            path.display()
        ));
    }
    CA.set(certs)
        .map_err(|_| "the CA is already set for this process".to_string())
}

/// Shows the certificate chain in the PEM file `cert` and its private key in `key` to every
/// `https://` node this process connects to from now on (the CLI's `--cert` and `--key`).
pub fn set_client_identity(cert: &Path, key: &Path) -> Result<(), String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "--cert {}: {e}: it must hold a PEM certificate chain",
                cert.display()
            )
        })?;
    if chain.is_empty() {
        return Err(format!(
            "--cert {}: holds no certificate: it must hold PEM `BEGIN CERTIFICATE` blocks",
            cert.display()
        ));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "--key {}: {e}: it must hold one PEM private key (PKCS#8, PKCS#1 or SEC1)",
            key.display()
        )
    })?;
    // Refused here, not at the first handshake: a key that is not the certificate's.
    rustls::sign::CertifiedKey::from_der(
        chain.clone(),
        private.clone_key(),
        &rustls::crypto::aws_lc_rs::default_provider(),
    )
    .map_err(|e| {
        format!(
            "--key {} does not go with --cert {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    IDENTITY
        .set((chain, private))
        .map_err(|_| "the client certificate is already set for this process".to_string())
}

/// Makes aws-lc-rs (the provider libp2p already brings in) the process's rustls provider,
/// Whether a CA was given (`--ca`), so requests may go to TLS nodes.
pub fn ca_configured() -> bool {
    CA.get().is_some()
}

/// Whether a client certificate was given (`--cert`, `--key`).
pub fn has_client_identity() -> bool {
    IDENTITY.get().is_some()
}

/// which reqwest asks for even for `http://` clients; a provider installed before is kept.
pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The rustls settings of a client; `https`: of one that will verify a server (an `http://`
/// client gets no roots, never used).
pub(crate) fn client_config(https: bool) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match CA.get() {
        _ if !https => {}
        Some(certs) => {
            for c in certs {
                roots
                    .add(c.clone())
                    .map_err(|e| format!("a --ca certificate is refused: {e}"))?;
            }
        }
        None => {
            // Unreadable system certificates are skipped: the handshake then says the
            // server's certificate is unknown, which names the fix (--ca).
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    match IDENTITY.get() {
        Some((chain, key)) if https => builder
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| format!("the client certificate (--cert, --key) is refused: {e}")),
        _ => Ok(builder.with_no_client_auth()),
    }
}
