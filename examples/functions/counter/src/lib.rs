//! `counter`: counts events per key and emits the running count. The key is the event's
//! `key` header if it has one, else the last level of its topic; the count lives in the
//! state key `count/{key}` (integer text), and the emitted payload is `{key} {count}`.
//!
//! Bind it with an output topic:
//! `canal trigger add clicks --on 'clicks/+' --fn counter --out clicks-count/all`

use canal_function::{Event, Function, emit, export, state};

struct Counter;

impl Function for Counter {
    fn handle(event: Event) -> Result<(), String> {
        let key = event.header("key").unwrap_or_else(|| event.last_level());
        let count = state::increment(&format!("count/{key}"))?;
        emit(format!("{key} {count}"), &[])
    }
}

export!(Counter);
