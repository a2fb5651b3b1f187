//! The wall clock, for the few places that stamp or age things for people.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch by this machine's wall clock: 0 before the epoch,
/// `u64::MAX` past what fits (saturating, never panicking).
///
/// Never used inside a state machine: replicas must apply the same entries to the same
/// state, and two machines' clocks differ. Consensus has its own clock for that.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// An id no other of any node has, for requests (so that retries are recognised), triggers
/// and events a node makes: `local` (its peer id), the time in nanoseconds and a sequence
/// number of this process.
pub fn fresh_id(local: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{local}-{nanos}-{}", SEQ.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_name_their_peer() {
        let a = fresh_id("P");
        let b = fresh_id("P");
        assert_ne!(a, b);
        assert!(a.starts_with("P-") && a.split('-').count() == 3, "{a}");
    }

    #[test]
    fn the_clock_is_after_2020_and_does_not_run_backwards_by_much() {
        let a = now_ms();
        // 2020-01-01T00:00:00Z: a clock before it is broken, not saturated.
        assert!(a > 1_577_836_800_000, "{a}");
        assert!(now_ms() + 1_000 >= a);
    }
}
