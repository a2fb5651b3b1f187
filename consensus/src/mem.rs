//! An in-memory [`Transport`] for tests: nodes of one process call each other through a
//! shared registry, so a cluster forms, elects and replicates without sockets. Removing a
//! node from the registry is a crash as far as its peers can tell: every call to it fails.
//!
//! Compiled for this crate's tests and behind the `mem-transport` feature for other crates'
//! tests; never part of a node.

use crate::groups::Consensus;
use crate::network::Transport;
use crate::types::{NodeId, RaftNode};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The nodes of an in-memory cluster, by peer id.
#[derive(Clone, Default)]
pub struct MemNet {
    nodes: Arc<Mutex<HashMap<String, Consensus<MemTransport>>>>,
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
        let c = self
            .net
            .get(&target.peer_id)
            .ok_or_else(|| format!("{} is not running", target.peer_id))?;
        Ok(c.handle(self.me, &body).await.answer)
    }
}
