//! The token format, signing and verification.
//!
//! ```text
//!   token  = "canal1." base64url-no-pad( claims || signature )
//!   claims = canal_proto::wire encoding of [`Claims`] (a version byte, then bincode)
//!   signature = Ed25519 over  DOMAIN || claims  (64 bytes, the last 64 of the payload)
//! ```
//!
//! `canal1` is the format's version: a new layout gets a new prefix, and a node names the
//! prefixes it reads when it refuses another. The whole token is at most [`MAX_TOKEN_BYTES`]
//! of text, checked before anything is decoded; the claims are decoded with that bound too.
//! The domain string keeps a token signature from being valid as any other signature the key
//! might ever make.

use crate::claims::Claims;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signer, Verifier as _};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::sync::RwLock;

/// The prefix of every token of this format (and its version).
pub const TOKEN_PREFIX: &str = "canal1.";
/// The longest token accepted, in bytes of text.
pub const MAX_TOKEN_BYTES: usize = 8192;
/// What a token's signature covers before the claims.
const DOMAIN: &[u8] = b"canal token v1\0";
/// Bytes of an Ed25519 signature.
const SIGNATURE_BYTES: usize = 64;
/// The first line of a signing key file.
const KEY_FILE_HEADER: &str = "canal-token-key/1";

/// Why a token is not accepted (the answer is 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unauthorized {
    /// No token came with the request.
    #[error(
        "no token: send `Authorization: Bearer TOKEN` (or `?token=TOKEN` on a subscription); `canal token create` makes one"
    )]
    Missing,
    /// The token does not parse.
    #[error("the token is malformed: {0}")]
    Malformed(String),
    /// The token was issued by another cluster's key.
    #[error("the token was issued by cluster {token}; this is cluster {cluster}")]
    ForeignCluster {
        /// The cluster the token names.
        token: String,
        /// This node's cluster.
        cluster: String,
    },
    /// The signature does not verify: the token was altered or forged.
    #[error("the token's signature does not verify: it was altered or not issued by this cluster")]
    BadSignature,
    /// The token is past its expiry.
    #[error("the token {id} expired at {expired_ms} ms (now {now_ms} ms since the epoch)")]
    Expired {
        /// The token's id.
        id: String,
        /// When it expired.
        expired_ms: u64,
        /// This node's clock.
        now_ms: u64,
    },
    /// The token was revoked (`canal token revoke`).
    #[error("the token {id} was revoked")]
    Revoked {
        /// The token's id.
        id: String,
    },
    /// The cluster has no token key yet (it has not formed).
    #[error(
        "this node does not know the cluster's token key yet: the cluster has not formed, or this node has not caught up"
    )]
    NoKey,
}

impl Unauthorized {
    /// A short name of the reason, for the error's `kind` and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Unauthorized::Missing => "missing",
            Unauthorized::Malformed(_) => "malformed",
            Unauthorized::ForeignCluster { .. } => "foreign_cluster",
            Unauthorized::BadSignature => "bad_signature",
            Unauthorized::Expired { .. } => "expired",
            Unauthorized::Revoked { .. } => "revoked",
            Unauthorized::NoKey => "no_key",
        }
    }
}

/// Why a key could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The OS gave no random bytes.
    #[error("cannot read random bytes from the operating system: {0}")]
    Random(String),
    /// A key file does not hold a key.
    #[error("{0}")]
    Format(String),
    /// The claims to sign are refused.
    #[error("the token's claims are refused: {0}")]
    Claims(String),
    /// The claims do not encode.
    #[error("the token's claims do not encode: {0}")]
    Encode(String),
}

/// Fresh random bytes from the OS.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], KeyError> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(out)
}

/// A fresh token id: 16 random bytes, hex.
pub fn fresh_token_id() -> Result<String, KeyError> {
    Ok(hex::encode(random_bytes::<16>()?))
}

/// The id of the cluster whose token key is `public`: the first 8 bytes of its SHA-256, hex.
/// Tokens name it, so a token from another cluster is told apart from a forged one.
pub fn cluster_id(public: &[u8; 32]) -> String {
    hex::encode(&Sha256::digest(public)[..8])
}

/// The cluster's token signing key (Ed25519).
pub struct SigningKey(ed25519_dalek::SigningKey);

impl SigningKey {
    /// A fresh key from the OS's random source.
    pub fn generate() -> Result<SigningKey, KeyError> {
        Ok(SigningKey(ed25519_dalek::SigningKey::from_bytes(
            &random_bytes::<32>()?,
        )))
    }

    /// The key from its 32 secret bytes.
    pub fn from_bytes(secret: &[u8; 32]) -> SigningKey {
        SigningKey(ed25519_dalek::SigningKey::from_bytes(secret))
    }

    /// The public half, which every node verifies with.
    pub fn public(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    /// The key as a key file holds it: a header line and the secret in hex.
    pub fn to_text(&self) -> String {
        format!("{KEY_FILE_HEADER}\n{}\n", hex::encode(self.0.to_bytes()))
    }

    /// The key a key file holds ([`SigningKey::to_text`]).
    pub fn from_text(text: &str) -> Result<SigningKey, KeyError> {
        let mut lines = text.lines();
        let bad = || {
            KeyError::Format(format!(
                "not a token key file: it must be the line {KEY_FILE_HEADER:?}, then 64 hex digits"
            ))
        };
        if lines.next().map(str::trim) != Some(KEY_FILE_HEADER) {
            return Err(bad());
        }
        let hexed = lines.next().map(str::trim).ok_or_else(bad)?;
        let mut secret = [0u8; 32];
        hex::decode_to_slice(hexed, &mut secret).map_err(|_| bad())?;
        Ok(SigningKey::from_bytes(&secret))
    }

    /// Signs `claims` into a token, after checking their bounds.
    pub fn issue(&self, claims: &Claims) -> Result<String, KeyError> {
        claims.check().map_err(KeyError::Claims)?;
        let body =
            canal_proto::wire::encode(claims).map_err(|e| KeyError::Encode(e.to_string()))?;
        let signature = self.0.sign(&signed_message(&body));
        let mut payload = body;
        payload.extend_from_slice(&signature.to_bytes());
        let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(payload));
        if token.len() > MAX_TOKEN_BYTES {
            return Err(KeyError::Claims(format!(
                "the token would be {} bytes: at most {MAX_TOKEN_BYTES} are allowed (fewer or shorter filters)",
                token.len()
            )));
        }
        Ok(token)
    }
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + body.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(body);
    m
}

/// A token split into its parts, nothing checked but the layout: what the decoder of bytes
/// from outside returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The claims, as signed.
    pub claims: Claims,
    body: Vec<u8>,
    signature: [u8; SIGNATURE_BYTES],
}

/// Splits `token` into claims and signature, bounded: the length is checked before any
/// decoding, and the claims decode within [`MAX_TOKEN_BYTES`].
pub fn parse(token: &str) -> Result<Parsed, Unauthorized> {
    let malformed = |why: String| Unauthorized::Malformed(why);
    if token.len() > MAX_TOKEN_BYTES {
        return Err(malformed(format!(
            "it is {} bytes long: at most {MAX_TOKEN_BYTES} are allowed",
            token.len()
        )));
    }
    let rest = token.strip_prefix(TOKEN_PREFIX).ok_or_else(|| {
        malformed(format!(
            "it does not start with {TOKEN_PREFIX:?} (the token format this node reads)"
        ))
    })?;
    let payload = URL_SAFE_NO_PAD
        .decode(rest)
        .map_err(|e| malformed(format!("it is not base64url without padding: {e}")))?;
    if payload.len() <= SIGNATURE_BYTES {
        return Err(malformed(format!(
            "it holds {} bytes: claims and a {SIGNATURE_BYTES}-byte signature need more",
            payload.len()
        )));
    }
    let (body, sig) = payload.split_at(payload.len() - SIGNATURE_BYTES);
    let mut signature = [0u8; SIGNATURE_BYTES];
    signature.copy_from_slice(sig);
    let claims: Claims = canal_proto::wire::decode_with_limit(body, MAX_TOKEN_BYTES)
        .map_err(|e| malformed(format!("its claims do not decode: {e}")))?;
    claims.check().map_err(malformed)?;
    Ok(Parsed {
        claims,
        body: body.to_vec(),
        signature,
    })
}

/// Checks tokens for one cluster: signature, cluster, expiry and revocation, with no lookup.
pub struct Verifier {
    key: ed25519_dalek::VerifyingKey,
    cluster: String,
    revoked: RwLock<HashSet<String>>,
}

impl Verifier {
    /// A verifier for the cluster whose token key's public half is `public`.
    pub fn new(public: &[u8; 32]) -> Result<Verifier, KeyError> {
        let key = ed25519_dalek::VerifyingKey::from_bytes(public)
            .map_err(|e| KeyError::Format(format!("the token key is no Ed25519 key: {e}")))?;
        Ok(Verifier {
            key,
            cluster: cluster_id(public),
            revoked: RwLock::default(),
        })
    }

    /// The public key it verifies with.
    pub fn public(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The cluster's id ([`cluster_id`]).
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Replaces the set of revoked token ids.
    pub fn set_revoked(&self, ids: HashSet<String>) {
        // A poisoned lock only means a writer panicked mid-assignment of a whole set.
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = ids;
    }

    /// Whether the token id `id` is revoked.
    pub fn is_revoked(&self, id: &str) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    /// The claims of `token` if it is valid now (this node's clock).
    pub fn verify(&self, token: &str) -> Result<Claims, Unauthorized> {
        self.verify_at(token, canal_proto::time::now_ms())
    }

    /// The claims of `token` if it is valid at `now_ms`.
    pub fn verify_at(&self, token: &str, now_ms: u64) -> Result<Claims, Unauthorized> {
        let parsed = parse(token)?;
        if parsed.claims.cluster != self.cluster {
            return Err(Unauthorized::ForeignCluster {
                token: parsed.claims.cluster,
                cluster: self.cluster.clone(),
            });
        }
        let signature = ed25519_dalek::Signature::from_bytes(&parsed.signature);
        self.key
            .verify(&signed_message(&parsed.body), &signature)
            .map_err(|_| Unauthorized::BadSignature)?;
        let claims = parsed.claims;
        if now_ms >= claims.expires_ms {
            return Err(Unauthorized::Expired {
                id: claims.id,
                expired_ms: claims.expires_ms,
                now_ms,
            });
        }
        if self.is_revoked(&claims.id) {
            return Err(Unauthorized::Revoked { id: claims.id });
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claims::Permission;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

    fn claims_for(key: &SigningKey) -> Claims {
        Claims {
            id: "0123abcd".into(),
            subject: "alice".into(),
            cluster: cluster_id(&key.public()),
            issued_ms: 1_000,
            expires_ms: 10_000,
            publish: Permission {
                allow: vec!["sensors/room1/#".parse().unwrap_or_else(|e| panic!("{e}"))],
                deny: Vec::new(),
            },
            subscribe: Permission::everything(),
            admin: false,
        }
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
        r.unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_token_round_trips() {
        let k = key(1);
        let v = ok(Verifier::new(&k.public()));
        let c = claims_for(&k);
        let token = ok(k.issue(&c));
        assert!(token.starts_with(TOKEN_PREFIX));
        assert_eq!(ok(v.verify_at(&token, 5_000)), c);
    }

    #[test]
    fn expired_revoked_forged_and_foreign_tokens_are_refused() {
        let k = key(1);
        let v = ok(Verifier::new(&k.public()));
        let c = claims_for(&k);
        let token = ok(k.issue(&c));
        assert!(matches!(
            v.verify_at(&token, 10_000),
            Err(Unauthorized::Expired { .. })
        ));
        // Signed by another key but naming this cluster: forged.
        let forged = ok(key(2).issue(&c));
        assert_eq!(v.verify_at(&forged, 5_000), Err(Unauthorized::BadSignature));
        // Another cluster's own token.
        let other = key(3);
        let foreign = ok(other.issue(&claims_for(&other)));
        assert!(matches!(
            v.verify_at(&foreign, 5_000),
            Err(Unauthorized::ForeignCluster { .. })
        ));
        v.set_revoked(["0123abcd".to_string()].into());
        assert_eq!(
            v.verify_at(&token, 5_000),
            Err(Unauthorized::Revoked {
                id: "0123abcd".into()
            })
        );
    }

    #[test]
    fn altered_claims_do_not_verify() {
        let k = key(1);
        let v = ok(Verifier::new(&k.public()));
        let mut c = claims_for(&k);
        let token = ok(k.issue(&c));
        let parsed = ok(parse(&token));
        c.admin = true;
        let body = ok(canal_proto::wire::encode(&c));
        let mut payload = body;
        payload.extend_from_slice(&parsed.signature);
        let altered = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(payload));
        assert_eq!(
            v.verify_at(&altered, 5_000),
            Err(Unauthorized::BadSignature)
        );
    }

    #[test]
    fn issuing_checks_the_claims() {
        let k = key(1);
        let mut c = claims_for(&k);
        c.expires_ms = c.issued_ms;
        assert!(k.issue(&c).is_err());
        let mut c = claims_for(&k);
        c.publish.allow = vec!["a".parse().unwrap_or_else(|e| panic!("{e}")); 65];
        assert!(k.issue(&c).is_err());
    }

    #[test]
    fn key_files_round_trip() {
        let k = key(9);
        let back = ok(SigningKey::from_text(&k.to_text()));
        assert_eq!(back.public(), k.public());
        assert!(SigningKey::from_text("nonsense").is_err());
        assert!(SigningKey::from_text("canal-token-key/1\nzz").is_err());
    }

    fn runner(seed: u8, cases: u32) -> TestRunner {
        let config = Config {
            cases,
            ..Config::default()
        };
        TestRunner::new_with_rng(
            config,
            TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]),
        )
    }

    /// Random text, with and without the prefix, never panics the decoder and never verifies.
    #[test]
    fn random_input_is_refused_without_panic() {
        let k = key(1);
        let v = ok(Verifier::new(&k.public()));
        let strategy = (
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..600),
            any::<bool>(),
        );
        let result = runner(7, 5000).run(&strategy, |(prefixed, bytes, as_base64)| {
            let body = if as_base64 {
                URL_SAFE_NO_PAD.encode(&bytes)
            } else {
                String::from_utf8_lossy(&bytes).into_owned()
            };
            let text = if prefixed {
                format!("{TOKEN_PREFIX}{body}")
            } else {
                body
            };
            prop_assert!(v.verify_at(&text, 5_000).is_err());
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }

    /// Any change to a valid token (a character replaced, inserted or removed, or the token
    /// cut short) makes it refused, and never panics.
    #[test]
    fn mutated_tokens_are_refused() {
        let k = key(1);
        let v = ok(Verifier::new(&k.public()));
        let token = ok(k.issue(&claims_for(&k)));
        let len = token.len();
        let alphabet: Vec<char> =
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/"
                .chars()
                .collect();
        let strategy = (0..len, 0..alphabet.len(), 0u8..4);
        let result = runner(11, 10_000).run(&strategy, |(at, c, how)| {
            let mut chars: Vec<char> = token.chars().collect();
            match how {
                0 => chars[at] = alphabet[c],
                1 => chars.insert(at, alphabet[c]),
                2 => {
                    chars.remove(at);
                }
                _ => chars.truncate(at),
            }
            let mutated: String = chars.into_iter().collect();
            if mutated != token {
                prop_assert!(v.verify_at(&mutated, 5_000).is_err(), "{}", mutated);
            }
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }

    /// Random claims survive signing and verifying unchanged.
    #[test]
    fn random_claims_round_trip() {
        let k = key(4);
        let v = ok(Verifier::new(&k.public()));
        let filter = prop_oneof![Just("#"), Just("a/+"), Just("sensors/room1/#"), Just("x")]
            .prop_map(|s| {
                s.parse::<canal_proto::TopicFilter>()
                    .unwrap_or_else(|e| panic!("{e}"))
            });
        let list = proptest::collection::vec(filter, 0..8);
        let strategy = (
            "[a-z]{1,20}",
            "[0-9a-f]{1,32}",
            0u64..1_000,
            1u64..1_000_000,
            list.clone(),
            list,
            any::<bool>(),
        );
        let result = runner(13, 2000).run(&strategy, |(subject, id, issued, ttl, a, d, admin)| {
            let c = Claims {
                id,
                subject,
                cluster: v.cluster().to_string(),
                issued_ms: issued,
                expires_ms: issued + ttl,
                publish: Permission {
                    allow: a.clone(),
                    deny: d.clone(),
                },
                subscribe: Permission { allow: d, deny: a },
                admin,
            };
            let token = k
                .issue(&c)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(v.verify_at(&token, issued), Ok(c));
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }
}
