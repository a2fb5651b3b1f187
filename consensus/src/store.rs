//! Raft storage on sled: one database per node, trees per group.
//!
//! ```text
//!   canal            format marker ("canal-raft/3")
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

use crate::types::{GroupId, NodeId, Op, Proposal, RaftNode, Request, Response, TypeConfig};
use canal_proto::wire;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

// 3: entries carry the leader's stamp (Proposal), internal records moved (the removed-peer
// tombstone), dedup keys hold expiries. Older databases are refused, naming both formats.
const FORMAT: &[u8] = b"canal-raft/3";

type SErr = StorageError<NodeId>;

/// The error type of storage reads (openraft's `StorageError`), for callers that name it.
pub type StorageErrorOf = SErr;

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

/// The node's Raft database: every group's log and state machine.
#[derive(Clone)]
pub struct RaftDb {
    db: sled::Db,
    path: PathBuf,
    watermark: Arc<Watermark>,
}

/// Per group, a log index known durable; see the module docs.
#[derive(Debug)]
pub struct Watermark {
    path: PathBuf,
    durable: std::sync::Mutex<std::collections::BTreeMap<u32, u64>>,
    written: std::sync::Mutex<std::collections::BTreeMap<u32, u64>>,
}

#[derive(Serialize, Deserialize)]
struct WatermarkFile {
    version: u32,
    groups: std::collections::BTreeMap<u32, u64>,
}

impl Watermark {
    fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn raise(&self, group: GroupId, index: u64) {
        let mut d = Self::lock(&self.durable);
        let e = d.entry(group.0).or_insert(0);
        *e = (*e).max(index);
    }

    /// Lowers a group's mark and writes the file at once, before a truncation makes the log
    /// shorter than the mark.
    fn lower(&self, group: GroupId, index: u64) -> std::io::Result<()> {
        {
            let mut d = Self::lock(&self.durable);
            let e = d.entry(group.0).or_insert(0);
            *e = (*e).min(index);
        }
        self.write(true)
    }

    /// Writes the file if the marks changed (or always, with `force`), atomically and synced.
    pub fn write(&self, force: bool) -> std::io::Result<()> {
        let current = Self::lock(&self.durable).clone();
        let mut written = Self::lock(&self.written);
        if !force && *written == current {
            return Ok(());
        }
        let text = serde_json::to_vec(&WatermarkFile {
            version: 1,
            groups: current.clone(),
        })
        .map_err(std::io::Error::other)?;
        let tmp = self.path.with_extension("json.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        *written = current;
        Ok(())
    }
}

impl RaftDb {
    /// Opens (or creates) the database at `path`. A directory that exists and has files but
    /// no canal format marker is refused, never silently started empty.
    pub fn open(path: &Path) -> Result<RaftDb, StoreError> {
        let existed = std::fs::read_dir(path)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        // No background flusher: every durable write flushes itself, and without the thread
        // the directory's lock is released as soon as the database is dropped.
        let db = open_sled(path)?;
        let io = |e: sled::Error| StoreError::Io {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let marker = db.open_tree("canal").map_err(io)?;
        match marker.get("format").map_err(io)? {
            Some(v) if v.as_ref() == FORMAT => {}
            Some(v) => {
                return Err(StoreError::Corrupt {
                    path: path.to_path_buf(),
                    reason: format!(
                        "format marker is {:?}, this build reads {:?}",
                        String::from_utf8_lossy(&v),
                        String::from_utf8_lossy(FORMAT)
                    ),
                });
            }
            None if existed => {
                return Err(StoreError::Corrupt {
                    path: path.to_path_buf(),
                    reason: "its format marker is missing".into(),
                });
            }
            None => {
                marker.insert("format", FORMAT).map_err(io)?;
                db.flush().map_err(io)?;
            }
        }
        let watermark_path = path.join("watermark.json");
        let marks = match std::fs::read(&watermark_path) {
            Ok(bytes) => {
                serde_json::from_slice::<WatermarkFile>(&bytes)
                    .map_err(|e| StoreError::Corrupt {
                        path: path.to_path_buf(),
                        reason: format!("watermark.json does not read: {e}"),
                    })?
                    .groups
            }
            Err(_) => Default::default(),
        };
        let raft = RaftDb {
            db,
            path: path.to_path_buf(),
            watermark: Arc::new(Watermark {
                path: watermark_path,
                durable: std::sync::Mutex::new(marks.clone()),
                written: std::sync::Mutex::new(marks.clone()),
            }),
        };
        for (g, mark) in marks {
            let (log, _) = raft.group(GroupId(g))?;
            let last = log.durable_end().map_err(|e| StoreError::Io {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
            if last < mark {
                return Err(StoreError::Corrupt {
                    path: path.to_path_buf(),
                    reason: format!(
                        "the log of group {} ends at index {last}, but index {mark} was known durable: the database was truncated",
                        GroupId(g)
                    ),
                });
            }
        }
        Ok(raft)
    }

    /// The durable-index marks, for the task that writes them to disk now and then.
    pub fn watermark(&self) -> Arc<Watermark> {
        self.watermark.clone()
    }

    /// The database directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The log store and state machine of `group`, created empty if the group is new.
    pub fn group(&self, group: GroupId) -> Result<(LogStore, StateMachine), StoreError> {
        let tree = |suffix: &str| {
            self.db
                .open_tree(format!("g{}.{suffix}", group.0))
                .map_err(|e| StoreError::Io {
                    path: self.path.clone(),
                    reason: e.to_string(),
                })
        };
        let log = LogStore {
            group,
            log: tree("log")?,
            meta: tree("meta")?,
            watermark: self.watermark.clone(),
        };
        let sm = StateMachine {
            sm: tree("sm")?,
            snap: tree("snap")?,
            snapshot_seq: Arc::new(AtomicU64::new(0)),
            applied_tx: Arc::new(tokio::sync::watch::Sender::new(0)),
        };
        Ok((log, sm))
    }

    /// The groups that have stored anything on this node.
    pub fn groups(&self) -> Vec<GroupId> {
        let mut out: Vec<GroupId> = self
            .db
            .tree_names()
            .iter()
            .filter_map(|n| {
                let n = std::str::from_utf8(n).ok()?;
                let id = n.strip_prefix('g')?.strip_suffix(".log")?;
                id.parse().ok().map(GroupId)
            })
            .collect();
        out.sort();
        out
    }
}

/// Opens sled, turning a panic in its recovery (it panics on some damaged files) into an
/// error naming the path.
fn open_sled(path: &Path) -> Result<sled::Db, StoreError> {
    let config = sled::Config::new().path(path).flush_every_ms(None);
    // The default hook would print the panic as if canal had crashed; this is an error with
    // a message of its own instead.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()));
    std::panic::set_hook(hook);
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(StoreError::Open {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown failure".into());
            Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("sled cannot recover it: {what}"),
            })
        }
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

/// Decodes a snapshot's data, whatever its size, with no claim past its own length.
fn decode_snapshot(bytes: &[u8]) -> Result<SnapshotData, wire::WireError> {
    dec(bytes)
}

fn any(e: &impl std::fmt::Display) -> openraft::AnyError {
    openraft::AnyError::error(e.to_string())
}

fn index_key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

/// A group's Raft log, vote and committed index. Cheap to clone.
#[derive(Clone)]
pub struct LogStore {
    group: GroupId,
    log: sled::Tree,
    meta: sled::Tree,
    watermark: Arc<Watermark>,
}

impl LogStore {
    /// The highest index the log covers: its last entry, or the purge point if it is empty.
    fn durable_end(&self) -> Result<u64, SErr> {
        let purged: Option<LogId<NodeId>> = self.meta_get("purged")?;
        let last = self.last_entry_id()?;
        Ok(last.or(purged).map(|l| l.index).unwrap_or(0))
    }

    fn meta_get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SErr> {
        match self
            .meta
            .get(key)
            .map_err(|e| StorageIOError::read_logs(&e))?
        {
            Some(v) => Ok(Some(dec(&v).map_err(|e| StorageIOError::read_logs(&e))?)),
            None => Ok(None),
        }
    }

    async fn meta_put<T: Serialize>(&self, key: &str, v: &T) -> Result<(), SErr> {
        let bytes = enc(v).map_err(|e| StorageIOError::write_logs(&e))?;
        self.meta
            .insert(key, bytes)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.meta
            .flush_async()
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    /// Removes the entries `range` yields, in one batch, and flushes.
    async fn remove_entries(&self, range: sled::Iter) -> Result<(), SErr> {
        let mut batch = sled::Batch::default();
        for item in range {
            let (k, _) = item.map_err(|e| StorageIOError::write_logs(&e))?;
            batch.remove(k);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.log
            .flush_async()
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    /// The highest log id this member knows committed (as last saved).
    pub fn committed(&self) -> Result<Option<LogId<NodeId>>, SErr> {
        Ok(self
            .meta_get::<Option<LogId<NodeId>>>("committed")?
            .flatten())
    }

    fn last_entry_id(&self) -> Result<Option<LogId<NodeId>>, SErr> {
        match self.log.last().map_err(|e| StorageIOError::read_logs(&e))? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> = dec(&v).map_err(|e| StorageIOError::read_logs(&e))?;
                Ok(Some(e.log_id))
            }
            None => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let iter = match range.end_bound() {
            Bound::Included(i) => match i.checked_add(1) {
                Some(end) => self.log.range(index_key(start)..index_key(end)),
                None => self.log.range(index_key(start)..),
            },
            Bound::Excluded(i) => self.log.range(index_key(start)..index_key(*i)),
            Bound::Unbounded => self.log.range(index_key(start)..),
        };
        let mut out = Vec::new();
        for item in iter {
            let (_, v) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            out.push(dec(&v).map_err(|e| StorageIOError::read_logs(&e))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.meta_get("purged")?;
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        let bytes = enc(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        self.meta
            .insert("vote", bytes)
            .map_err(|e| StorageIOError::write_vote(&e))?;
        self.meta
            .flush_async()
            .await
            .map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        match self
            .meta
            .get("vote")
            .map_err(|e| StorageIOError::read_vote(&e))?
        {
            Some(v) => Ok(Some(dec(&v).map_err(|e| StorageIOError::read_vote(&e))?)),
            None => Ok(None),
        }
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SErr> {
        // Not flushed on its own: losing the latest committed index to a crash only means
        // re-learning it from the leader; the entries themselves are durable.
        let bytes = enc(&committed).map_err(|e| StorageIOError::write_logs(&e))?;
        self.meta
            .insert("committed", bytes)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        Ok(self
            .meta_get::<Option<LogId<NodeId>>>("committed")?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        let mut highest = None;
        for e in entries {
            let bytes = enc(&e).map_err(|err| StorageIOError::write_log_entry(e.log_id, &err))?;
            batch.insert(&index_key(e.log_id.index), bytes);
            highest = Some(e.log_id.index);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let flushed = self.log.flush_async().await;
        match flushed {
            Ok(_) => {
                if let Some(h) = highest {
                    self.watermark.raise(self.group, h);
                }
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let msg = e.to_string();
                callback.log_io_completed(Err(std::io::Error::other(msg)));
                Err(StorageIOError::write_logs(&e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        // Lower the mark first: a crash after it leaves the mark below the log, never above.
        self.watermark
            .lower(self.group, log_id.index.saturating_sub(1))
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.remove_entries(self.log.range(index_key(log_id.index)..))
            .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        // Record the purge point first: a crash half-way leaves extra entries, never a gap.
        self.meta_put("purged", &log_id).await?;
        self.remove_entries(self.log.range(..=index_key(log_id.index)))
            .await
    }
}

/// A group's replicated state: a key-value map, the responses of applied requests (for
/// dedup), the applied log id and the membership. Cheap to clone; clones read the same data.
#[derive(Clone)]
pub struct StateMachine {
    sm: sled::Tree,
    snap: sled::Tree,
    snapshot_seq: Arc<AtomicU64>,
    /// The last applied index, for readers that wait for new entries (subscribers).
    applied_tx: Arc<tokio::sync::watch::Sender<u64>>,
}

/// The contents of a snapshot.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SnapshotData {
    data: Vec<(String, Vec<u8>)>,
    requests: Vec<(String, Response)>,
    /// The state machine's clock, as stored under [`CLOCK_KEY`].
    clock: u64,
}

impl StateMachine {
    fn read<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, SErr> {
        match self
            .sm
            .get(key)
            .map_err(|e| StorageIOError::read_state_machine(&e))?
        {
            Some(v) => Ok(Some(
                dec(&v).map_err(|e| StorageIOError::read_state_machine(&e))?,
            )),
            None => Ok(None),
        }
    }

    /// The value of `key`, as applied on this node (which may lag the leader).
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, SErr> {
        Ok(self
            .sm
            .get(format!("d/{key}"))
            .map_err(|e| StorageIOError::read_state_machine(&e))?
            .map(|v| v.to_vec()))
    }

    /// Every key and value whose key starts with `prefix`, in key order.
    pub fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, SErr> {
        let mut out = Vec::new();
        for item in self.sm.scan_prefix(format!("d/{prefix}")) {
            let (k, v) = item.map_err(|e| StorageIOError::read_state_machine(&e))?;
            out.push((String::from_utf8_lossy(&k[2..]).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    /// Wakes whenever entries are applied (the value is the applied index).
    pub fn watch_applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    /// Every topic with a log, and where its log starts and ends.
    pub fn topics(&self) -> Result<Vec<(String, crate::topics::TopicMeta)>, SErr> {
        let prefix = format!("d/{}", crate::topics::META_PREFIX);
        let mut out = Vec::new();
        for item in self.sm.scan_prefix(prefix.as_bytes()) {
            let (k, v) = item.map_err(|e| StorageIOError::read_state_machine(&e))?;
            let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            let meta = dec(&v).map_err(|e| StorageIOError::read_state_machine(&e))?;
            out.push((name, meta));
        }
        Ok(out)
    }

    /// Where one topic's log starts and ends, if the topic has one.
    pub fn topic_meta(&self, topic: &str) -> Result<Option<crate::topics::TopicMeta>, SErr> {
        self.read(format!("d/{}", crate::topics::meta_key(topic)).as_bytes())
    }

    /// Up to `limit` events of `topic` from offset `from` on, in offset order.
    pub fn events(
        &self,
        topic: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<crate::topics::StoredEvent>, SErr> {
        let start = format!("d/{}", crate::topics::event_key(topic, from));
        let prefix = format!("d/{}", crate::topics::event_prefix(topic));
        let mut out = Vec::new();
        for item in self.sm.range(start.as_bytes()..) {
            let (k, v) = item.map_err(|e| StorageIOError::read_state_machine(&e))?;
            if !k.starts_with(prefix.as_bytes()) || out.len() >= limit {
                break;
            }
            out.push(dec(&v).map_err(|e| StorageIOError::read_state_machine(&e))?);
        }
        Ok(out)
    }

    /// The offset of the first event of `topic` accepted at or after `time_ms` (the end of
    /// the log if none was).
    pub fn offset_at(&self, topic: &str, time_ms: u64) -> Result<u64, SErr> {
        let Some(meta) = self.topic_meta(topic)? else {
            return Ok(0);
        };
        let mut from = meta.first;
        loop {
            let batch = self.events(topic, from, 1024)?;
            if batch.is_empty() {
                return Ok(meta.next);
            }
            if let Some(e) = batch.iter().find(|e| e.time_ms >= time_ms) {
                return Ok(e.offset);
            }
            from = batch[batch.len() - 1].offset + 1;
        }
    }

    /// Where durable subscription `name` continues on `topic`: the offset after its last
    /// acknowledged one, if it acknowledged any.
    pub fn cursor(&self, name: &str, topic: &str) -> Result<Option<u64>, SErr> {
        self.read(format!("d/{}", crate::topics::cursor_key(name, topic)).as_bytes())
    }

    /// The last log id applied on this node.
    pub fn applied(&self) -> Result<Option<LogId<NodeId>>, SErr> {
        Ok(self.read::<Option<LogId<NodeId>>>(b"m/applied")?.flatten())
    }

    /// A SHA-256 digest of the key-value data, the applied request ids and the clock, in key
    /// order: equal on two nodes exactly when they hold the same state.
    pub fn digest(&self) -> Result<String, SErr> {
        let mut h = Sha256::new();
        for item in self.sm.iter() {
            let (k, v) = item.map_err(|e| StorageIOError::read_state_machine(&e))?;
            if k.starts_with(b"d/") || k.starts_with(b"r/") || k.as_ref() == CLOCK_KEY {
                h.update((k.len() as u64).to_be_bytes());
                h.update(&k);
                h.update((v.len() as u64).to_be_bytes());
                h.update(&v);
            }
        }
        Ok(hex::encode(h.finalize()))
    }

    fn snapshot_data(&self) -> Result<SnapshotData, SErr> {
        let mut out = SnapshotData::default();
        for item in self.sm.iter() {
            let (k, v) = item.map_err(|e| StorageIOError::read_state_machine(&e))?;
            if let Some(key) = k.strip_prefix(b"d/") {
                out.data
                    .push((String::from_utf8_lossy(key).into_owned(), v.to_vec()));
            } else if let Some(id) = k.strip_prefix(b"r/") {
                let r: Response = dec(&v).map_err(|e| StorageIOError::read_state_machine(&e))?;
                out.requests
                    .push((String::from_utf8_lossy(id).into_owned(), r));
            } else if k.as_ref() == CLOCK_KEY {
                out.clock = dec(&v).map_err(|e| StorageIOError::read_state_machine(&e))?;
            }
        }
        Ok(out)
    }
}

/// The state, its applied log id and its membership, copied for a snapshot.
type StateCopy = (
    SnapshotData,
    Option<LogId<NodeId>>,
    StoredMembership<NodeId, RaftNode>,
);

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

/// The writes of one `apply` call, on top of the tree: every read (point or range) sees the
/// call's earlier writes, so applying entries one call at a time or many per call gives the
/// same result. Written to sled as one batch at the end of the call.
struct Writes<'a> {
    tree: &'a sled::Tree,
    /// Raw sled keys (`d/…`, `r/…`, `m/…`) to their new value (`None`: removed).
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a> Writes<'a> {
    fn new(tree: &'a sled::Tree) -> Self {
        Writes {
            tree,
            pending: BTreeMap::new(),
        }
    }

    fn raw_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        match self.pending.get(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(self
                .tree
                .get(key)
                .map_err(|e| e.to_string())?
                .map(|v| v.to_vec())),
        }
    }

    fn raw_set(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.pending.insert(key, value);
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        self.raw_get(&data_key(key))
    }

    fn set(&mut self, key: String, value: Option<Vec<u8>>) {
        self.raw_set(data_key(&key), value);
    }

    /// Up to `limit` raw keys in `start..end`, in order, as they stand after this call's
    /// writes so far (the tree's keys merged with the pending ones; removed ones skipped).
    fn keys_in(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Vec<u8>>, String> {
        let mut tree = self.tree.range(start..end).keys().peekable();
        let mut pending = self
            .pending
            .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
            .peekable();
        let mut out = Vec::new();
        while out.len() < limit {
            let t = match tree.peek() {
                Some(Ok(k)) => Some(k.to_vec()),
                Some(Err(e)) => return Err(e.to_string()),
                None => None,
            };
            let p = pending.peek().map(|(k, _)| k.as_slice());
            match (t, p) {
                (None, None) => break,
                (Some(t), p) if p.is_none_or(|p| t.as_slice() < p) => {
                    tree.next();
                    out.push(t);
                }
                (t, _) => {
                    // The pending write of a key overrides the tree's.
                    if let Some((k, v)) = pending.next() {
                        if t.as_deref() == Some(k.as_slice()) {
                            tree.next();
                        }
                        if v.is_some() {
                            out.push(k.clone());
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    fn into_batch(self) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for (k, v) in self.pending {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        batch
    }
}

/// Moves the state machine's clock to `stamp` unless it already stands later, and returns
/// it: time inside the state machine never goes backwards, even when leadership moves to a
/// node whose clock is behind.
fn advance_clock(w: &mut Writes<'_>, stamp: u64) -> Result<u64, String> {
    let stored = match w.raw_get(CLOCK_KEY)? {
        Some(b) => dec::<u64>(&b).map_err(|e| format!("the state machine's clock: {e}"))?,
        None => 0,
    };
    if stamp > stored {
        w.raw_set(
            CLOCK_KEY.to_vec(),
            Some(enc(&stamp).map_err(|e| e.to_string())?),
        );
        Ok(stamp)
    } else {
        Ok(stored)
    }
}

/// Applies one client request of the entry at `index`, at the state machine's time `now`:
/// once per request id, however often it is proposed.
fn apply_request(
    index: u64,
    now: u64,
    Request { id, op }: Request,
    w: &mut Writes<'_>,
) -> Result<Response, String> {
    // A publish's id is remembered for its dedup window only. Expired ids are forgotten
    // before the id is looked up, through this call's earlier writes, so a reused id past its
    // window is new on every replica however the entries were grouped into apply calls.
    let dedup_window = match (&id, &op) {
        (Some(_), Op::Publish(p)) => Some(p.retention.dedup_window_ms.max(1)),
        _ => None,
    };
    if dedup_window.is_some() {
        forget_old_ids(w, now)?;
    }
    if let Some(id) = &id
        && let Some(b) = w.raw_get(&request_key(id))?
    {
        let mut first: Response = dec(&b).map_err(|e| format!("response of {id:?}: {e}"))?;
        first.duplicate = true;
        return Ok(first);
    }
    let (previous, refused, offset) = apply_op(w, now, op)?;
    if let (Some(window), Some(id)) = (dedup_window, &id) {
        w.set(
            crate::topics::dedup_key(now.saturating_add(window), id),
            Some(Vec::new()),
        );
    }
    let reply = Response {
        index,
        duplicate: false,
        previous,
        refused,
        offset,
        batch: Vec::new(),
    };
    if let Some(id) = id {
        // The stored copy drops `previous`: a duplicate learns only where the first write
        // landed.
        let stored = Response {
            previous: None,
            ..reply.clone()
        };
        w.raw_set(
            request_key(&id),
            Some(enc(&stored).map_err(|e| e.to_string())?),
        );
    }
    Ok(reply)
}

/// What one operation did: the previous value, why it was refused (if it was), and for a
/// publish the event's offset.
type Applied = (Option<Vec<u8>>, Option<String>, Option<u64>);

/// Why a client key operation may not touch `key`: the internal keyspace is written only by
/// the operations that own it.
fn internal_refusal(key: &str) -> Option<String> {
    crate::types::is_internal(key).then(|| {
        format!(
            "key {key:?} is in the internal keyspace (it starts with U+0001): only the operations that own internal records write them"
        )
    })
}

/// Why a topic named in a replicated operation is refused: it must be a valid topic name,
/// so it cannot reach into another topic's keys.
fn topic_refusal(topic: &str) -> Option<String> {
    canal_proto::Topic::new(topic)
        .err()
        .map(|e| format!("topic {topic:?} is refused: {e}"))
}

/// Why a name that is part of internal keys (a subscription, a function, a trigger uid) is
/// refused: it must be 1 to 1024 bytes without control characters (the keys' separators).
fn name_refusal(what: &str, name: &str) -> Option<String> {
    let max = crate::types::MAX_INTERNAL_NAME_BYTES;
    (name.is_empty() || name.len() > max || name.chars().any(char::is_control))
        .then(|| format!("{what} {name:?} is refused: 1 to {max} bytes, no control characters"))
}

/// Applies one operation at the state machine's time `now`; returns the previous value, why
/// it was refused (if it was), and for a publish the event's offset.
fn apply_op(w: &mut Writes<'_>, now: u64, op: crate::types::Op) -> Result<Applied, String> {
    let refuse = |why: String| Ok((None, Some(why), None));
    match op {
        Op::Put { key, value } => {
            if let Some(why) = internal_refusal(&key) {
                return refuse(why);
            }
            let previous = w.get(&key)?;
            w.set(key, Some(value));
            Ok((previous, None, None))
        }
        Op::Delete { key } => {
            if let Some(why) = internal_refusal(&key) {
                return refuse(why);
            }
            let previous = w.get(&key)?;
            w.set(key, None);
            Ok((previous, None, None))
        }
        Op::Add { key, delta } => {
            if let Some(why) = internal_refusal(&key) {
                return refuse(why);
            }
            let previous = w.get(&key)?;
            match add(previous.as_deref(), delta) {
                Ok(v) => {
                    w.set(key, Some(v));
                    Ok((previous, None, None))
                }
                Err(why) => Ok((previous, Some(why), None)),
            }
        }
        Op::Internal { key, value } => {
            if let Err(why) = key.check() {
                return refuse(why);
            }
            let key = key.key();
            let previous = w.get(&key)?;
            w.set(key, value);
            Ok((previous, None, None))
        }
        Op::Ack {
            subscription,
            topic,
            offset,
        } => {
            if let Some(why) =
                name_refusal("subscription", &subscription).or_else(|| topic_refusal(&topic))
            {
                return refuse(why);
            }
            // An ack of an offset the topic never had would let a cursor run ahead of the
            // log and skip events published later.
            let end = match w.get(&crate::topics::meta_key(&topic))? {
                Some(b) => {
                    dec::<crate::topics::TopicMeta>(&b)
                        .map_err(|e| e.to_string())?
                        .next
                }
                None => 0,
            };
            if offset >= end {
                return refuse(match end {
                    0 => format!(
                        "offset {offset} is beyond the end of topic {topic}: it has no events"
                    ),
                    n => format!(
                        "offset {offset} is beyond the end of topic {topic}: its last offset is {}",
                        n - 1
                    ),
                });
            }
            let key = crate::topics::cursor_key(&subscription, &topic);
            let current = w.get(&key)?.and_then(|b| dec::<u64>(&b).ok()).unwrap_or(0);
            let next = current.max(offset.saturating_add(1));
            w.set(key, Some(enc(&next).map_err(|e| e.to_string())?));
            Ok((None, None, Some(next)))
        }
        Op::Publish(event) => {
            if let Some(why) = topic_refusal(&event.topic) {
                return refuse(why);
            }
            let offset = append_event(w, event, now)?;
            Ok((None, None, Some(offset)))
        }
        Op::Effects(fx) => apply_effects(w, fx, now),
        Op::Trim { topic, retention } => {
            if let Some(why) = topic_refusal(&topic) {
                return refuse(why);
            }
            apply_trim(w, &topic, &retention, now)
        }
        // A batch is unpacked by `apply`; one inside another is not a thing clients send.
        Op::Batch(_) => refuse("a batch cannot hold a batch".into()),
    }
}

/// How many expired ids one publish forgets at most: pruning keeps pace with publishing
/// without making one apply slow.
const FORGET_PER_PUBLISH: usize = 64;

/// Forgets (up to [`FORGET_PER_PUBLISH`]) the publish ids whose dedup window ended at or
/// before `now`, earliest expiry first.
fn forget_old_ids(w: &mut Writes<'_>, now: u64) -> Result<(), String> {
    let start = data_key(crate::topics::DEDUP_PREFIX);
    let end = data_key(&crate::topics::dedup_key(now.saturating_add(1), ""));
    for raw in w.keys_in(&start, &end, FORGET_PER_PUBLISH)? {
        let key = String::from_utf8_lossy(&raw[2..]).into_owned();
        if let Some((_, id)) = key.split_once('\u{0}') {
            w.raw_set(request_key(id), None);
        }
        w.raw_set(raw, None);
    }
    Ok(())
}

/// Appends an event to its topic's log at time `now`, applying the topic's retention;
/// returns its offset.
fn append_event(
    w: &mut Writes<'_>,
    event: crate::topics::PublishOp,
    now: u64,
) -> Result<u64, String> {
    let meta_key = crate::topics::meta_key(&event.topic);
    let mut meta: crate::topics::TopicMeta = match w.get(&meta_key)? {
        Some(b) => dec(&b).map_err(|e| e.to_string())?,
        None => crate::topics::TopicMeta::default(),
    };
    let offset = meta.next;
    meta.bytes += event.payload.len() as u64;
    let stored = crate::topics::StoredEvent {
        offset,
        time_ms: now,
        id: event.id,
        headers: event.headers,
        payload: event.payload,
    };
    w.set(
        crate::topics::event_key(&event.topic, offset),
        Some(enc(&stored).map_err(|e| e.to_string())?),
    );
    meta.next += 1;
    trim(w, &event.topic, &mut meta, &event.retention, now)?;
    w.set(meta_key, Some(enc(&meta).map_err(|e| e.to_string())?));
    Ok(offset)
}

/// Drops a topic's oldest events while the log passes a retention limit at time `now_ms`
/// (the state machine's clock, so every replica drops the same events). The newest event
/// always stays.
fn trim(
    w: &mut Writes<'_>,
    topic: &str,
    meta: &mut crate::topics::TopicMeta,
    retention: &canal_proto::settings::Retention,
    now_ms: u64,
) -> Result<(), String> {
    while meta.next - meta.first > 1 {
        let key = crate::topics::event_key(topic, meta.first);
        let oldest: Option<crate::topics::StoredEvent> = match w.get(&key)? {
            Some(b) => Some(dec(&b).map_err(|e| e.to_string())?),
            None => None,
        };
        let (size, time) = oldest
            .as_ref()
            .map(|e| (e.payload.len() as u64, e.time_ms))
            .unwrap_or((0, now_ms));
        let over = meta.next - meta.first > retention.max_events.max(1)
            || (retention.max_bytes > 0 && meta.bytes > retention.max_bytes)
            || (retention.max_age_ms > 0 && time.saturating_add(retention.max_age_ms) < now_ms);
        if !over {
            break;
        }
        w.set(key, None);
        meta.bytes = meta.bytes.saturating_sub(size);
        meta.first += 1;
    }
    Ok(())
}

/// Applies a topic's retention at `now_ms` without appending (age limits on a quiet topic).
fn apply_trim(
    w: &mut Writes<'_>,
    topic: &str,
    retention: &canal_proto::settings::Retention,
    now_ms: u64,
) -> Result<Applied, String> {
    let meta_key = crate::topics::meta_key(topic);
    let Some(b) = w.get(&meta_key)? else {
        return Ok((None, None, None));
    };
    let mut meta: crate::topics::TopicMeta = dec(&b).map_err(|e| e.to_string())?;
    let first = meta.first;
    trim(w, topic, &mut meta, retention, now_ms)?;
    if meta.first != first {
        w.set(meta_key, Some(enc(&meta).map_err(|e| e.to_string())?));
    }
    Ok((None, None, Some(meta.first)))
}

/// Applies an execution's effects at time `now` if its cursor and state version still hold;
/// otherwise refuses, changing nothing.
fn apply_effects(
    w: &mut Writes<'_>,
    fx: crate::functions::Effects,
    now: u64,
) -> Result<Applied, String> {
    use crate::functions::{cursor_key, state_key, version_key};
    let refusal = name_refusal("function", &fx.function)
        .or_else(|| {
            fx.cursor.as_ref().and_then(|c| {
                name_refusal("trigger uid", &c.trigger_uid).or_else(|| topic_refusal(&c.topic))
            })
        })
        .or_else(|| fx.outputs.iter().find_map(|o| topic_refusal(&o.topic)));
    if let Some(why) = refusal {
        return Ok((None, Some(why), None));
    }
    let read_u64 = |w: &Writes<'_>, key: &str| -> Result<Option<u64>, String> {
        match w.get(key)? {
            Some(b) => dec::<u64>(&b).map(Some).map_err(|e| e.to_string()),
            None => Ok(None),
        }
    };
    if let Some(c) = &fx.cursor {
        let now = read_u64(w, &cursor_key(&c.trigger_uid, &c.topic))?;
        if now != c.expected {
            return Ok((
                None,
                Some(format!(
                    "the trigger's cursor on {} is at {now:?}, not {:?}: another execution committed first",
                    c.topic, c.expected
                )),
                None,
            ));
        }
    }
    let version = read_u64(w, &version_key(&fx.function))?.unwrap_or(0);
    if let Some(expected) = fx.state_version
        && expected != version
    {
        return Ok((
            None,
            Some(format!(
                "the state of {} is at version {version}, not {expected}: it changed since it was read",
                fx.function
            )),
            None,
        ));
    }
    if !fx.state.is_empty() {
        for (k, v) in fx.state {
            w.set(state_key(&fx.function, &k), v);
        }
        w.set(
            version_key(&fx.function),
            Some(enc(&(version + 1)).map_err(|e| e.to_string())?),
        );
    }
    let mut last = None;
    for out in fx.outputs {
        last = Some(append_event(w, out, now)?);
    }
    if let Some(c) = fx.cursor {
        w.set(
            cursor_key(&c.trigger_uid, &c.topic),
            Some(enc(&c.next).map_err(|e| e.to_string())?),
        );
    }
    Ok((None, None, last))
}

/// `previous + delta`, as decimal text; a missing value counts as 0.
fn add(previous: Option<&[u8]>, delta: i64) -> Result<Vec<u8>, String> {
    let current: i64 = match previous {
        None => 0,
        Some(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| "the key does not hold a whole number".to_string())?,
    };
    let sum = current
        .checked_add(delta)
        .ok_or_else(|| format!("{current} + {delta} overflows a 64-bit number"))?;
    Ok(sum.to_string().into_bytes())
}

/// Builds a snapshot from a copy of the state taken when the builder was made.
pub struct SnapshotBuilder {
    sm: StateMachine,
    copy: Result<StateCopy, SErr>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let (data, applied, membership) =
            std::mem::replace(&mut self.copy, Ok(Default::default()))?;
        let seq = self.sm.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match applied {
            Some(id) => format!("{}-{}-{seq}", id.leader_id, id.index),
            None => format!("none-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id,
        };
        let bytes =
            enc(&data).map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        store_snapshot(&self.sm, &meta, &bytes).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

async fn store_snapshot(
    sm: &StateMachine,
    meta: &SnapshotMeta<NodeId, RaftNode>,
    bytes: &[u8],
) -> Result<(), SErr> {
    let err = |e: openraft::AnyError| StorageIOError::write_snapshot(Some(meta.signature()), e);
    let meta_bytes = enc(meta).map_err(|e| err(any(&e)))?;
    let mut batch = sled::Batch::default();
    batch.insert("meta", meta_bytes);
    batch.insert("data", bytes);
    sm.snap.apply_batch(batch).map_err(|e| err(any(&e)))?;
    // The state machine first: the log may be purged up to this snapshot once it exists.
    sm.sm.flush_async().await.map_err(|e| err(any(&e)))?;
    sm.snap.flush_async().await.map_err(|e| err(any(&e)))?;
    Ok(())
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, RaftNode>), SErr> {
        let applied = self.applied()?;
        let membership = self.read(b"m/membership")?.unwrap_or_default();
        Ok((applied, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let werr = |e: String| StorageIOError::write_state_machine(openraft::AnyError::error(e));
        let mut w = Writes::new(&self.sm);
        let mut replies = Vec::new();
        let mut last = None;
        let mut membership = None;
        for entry in entries {
            last = Some(entry.log_id);
            let index = entry.log_id.index;
            match entry.payload {
                EntryPayload::Blank => replies.push(Response {
                    index,
                    ..Default::default()
                }),
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    replies.push(Response {
                        index,
                        ..Default::default()
                    });
                }
                EntryPayload::Normal(Proposal { time_ms, request }) => {
                    let now = advance_clock(&mut w, time_ms).map_err(werr)?;
                    match request {
                        Request {
                            id: None,
                            op: Op::Batch(requests_of_batch),
                        } => {
                            // Many client writes in one entry: each keeps its own id and
                            // answer, and all share the entry's time.
                            let mut answers = Vec::with_capacity(requests_of_batch.len());
                            for req in requests_of_batch {
                                answers.push(apply_request(index, now, req, &mut w).map_err(werr)?);
                            }
                            replies.push(Response {
                                index,
                                batch: answers,
                                ..Default::default()
                            });
                        }
                        req => replies.push(apply_request(index, now, req, &mut w).map_err(werr)?),
                    }
                }
            }
        }
        if let Some(last) = last {
            w.raw_set(
                b"m/applied".to_vec(),
                Some(enc(&Some(last)).map_err(|e| werr(e.to_string()))?),
            );
        }
        if let Some(m) = membership {
            w.raw_set(
                b"m/membership".to_vec(),
                Some(enc(&m).map_err(|e| werr(e.to_string()))?),
            );
        }
        self.sm
            .apply_batch(w.into_batch())
            .map_err(|e| werr(e.to_string()))?;
        if let Some(last) = last {
            self.applied_tx.send_replace(last.index);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let copy = (|| {
            let data = self.snapshot_data()?;
            let applied = self.applied()?;
            let membership = self.read(b"m/membership")?.unwrap_or_default();
            Ok((data, applied, membership))
        })();
        SnapshotBuilder {
            sm: self.clone(),
            copy,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, RaftNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let bytes = snapshot.into_inner();
        let err = |e: openraft::AnyError| StorageIOError::read_snapshot(Some(meta.signature()), e);
        let data = decode_snapshot(&bytes).map_err(|e| err(any(&e)))?;
        let mut batch = sled::Batch::default();
        for item in self.sm.iter() {
            let (k, _) = item.map_err(|e| err(any(&e)))?;
            batch.remove(k);
        }
        for (k, v) in data.data {
            batch.insert(format!("d/{k}").as_bytes(), v);
        }
        for (id, r) in data.requests {
            batch.insert(
                format!("r/{id}").as_bytes(),
                enc(&r).map_err(|e| err(any(&e)))?,
            );
        }
        batch.insert(CLOCK_KEY, enc(&data.clock).map_err(|e| err(any(&e)))?);
        batch.insert(
            "m/applied",
            enc(&meta.last_log_id).map_err(|e| err(any(&e)))?,
        );
        batch.insert(
            "m/membership",
            enc(&meta.last_membership).map_err(|e| err(any(&e)))?,
        );
        self.sm.apply_batch(batch).map_err(|e| err(any(&e)))?;
        store_snapshot(self, meta, &bytes).await?;
        if let Some(l) = meta.last_log_id {
            self.applied_tx.send_replace(l.index);
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        let rerr = |e: openraft::AnyError| StorageIOError::read_snapshot(None, e);
        let meta = self.snap.get("meta").map_err(|e| rerr(any(&e)))?;
        let data = self.snap.get("data").map_err(|e| rerr(any(&e)))?;
        match (meta, data) {
            (Some(meta), Some(data)) => {
                let meta: SnapshotMeta<NodeId, RaftNode> = dec(&meta).map_err(|e| rerr(any(&e)))?;
                Ok(Some(Snapshot {
                    meta,
                    snapshot: Box::new(Cursor::new(data.to_vec())),
                }))
            }
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
#[path = "store_proptests.rs"]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), SErr> {
            let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
            let db =
                RaftDb::open(&dir.path().join("raft")).map_err(|e| StorageIOError::write(&e))?;
            let (log, sm) = db
                .group(crate::routing::DEFAULT_GROUP)
                .map_err(|e| StorageIOError::write(&e))?;
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn passes_the_openraft_storage_suite() {
        Suite::test_all(Builder).unwrap();
    }

    #[test]
    fn refuses_a_damaged_or_foreign_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft");
        drop(RaftDb::open(&path).unwrap());
        // Reopening is fine.
        let db = RaftDb::open(&path).unwrap();
        db.group(GroupId(3)).unwrap();
        assert_eq!(db.groups(), vec![GroupId(3)]);
        drop(db);
        // A directory with files but no marker is refused, naming the path.
        let foreign = dir.path().join("foreign");
        std::fs::create_dir_all(&foreign).unwrap();
        std::fs::write(foreign.join("junk"), b"not sled").unwrap();
        let e = RaftDb::open(&foreign)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains(&foreign.display().to_string()), "{e}");
    }

    #[test]
    fn a_log_shorter_than_its_watermark_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft");
        let db = RaftDb::open(&path).unwrap();
        db.group(crate::group_of("t")).unwrap();
        drop(db);
        // The mark says entry 5 of group 1 was durable, but the log is empty.
        std::fs::write(
            path.join("watermark.json"),
            r#"{"version":1,"groups":{"1":5}}"#,
        )
        .unwrap();
        let e = RaftDb::open(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("truncated") && e.contains(&path.display().to_string()),
            "{e}"
        );
        std::fs::write(path.join("watermark.json"), "{").unwrap();
        assert!(RaftDb::open(&path).is_err());
        std::fs::write(
            path.join("watermark.json"),
            r#"{"version":1,"groups":{"1":0}}"#,
        )
        .unwrap();
        assert!(RaftDb::open(&path).is_ok());
    }

    pub(super) fn entry(index: u64, req: Request) -> Entry<TypeConfig> {
        entry_at(index, 0, req)
    }

    /// An entry the leader stamped at `time_ms`.
    pub(super) fn entry_at(index: u64, time_ms: u64, req: Request) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Proposal {
                time_ms,
                request: req,
            }),
        }
    }

    #[test]
    fn publish_ids_are_remembered_for_the_dedup_window() {
        use crate::topics::DEDUP_WINDOW_MS;
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let db = RaftDb::open(dir.path()).unwrap();
            let (_, mut sm) = db.group(crate::group_of("t")).unwrap();
            let publish = |i: u64, id: &str, t: u64| {
                entry_at(
                    i,
                    t,
                    Request {
                        id: Some(format!("pub/t/{id}")),
                        op: Op::Publish(crate::topics::PublishOp {
                            topic: "t".into(),
                            id: Some(id.into()),
                            headers: Vec::new(),
                            payload: b"x".to_vec(),
                            retention: Default::default(),
                        }),
                    },
                )
            };
            let r = sm.apply(vec![publish(1, "a", 1_000)]).await.unwrap();
            assert!(!r[0].duplicate);
            // Within the window: the same id is the same event.
            let r = sm
                .apply(vec![publish(2, "a", 1_000 + DEDUP_WINDOW_MS - 1)])
                .await
                .unwrap();
            assert!(r[0].duplicate && r[0].offset == Some(0));
            // Past it, another publish makes the node forget `a`; `a` again is a new event.
            let later = 1_000 + DEDUP_WINDOW_MS + 1;
            sm.apply(vec![publish(3, "b", later)]).await.unwrap();
            let r = sm.apply(vec![publish(4, "a", later)]).await.unwrap();
            assert!(!r[0].duplicate);
            assert_eq!(r[0].offset, Some(2));
            assert_eq!(sm.topic_meta("t").unwrap().unwrap().next, 3);
        });
    }

    #[test]
    fn retention_drops_the_oldest_by_count_bytes_and_age() {
        use canal_proto::settings::Retention;
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let db = RaftDb::open(dir.path()).unwrap();
            let (_, mut sm) = db.group(crate::group_of("t")).unwrap();
            let publish = |i: u64, t: u64, size: usize, retention: Retention| {
                entry_at(
                    i,
                    t,
                    Request {
                        id: None,
                        op: Op::Publish(crate::topics::PublishOp {
                            topic: "t".into(),
                            id: None,
                            headers: Vec::new(),
                            payload: vec![b'x'; size],
                            retention,
                        }),
                    },
                )
            };
            let by_bytes = Retention {
                max_events: 100,
                max_bytes: 250,
                max_age_ms: 0,
                ..Retention::default()
            };
            let mut i = 0;
            for t in 0..5 {
                i += 1;
                sm.apply(vec![publish(i, t, 100, by_bytes)]).await.unwrap();
            }
            let meta = sm.topic_meta("t").unwrap().unwrap();
            assert_eq!((meta.first, meta.next, meta.bytes), (3, 5, 200));
            // Age: at t=1000 with a 500 ms limit, everything but the new event goes.
            let by_age = Retention {
                max_events: 100,
                max_bytes: 0,
                max_age_ms: 500,
                ..Retention::default()
            };
            i += 1;
            sm.apply(vec![publish(i, 1000, 10, by_age)]).await.unwrap();
            let meta = sm.topic_meta("t").unwrap().unwrap();
            assert_eq!((meta.first, meta.next, meta.bytes), (5, 6, 10));
            // A trim on a quiet topic never drops the newest event.
            i += 1;
            let trim = Request {
                id: None,
                op: Op::Trim {
                    topic: "t".into(),
                    retention: by_age,
                },
            };
            sm.apply(vec![entry_at(i, 10_000, trim)]).await.unwrap();
            assert_eq!(sm.topic_meta("t").unwrap().unwrap().first, 5);
            assert_eq!(sm.events("t", 0, 10).unwrap().len(), 1);
        });
    }

    #[test]
    fn a_batch_answers_each_request_and_keeps_their_ids() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let db = RaftDb::open(dir.path()).unwrap();
            let (_, mut sm) = db.group(crate::group_of("t")).unwrap();
            let add = |id: &str| Request {
                id: Some(id.into()),
                op: Op::Add {
                    key: "n".into(),
                    delta: 1,
                },
            };
            let batch = |reqs: Vec<Request>| Request {
                id: None,
                op: Op::Batch(reqs),
            };
            let r = sm
                .apply(vec![entry(1, batch(vec![add("a"), add("b"), add("a")]))])
                .await
                .unwrap();
            let answers: Vec<bool> = r[0].batch.iter().map(|a| a.duplicate).collect();
            assert_eq!(answers, [false, false, true]);
            // A retried batch applies only what is new.
            let r = sm
                .apply(vec![entry(2, batch(vec![add("b"), add("c")]))])
                .await
                .unwrap();
            assert!(r[0].batch[0].duplicate && !r[0].batch[1].duplicate);
            assert_eq!(sm.get("n").unwrap(), Some(b"3".to_vec()));
            // A batch inside a batch is refused, changing nothing.
            let r = sm
                .apply(vec![entry(3, batch(vec![batch(vec![add("d")])]))])
                .await
                .unwrap();
            assert!(r[0].batch[0].refused.is_some());
            assert_eq!(sm.get("n").unwrap(), Some(b"3".to_vec()));
        });
    }

    #[test]
    fn a_request_id_is_applied_once() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let db = RaftDb::open(dir.path()).unwrap();
            let (_, mut sm) = db.group(crate::group_of("t")).unwrap();
            let put = |v: &str| Request {
                id: Some("w1".into()),
                op: crate::types::Op::Put {
                    key: "k".into(),
                    value: v.as_bytes().to_vec(),
                },
            };
            // Twice in one batch, and again in a later one.
            let r = sm
                .apply(vec![entry(1, put("a")), entry(2, put("b"))])
                .await
                .unwrap();
            assert!(!r[0].duplicate && r[1].duplicate && r[1].index == 1);
            let r = sm.apply(vec![entry(3, put("c"))]).await.unwrap();
            assert!(r[0].duplicate);
            assert_eq!(sm.get("k").unwrap(), Some(b"a".to_vec()));
            assert_eq!(sm.applied().unwrap().map(|l| l.index), Some(3));
        });
    }
}
