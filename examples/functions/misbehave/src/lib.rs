//! `misbehave`: a function that misbehaves on request, for testing how canal contains its
//! guests. The payload picks what it does:
//!
//! - `loop`: spins forever (the host's fuel or time limit must stop it);
//! - `grow`: allocates 1 MiB after 1 MiB without end (the memory limit must stop it);
//! - `trap`: traps (`unreachable`);
//! - `err`: returns `Err("asked to fail")`;
//! - `publish:TOPIC`: publishes `x` to `TOPIC` and succeeds;
//! - `republish`: publishes the event, headers and all, back to its own topic (a loop that
//!   only the hop limit stops);
//! - `spam:N:SIZE`: emits N outputs of SIZE bytes each, ignoring errors, and succeeds (the
//!   output limits must stop it);
//! - `state:N:SIZE`: writes N state keys of SIZE bytes each, ignoring errors, and succeeds
//!   (the state limit must stop it);
//! - `ok` or anything else: emits the payload back unchanged and succeeds.
//!
//! Bind it like any function, e.g. `canal trigger add abuse --on 'test/abuse' --fn misbehave
//! --out test/abuse-out`, or call it directly with `canal fn invoke`.

use canal_function::{Event, Function, emit, export, publish, state};
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
            b"republish" => publish(&event.topic, &event.payload, &event.headers),
            payload => {
                if let Some(topic) = payload.strip_prefix(b"publish:") {
                    let topic = std::str::from_utf8(topic).map_err(|_| "topic is not UTF-8")?;
                    return publish(topic, "x", &[]);
                }
                if let Some(args) = payload.strip_prefix(b"spam:") {
                    let (n, size) = count_and_size(args)?;
                    let chunk = vec![b'x'; size];
                    for _ in 0..n {
                        // Ignored on purpose: the host must stop this guest, not trust it.
                        let _ = emit(&chunk, &[]);
                    }
                    return Ok(());
                }
                if let Some(args) = payload.strip_prefix(b"state:") {
                    let (n, size) = count_and_size(args)?;
                    let value = vec![b'v'; size];
                    for i in 0..n {
                        let _ = state::set(&format!("k{i}"), &value);
                    }
                    return Ok(());
                }
                emit(&event.payload, &event.headers)
            }
        }
    }
}

/// Reads `N:SIZE`.
fn count_and_size(args: &[u8]) -> Result<(u64, usize), String> {
    let text = std::str::from_utf8(args).map_err(|_| "arguments are not UTF-8")?;
    let (n, size) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?}: expected N:SIZE"))?;
    let n = n.parse().map_err(|_| format!("{n:?} is not a count"))?;
    let size = size.parse().map_err(|_| format!("{size:?} is not a size"))?;
    Ok((n, size))
}

export!(Misbehave);
