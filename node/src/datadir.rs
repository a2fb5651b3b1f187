//! The data directory: created on first start, locked while a node uses it, so two nodes
//! never share one.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why the data directory cannot be used. Each names the path.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// The directory could not be created or opened.
    #[error("data dir {path}: cannot use it: {source}")]
    Io {
        /// The path at fault.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Another process holds the lock.
    #[error(
        "data dir {path} is in use by another canal node (it holds the lock on {path}/LOCK): give each node its own --data-dir"
    )]
    Locked {
        /// The directory.
        path: PathBuf,
    },
    /// The path exists and is not a directory.
    #[error("data dir {path} is not a directory")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
}

/// An open, locked data directory. The lock is released when this is dropped.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    _lock: File,
}

impl DataDir {
    /// Creates the directory if needed and takes its lock.
    pub fn open(path: &Path) -> Result<DataDir, DataDirError> {
        let io = |source| DataDirError::Io {
            path: path.to_path_buf(),
            source,
        };
        if path.exists() && !path.is_dir() {
            return Err(DataDirError::NotADirectory {
                path: path.to_path_buf(),
            });
        }
        std::fs::create_dir_all(path).map_err(io)?;
        let mut lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path.join("LOCK"))
            .map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(DataDirError::Locked {
                    path: path.to_path_buf(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        lock.set_len(0).map_err(io)?;
        writeln!(lock, "{}", std::process::id()).map_err(io)?;
        Ok(DataDir {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_open_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDir::open(dir.path()).unwrap();
        let second = DataDir::open(dir.path());
        assert!(
            matches!(second, Err(DataDirError::Locked { .. })),
            "{second:?}"
        );
        drop(first);
        assert!(DataDir::open(dir.path()).is_ok());
    }

    #[test]
    fn a_file_is_not_a_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let e = DataDir::open(&file)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("not a directory"), "{e}");
    }
}
