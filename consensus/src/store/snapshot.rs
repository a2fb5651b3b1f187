//! Snapshots: what they hold, how they are built, stored and installed.

use super::state::StateMachine;
use super::*;
use crate::types::{NodeId, RaftNode, Response, TypeConfig};
use openraft::storage::Snapshot;
use openraft::{LogId, RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership};
use serde::Deserialize;
use std::fmt::Debug;
use std::io::Cursor;
use std::sync::atomic::Ordering;

/// The contents of a snapshot.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct SnapshotData {
    pub(super) data: Vec<(String, Vec<u8>)>,
    pub(super) requests: Vec<(String, Response)>,
    /// The state machine's clock, as stored under [`CLOCK_KEY`].
    pub(super) clock: u64,
}

/// Decodes a snapshot's data, whatever its size, with no claim past its own length.
pub(super) fn decode_snapshot(bytes: &[u8]) -> Result<SnapshotData, wire::WireError> {
    dec(bytes)
}

/// The state, its applied log id and its membership, copied for a snapshot.
pub(super) type StateCopy = (
    SnapshotData,
    Option<LogId<NodeId>>,
    StoredMembership<NodeId, RaftNode>,
);

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

pub(super) async fn store_snapshot(
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
    super::flush(&sm.sm).await.map_err(|e| err(any(&e)))?;
    super::flush(&sm.snap).await.map_err(|e| err(any(&e)))?;
    Ok(())
}

/// A builder holding a copy of the state as it is now.
pub(super) fn builder(sm: &StateMachine) -> SnapshotBuilder {
    let copy = (|| {
        let data = sm.snapshot_data()?;
        let applied = sm.applied()?;
        let membership = sm.read(b"m/membership")?.unwrap_or_default();
        Ok((data, applied, membership))
    })();
    SnapshotBuilder {
        sm: sm.clone(),
        copy,
    }
}

/// Replaces the state machine's contents with a received snapshot's, then keeps the snapshot
/// as the current one.
pub(super) async fn install(
    sm: &StateMachine,
    meta: &SnapshotMeta<NodeId, RaftNode>,
    bytes: Vec<u8>,
) -> Result<(), SErr> {
    let err = |e: openraft::AnyError| StorageIOError::read_snapshot(Some(meta.signature()), e);
    let data = decode_snapshot(&bytes).map_err(|e| err(any(&e)))?;
    // The last apply's write set goes first: written again on open after the snapshot, it
    // would undo part of it; everything it wrote is recovered before its removal.
    sm.drop_intent().map_err(|e| err(any(&e)))?;
    let changing = sm.changing();
    let mut batch = sled::Batch::default();
    for item in sm.sm.iter() {
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
    sm.sm.apply_batch(batch).map_err(|e| err(any(&e)))?;
    drop(changing);
    store_snapshot(sm, meta, &bytes).await?;
    if let Some(l) = meta.last_log_id {
        sm.ring().reset(l.index);
        sm.applied_tx.send_replace(l.index);
        sm.notify_changes(l.index, None);
    }
    Ok(())
}

/// The snapshot stored last, if any.
pub(super) fn current(sm: &StateMachine) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
    let rerr = |e: openraft::AnyError| StorageIOError::read_snapshot(None, e);
    let meta = sm.snap.get("meta").map_err(|e| rerr(any(&e)))?;
    let data = sm.snap.get("data").map_err(|e| rerr(any(&e)))?;
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
