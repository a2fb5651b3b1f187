//! How the client verifies an `https://` node: against the CA certificates of `--ca` (set
//! once per process with [`set_ca_file`]), else against the system's roots. Plain `http://`
//! bases use no TLS at all.

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::path::Path;
use std::sync::{Arc, OnceLock};

static CA: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();

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

/// Makes aws-lc-rs (the provider libp2p already brings in) the process's rustls provider,
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
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
