//! An in-memory [`Transport`] for tests: nodes of one process call each other through a
//! shared registry, so a cluster forms, elects and replicates without sockets. Removing a
//! node from the registry is a crash as far as its peers can tell: every call to it fails.
//!
//! Compiled for this crate's tests and behind the `mem-transport` feature for other crates'
//! tests; never part of a node.

use crate::groups::Consensus;
use crate::network::Transport;
use crate::types::{NodeId, RaftNode};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// The nodes of an in-memory cluster, by peer id.
#[derive(Clone, Default)]
pub struct MemNet {
    nodes: Arc<Mutex<HashMap<String, Consensus<MemTransport>>>>,
    /// Nodes cut off from the others: every call to or from them fails.
    cut: Arc<Mutex<HashSet<NodeId>>>,
    /// Requests sent, by kind (`append`, `vote`, `alive`, ...), as tests count them.
    sent: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl MemNet {
    /// The transport node `me` calls its peers with; a call carries `me` as the
    /// authenticated sender, as the mesh does.
    pub fn transport(&self, me: NodeId) -> MemTransport {
        MemTransport {
            me,
            net: self.clone(),
        }
    }

    /// Makes `node` reachable under `peer_id`.
    pub fn insert(&self, peer_id: &str, node: Consensus<MemTransport>) {
        self.lock().insert(peer_id.to_string(), node);
    }

    /// Makes `peer_id` unreachable (a crash, seen from its peers); the node, if it was there.
    pub fn remove(&self, peer_id: &str) -> Option<Consensus<MemTransport>> {
        self.lock().remove(peer_id)
    }

    /// The node reachable under `peer_id`.
    pub fn get(&self, peer_id: &str) -> Option<Consensus<MemTransport>> {
        self.lock().get(peer_id).cloned()
    }

    /// Cuts node `id` off (a partition, both ways) or, with `cut` false, heals it.
    pub fn cut(&self, id: NodeId, cut: bool) {
        let mut c = self.cut.lock().unwrap_or_else(|p| p.into_inner());
        if cut {
            c.insert(id);
        } else {
            c.remove(&id);
        }
    }

    /// How many requests of `kind` were sent so far (see [`crate::groups::Consensus::handle`]
    /// for the kinds), delivered or not.
    pub fn sent(&self, kind: &str) -> u64 {
        let s = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        s.get(kind).copied().unwrap_or(0)
    }

    fn is_cut(&self, id: NodeId) -> bool {
        self.cut
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Consensus<MemTransport>>> {
        // A test that panicked while holding the lock left the map as it was: still usable.
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A [`Transport`] over a [`MemNet`].
#[derive(Clone)]
pub struct MemTransport {
    me: NodeId,
    net: MemNet,
}

impl Transport for MemTransport {
    async fn call(&self, target: &RaftNode, body: Vec<u8>) -> Result<Vec<u8>, String> {
        let kind = crate::groups::kind_of_body(&body);
        *self
            .net
            .sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(kind.to_string())
            .or_insert(0) += 1;
        let c = self
            .net
            .get(&target.peer_id)
            .ok_or_else(|| format!("{} is not running", target.peer_id))?;
        if self.net.is_cut(self.me) || self.net.is_cut(c.node_id()) {
            return Err(format!("{} is cut off", target.peer_id));
        }
        Ok(c.handle(self.me, &body).await.answer)
    }
}
