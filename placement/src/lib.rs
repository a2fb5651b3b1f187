//! # canal-placement — where functions and replicas run, and why
//!
//! Will be pure policy, with no I/O: from a function's or shard's requirements, the table of
//! peer capabilities and load, and topology facts (Kademlia distance, round-trip times), it
//! computes a decision (an ordered set of peers) and an explanation for every candidate.
//!
//! Until it exists, the `topology` policy — the K peers closest to a shard's key, computed in
//! `canal-dht` — is the only one, and `canal topic locate` says so.
