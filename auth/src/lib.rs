//! # canal-auth — tokens with per-topic permissions
//!
//! A token is a set of [`Claims`] (subject, id, cluster, issue and expiry times, publish and
//! subscribe allow/deny filter lists, admin) signed with the cluster's Ed25519 token key
//! ([`SigningKey`]). Every node checks a token alone ([`Verifier::verify`]): the signature
//! against the cluster's public key, the cluster id, the expiry against the node's own clock
//! and the revoked ids it keeps in memory. Then the caller asks the claims
//! ([`Claims::may_publish`], [`Claims::may_subscribe`], [`Claims::may_admin`]).
//!
//! Nothing here does I/O beyond reading the OS's random source, so the HTTP API, the MQTT
//! listener and the function executor all use the same checks. The format is in [`token`],
//! the permission rules (deny wins; a subscription wider than the token's filters is refused,
//! not narrowed) in [`claims`]. Signatures use `ed25519-dalek` 3.0, the version libp2p already
//! brings into the workspace, over a small claims format of canal's own wire encoding: no JSON
//! Web Token machinery (and no `alg` header to get wrong) is needed for one algorithm.

pub mod claims;
pub mod token;

pub use claims::{Claims, Forbidden, Permission, Right};
pub use token::{
    KeyError, MAX_TOKEN_BYTES, SigningKey, TOKEN_PREFIX, Unauthorized, Verifier, cluster_id,
    fresh_token_id,
};
