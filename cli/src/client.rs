//! The HTTP client every client command uses: [`canal_client`], shared with the testnet and
//! the benches, plus the CLI's own usage error.

pub(crate) use canal_client::{Client, encode_path, encode_segment};

/// A command-line value that is not allowed (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub(crate) String);
