//! Ids this node makes: for requests (so that retries are recognised), triggers and events
//! of invocations by hand.

/// An id no other of any node has: the peer id (base58), the time in nanoseconds and a
/// sequence number of this process (one sequence with the ids canal-pubsub makes for
/// publishes).
pub fn fresh_id(peer_id: &str) -> String {
    canal_pubsub::fresh_id(peer_id)
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
