//! Ids this node makes: for requests (so that retries are recognised), triggers and events
//! of invocations by hand.

use std::sync::atomic::{AtomicU64, Ordering};

static SEQ: AtomicU64 = AtomicU64::new(0);

/// An id no other of any node has: the peer id (base58), the time in nanoseconds and a
/// sequence number of this process.
pub fn fresh_id(peer_id: &str) -> String {
    format!(
        "{peer_id}-{}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
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
}
