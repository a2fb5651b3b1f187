//! The peer identity: an ed25519 key pair kept in the data directory, so a peer has the same
//! peer id after every restart.
//!
//! File format (`identity.key`, mode 0600): the line `canal-identity v1`, then the key pair's
//! libp2p protobuf encoding in hex. A file that exists but does not read is an error naming
//! the path: a node never quietly takes a new identity.

use libp2p::identity::Keypair;
use std::path::{Path, PathBuf};

const HEADER: &str = "canal-identity v1";
/// The identity file's name inside the data directory.
pub const IDENTITY_FILE: &str = "identity.key";

/// Why the identity could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the file failed.
    #[error("identity file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file exists but is not an identity.
    #[error(
        "identity file {path} is damaged ({reason}); restore it from a backup, or delete it to give this peer a new identity"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// Loads the identity from `dir`, or makes and stores a new one if there is none.
pub fn load_or_create(dir: &Path) -> Result<Keypair, IdentityError> {
    let path = dir.join(IDENTITY_FILE);
    let io = |source| IdentityError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(&text).map_err(|reason| IdentityError::Corrupt {
            path: path.clone(),
            reason,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| IdentityError::Corrupt {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            let text = format!("{HEADER}\n{}\n", hex::encode(bytes));
            // Write to a temporary file and rename, so a crash never leaves half a key.
            let tmp = dir.join(format!("{IDENTITY_FILE}.tmp"));
            write_private(&tmp, text.as_bytes()).map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

fn parse(text: &str) -> Result<Keypair, String> {
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(format!("the first line is not {HEADER:?}"));
    }
    let hex_key = lines.next().ok_or("the key line is missing")?;
    let bytes = hex::decode(hex_key.trim()).map_err(|e| format!("the key is not hex: {e}"))?;
    Keypair::from_protobuf_encoding(&bytes).map_err(|e| format!("the key does not decode: {e}"))
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_identity_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
    }

    #[test]
    fn a_damaged_file_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path()).unwrap();
        let path = dir.path().join(IDENTITY_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, &text[..text.len() / 2]).unwrap();
        let e = load_or_create(dir.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("identity.key") && e.contains("damaged"), "{e}");
        std::fs::write(&path, "hello").unwrap();
        assert!(load_or_create(dir.path()).is_err());
    }
}
