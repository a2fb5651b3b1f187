//! Tokens on a node: the [`Gate`] every request passes (which verifier, which revoked ids),
//! the cluster's token key (made at formation, or given by the operator), and issuing,
//! listing and revoking tokens through the metadata group.
//!
//! ```text
//!   --token-key FILE, or DATA_DIR/token-key ──> signing key (this node may issue tokens)
//!   metadata group  \x01K/ed25519  (public half, set once at formation) ──> Verifier
//!                   \x01I/{id}     (what an issued token says)         ──> `canal token list`
//!                   \x01X/{id}     (revoked)                           ──> Verifier's revoked set
//! ```
//!
//! The private key never travels: the founding node makes it in its data directory (mode
//! 0600) and records only the public half, which every node verifies with. Other nodes issue
//! tokens only if the operator gives them the same key file (`--token-key`); see
//! docs/auth.md for the threat model. The [`TokenJob`] refreshes the verifier and the revoked
//! set from this node's replica of the metadata group every [`REFRESH_EVERY`], so a
//! revocation is in force on every node about as soon as it is applied there.

use crate::config::AuthMode;
use canal_auth::{Claims, KeyError, Permission, SigningKey, Unauthorized, Verifier};
use canal_consensus::{Consensus, GroupId, InternalKey, Op, Transport, keys};
use canal_proto::TopicFilter;
use canal_proto::api::{TokenInfo, TokenIssued, TokenRequest};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tracing::{info, warn};

/// The name of the token key's record (its algorithm).
const KEY_RECORD: &str = "ed25519";
/// The token key file the founding node makes in its data directory.
pub const TOKEN_KEY_FILE: &str = "token-key";
/// The file the founding node writes its first admin token to (mode 0600).
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// How long the first admin token is valid.
pub const ADMIN_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// The longest validity a token may be issued with (ten years).
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How often the job reads the token key and the revoked ids from the local replica.
pub const REFRESH_EVERY: Duration = Duration::from_millis(200);

/// Who is calling, as the gate let them in.
#[derive(Debug, Clone)]
pub enum Caller {
    /// `--auth none`: anyone may do anything.
    Open,
    /// The holder of a valid token.
    Token(Arc<Claims>),
}

impl Caller {
    /// Whether the caller may publish to `topic`.
    pub fn may_publish(&self, topic: &canal_proto::Topic) -> Result<(), canal_auth::Forbidden> {
        match self {
            Caller::Open => Ok(()),
            Caller::Token(c) => c.may_publish(topic),
        }
    }

    /// Whether the caller may subscribe with `filter`.
    pub fn may_subscribe(&self, filter: &TopicFilter) -> Result<(), canal_auth::Forbidden> {
        match self {
            Caller::Open => Ok(()),
            Caller::Token(c) => c.may_subscribe(filter),
        }
    }

    /// Whether the caller may read `topic` (acknowledge it, see its log).
    pub fn may_read(&self, topic: &canal_proto::Topic) -> Result<(), canal_auth::Forbidden> {
        match self {
            Caller::Open => Ok(()),
            Caller::Token(c) => c.may_read(topic),
        }
    }

    /// Whether the caller has admin rights.
    pub fn may_admin(&self) -> Result<(), canal_auth::Forbidden> {
        match self {
            Caller::Open => Ok(()),
            Caller::Token(c) => c.may_admin(),
        }
    }

    /// The token's subject; `None` with `--auth none`.
    pub fn subject(&self) -> Option<&str> {
        match self {
            Caller::Open => None,
            Caller::Token(c) => Some(&c.subject),
        }
    }

    /// What the caller may publish to; `None`: anything (`--auth none`).
    pub fn publish_rights(&self) -> Option<&Permission> {
        match self {
            Caller::Open => None,
            Caller::Token(c) => Some(&c.publish),
        }
    }
}

/// Why tokens could not be issued, listed or revoked.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The request is refused (bad filter, subject, ttl).
    #[error("{0}")]
    Invalid(String),
    /// This node does not hold the signing key.
    #[error(
        "this node does not hold the cluster's token key, so it cannot issue tokens: ask the node that founded the cluster (its data directory holds `token-key`), or start this one with --token-key FILE holding that key"
    )]
    NoSigningKey,
    /// `--auth none`: there are no tokens.
    #[error("this node runs --auth none: it checks no tokens, so it issues none")]
    AuthOff,
    /// The key or the token could not be made.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The metadata group could not be read or written.
    #[error(transparent)]
    Consensus(#[from] canal_consensus::ClientError),
    /// A stored record does not read.
    #[error("{0}")]
    Stored(String),
}

/// What every request passes: the mode, and the verifier of this cluster's tokens.
pub struct Gate {
    mode: AuthMode,
    verifier: RwLock<Option<Arc<Verifier>>>,
    signer: RwLock<Option<Arc<SigningKey>>>,
    /// Requests refused, by reason.
    pub refused: prometheus_client::metrics::family::Family<
        Vec<(String, String)>,
        prometheus_client::metrics::counter::Counter,
    >,
}

impl Gate {
    /// A gate in `mode`, verifying with `key`'s public half (and signing with it) from the
    /// start when the operator gave one.
    pub fn new(mode: AuthMode, key: Option<SigningKey>) -> Result<Gate, KeyError> {
        let verifier = key
            .as_ref()
            .map(|k| Verifier::new(&k.public()).map(Arc::new))
            .transpose()?;
        Ok(Gate {
            mode,
            verifier: RwLock::new(verifier),
            signer: RwLock::new(key.map(Arc::new)),
            refused: Default::default(),
        })
    }

    /// The mode.
    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// The caller holding `token` (or none), if the gate lets them in.
    pub fn check(&self, token: Option<&str>) -> Result<Caller, Unauthorized> {
        if self.mode == AuthMode::None {
            return Ok(Caller::Open);
        }
        let token = token.ok_or(Unauthorized::Missing)?;
        let verifier = self.verifier().ok_or(Unauthorized::NoKey)?;
        verifier.verify(token).map(|c| Caller::Token(Arc::new(c)))
    }

    /// Counts a refusal under `reason` (`canal_auth_refused_total{reason}`).
    pub fn count_refusal(&self, reason: &str) {
        self.refused
            .get_or_create(&vec![("reason".to_string(), reason.to_string())])
            .inc();
    }

    /// The verifier, once the cluster's token key is known.
    pub fn verifier(&self) -> Option<Arc<Verifier>> {
        self.verifier
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn signer(&self) -> Option<Arc<SigningKey>> {
        self.signer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_key(&self, public: &[u8; 32]) -> Result<(), KeyError> {
        if self.verifier().is_some_and(|v| v.public() == *public) {
            return Ok(());
        }
        let v = Verifier::new(public)?;
        if let Some(old) = self.verifier() {
            warn!(
                was = %old.cluster(),
                now = %v.cluster(),
                "this node's token key is not the cluster's: it verifies with the cluster's and issues no tokens"
            );
        }
        let mut signer = self.signer.write().unwrap_or_else(|p| p.into_inner());
        if signer.as_ref().is_some_and(|s| s.public() != *public) {
            *signer = None;
        }
        *self.verifier.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(v));
        Ok(())
    }
}

/// Reads a token key file (`canal token keygen`, or a data directory's `token-key`).
pub fn read_key_file(path: &Path) -> Result<SigningKey, KeyError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| KeyError::Format(format!("cannot read {}: {e}", path.display())))?;
    SigningKey::from_text(&text).map_err(|e| KeyError::Format(format!("{}: {e}", path.display())))
}

/// Writes `text` to a new file at `path`, readable by its owner only (0600); refuses to
/// replace a file that exists.
pub fn write_private_file(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// The token key this node starts with: the operator's file, or the one its data directory
/// holds from an earlier formation.
pub fn load_key(given: Option<&Path>, data_dir: &Path) -> Result<Option<SigningKey>, KeyError> {
    if let Some(p) = given {
        return read_key_file(p).map(Some);
    }
    let own = data_dir.join(TOKEN_KEY_FILE);
    if own.exists() {
        return read_key_file(&own).map(Some);
    }
    Ok(None)
}

/// The filters of a request's list, each checked.
fn filters(what: &str, list: &[String]) -> Result<Vec<TopicFilter>, TokenError> {
    list.iter()
        .map(|s| {
            TopicFilter::new(s)
                .map_err(|e| TokenError::Invalid(format!("{what} filter {s:?} is refused: {e}")))
        })
        .collect()
}

/// The list entry of `claims`.
pub fn info_of(claims: &Claims, revoked: bool) -> TokenInfo {
    let strings = |l: &[TopicFilter]| l.iter().map(|f| f.to_string()).collect();
    TokenInfo {
        id: claims.id.clone(),
        subject: claims.subject.clone(),
        issued_ms: claims.issued_ms,
        expires_ms: claims.expires_ms,
        publish: strings(&claims.publish.allow),
        publish_deny: strings(&claims.publish.deny),
        subscribe: strings(&claims.subscribe.allow),
        subscribe_deny: strings(&claims.subscribe.deny),
        admin: claims.admin,
        revoked,
    }
}

/// Issuing, listing and revoking tokens, and the job that keeps the gate current.
pub struct Tokens<T: Transport> {
    /// The groups.
    pub consensus: Consensus<T>,
    /// The gate the API checks requests with.
    pub gate: Arc<Gate>,
    /// This node's data directory (where a founding node keeps its key).
    pub data_dir: PathBuf,
}

impl<T: Transport> Tokens<T> {
    /// Signs a token for `req` (the caller checked admin rights) and records what it says.
    pub async fn issue(&self, req: &TokenRequest) -> Result<TokenIssued, TokenError> {
        if self.gate.mode == AuthMode::None {
            return Err(TokenError::AuthOff);
        }
        let signer = self.gate.signer().ok_or(TokenError::NoSigningKey)?;
        let ttl = Duration::from_secs(req.ttl_s);
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(TokenError::Invalid(format!(
                "ttl {} s is out of range: 1 s to {} s (ten years)",
                req.ttl_s,
                MAX_TTL.as_secs()
            )));
        }
        let now = canal_proto::time::now_ms();
        let claims = Claims {
            id: canal_auth::fresh_token_id()?,
            subject: req.subject.clone(),
            cluster: canal_auth::cluster_id(&signer.public()),
            issued_ms: now,
            expires_ms: now.saturating_add(ttl.as_millis() as u64),
            publish: Permission {
                allow: filters("publish", &req.publish)?,
                deny: filters("publish deny", &req.publish_deny)?,
            },
            subscribe: Permission {
                allow: filters("subscribe", &req.subscribe)?,
                deny: filters("subscribe deny", &req.subscribe_deny)?,
            },
            admin: req.admin,
        };
        claims.check().map_err(TokenError::Invalid)?;
        let token = signer.issue(&claims)?;
        self.record(&claims).await?;
        Ok(TokenIssued {
            token,
            info: info_of(&claims, false),
        })
    }

    async fn record(&self, claims: &Claims) -> Result<(), TokenError> {
        let value = canal_proto::wire::encode(claims)
            .map_err(|e| TokenError::Stored(format!("the claims do not encode: {e}")))?;
        self.consensus
            .write_op(
                GroupId::METADATA,
                Op::Internal {
                    key: InternalKey::Token(claims.id.clone()),
                    value: Some(value),
                },
            )
            .await?;
        Ok(())
    }

    /// Every issued token as this node's replica knows it.
    pub fn list(&self) -> Result<Vec<TokenInfo>, TokenError> {
        let sm = self.consensus.state_machine(GroupId::METADATA)?;
        let stored = |e: canal_consensus::ReadError| TokenError::Stored(e.to_string());
        let revoked: HashSet<String> = sm
            .scan_table(&keys::REVOKED_TOKENS)
            .map_err(stored)?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let mut out = Vec::new();
        for (id, bytes) in sm.scan_table(&keys::TOKENS).map_err(stored)? {
            let claims: Claims = canal_proto::wire::decode_with_limit(&bytes, usize::MAX)
                .map_err(|e| TokenError::Stored(format!("stored token {id} does not read: {e}")))?;
            out.push(info_of(&claims, revoked.contains(&id)));
        }
        Ok(out)
    }

    /// Revokes token `id` (any well-formed id: tokens minted from an operator's key file
    /// offline have no record) and puts it in force on this node at once.
    pub async fn revoke(&self, id: &str) -> Result<(), TokenError> {
        if id.is_empty()
            || id.len() > canal_auth::claims::MAX_ID_BYTES
            || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(TokenError::Invalid(format!(
                "token id {id:?} is refused: 1 to {} ASCII letters, digits or `-` (as `canal token list` shows)",
                canal_auth::claims::MAX_ID_BYTES
            )));
        }
        let sm = self.consensus.state_machine(GroupId::METADATA)?;
        let expires = sm
            .record(&keys::TOKENS, id)
            .ok()
            .flatten()
            .and_then(|b| canal_proto::wire::decode_with_limit::<Claims>(&b, usize::MAX).ok())
            .map_or(u64::MAX, |c| c.expires_ms);
        let value = keys::REVOKED_TOKENS
            .encode(&expires)
            .map_err(|e| TokenError::Stored(e.to_string()))?;
        self.consensus
            .write_op(
                GroupId::METADATA,
                Op::Internal {
                    key: InternalKey::RevokedToken(id.to_string()),
                    value: Some(value),
                },
            )
            .await?;
        self.refresh_revoked();
        Ok(())
    }

    /// Reads the revoked ids from this node's replica into the verifier.
    fn refresh_revoked(&self) {
        let Some(v) = self.gate.verifier() else {
            return;
        };
        let Ok(sm) = self.consensus.state_machine(GroupId::METADATA) else {
            return;
        };
        match sm.scan_table(&keys::REVOKED_TOKENS) {
            Ok(rs) => v.set_revoked(rs.into_iter().map(|(id, _)| id).collect()),
            Err(e) => warn!(error = %e, "cannot read the revoked tokens"),
        }
    }

    /// One round of the job: learn the cluster's key (or, on the metadata leader of a cluster
    /// that has none, make it), then the revoked ids.
    async fn step(&self) {
        if self.gate.mode == AuthMode::None {
            return;
        }
        let Ok(sm) = self.consensus.state_machine(GroupId::METADATA) else {
            return;
        };
        match sm.record(&keys::TOKEN_KEY, KEY_RECORD) {
            Ok(Some(bytes)) => match <[u8; 32]>::try_from(bytes.as_slice()) {
                Ok(public) => {
                    if let Err(e) = self.gate.set_key(&public) {
                        warn!(error = %e, "the cluster's token key record does not read");
                    }
                }
                Err(_) => warn!(
                    len = bytes.len(),
                    "the cluster's token key record is not 32 bytes"
                ),
            },
            Ok(None) if self.consensus.is_leader(GroupId::METADATA) => {
                if let Err(e) = self.found().await {
                    warn!(error = %e, "cannot set the cluster's token key yet");
                }
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, "cannot read the cluster's token key"),
        }
        self.refresh_revoked();
    }

    /// Records this node's key (made now, in the data directory, unless the operator gave
    /// one) as the cluster's, and issues the first admin token, printed once.
    async fn found(&self) -> Result<(), TokenError> {
        let key = match self.gate.signer() {
            Some(k) => k,
            None => {
                let k = SigningKey::generate()?;
                let path = self.data_dir.join(TOKEN_KEY_FILE);
                write_private_file(&path, &k.to_text()).map_err(|e| {
                    TokenError::Stored(format!("cannot write {}: {e}", path.display()))
                })?;
                let k = Arc::new(k);
                *self.gate.signer.write().unwrap_or_else(|p| p.into_inner()) = Some(k.clone());
                k
            }
        };
        let r = self
            .consensus
            .write_op(
                GroupId::METADATA,
                Op::Internal {
                    key: InternalKey::TokenKey(KEY_RECORD.into()),
                    value: Some(key.public().to_vec()),
                },
            )
            .await?;
        if let Some(why) = r.refused {
            // Another founder's key won; the next round adopts it.
            return Err(TokenError::Stored(why));
        }
        self.gate.set_key(&key.public())?;
        if r.previous.is_some() {
            return Ok(()); // recorded before, by this same key: the admin token exists
        }
        let admin = self
            .issue(&TokenRequest {
                subject: "admin".into(),
                publish: vec!["#".into()],
                subscribe: vec!["#".into()],
                admin: true,
                ttl_s: ADMIN_TOKEN_TTL.as_secs(),
                ..TokenRequest::default()
            })
            .await?;
        let path = self.data_dir.join(ADMIN_TOKEN_FILE);
        if let Err(e) = write_private_file(&path, &format!("{}\n", admin.token)) {
            warn!(file = %path.display(), error = %e, "cannot keep the admin token");
        }
        info!(
            cluster = %canal_auth::cluster_id(&key.public()),
            id = %admin.info.id,
            "the cluster's token key is set; the admin token follows, shown this once (also in {}, mode 0600)",
            path.display()
        );
        // Printed apart from the log so that it can be copied, and not shipped to a log store.
        eprintln!("canal admin token (shown once): {}", admin.token);
        Ok(())
    }
}

/// The job that keeps the gate current ([`Tokens::step`] every [`REFRESH_EVERY`]).
pub struct TokenJob<T: Transport> {
    tokens: Arc<Tokens<T>>,
    tick: tokio::time::Interval,
}

impl<T: Transport> TokenJob<T> {
    /// The job for `tokens`.
    pub fn new(tokens: Arc<Tokens<T>>) -> Self {
        TokenJob {
            tokens,
            tick: canal_worker::ticker(REFRESH_EVERY),
        }
    }
}

impl<T: Transport> canal_worker::Worker for TokenJob<T> {
    fn name(&self) -> &'static str {
        "tokens"
    }

    async fn wait(&mut self) {
        self.tick.tick().await;
    }

    async fn work(&mut self) -> canal_worker::Flow {
        self.tokens.step().await;
        canal_worker::Flow::Continue
    }
}

/// The MQTT listener's token check: the CONNECT password is the token (the user name is not
/// looked at), and the connection then publishes and subscribes within its rights.
pub struct MqttTokens {
    /// The node's token gate.
    pub gate: Arc<Gate>,
}

impl canal_mqtt::ConnectAuth for MqttTokens {
    fn check(
        &self,
        c: canal_mqtt::Credentials<'_>,
    ) -> Result<Arc<dyn canal_mqtt::Rights>, canal_mqtt::AuthRefused> {
        match self.gate.check(c.password) {
            Ok(caller) => Ok(Arc::new(MqttRights {
                caller,
                gate: self.gate.clone(),
            })),
            Err(e) => {
                self.gate.count_refusal(e.kind());
                Err(canal_mqtt::AuthRefused::NotAuthorized(format!(
                    "{e} (MQTT: the token goes in the CONNECT password)"
                )))
            }
        }
    }
}

/// A connected MQTT client's rights: its token's.
struct MqttRights {
    caller: Caller,
    gate: Arc<Gate>,
}

impl canal_mqtt::Rights for MqttRights {
    fn may_publish(&self, topic: &canal_proto::Topic) -> Result<(), String> {
        self.caller.may_publish(topic).map_err(|f| {
            self.gate.count_refusal(f.right.as_str());
            f.to_string()
        })
    }

    fn may_subscribe(&self, filter: &TopicFilter) -> Result<(), String> {
        self.caller.may_subscribe(filter).map_err(|f| {
            self.gate.count_refusal(f.right.as_str());
            f.to_string()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{Cluster, until};

    fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
        r.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Founding on the metadata leader, issuing there, and a revocation in force on every
    /// member of an in-memory cluster, each learning the key from its replica alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_leader_founds_the_key_and_revocations_reach_every_member() {
        let cluster = Cluster::formed(3).await;
        let leader = cluster.leader(GroupId::METADATA).await;
        let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| ok(tempfile::tempdir())).collect();
        let tokens: Vec<Arc<Tokens<_>>> = cluster
            .members
            .iter()
            .zip(&dirs)
            .map(|(m, d)| {
                Arc::new(Tokens {
                    consensus: m.consensus.clone(),
                    gate: Arc::new(ok(Gate::new(AuthMode::Tokens, None))),
                    data_dir: d.path().to_path_buf(),
                })
            })
            .collect();
        // Before the key exists, every token is refused for want of it.
        assert_eq!(
            tokens[0].gate.check(Some("canal1.x")).err(),
            Some(Unauthorized::NoKey)
        );
        tokens[leader].step().await;
        let admin = ok(std::fs::read_to_string(
            dirs[leader].path().join(ADMIN_TOKEN_FILE),
        ));
        let admin = admin.trim().to_string();
        for t in &tokens {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                t.step().await;
                if t.gate.check(Some(&admin)).is_ok() {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "a member did not learn the key"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        // Only the founder holds the signing key.
        let other = (leader + 1) % 3;
        let req = TokenRequest {
            subject: "room1".into(),
            publish: vec!["sensors/room1/#".into()],
            ttl_s: 60,
            ..TokenRequest::default()
        };
        assert!(matches!(
            tokens[other].issue(&req).await,
            Err(TokenError::NoSigningKey)
        ));
        let issued = ok(tokens[leader].issue(&req).await);
        assert_eq!(issued.info.publish, ["sensors/room1/#"]);
        let caller = ok(tokens[other].gate.check(Some(&issued.token)));
        let room2 = ok(canal_proto::Topic::new("sensors/room2/t"));
        assert!(caller.may_publish(&room2).is_err());
        assert!(caller.may_admin().is_err());
        // Revoked through a follower; every member refuses it once its replica has it.
        ok(tokens[other].revoke(&issued.info.id).await);
        for t in &tokens {
            until(
                "every member to refuse the revoked token",
                Duration::from_secs(10),
                || {
                    t.refresh_revoked();
                    matches!(
                        t.gate.check(Some(&issued.token)),
                        Err(Unauthorized::Revoked { .. })
                    )
                },
            )
            .await;
        }
        let listed = ok(tokens[other].list());
        assert!(listed.iter().any(|i| i.id == issued.info.id && i.revoked));
        assert!(listed.iter().any(|i| i.subject == "admin" && !i.revoked));
        // Bad requests name what is wrong.
        let bad = TokenRequest {
            publish: vec!["a/#/b".into()],
            ..req.clone()
        };
        let e = tokens[leader]
            .issue(&bad)
            .await
            .err()
            .map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|e| e.contains("a/#/b")), "{e:?}");
        let e = tokens[leader]
            .revoke("not an id")
            .await
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains("not an id")),
            "{e:?}"
        );
        cluster.shutdown().await;
    }
}
