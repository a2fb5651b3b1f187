//! # canal-consensus — replication through Raft
//!
//! Will own openraft's type configuration for canal, the sled-backed Raft log store and
//! state machine, snapshots, the Raft network carried over libp2p streams, and group ids (the
//! metadata group and one data group per shard). It must not know about Wasm.
//!
//! Nothing is implemented yet: replication is the subject of the next issue, which builds on
//! the peer mesh (`canal-dht`) that exists now.
