//! Raft storage on sled: one database per node, trees per group.
//!
//! - `db`: the [`RaftDb`], its format marker and the durable-index [`Watermark`].
//! - `log`: a group's [`LogStore`] (entries, vote, committed index, purges).
//! - `state`: a group's [`StateMachine`] and its reads (typed through [`crate::keys`]).
//! - `apply`: the deterministic apply of operations, on `overlay` (one call's writes).
//! - `changes`: notices of the topics each apply changed, for subscribers and executors.
//! - `snapshot`: what a snapshot holds, and how it is built, stored and installed.
//!
//! ```text
//!   canal            format marker ("canal-raft/5")
//!   g{N}.log         log index (u64, big-endian) -> entry
//!   g{N}.meta        "vote", "committed", "purged"
//!   g{N}.sm          "d/{key}" -> value, "r/{request id}" -> response,
//!                    "m/applied", "m/membership", "m/clock"
//!   g{N}.snap        "meta", "data": the current snapshot
//! ```
//!
//! Beside sled's files, `watermark.json` records, per group, a log index known durable (it
//! is written a moment after the entries it covers were flushed, and lowered before a
//! truncation). A database whose log ends below its watermark was truncated behind canal's
//! back (a damaged or partly restored `db` file), and is refused instead of silently
//! starting with acknowledged entries missing.
//!
//! The state machine is deterministic: every replica that applies the same entries holds
//! the same state, however openraft groups the entries into `apply` calls (the leader and
//! the followers group them differently). Each call's writes are kept in a sorted overlay
//! that every read of the call, point or range, goes through; and the only clock is the
//! leader's stamp on each entry ([`crate::types::Proposal`]), raised to the last one applied
//! so it never goes back, and stored under [`CLOCK_KEY`] (in digests and snapshots too) so
//! snapshots and restarts keep it.
//! Client key operations (`Put`, `Delete`, `Add`) are refused on the internal keyspace
//! (keys starting with U+0001); internal records are written by the operations that own
//! them.
//!
//! Every value is written with `canal_proto::wire` (a version byte and bincode) and read
//! back with length prefixes limited by the bytes there are, so a damaged value is an error
//! and a snapshot of any size reads. Log appends,
//! votes, truncation and purges are flushed before they are reported done, so nothing the
//! log store acknowledged is lost to a `kill -9`. The state machine applies each batch of
//! entries as one atomic sled batch (its data, its applied log id and its membership
//! together), and is flushed before a snapshot is taken, so the log is never purged past what
//! the state machine holds durably.

// openraft's storage traits fix the error type, StorageError, which is large; the helpers
// here return it too rather than converting back and forth.
#![allow(clippy::result_large_err)]

use crate::types::NodeId;
use canal_proto::wire;
use openraft::StorageError;
use serde::{Serialize, de::DeserializeOwned};
use std::path::PathBuf;

/// One sled database's flushes, coalesced. A flush of any tree writes the whole database
/// (sled keeps one log for all its trees), so the appends of every Raft group of a node
/// can share one: a caller whose writes are in sled's buffers waits for a flush that
/// begins after it called, and starts one itself if none is under way. With many groups
/// appending at once (a shard group per topic shard) a node then pays one fsync per round,
/// not one per group.
///
/// No flush waits for company: holding one back for a millisecond so that more appends
/// share it lowered QoS 1 throughput on 64 shard groups (2,700-3,000 events a second
/// against 3,100-3,700 without), since each group's replication waits on its flushes.
///
/// The flush is sled's synchronous one on the blocking pool: sled's own `flush_async`
/// deadlocks when several run at once (sled 0.34, spacejam/sled#1308, fixed only on its
/// unreleased main; seen here as a node that stopped for good while 65 groups formed).
#[derive(Default)]
pub struct Flusher {
    state: std::sync::Mutex<FlushState>,
    done: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct FlushState {
    /// The number of the last flush that began (called sled's flush).
    begun: u64,
    /// The number of the last flush that succeeded.
    completed: u64,
    /// A flush is about to begin or running: it is numbered `begun + 1` until it begins.
    busy: bool,
}

impl Flusher {
    fn state(&self) -> std::sync::MutexGuard<'_, FlushState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes everything written to `tree`'s database before this call durable.
    pub(crate) async fn flush(self: &std::sync::Arc<Self>, tree: &sled::Tree) -> sled::Result<()> {
        // The next flush to begin covers what is written by now, whether it is on its way
        // to the blocking pool already or not.
        let need = self.state().begun + 1;
        loop {
            // Subscribed before the state is looked at, so a flush ending in between is
            // not missed.
            let mut done = self.done.subscribe();
            let number = {
                let mut s = self.state();
                if s.completed >= need {
                    return Ok(());
                }
                if s.busy {
                    None
                } else {
                    s.busy = true;
                    Some(s.begun + 1)
                }
            };
            let Some(number) = number else {
                let _ = done.changed().await;
                continue;
            };
            // The whole flush, state included, runs on the blocking thread: a caller dropped
            // while it waits cannot leave the database marked busy for good.
            let (this, tree) = (self.clone(), tree.clone());
            let r = tokio::task::spawn_blocking(move || this.run(number, &tree)).await;
            return match r {
                Ok(r) => r,
                Err(e) => Err(sled::Error::Io(std::io::Error::other(format!(
                    "the flush task failed: {e}"
                )))),
            };
        }
    }

    /// Flush `number`: begins (from here on, later writes need the next one), flushes and
    /// wakes the waiters.
    fn run(&self, number: u64, tree: &sled::Tree) -> sled::Result<()> {
        self.state().begun = number;
        let r = tree.flush().map(|_| ());
        {
            let mut s = self.state();
            s.busy = false;
            if r.is_ok() {
                s.completed = s.completed.max(number);
            }
        }
        // Waiters look again: covered, or one of them flushes next.
        self.done.send_replace(number);
        r
    }
}

/// Flushes `tree` (and with it the whole sled database) at once, alone: for the rare
/// flushes outside the logs' appends (installing a snapshot). Synchronous sled flush on the
/// blocking pool, as [`Flusher`] does.
async fn flush(tree: &sled::Tree) -> sled::Result<()> {
    let tree = tree.clone();
    match tokio::task::spawn_blocking(move || tree.flush()).await {
        Ok(r) => r.map(|_| ()),
        Err(e) => Err(sled::Error::Io(std::io::Error::other(format!(
            "the flush task failed: {e}"
        )))),
    }
}

mod apply;
mod changes;
mod db;
mod log;
mod overlay;
mod snapshot;
mod state;

pub use changes::{CHANGE_NOTICES, ChangeWatch, Changed, RING_NOTICES, RING_TOPICS, Wake};
pub(crate) use changes::{ChangeRing, RingAnswer};
pub use db::{RaftDb, Watermark};

pub use log::LogStore;
pub use snapshot::SnapshotBuilder;
pub use state::StateMachine;

type SErr = StorageError<NodeId>;

/// Why the Raft database cannot be opened. Each names the path.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled refused to open the directory (damaged files, permissions, a lock).
    #[error("Raft database {path} cannot be opened: {reason}")]
    Open {
        /// The database directory.
        path: PathBuf,
        /// sled's reason.
        reason: String,
    },
    /// The directory holds data that is not a canal Raft database, or is missing its
    /// format marker: it was truncated or damaged. canal refuses to start empty over it.
    #[error(
        "Raft database {path} is damaged or not canal's ({reason}); restore it from a backup, or move it away to rejoin the cluster as a new, empty member"
    )]
    Corrupt {
        /// The database directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing failed.
    #[error("Raft database {path}: {reason}")]
    Io {
        /// The database directory.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// Why a read of a group's state failed; each names what was read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// sled could not read.
    #[error("reading {what} from the state machine failed: {reason}")]
    Io {
        /// What was read.
        what: String,
        /// sled's reason.
        reason: String,
    },
    /// A stored value does not decode: the database is damaged or was written by another
    /// format.
    #[error("the stored {what} under key {key:?} does not decode: {reason}")]
    Damaged {
        /// What kind of record it is.
        what: String,
        /// Its key.
        key: String,
        /// The decoder's reason.
        reason: String,
    },
    /// A key under a table's prefix is not one of the table's keys: the database is damaged.
    #[error("key {key:?} is under the prefix of {what} but is not one of its keys")]
    ForeignKey {
        /// The table.
        what: &'static str,
        /// The key.
        key: String,
    },
    /// The group is not hosted here and no replica of it answered within the client
    /// timeout (see [`crate::reader::GroupReader`]).
    #[error("no replica of group {group} answered a log read: tried {tried}")]
    NoReplica {
        /// The group.
        group: crate::types::GroupId,
        /// Whom it asked and what each said (the last few).
        tried: String,
    },
}

impl ReadError {
    fn io(what: &str, e: sled::Error) -> ReadError {
        ReadError::Io {
            what: what.to_string(),
            reason: e.to_string(),
        }
    }

    fn damaged(what: &str, key: &str, e: wire::WireError) -> ReadError {
        ReadError::Damaged {
            what: what.to_string(),
            key: key.to_string(),
            reason: e.to_string(),
        }
    }
}

impl From<ReadError> for StorageError<NodeId> {
    fn from(e: ReadError) -> Self {
        openraft::StorageIOError::read_state_machine(&e).into()
    }
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>, wire::WireError> {
    wire::encode(v)
}

/// Decodes a value read from the database. No length cap (a snapshot may be far larger than
/// a message), but claims are still bounded by the bytes present: a damaged value is an
/// error, never a huge allocation.
fn dec<T: DeserializeOwned>(b: &[u8]) -> Result<T, wire::WireError> {
    wire::decode_with_limit(b, usize::MAX)
}

fn any(e: &impl std::fmt::Display) -> openraft::AnyError {
    openraft::AnyError::error(e.to_string())
}

/// The sled key of the state machine's clock: the latest entry stamp applied (u64, ms since
/// the Unix epoch). Beside the data, like the applied index, so client key counts do not
/// see it; snapshots and digests carry it.
pub const CLOCK_KEY: &[u8] = b"m/clock";

/// The sled key of a client key's value.
fn data_key(key: &str) -> Vec<u8> {
    format!("d/{key}").into_bytes()
}

/// The sled key of an applied request's response.
fn request_key(id: &str) -> Vec<u8> {
    format!("r/{id}").into_bytes()
}

#[cfg(test)]
mod outbox_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod flusher_tests {
    use super::Flusher;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_call_gets_a_flush_that_started_after_it_and_concurrent_calls_share() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree("t").unwrap();
        let f = std::sync::Arc::new(Flusher::default());
        // One after another: none is covered by an earlier flush.
        for i in 0..5u64 {
            tree.insert(i.to_be_bytes(), &[1u8][..]).unwrap();
            f.flush(&tree).await.unwrap();
            assert_eq!(f.state().begun, i + 1);
        }
        // At once: every call returns, after a flush that started after it, and they may
        // share flushes (never more flushes than calls).
        let calls = (0..64u64).map(|i| {
            let (f, tree) = (f.clone(), tree.clone());
            tokio::spawn(async move {
                tree.insert((100 + i).to_be_bytes(), &[1u8][..]).unwrap();
                let before = f.state().begun;
                f.flush(&tree).await.unwrap();
                assert!(f.state().completed > before);
            })
        });
        for c in calls {
            c.await.unwrap();
        }
        let s = f.state();
        assert!(!s.busy);
        assert!(s.begun <= 5 + 64 && s.completed == s.begun);
    }
}
