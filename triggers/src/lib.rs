//! # canal-triggers — WebAssembly functions fired by topics
//!
//! Runs canal functions: WebAssembly components of the world in `wit/canal.wit`. It owns the
//! wasmtime engine (pooling allocator, one `InstancePre` per module, an on-disk cache of
//! compiled artifacts), the validation a module passes before it is deployed, invocation with
//! memory, time and fuel limits, the host API given to guests (publish, emit, key-value
//! state, log), and the pure rules of triggers (which trigger fires on which topic, where a
//! trigger starts, how failures back off). It never talks to the network: the node hands it
//! events and a view of the function's state, and commits what an invocation returns.
//!
//! ## Layout
//!
//! - [`runtime`]: [`Runtime`] — the engine, [`Runtime::prepare`] (validate, compile, cache),
//!   and [`Runtime::invoke`] (one event in a fresh instance, with limits).
//! - [`host`]: the imports a guest sees, buffered until the invocation succeeds.
//! - [`rules`]: trigger matching, start offsets and retry backoff, without I/O.
//!
//! ```text
//!   deploy:  bytes ─> is a component? ─> compile ─> imports satisfied? ─> `handle` export?
//!                                          └─> artifact cache (data dir) ─> InstancePre
//!   event:   InstancePre ─> fresh instance (pool) ─> handle(event) ─> Invocation {
//!                               limits: memory, epoch deadline, fuel      outputs, state
//!                                                                         changes, logs }
//! ```

pub mod host;
pub mod rules;
pub mod runtime;

pub use host::StateView;
pub use runtime::{DeployError, Failure, Invocation, Prepared, Runtime, RuntimeConfig};
