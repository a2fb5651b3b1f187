//! The local CA of `canal testnet up --tls` (and TLS tests): a CA certificate, one
//! certificate for every node (`localhost`, `127.0.0.1`) and one client certificate (for
//! nodes started with `--tls-client-ca`), made with rcgen, in PEM files.

use anyhow::Context;
use std::path::{Path, PathBuf};

/// The PEM files of a local CA and the nodes' certificate.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate (`canal --ca`).
    pub ca: PathBuf,
    /// The nodes' certificate, signed by the CA (`--tls-cert`).
    pub cert: PathBuf,
    /// Its private key (`--tls-key`, mode 0600).
    pub key: PathBuf,
    /// A client certificate, signed by the CA (`canal --cert`).
    pub client_cert: PathBuf,
    /// Its private key (`canal --key`, mode 0600).
    pub client_key: PathBuf,
}

/// The local CA in `dir`, made there unless it exists already.
pub fn ensure_local_ca(dir: &Path) -> anyhow::Result<TlsFiles> {
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("node.pem"),
        key: dir.join("node-key.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client-key.pem"),
    };
    let all = [
        &files.ca,
        &files.cert,
        &files.key,
        &files.client_cert,
        &files.client_key,
    ];
    // The CA's own key is not kept, so a set without the client files (made before they
    // were) is made anew, whole.
    if all.iter().all(|f| f.exists()) {
        return Ok(files);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca = certificate_authority("canal testnet CA")?;
    let (cert, key) = ca.issue(&["localhost", "127.0.0.1"])?;
    let (client_cert, client_key) = ca.issue_client("canal client")?;
    for f in all {
        let _ = std::fs::remove_file(f);
    }
    std::fs::write(&files.ca, &ca.pem)
        .with_context(|| format!("cannot write {}", files.ca.display()))?;
    std::fs::write(&files.cert, cert)
        .with_context(|| format!("cannot write {}", files.cert.display()))?;
    crate::auth::write_private(&files.key, &key)?;
    std::fs::write(&files.client_cert, client_cert)
        .with_context(|| format!("cannot write {}", files.client_cert.display()))?;
    crate::auth::write_private(&files.client_key, &client_key)?;
    Ok(files)
}

/// A certificate authority: its certificate (PEM) and what it signs with.
pub struct Authority {
    /// The CA certificate, PEM.
    pub pem: String,
    issuer: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// A fresh self-signed CA named `name`.
pub fn certificate_authority(name: &str) -> anyhow::Result<Authority> {
    let key = rcgen::KeyPair::generate().context("cannot make the CA's key")?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let issuer = params.self_signed(&key).context("cannot sign the CA")?;
    Ok(Authority {
        pem: issuer.pem(),
        issuer,
        key,
    })
}

impl Authority {
    /// A server certificate for `names` (DNS names or IP addresses) and its private key,
    /// both PEM.
    pub fn issue(&self, names: &[&str]) -> anyhow::Result<(String, String)> {
        let key = rcgen::KeyPair::generate().context("cannot make a node key")?;
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "canal node");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .context("cannot sign the node certificate")?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A client certificate named `name` (its common name) and its private key, both PEM.
    pub fn issue_client(&self, name: &str) -> anyhow::Result<(String, String)> {
        let key = rcgen::KeyPair::generate().context("cannot make a client key")?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .context("cannot sign the client certificate")?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}
