//! The peer table: the latest capability record of every peer known alive.
//!
//! Pure state, driven by the swarm loop: records in (with the time they arrived), expiry by
//! time. A record only replaces an older one of the same peer (higher `seq`), so a record
//! that arrives late over a longer gossip path never rolls a peer's state back. A peer whose
//! record has not been refreshed for the TTL is gone.

use canal_proto::Capabilities;
use libp2p::PeerId;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// One peer as this node knows it.
#[derive(Debug, Clone)]
pub struct PeerEntry {
    /// The peer's latest record.
    pub caps: Capabilities,
    /// When this node received that record (or a refresh of it).
    pub last_seen: Instant,
}

/// What [`PeerTable::apply`] did with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The peer was not in the table (new, or back after it was gone).
    Joined,
    /// The record replaced an older one.
    Updated,
    /// The record was no newer than the one held, and was dropped.
    Stale,
}

/// The latest record of each live peer, keyed by peer id.
#[derive(Debug, Default)]
pub struct PeerTable {
    entries: BTreeMap<PeerId, PeerEntry>,
}

impl PeerTable {
    /// Takes `caps` as `peer`'s record, received at `now`.
    pub fn apply(&mut self, peer: PeerId, caps: Capabilities, now: Instant) -> Applied {
        match self.entries.get_mut(&peer) {
            // Newer by measurement time, then by seq: a restarted peer counts seq from 1 again,
            // and a late record of its previous run must not replace the new run's.
            Some(e) if (caps.measured_at_ms, caps.seq) > (e.caps.measured_at_ms, e.caps.seq) => {
                e.caps = caps;
                e.last_seen = now;
                Applied::Updated
            }
            Some(_) => Applied::Stale,
            None => {
                self.entries.insert(
                    peer,
                    PeerEntry {
                        caps,
                        last_seen: now,
                    },
                );
                Applied::Joined
            }
        }
    }

    /// Drops the peers not heard from within `ttl` before `now`, and returns them.
    pub fn expire(&mut self, now: Instant, ttl: Duration) -> Vec<PeerId> {
        let gone: Vec<PeerId> = self
            .entries
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.last_seen) > ttl)
            .map(|(p, _)| *p)
            .collect();
        for p in &gone {
            self.entries.remove(p);
        }
        gone
    }

    /// The live peers, in peer id order.
    pub fn iter(&self) -> impl Iterator<Item = (&PeerId, &PeerEntry)> {
        self.entries.iter()
    }

    /// The live peer ids.
    pub fn ids(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.entries.keys().copied()
    }

    /// How many peers are live.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no peer is live.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// One peer's entry.
    pub fn get(&self, peer: &PeerId) -> Option<&PeerEntry> {
        self.entries.get(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use canal_proto::Load;

    fn caps(seq: u64, at: u64) -> Capabilities {
        Capabilities {
            peer_id: String::new(),
            version: "0".into(),
            listen_addrs: vec![],
            api_addr: None,
            mqtt_addr: None,
            tier: "edge".into(),
            labels: Default::default(),
            cpu_cores: 1,
            memory_total_bytes: 1,
            memory_available_bytes: 1,
            gpus_detected: vec![],
            gpus_declared: vec![],
            load: Load::default(),
            raft_member: false,
            forms_cluster: false,
            interest: Vec::new(),
            seq,
            measured_at_ms: at,
        }
    }

    #[test]
    fn newer_records_win_and_stale_ones_are_dropped() {
        let mut t = PeerTable::default();
        let p = PeerId::random();
        let now = Instant::now();
        assert_eq!(t.apply(p, caps(1, 10), now), Applied::Joined);
        assert_eq!(t.apply(p, caps(2, 20), now), Applied::Updated);
        assert_eq!(t.apply(p, caps(1, 10), now), Applied::Stale);
        assert_eq!(t.get(&p).map(|e| e.caps.seq), Some(2));
        // A restarted peer: seq starts over, but its measurement is newer.
        assert_eq!(t.apply(p, caps(1, 30), now), Applied::Updated);
        // A late record of the previous run (higher seq, older time) does not win.
        assert_eq!(t.apply(p, caps(5, 25), now), Applied::Stale);
    }

    #[test]
    fn silent_peers_expire_after_the_ttl() {
        let mut t = PeerTable::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        t.apply(a, caps(1, 1), t0);
        t.apply(b, caps(1, 1), t0 + Duration::from_secs(5));
        assert!(
            t.expire(t0 + Duration::from_secs(10), Duration::from_secs(10))
                .is_empty()
        );
        assert_eq!(
            t.expire(t0 + Duration::from_secs(11), Duration::from_secs(10)),
            vec![a]
        );
        assert_eq!(t.ids().collect::<Vec<_>>(), vec![b]);
        assert_eq!(
            t.expire(t0 + Duration::from_secs(16), Duration::from_secs(10)),
            vec![b]
        );
        assert!(t.is_empty());
    }
}
