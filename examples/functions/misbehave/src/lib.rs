//! `misbehave`: a function that misbehaves on request, for testing how canal contains its
//! guests. The payload picks what it does:
//!
//! - `loop`: spins forever (the host's fuel or time limit must stop it);
//! - `grow`: allocates 1 MiB after 1 MiB without end (the memory limit must stop it);
//! - `trap`: traps (`unreachable`);
//! - `err`: returns `Err("asked to fail")`;
//! - `publish:TOPIC`: publishes `x` to `TOPIC` and succeeds;
//! - `ok` or anything else: emits the payload back unchanged and succeeds.
//!
//! Bind it like any function, e.g. `canal trigger add abuse --on 'test/abuse' --fn misbehave
//! --out test/abuse-out`, or call it directly with `canal fn invoke`.

use canal_function::{Event, Function, emit, export, publish};
use std::hint::black_box;

struct Misbehave;

impl Function for Misbehave {
    fn handle(event: Event) -> Result<(), String> {
        match event.payload.as_slice() {
            b"loop" => {
                let mut n: u64 = 0;
                loop {
                    // black_box keeps the optimiser from proving the loop does nothing.
                    n = black_box(n.wrapping_add(1));
                }
            }
            b"grow" => {
                let mut chunks: Vec<Vec<u8>> = Vec::new();
                loop {
                    // Touching every page makes the memory real, not just reserved.
                    let chunk = vec![chunks.len() as u8 | 1; 1 << 20];
                    chunks.push(black_box(chunk));
                }
            }
            b"trap" => std::process::abort(),
            b"err" => Err("asked to fail".into()),
            payload => match payload.strip_prefix(b"publish:") {
                Some(topic) => {
                    let topic = std::str::from_utf8(topic).map_err(|_| "topic is not UTF-8")?;
                    publish(topic, "x", &[])
                }
                None => emit(&event.payload, &event.headers),
            },
        }
    }
}

export!(Misbehave);
