//! `uppercase`: emits each event's payload in upper case to the trigger's output topic,
//! with the event's headers. A payload that is not UTF-8 text fails the invocation.
//!
//! Bind it with an output topic:
//! `canal trigger add shout --on 'chat/#' --fn uppercase --out chat-loud/all`

use canal_function::{Event, Function, emit, export};

struct Uppercase;

impl Function for Uppercase {
    fn handle(event: Event) -> Result<(), String> {
        emit(event.text()?.to_uppercase(), &event.headers)
    }
}

export!(Uppercase);
