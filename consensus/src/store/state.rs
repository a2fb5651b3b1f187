//! A group's state machine and its reads.

use super::snapshot::{SnapshotBuilder, SnapshotData};
use super::*;
use crate::keys::{self, Codec, Grouped, Records, Shape, Table, UserKey};
use crate::topics::{StoredEvent, TopicMeta};
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
    /// The write set of the last apply, so that a crash half-way through one is finished on
    /// open ([`StateMachine::write`]); never part of the replicated state.
    pub(super) intent: sled::Tree,
    /// Held to read while an apply writes: a read sees the state between two applies,
    /// never half of one ([`StateMachine::write`]). Per group, so groups never wait on
    /// each other.
    pub(super) view: Arc<std::sync::RwLock<()>>,
    pub(super) snap: sled::Tree,
    pub(super) snapshot_seq: Arc<AtomicU64>,
    /// The last applied index, for readers that wait for new entries (subscribers).
    pub(super) applied_tx: Arc<tokio::sync::watch::Sender<u64>>,
    /// The topics each apply changed, for readers that wait on some topics only.
    pub(super) changes_tx: Arc<tokio::sync::broadcast::Sender<super::Changed>>,
    /// The recent change notices, for remote readers that poll with an index
    /// ([`StateMachine::changes_since`]); never part of the replicated state.
    pub(super) ring: Arc<std::sync::Mutex<super::ChangeRing>>,
}

/// The key of the last apply's write set in the intent tree.
const INTENT_KEY: &[u8] = b"w";

/// One apply's writes: raw sled key to its new value (`None`: removed).
type WriteSet = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// An apply's write set as [`StateMachine::write`] stored it.
pub(super) fn decode_intent(bytes: &[u8]) -> Result<WriteSet, canal_proto::wire::WireError> {
    dec(bytes)
}

impl StateMachine {
    /// A read view: the state as it stands between two applies.
    pub(super) fn viewing(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        // Nothing panics while holding it; the state is whole either way.
        self.view.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Excludes readers while the state changes.
    pub(super) fn changing(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.view.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes one apply's changes atomically, for readers and across a crash.
    ///
    /// Not a sled batch: sled 0.34 writes its buffer to disk (a write and a
    /// `sync_file_range`) at the start of every batch and takes a lock exclusive across the
    /// whole process, so with dozens of groups applying at once the batches of one node
    /// serialized every group's reads and writes and cost a disk write each (measured on 64
    /// shard groups: a tenth of the disk writes and a third of the context switches
    /// without, and 1.1x to 1.6x the QoS 1 throughput, over noisy runs). Instead:
    /// - the write set goes first into the intent tree as one value (a single insert is
    ///   atomic), then each write goes to the state tree as a plain insert or remove;
    /// - sled recovers its one log (shared by every tree) up to the first write that did
    ///   not reach the disk, so after a crash the state is the last whole apply, or the
    ///   last intent with a prefix of its writes: [`StateMachine::finish_intent`] on open
    ///   writes that intent again, which is idempotent, since every write is a whole value
    ///   and nothing after the intent is recovered without it;
    /// - readers hold [`StateMachine::viewing`], so they see all of an apply or none.
    ///
    /// Not flushed, as before: the log is, and entries past the recovered applied index
    /// are applied again.
    pub(super) fn write(
        &self,
        writes: std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    ) -> Result<(), String> {
        let set: WriteSet = writes.into_iter().collect();
        let bytes = enc(&set).map_err(|e| format!("an apply's write set: {e}"))?;
        let _changing = self.changing();
        self.intent
            .insert(INTENT_KEY, bytes)
            .map_err(|e| e.to_string())?;
        self.put_all(set)
    }

    fn put_all(&self, set: WriteSet) -> Result<(), String> {
        for (k, v) in set {
            match v {
                Some(v) => self.sm.insert(k, v).map(|_| ()),
                None => self.sm.remove(k).map(|_| ()),
            }
            .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Writes the last apply's write set again, so that an apply a crash cut short is
    /// whole (see [`StateMachine::write`]). Called on open, before anything reads.
    pub(super) fn finish_intent(&self) -> Result<(), String> {
        let Some(bytes) = self.intent.get(INTENT_KEY).map_err(|e| e.to_string())? else {
            return Ok(());
        };
        let set = decode_intent(&bytes)
            .map_err(|e| format!("the last apply's write set does not decode: {e}"))?;
        let _changing = self.changing();
        self.put_all(set)
    }

    /// Forgets the last apply's write set, before the state is replaced wholesale (a
    /// snapshot installed): written again on open, it would undo part of the snapshot.
    pub(super) fn drop_intent(&self) -> Result<(), sled::Error> {
        self.intent.remove(INTENT_KEY).map(|_| ())
    }

    /// A value under a raw sled key (`m/…`), for the Raft storage traits.
    pub(super) fn read<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, SErr> {
        let _view = self.viewing();
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

    /// The bytes under a key of the data map, internal or not.
    fn raw(&self, key: &str, what: &str) -> Result<Option<Vec<u8>>, ReadError> {
        let _view = self.viewing();
        Ok(self
            .sm
            .get(data_key(key))
            .map_err(|e| ReadError::io(what, e))?
            .map(|v| v.to_vec()))
    }

    /// The value of client key `key`, as applied on this node (which may lag the leader).
    pub fn get(&self, key: &UserKey) -> Result<Option<Vec<u8>>, ReadError> {
        self.raw(key.as_str(), "a client key")
    }

    /// The bytes under any key of the data map: what a member asks the leader for with a
    /// linearizable read (a client key, or a key a [`Table`] built).
    pub(crate) fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>, ReadError> {
        self.raw(key, "a key")
    }

    /// How many keys the data map holds, client and internal ones together.
    pub fn key_count(&self) -> Result<usize, ReadError> {
        let mut n = 0;
        let _view = self.viewing();
        for item in self.sm.scan_prefix(b"d/").keys() {
            item.map_err(|e| ReadError::io("the key count", e))?;
            n += 1;
        }
        Ok(n)
    }

    /// The record of `table` named by `parts`, if there is one.
    pub fn record<S: Shape, C: Codec>(
        &self,
        table: &Table<S, C>,
        parts: S::Ref<'_>,
    ) -> Result<Option<C::Value>, ReadError> {
        let key = table.key(parts);
        match self.raw(&key, table.what())? {
            Some(b) => Ok(Some(
                table
                    .decode(&b)
                    .map_err(|e| ReadError::damaged(table.what(), &key, e))?,
            )),
            None => Ok(None),
        }
    }

    /// Every record of `table`, in key order, with the parts of its key.
    pub fn scan_table<S: Shape, C: Codec>(
        &self,
        table: &Table<S, C>,
    ) -> Result<Records<S, C>, ReadError> {
        self.scan_records(table, table.prefix(), usize::MAX)
    }

    /// Up to `limit` records of `table` whose key starts with `first` (one function's state,
    /// one topic's events) and then `tail`, in key order.
    pub fn scan_group<S: Grouped, C: Codec>(
        &self,
        table: &Table<S, C>,
        first: &str,
        tail: &str,
        limit: usize,
    ) -> Result<Records<S, C>, ReadError> {
        let prefix = format!("{}{tail}", table.prefix_of(first));
        self.scan_records(table, &prefix, limit)
    }

    /// Up to `limit` records of `table` whose key starts with `prefix` (a prefix inside the
    /// table's), decoded: a key there that is not the table's, or a value that does not
    /// decode, is an error naming it.
    fn scan_records<S: Shape, C: Codec>(
        &self,
        table: &Table<S, C>,
        prefix: &str,
        limit: usize,
    ) -> Result<Records<S, C>, ReadError> {
        let mut out = Vec::new();
        let _view = self.viewing();
        for item in self.sm.scan_prefix(data_key(prefix)) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(|e| ReadError::io(table.what(), e))?;
            let raw = String::from_utf8_lossy(&k[2..]);
            let parts = table.parse(&raw).ok_or_else(|| ReadError::ForeignKey {
                what: table.what(),
                key: raw.to_string(),
            })?;
            let value = table
                .decode(&v)
                .map_err(|e| ReadError::damaged(table.what(), &raw, e))?;
            out.push((parts, value));
        }
        Ok(out)
    }

    /// Wakes whenever entries are applied (the value is the applied index).
    pub fn watch_applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    /// Tells of the topics each later apply changes (appended to, trimmed, or moved a
    /// subscription's or trigger's cursor on). Subscribe before reading the state the
    /// notices are about, so nothing applied in between goes unnoticed.
    pub fn watch_changes(&self) -> super::ChangeWatch {
        super::ChangeWatch::new(self.changes_tx.subscribe())
    }

    /// Tells the change waiters of what an apply changed; never waits, and having no
    /// waiter is fine.
    pub(super) fn notify_changes(&self, index: u64, topics: Option<Arc<[String]>>) {
        let _ = self.changes_tx.send(super::Changed { index, topics });
    }

    pub(super) fn ring(&self) -> std::sync::MutexGuard<'_, super::ChangeRing> {
        // Nothing panics while holding it; if something did, the ring is still whole.
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The topics the applies after index `since` changed, as the ring of recent notices
    /// knows them (at most `max_topics`; more, or what the ring no longer knows, is
    /// "anything").
    pub(crate) fn changes_since(&self, since: u64, max_topics: usize) -> super::RingAnswer {
        self.ring().since(since, max_topics)
    }

    /// Up to `limit` topics with a log, in name order after `after` (from the first with
    /// `None`), and where each log starts and ends.
    pub fn topics_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, TopicMeta)>, ReadError> {
        let table = &keys::TOPIC_META;
        let prefix = data_key(table.prefix());
        let start = match after {
            Some(a) => data_key(&table.key(a)),
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        let _view = self.viewing();
        for item in self.sm.range(start.clone()..) {
            let (k, v) = item.map_err(|e| ReadError::io(table.what(), e))?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            if after.is_some() && k.as_ref() == start.as_slice() {
                continue;
            }
            let raw = String::from_utf8_lossy(&k[2..]);
            let name = table.parse(&raw).ok_or_else(|| ReadError::ForeignKey {
                what: table.what(),
                key: raw.to_string(),
            })?;
            let meta = table
                .decode(&v)
                .map_err(|e| ReadError::damaged(table.what(), &raw, e))?;
            out.push((name, meta));
        }
        Ok(out)
    }

    /// Every topic with a log, and where its log starts and ends.
    pub fn topics(&self) -> Result<Vec<(String, TopicMeta)>, ReadError> {
        self.scan_table(&keys::TOPIC_META)
    }

    /// Where one topic's log starts and ends, if the topic has one.
    pub fn topic_meta(&self, topic: &str) -> Result<Option<TopicMeta>, ReadError> {
        self.record(&keys::TOPIC_META, topic)
    }

    /// Up to `limit` events of `topic` from offset `from` on, in offset order.
    pub fn events(
        &self,
        topic: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, ReadError> {
        let table = &keys::EVENTS;
        let start = data_key(&table.key((topic, from)));
        let prefix = data_key(&table.prefix_of(topic));
        let mut out = Vec::new();
        let _view = self.viewing();
        for item in self.sm.range(start..) {
            let (k, v) = item.map_err(|e| ReadError::io(table.what(), e))?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            out.push(table.decode(&v).map_err(|e| {
                ReadError::damaged(table.what(), &String::from_utf8_lossy(&k[2..]), e)
            })?);
        }
        Ok(out)
    }

    /// The offset of the first event of `topic` accepted at or after `time_ms` (the end of
    /// the log if none was).
    pub fn offset_at(&self, topic: &str, time_ms: u64) -> Result<u64, ReadError> {
        let Some(meta) = self.topic_meta(topic)? else {
            return Ok(0);
        };
        let mut from = meta.first;
        loop {
            let batch = self.events(topic, from, 1024)?;
            let Some(last) = batch.last() else {
                return Ok(meta.next);
            };
            if let Some(e) = batch.iter().find(|e| e.time_ms >= time_ms) {
                return Ok(e.offset);
            }
            from = last.offset + 1;
        }
    }

    /// Where durable subscription `name` continues on `topic`: the offset after its last
    /// acknowledged one, if it acknowledged any.
    pub fn subscription_cursor(&self, name: &str, topic: &str) -> Result<Option<u64>, ReadError> {
        self.record(&keys::SUBSCRIPTION_CURSORS, (name, topic))
    }

    /// Where the trigger with uid `trigger_uid` continues on `topic`, if it committed
    /// anything there.
    pub fn trigger_cursor(&self, trigger_uid: &str, topic: &str) -> Result<Option<u64>, ReadError> {
        self.record(&keys::TRIGGER_CURSORS, (trigger_uid, topic))
    }

    /// Every producer with an outbox in this group (as the source), and where it stands.
    pub fn outbox_producers(
        &self,
    ) -> Result<Vec<(String, crate::functions::OutboxMeta)>, ReadError> {
        self.scan_table(&keys::OUTBOX_META)
    }

    /// Up to `limit` outbox entries of `producer` from sequence number `from` on, in
    /// sequence order, with their sequence numbers.
    pub fn outbox(
        &self,
        producer: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, crate::functions::OutboxEntry)>, ReadError> {
        let table = &keys::OUTBOX;
        let start = data_key(&table.key((producer, from)));
        let prefix = data_key(&table.prefix_of(producer));
        let mut out = Vec::new();
        let _view = self.viewing();
        for item in self.sm.range(start..) {
            let (k, v) = item.map_err(|e| ReadError::io(table.what(), e))?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            let raw = String::from_utf8_lossy(&k[2..]);
            let (_, seq) = table.parse(&raw).ok_or_else(|| ReadError::ForeignKey {
                what: table.what(),
                key: raw.to_string(),
            })?;
            out.push((
                seq,
                table
                    .decode(&v)
                    .map_err(|e| ReadError::damaged(table.what(), &raw, e))?,
            ));
        }
        Ok(out)
    }

    /// The last sequence number of `producer` delivered to this group (as the target), if
    /// any was.
    pub fn producer_seq(&self, producer: &str) -> Result<Option<u64>, ReadError> {
        self.record(&keys::PRODUCER_SEQS, producer)
    }

    /// The last log id applied on this node.
    pub fn applied(&self) -> Result<Option<LogId<NodeId>>, ReadError> {
        let _view = self.viewing();
        match self
            .sm
            .get(b"m/applied")
            .map_err(|e| ReadError::io("the applied index", e))?
        {
            Some(v) => Ok(dec::<Option<LogId<NodeId>>>(&v)
                .map_err(|e| ReadError::damaged("applied index", "m/applied", e))?),
            None => Ok(None),
        }
    }

    /// A SHA-256 digest of the key-value data, the applied request ids and the clock, in key
    /// order: equal on two nodes exactly when they hold the same state.
    pub fn digest(&self) -> Result<String, ReadError> {
        let mut h = Sha256::new();
        let _view = self.viewing();
        for item in self.sm.iter() {
            let (k, v) = item.map_err(|e| ReadError::io("the digest", e))?;
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
        let _view = self.viewing();
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
