//! A group's Raft log, vote and committed index.

use super::*;
use crate::types::{GroupId, NodeId, TypeConfig};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageIOError, Vote};
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

fn index_key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

/// A group's Raft log, vote and committed index. Cheap to clone.
#[derive(Clone)]
pub struct LogStore {
    pub(super) group: GroupId,
    pub(super) log: sled::Tree,
    pub(super) meta: sled::Tree,
    pub(super) watermark: Arc<Watermark>,
    /// The database's flushes, shared by every group's log.
    pub(super) flusher: Arc<super::Flusher>,
}

impl LogStore {
    /// The highest index the log covers: its last entry, or the purge point if it is empty.
    pub(super) fn durable_end(&self) -> Result<u64, SErr> {
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
        self.flusher
            .flush(&self.meta)
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
        self.flusher
            .flush(&self.log)
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
        self.flusher
            .flush(&self.meta)
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
        // Plain inserts in index order, not a sled batch: sled 0.34 writes its buffer to disk
        // (a write and a `sync_file_range`) at the start of every batch, which made each
        // group's append cost a disk write of its own before the shared flush. Atomicity is
        // not needed here: sled recovers its log up to the first write that did not reach
        // the disk, so a crash leaves a prefix of these entries, never a gap, and an entry
        // not yet reported flushed may be there or not.
        let mut highest = None;
        for e in entries {
            let bytes = enc(&e).map_err(|err| StorageIOError::write_log_entry(e.log_id, &err))?;
            self.log
                .insert(index_key(e.log_id.index), bytes)
                .map_err(|e| StorageIOError::write_logs(&e))?;
            highest = Some(e.log_id.index);
        }
        let flushed = self.flusher.flush(&self.log).await;
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
