//! The Kademlia keyspace of the topic space, as pure functions: topic name -> key -> shard,
//! a shard's key, and the XOR distance that says which peers are closest to it.
//!
//! One definition for every crate: the DHT (`canal_dht::topology`) computes homes with these,
//! and the placement crate's shard map prefers the same peers. A peer's key is the SHA-256 of
//! its peer id's bytes, as libp2p's Kademlia computes it; `canal_dht::topology::peer_key`
//! computes it from a `PeerId` (and is tested to agree with [`peer_key_of_bytes`]).

use crate::Topic;
use sha2::{Digest, Sha256};

/// A 256-bit key in the Kademlia keyspace.
pub type Key = [u8; 32];

/// The default number of shards in the topic space.
pub const DEFAULT_SHARDS: u32 = 64;
/// The default replication factor K: how many home peers (replicas) each shard has.
pub const DEFAULT_REPLICATION: usize = 3;

/// The key of a topic: SHA-256 of its name.
pub fn topic_key(topic: &Topic) -> Key {
    topic_name_key(topic.as_str())
}

/// [`topic_key`] of a topic name already checked elsewhere (as stored in a log).
pub fn topic_name_key(topic: &str) -> Key {
    Sha256::digest(topic.as_bytes()).into()
}

/// The key of a named thing that is no topic (`kind` such as `subscription`): SHA-256 of
/// `canal/{kind}/v1/{name}`, so a subscription and a topic of one name fall apart.
pub fn name_key(kind: &str, name: &str) -> Key {
    Sha256::digest(format!("canal/{kind}/v1/{name}").as_bytes()).into()
}

/// The shard a key falls in, for a topic space of `shards` shards: the key's first eight
/// bytes, big-endian, modulo the shard count (0 reads as 1).
pub fn shard_of(key: &Key, shards: u32) -> u32 {
    let mut head = [0u8; 8];
    head.copy_from_slice(&key[..8]);
    (u64::from_be_bytes(head) % u64::from(shards.max(1))) as u32
}

/// The key of a shard: SHA-256 of `canal/shard/v1/{shard}`.
pub fn shard_key(shard: u32) -> Key {
    Sha256::digest(format!("canal/shard/v1/{shard}").as_bytes()).into()
}

/// The Kademlia key of a peer from its peer id's bytes (`PeerId::to_bytes`): their SHA-256.
pub fn peer_key_of_bytes(peer_id_bytes: &[u8]) -> Key {
    Sha256::digest(peer_id_bytes).into()
}

/// The XOR distance between two keys; comparing the arrays compares the distances.
pub fn distance(a: &Key, b: &Key) -> Key {
    let mut out = [0u8; 32];
    for (o, (x, y)) in out.iter_mut().zip(a.iter().zip(b.iter())) {
        *o = x ^ y;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_keys_and_shards_are_pinned() {
        // A change to either mapping moves every topic, so it must be noticed.
        assert_eq!(
            hex::encode(shard_key(0)),
            hex::encode(Sha256::digest(b"canal/shard/v1/0"))
        );
        let mut key = [0u8; 32];
        key[7] = 65;
        assert_eq!(shard_of(&key, 64), 1);
        assert_eq!(shard_of(&key, 0), 0);
        assert_eq!(distance(&key, &key), [0u8; 32]);
        assert_eq!(distance(&key, &[0u8; 32]), key);
    }
}
