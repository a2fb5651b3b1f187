//! The sled database, its format marker and the durable-index watermark.

use super::log::LogStore;
use super::state::StateMachine;
use super::*;
use crate::types::GroupId;
use serde::Deserialize;
use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

// 3: entries carry the leader's stamp (Proposal), internal records moved (the removed-peer
// tombstone), dedup keys hold expiries. 5: Effects entries carry an outbox, new ops Deliver
// and OutboxTrim, outbox and producer-sequence tables. Older databases are refused, naming
// both formats.
const FORMAT: &[u8] = b"canal-raft/5";

/// The node's Raft database: every group's log and state machine.
#[derive(Clone)]
pub struct RaftDb {
    db: sled::Db,
    path: PathBuf,
    watermark: Arc<Watermark>,
    flusher: Arc<super::Flusher>,
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

    pub(super) fn raise(&self, group: GroupId, index: u64) {
        let mut d = Self::lock(&self.durable);
        let e = d.entry(group.0).or_insert(0);
        *e = (*e).max(index);
    }

    /// Lowers a group's mark and writes the file at once, before a truncation makes the log
    /// shorter than the mark.
    pub(super) fn lower(&self, group: GroupId, index: u64) -> std::io::Result<()> {
        {
            let mut d = Self::lock(&self.durable);
            let e = d.entry(group.0).or_insert(0);
            *e = (*e).min(index);
        }
        self.write(true)
    }

    /// Drops a group's mark and writes the file at once, before the group's log is deleted
    /// (a later open would otherwise find the log shorter than the mark).
    pub(super) fn forget(&self, group: GroupId) -> std::io::Result<()> {
        Self::lock(&self.durable).remove(&group.0);
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
            flusher: Arc::default(),
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
            flusher: self.flusher.clone(),
        };
        let sm = StateMachine {
            sm: tree("sm")?,
            intent: tree("intent")?,
            view: Arc::default(),
            snap: tree("snap")?,
            snapshot_seq: Arc::new(AtomicU64::new(0)),
            applied_tx: Arc::new(tokio::sync::watch::Sender::new(0)),
            changes_tx: Arc::new(tokio::sync::broadcast::Sender::new(super::CHANGE_NOTICES)),
            ring: Arc::new(std::sync::Mutex::new(super::ChangeRing::new(
                0,
                super::RING_NOTICES,
                super::RING_TOPICS,
            ))),
        };
        sm.finish_intent().map_err(|reason| StoreError::Corrupt {
            path: self.path.clone(),
            reason: format!("group {group}: {reason}"),
        })?;
        // The ring knows nothing applied before this open: a remote reader's older index
        // is answered "anything may have changed".
        let applied = sm
            .applied()
            .map_err(|e| StoreError::Io {
                path: self.path.clone(),
                reason: e.to_string(),
            })?
            .map_or(0, |l| l.index);
        sm.ring().reset(applied);
        Ok((log, sm))
    }

    /// Deletes everything group `group` stored (its log, vote, state machine and snapshot),
    /// so opening it again starts empty. The group must not be running.
    pub fn purge_group(&self, group: GroupId) -> Result<(), StoreError> {
        let io = |reason: String| StoreError::Io {
            path: self.path.clone(),
            reason,
        };
        self.watermark
            .forget(group)
            .map_err(|e| io(format!("cannot write watermark.json: {e}")))?;
        for suffix in ["log", "meta", "sm", "intent", "snap"] {
            let name = format!("g{}.{suffix}", group.0);
            self.db
                .drop_tree(name.as_bytes())
                .map_err(|e| io(format!("cannot delete tree {name}: {e}")))?;
        }
        self.db
            .flush()
            .map_err(|e| io(format!("cannot flush after purging group {group}: {e}")))?;
        Ok(())
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

thread_local! {
    /// Set while this thread opens sled, whose panics on damaged files are turned into
    /// errors ([`open_sled`]) and so are not printed.
    static OPENING_SLED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Wraps the process's panic hook, once, so that it stays silent for a panic of sled's
/// recovery on the thread opening it, and only there. Swapping the global hook around
/// each open instead silenced every other thread's panics meanwhile, and two opens at once
/// could leave the silent hook installed for good (a test failing in parallel then printed
/// nothing).
fn quiet_sled_recovery_panics() {
    static WRAPPED: std::sync::Once = std::sync::Once::new();
    WRAPPED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !OPENING_SLED.with(|o| o.get()) {
                previous(info);
            }
        }));
    });
}

/// How long opening the store waits for sled's lock on its directory ([`open_sled`]).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Whether sled refused to open because its directory's lock is taken. sled 0.34 reports
/// it only as an I/O error of kind `Other` with this message.
fn lock_held(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// Opens sled, turning a panic in its recovery (it panics on some damaged files) into an
/// error naming the path.
fn open_sled(path: &Path) -> Result<sled::Db, StoreError> {
    let config = sled::Config::new().path(path).flush_every_ms(None);
    // The default hook would print the panic as if canal had crashed; this is an error with
    // a message of its own instead.
    quiet_sled_recovery_panics();
    // sled's own write-back jobs hold the database's lock for a moment after the last
    // handle of it is dropped, so a store closed and opened again in one process (a
    // restart in place, the tests) may find it still held: that is waited out. Another
    // process holding it is not, and is named after the wait.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let opened = loop {
        OPENING_SLED.with(|o| o.set(true));
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()));
        OPENING_SLED.with(|o| o.set(false));
        match &opened {
            Ok(Err(e)) if lock_held(e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            _ => break opened,
        }
    };
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) if lock_held(&e) => Err(StoreError::Open {
            path: path.to_path_buf(),
            reason: format!(
                "another process holds this data directory (its lock stayed taken for {LOCK_WAIT:?}): {e}"
            ),
        }),
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
