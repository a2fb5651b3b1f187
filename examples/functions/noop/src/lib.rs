//! `noop`: does nothing and succeeds. It measures what canal itself costs per event (a fresh
//! instance, the call, the teardown): `canal bench fn` runs it.

use canal_function::{Event, Function, export};

struct Noop;

impl Function for Noop {
    fn handle(_event: Event) -> Result<(), String> {
        Ok(())
    }
}

export!(Noop);
