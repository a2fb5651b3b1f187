//! A group's state machine and its reads.

use super::snapshot::{SnapshotBuilder, SnapshotData};
use super::*;
use crate::types::{NodeId, RaftNode, Response, TypeConfig};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{Entry, LogId, OptionalSend, SnapshotMeta, StorageIOError, StoredMembership};
use sha2::{Digest, Sha256};
use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

/// A group's replicated state: a key-value map, the responses of applied requests (for
/// dedup), the applied log id and the membership. Cheap to clone; clones read the same data.
#[derive(Clone)]
pub struct StateMachine {
    pub(super) sm: sled::Tree,
    pub(super) snap: sled::Tree,
    pub(super) snapshot_seq: Arc<AtomicU64>,
    /// The last applied index, for readers that wait for new entries (subscribers).
    pub(super) applied_tx: Arc<tokio::sync::watch::Sender<u64>>,
}

impl StateMachine {
    pub(super) fn read<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, SErr> {
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

    pub(super) fn snapshot_data(&self) -> Result<SnapshotData, SErr> {
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
        super::apply::apply_entries(self, entries)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        super::snapshot::builder(self)
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, RaftNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        super::snapshot::install(self, meta, snapshot.into_inner()).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        super::snapshot::current(self)
    }
}
