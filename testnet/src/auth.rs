//! The tokens of a testnet: one token key per test process, written into each testnet's
//! directory and given to its nodes (`--token-key`), and an admin token signed with it that
//! every client the harness makes carries, so the whole suite runs with tokens checked.
//!
//! One key per process, not per testnet, so a test's own HTTP clients and `canal` commands
//! need only [`admin_token`], not the testnet they talk to. A test of what a founding node
//! does without an operator's key starts its nodes with [`crate::NodeOptions::own_token_key`].

use anyhow::Context;
use canal_auth::{Claims, Permission, SigningKey};
use std::path::Path;
use std::sync::OnceLock;

/// The name of the token key file in a testnet's directory.
pub const TOKEN_KEY_FILE: &str = "token.key";
/// The file a persistent testnet keeps its admin token in.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

struct Credentials {
    key: SigningKey,
    admin: String,
}

fn credentials() -> &'static Credentials {
    static CREDENTIALS: OnceLock<Credentials> = OnceLock::new();
    CREDENTIALS.get_or_init(|| {
        // Only a test harness: without OS randomness, a seed of the process and the time.
        let seed = canal_auth::token::random_bytes::<32>().unwrap_or_else(|_| {
            use std::hash::{BuildHasher, RandomState};
            let h = RandomState::new().hash_one((std::process::id(), std::time::SystemTime::now()));
            let mut s = [0u8; 32];
            s[..8].copy_from_slice(&h.to_le_bytes());
            s
        });
        let key = SigningKey::from_bytes(&seed);
        let admin = mint_admin(&key, 24 * 3600 * 1000).unwrap_or_default();
        Credentials { key, admin }
    })
}

/// An admin token (every topic, admin rights) signed with `key`, valid for `ttl_ms`.
pub fn mint_admin(key: &SigningKey, ttl_ms: u64) -> anyhow::Result<String> {
    let now = canal_proto::time::now_ms();
    let claims = Claims {
        id: canal_auth::fresh_token_id()?,
        subject: "admin".into(),
        cluster: canal_auth::cluster_id(&key.public()),
        issued_ms: now,
        expires_ms: now.saturating_add(ttl_ms),
        publish: Permission::everything(),
        subscribe: Permission::everything(),
        admin: true,
    };
    Ok(key.issue(&claims)?)
}

/// The admin token of every testnet this process starts.
pub fn admin_token() -> &'static str {
    &credentials().admin
}

/// The token key of every testnet this process starts.
pub fn token_key() -> &'static SigningKey {
    &credentials().key
}

/// Writes this process's token key to `path` (mode 0600) unless it is there already.
pub fn write_process_key(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    write_private(path, &token_key().to_text())
}

/// Writes `text` to a new file `path` readable by its owner only.
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The token key of the persistent testnet in `dir` (made on first use, kept with it so a
/// restarted testnet keeps its tokens valid) and an admin token for it, valid 30 days,
/// also kept in `dir/admin-token`.
pub fn persistent_credentials(dir: &Path) -> anyhow::Result<String> {
    let key_path = dir.join(TOKEN_KEY_FILE);
    if !key_path.exists() {
        let key = SigningKey::generate()?;
        write_private(&key_path, &key.to_text())?;
    }
    let text = std::fs::read_to_string(&key_path)
        .with_context(|| format!("cannot read {}", key_path.display()))?;
    let key = SigningKey::from_text(&text).with_context(|| key_path.display().to_string())?;
    let token = mint_admin(&key, 30 * 24 * 3600 * 1000)?;
    let token_path = dir.join(ADMIN_TOKEN_FILE);
    let _ = std::fs::remove_file(&token_path);
    write_private(&token_path, &format!("{token}\n"))?;
    Ok(token)
}

/// An HTTP client that sends the admin token with every request, for tests' own requests.
pub fn http_client() -> reqwest::Client {
    canal_client::tls::install_provider();
    let mut headers = reqwest::header::HeaderMap::new();
    if let Ok(v) = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", admin_token())) {
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap_or_default()
}

/// A file holding this process's token key (made on first use, in the system's temporary
/// directory, mode 0600), for `canal testnet up --token-key` in tests: the persistent
/// testnet's nodes then accept [`admin_token`] too.
pub fn process_key_file() -> anyhow::Result<std::path::PathBuf> {
    static FILE: OnceLock<std::path::PathBuf> = OnceLock::new();
    if let Some(p) = FILE.get() {
        return Ok(p.clone());
    }
    let path = std::env::temp_dir().join(format!(
        "canal-test-token-key-{}-{}",
        std::process::id(),
        canal_auth::cluster_id(&token_key().public())
    ));
    write_process_key(&path)?;
    Ok(FILE.get_or_init(|| path).clone())
}
