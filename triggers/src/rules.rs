//! The rules of triggers, without I/O: which triggers an event fires, where a trigger's
//! cursor starts on a topic, how far one batch reaches, and how failures back off.

use canal_proto::Topic;
use canal_proto::function::TriggerSpec;
use std::time::Duration;

/// The triggers of QoS `qos` whose filter matches `topic`, in the order given.
pub fn matching<'a>(triggers: &'a [TriggerSpec], topic: &Topic, qos: u8) -> Vec<&'a TriggerSpec> {
    triggers
        .iter()
        .filter(|t| t.qos == qos && t.filter.matches(topic))
        .collect()
}

/// Where a trigger's cursor stands on a topic whose log holds offsets `first..next`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    /// The next offset to process.
    pub offset: u64,
    /// Offsets dropped by retention before the trigger read them (`from..to`), if any.
    pub skipped: Option<(u64, u64)>,
}

/// The next offset a trigger processes on a topic: after its committed cursor if it has
/// one, else the first event accepted at or after the trigger's creation (`created_at`, the
/// answer of an offset-by-time lookup). A cursor behind the oldest stored event means
/// retention dropped events before the trigger saw them; that gap is reported.
pub fn start(stored: Option<u64>, first: u64, next: u64, created_at: u64) -> Start {
    match stored {
        Some(c) if c < first => Start {
            offset: first,
            skipped: Some((c, first)),
        },
        Some(c) => Start {
            offset: c.min(next),
            skipped: None,
        },
        None => Start {
            offset: created_at.clamp(first, next),
            skipped: None,
        },
    }
}

/// The end (exclusive) of the batch that starts at `cursor`: at most `max` events, never
/// past `next`.
pub fn batch_end(cursor: u64, next: u64, max: u64) -> u64 {
    next.min(cursor.saturating_add(max.max(1)))
}

/// How long to wait before retry number `attempt` (1-based) of a failing event: 10 ms,
/// doubling, at most 2 s.
pub fn backoff(attempt: u32) -> Duration {
    let ms = 10u64.saturating_mul(1u64 << attempt.saturating_sub(1).min(16));
    Duration::from_millis(ms.min(2_000))
}

/// The id of the `n`th output of the event at `offset` of `topic` processed by trigger
/// `uid`: the same on every re-run, so a re-run cannot mint a second, different event.
pub fn output_id(trigger_uid: &str, topic: &str, offset: u64, n: usize) -> String {
    format!("{trigger_uid}/{topic}/{offset}/{n}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use canal_proto::TopicFilter;
    use proptest::prelude::*;

    fn trig(name: &str, filter: &str, qos: u8) -> TriggerSpec {
        TriggerSpec {
            name: name.into(),
            uid: name.into(),
            filter: TopicFilter::new(filter).unwrap(),
            function: "f".into(),
            out: None,
            qos,
            retries: 0,
            dead_letter: None,
            created_ms: 0,
        }
    }

    #[test]
    fn matching_takes_the_filter_and_the_qos() {
        let ts = vec![
            trig("a", "sensors/+/temp", 1),
            trig("b", "sensors/#", 1),
            trig("c", "sensors/#", 0),
            trig("d", "other/#", 1),
        ];
        let t = Topic::new("sensors/r1/temp").unwrap();
        let names: Vec<_> = matching(&ts, &t, 1).iter().map(|t| &t.name).collect();
        assert_eq!(names, ["a", "b"]);
        let names: Vec<_> = matching(&ts, &t, 0).iter().map(|t| &t.name).collect();
        assert_eq!(names, ["c"]);
    }

    #[test]
    fn start_examples() {
        // A new trigger starts at its creation.
        assert_eq!(start(None, 0, 10, 4).offset, 4);
        // A cursor continues, clamped to the end.
        assert_eq!(start(Some(7), 0, 10, 0).offset, 7);
        assert_eq!(start(Some(12), 0, 10, 0).offset, 10);
        // Retention ran ahead of the cursor: the gap is said.
        assert_eq!(
            start(Some(3), 5, 10, 0),
            Start {
                offset: 5,
                skipped: Some((3, 5))
            }
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(10));
        assert_eq!(backoff(2), Duration::from_millis(20));
        assert_eq!(backoff(100), Duration::from_secs(2));
    }

    proptest! {
        #[test]
        fn start_is_within_the_log(stored in proptest::option::of(0u64..100), first in 0u64..50,
                                   len in 0u64..50, created in 0u64..120) {
            let next = first + len;
            let s = start(stored, first, next, created);
            prop_assert!(s.offset >= first && s.offset <= next);
            if let Some(c) = stored && c >= first {
                prop_assert_eq!(s.offset, c.min(next));
            }
        }

        #[test]
        fn batches_cover_the_log_without_overlap(first in 0u64..50, len in 0u64..200, max in 1u64..70) {
            let next = first + len;
            let mut c = first;
            let mut seen = 0;
            while c < next {
                let end = batch_end(c, next, max);
                prop_assert!(end > c && end - c <= max);
                seen += end - c;
                c = end;
            }
            prop_assert_eq!(seen, len);
        }

        #[test]
        fn backoff_never_shrinks(a in 1u32..40) {
            prop_assert!(backoff(a + 1) >= backoff(a));
        }
    }
}
