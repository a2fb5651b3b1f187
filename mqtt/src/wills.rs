//! Wills of clients whose node died: every connection with a will keeps it in a replicated
//! record ([`crate::records::StoredWill`], `$will/ID`, next to the session), and each node's
//! keeper looks at those records every [`SCAN_EVERY`]. A will whose node has left the
//! node's peer table (it expires a peer not heard from for its TTL) is orphaned; the live
//! node with the lowest peer id sends it, after its Will Delay counted from when it was
//! first seen orphaned. A node that restarts sends, on its first pass, the wills its
//! previous run left. Before it sends, the keeper removes the record with a write whose
//! request id names the connection (`mqtt-will-claim/{conn}`): if two keepers try (their
//! peer tables disagreed for a moment), one write removes it and the other is a
//! duplicate, so one node sends it. The publish carries the message id `will-{conn}`, so a
//! QoS 1 will is stored once even if the connection's own node sends it too (it was
//! thought gone but was not).
//!
//! ```text
//!   CONNECT with a will ─> $will/ID = {conn, node, will}
//!   end: DISCONNECT 0 ─> removed │ abnormal ─> this node sends it, then removes it
//!   node dies ─> peers' keepers: node not live ─> lowest live node: delay, send, remove
//! ```

use crate::records::StoredWill;
use std::collections::BTreeSet;
use std::time::Duration;

/// How often each node's keeper reads the will records.
pub const SCAN_EVERY: Duration = Duration::from_secs(1);

/// What this node knows of a will record's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen<'a> {
    /// This node's peer id.
    pub me: &'a str,
    /// The peer ids of the nodes alive now, this one among them.
    pub live: &'a BTreeSet<String>,
    /// Whether this is the keeper's first pass since the node started.
    pub first_pass: bool,
    /// Whether the client has a connection (or a will waiting to be sent) on this node.
    pub here: bool,
}

/// Whether `w`'s connection is gone with its node, so the will is for the keeper to send;
/// and whether this node is the one to send it.
pub fn orphaned(w: &StoredWill, s: Seen<'_>) -> bool {
    if w.node == s.me {
        // Left by this node's previous run: no connection of this run wrote it.
        s.first_pass && !s.here
    } else {
        !s.live.contains(&w.node)
    }
}

/// Whether this node sends the orphaned will `w`: the node that left it (after a restart),
/// else the live node with the lowest peer id.
pub fn sender(w: &StoredWill, s: Seen<'_>) -> bool {
    w.node == s.me || s.live.iter().next().map(String::as_str) == Some(s.me)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn will(node: &str) -> StoredWill {
        StoredWill {
            conn: "c".into(),
            node: node.into(),
            topic: "t".into(),
            payload: b"bye".to_vec(),
            qos: 1,
            retain: false,
            user_properties: Vec::new(),
            expiry_s: None,
            delay_s: 0,
        }
    }

    #[test]
    fn a_will_is_orphaned_when_its_node_is_gone_and_sent_by_one_node() {
        let live: BTreeSet<String> = ["a", "c"].into_iter().map(String::from).collect();
        let seen = |me, first_pass, here| Seen {
            me,
            live: &live,
            first_pass,
            here,
        };
        // Its node is alive: not orphaned, wherever it is looked at.
        assert!(!orphaned(&will("c"), seen("a", false, false)));
        // Its node is gone: orphaned, and only the lowest live node sends it.
        let gone = will("b");
        assert!(orphaned(&gone, seen("a", false, false)));
        assert!(orphaned(&gone, seen("c", false, false)));
        assert!(sender(&gone, seen("a", false, false)));
        assert!(!sender(&gone, seen("c", false, false)));
        // This node's own: only what a previous run left, on the first pass.
        let mine = will("c");
        assert!(orphaned(&mine, seen("c", true, false)));
        assert!(
            !orphaned(&mine, seen("c", true, true)),
            "connected here now"
        );
        assert!(!orphaned(&mine, seen("c", false, false)), "this run's");
        assert!(
            sender(&mine, seen("c", true, false)),
            "the node that left it"
        );
    }
}
