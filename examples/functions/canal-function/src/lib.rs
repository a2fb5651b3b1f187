//! Write canal functions in a few lines.
//!
//! A canal function is a WebAssembly component that handles one event at a time (see
//! `wit/canal.wit` at the root of the repository). With this crate a function is a type that
//! implements [`Function`], exported once with [`export!`]:
//!
//! ```ignore
//! use canal_function::{Event, Function, emit, export};
//!
//! struct Echo;
//!
//! impl Function for Echo {
//!     fn handle(event: Event) -> Result<(), String> {
//!         emit(&event.payload, &event.headers)
//!     }
//! }
//!
//! export!(Echo);
//! ```
//!
//! Build it as a `cdylib` with `cargo build --target wasm32-wasip2 --release`. Whatever the
//! function publishes, emits or writes to its state takes effect only if `handle` returns `Ok`.

#![warn(missing_docs)]

// Lets the generated bindings name this crate by the same path from inside and outside it.
extern crate self as canal_function;

#[doc(hidden)]
pub mod __private {
    pub use wit_bindgen;
}

/// The bindings `wit-bindgen` generates for the `canal:functions/handler` world.
#[allow(clippy::too_many_arguments)]
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../../wit",
        world: "handler",
        pub_export_macro: true,
        export_macro_name: "__export_handler",
        default_bindings_module: "canal_function::bindings",
        runtime_path: "canal_function::__private::wit_bindgen::rt",
    });
}

use bindings::canal::functions::{host, state as wit_state};

/// One event, as the trigger delivers it: its topic, id, offset, time, headers and payload.
pub use bindings::canal::functions::types::Event;

/// The header list that [`publish`] and [`emit`] take, the same shape as [`Event::headers`].
pub type Headers = [(String, String)];

/// A canal function: implement it on a type and pass that type to [`export!`].
pub trait Function {
    /// Handles one event: `Ok` commits what the function did, `Err` discards it and the
    /// trigger retries the event, then sends it to the dead-letter topic.
    fn handle(event: Event) -> Result<(), String>;
}

impl<T: Function> bindings::Guest for T {
    fn handle(event: Event) -> Result<(), String> {
        T::handle(event)
    }
}

/// Exports a type that implements [`Function`] as the component's `handle`; call it once.
#[macro_export]
macro_rules! export {
    ($ty:ident) => {
        $crate::bindings::__export_handler!($ty with_types_in $crate::bindings);
    };
}

impl Event {
    /// The value of the first header named `name` (names are case-sensitive), if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The payload as UTF-8 text, or `Err("payload is not UTF-8 text")`.
    pub fn text(&self) -> Result<&str, String> {
        std::str::from_utf8(&self.payload).map_err(|_| "payload is not UTF-8 text".to_string())
    }

    /// The last level of the topic (`temp` for `sensors/room1/temp`).
    pub fn last_level(&self) -> &str {
        self.topic.rsplit('/').next().unwrap_or("")
    }
}

/// Publishes `payload` to `topic` (no wildcards) if the invocation succeeds; fails at once
/// if the topic is not valid or a limit is reached.
pub fn publish(topic: &str, payload: impl AsRef<[u8]>, headers: &Headers) -> Result<(), String> {
    host::publish(topic, payload.as_ref(), headers)
}

/// Publishes `payload` to the trigger's output topic (`--out`) if the invocation succeeds;
/// fails if the trigger has no output topic.
pub fn emit(payload: impl AsRef<[u8]>, headers: &Headers) -> Result<(), String> {
    host::emit(payload.as_ref(), headers)
}

/// Writing to the function's log (shown by `canal fn invoke` and the node's log).
pub mod log {
    use super::host;

    /// How much a log line matters, from `Trace` to `Error`.
    pub use super::bindings::canal::functions::types::Level;

    /// Writes `message` to the function's log at `level`.
    pub fn log(level: Level, message: &str) {
        host::log(level, message)
    }

    /// Writes `message` to the function's log at trace level.
    pub fn trace(message: &str) {
        host::log(Level::Trace, message)
    }

    /// Writes `message` to the function's log at debug level.
    pub fn debug(message: &str) {
        host::log(Level::Debug, message)
    }

    /// Writes `message` to the function's log at info level.
    pub fn info(message: &str) {
        host::log(Level::Info, message)
    }

    /// Writes `message` to the function's log at warn level.
    pub fn warn(message: &str) {
        host::log(Level::Warn, message)
    }

    /// Writes `message` to the function's log at error level.
    pub fn error(message: &str) {
        host::log(Level::Error, message)
    }
}

/// The function's own key-value state, replicated with the cluster. Reads see the
/// invocation's earlier writes; writes take effect only if the invocation succeeds.
///
/// The typed helpers store values as text, so `canal state get` shows them readably.
pub mod state {
    use super::wit_state;

    /// The value of `key`, if it has one.
    pub fn get(key: &str) -> Option<Vec<u8>> {
        wit_state::get(key)
    }

    /// Sets `key` to `value`; fails if the key or value is over its limit.
    pub fn set(key: &str, value: impl AsRef<[u8]>) -> Result<(), String> {
        wit_state::set(key, value.as_ref())
    }

    /// Removes `key`.
    pub fn delete(key: &str) {
        wit_state::delete(key)
    }

    /// The keys that start with `prefix`, in order.
    pub fn list(prefix: &str) -> Vec<String> {
        wit_state::list(prefix)
    }

    /// The value of `key` as UTF-8 text; `None` if it has none or it is not UTF-8.
    pub fn get_string(key: &str) -> Option<String> {
        get(key).and_then(|v| String::from_utf8(v).ok())
    }

    /// Sets `key` to the text `value`.
    pub fn set_string(key: &str, value: &str) -> Result<(), String> {
        set(key, value)
    }

    /// The value of `key` parsed as a decimal number; `None` if it has none or it is not one.
    pub fn get_f64(key: &str) -> Option<f64> {
        get_string(key).and_then(|s| s.trim().parse().ok())
    }

    /// Sets `key` to `value` written as decimal text (`21.5`).
    pub fn set_f64(key: &str, value: f64) -> Result<(), String> {
        set(key, value.to_string())
    }

    /// The value of `key` parsed as an unsigned integer; `None` if it has none or it is not one.
    pub fn get_u64(key: &str) -> Option<u64> {
        get_string(key).and_then(|s| s.trim().parse().ok())
    }

    /// Sets `key` to `value` written as integer text (`42`).
    pub fn set_u64(key: &str, value: u64) -> Result<(), String> {
        set(key, value.to_string())
    }

    /// Adds one to the integer text at `key` (absent counts as 0) and returns the new count;
    /// fails if the value there is not an unsigned integer.
    pub fn increment(key: &str) -> Result<u64, String> {
        let count = match get(key) {
            None => 0,
            Some(bytes) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    let held = String::from_utf8_lossy(&bytes);
                    format!("state key {key:?} holds {held:?}, not a count")
                })?,
        };
        let count = count.saturating_add(1);
        set_u64(key, count)?;
        Ok(count)
    }
}
