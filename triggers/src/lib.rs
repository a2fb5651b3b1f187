//! # canal-triggers — WebAssembly functions fired by topics
//!
//! Will own the wasmtime engine (pooling allocator, `InstancePre`, on-disk compile cache),
//! the module store, trigger matching, invocation with memory, time and fuel limits, and the
//! host API given to guest functions (publish, key-value state, log). It must not talk to the
//! network directly.
//!
//! Nothing is implemented yet: functions and triggers build on replication and pub/sub.
