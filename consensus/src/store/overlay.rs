//! The sorted overlay of one `apply` call's writes.

use super::*;
use crate::keys::{Codec, Shape, Table};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

/// The writes of one `apply` call, on top of the tree: every read (point or range) sees the
/// call's earlier writes, so applying entries one call at a time or many per call gives the
/// same result. Written at the end of the call as one atomic write.
pub(super) struct Writes<'a> {
    tree: &'a sled::Tree,
    /// Raw sled keys (`d/…`, `r/…`, `m/…`) to their new value (`None`: removed).
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// The topics this call changed, for the change notice sent after it (not stored).
    changed: BTreeSet<String>,
}

impl<'a> Writes<'a> {
    pub(super) fn new(tree: &'a sled::Tree) -> Self {
        Writes {
            tree,
            pending: BTreeMap::new(),
            changed: BTreeSet::new(),
        }
    }

    /// Notes that this call changed `topic`'s log or a cursor on it.
    pub(super) fn touch(&mut self, topic: &str) {
        if !self.changed.contains(topic) {
            self.changed.insert(topic.to_string());
        }
    }

    /// The topics this call changed, sorted.
    pub(super) fn changed(&self) -> &BTreeSet<String> {
        &self.changed
    }

    pub(super) fn raw_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        match self.pending.get(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(self
                .tree
                .get(key)
                .map_err(|e| e.to_string())?
                .map(|v| v.to_vec())),
        }
    }

    pub(super) fn raw_set(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.pending.insert(key, value);
    }

    pub(super) fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        self.raw_get(&data_key(key))
    }

    pub(super) fn set(&mut self, key: String, value: Option<Vec<u8>>) {
        self.raw_set(data_key(&key), value);
    }

    /// The record of `table` named by `parts`, as it stands after this call's writes.
    pub(super) fn record<S: Shape, C: Codec>(
        &self,
        table: &Table<S, C>,
        parts: S::Ref<'_>,
    ) -> Result<Option<C::Value>, String> {
        let key = table.key(parts);
        match self.get(&key)? {
            Some(b) => table
                .decode(&b)
                .map(Some)
                .map_err(|e| format!("the stored {} under {key:?}: {e}", table.what())),
            None => Ok(None),
        }
    }

    /// Sets (`Some`) or removes (`None`) the record of `table` named by `parts`.
    pub(super) fn set_record<S: Shape, C: Codec>(
        &mut self,
        table: &Table<S, C>,
        parts: S::Ref<'_>,
        value: Option<&C::Value>,
    ) -> Result<(), String> {
        let bytes = match value {
            Some(v) => Some(
                table
                    .encode(v)
                    .map_err(|e| format!("a record of {}: {e}", table.what()))?,
            ),
            None => None,
        };
        self.set(table.key(parts), bytes);
        Ok(())
    }

    /// Up to `limit` raw keys in `start..end`, in order, as they stand after this call's
    /// writes so far (the tree's keys merged with the pending ones; removed ones skipped).
    pub(super) fn keys_in(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, String> {
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

    /// The call's writes, in key order: raw sled key to its new value (`None`: removed).
    pub(super) fn into_pending(self) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
        self.pending
    }
}
