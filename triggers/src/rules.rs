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

/// The header that counts how many function invocations an event has passed through: an
/// output carries its input's count plus one; a publish from a client carries none (0).
pub const HOPS_HEADER: &str = "canal-hops";
/// The most hops an output may have: past this an invocation's outputs are refused (error
/// kind `limit`), so a function whose outputs fire it again cannot multiply one event
/// without end.
pub const MAX_HOPS: u32 = 16;

/// The hop count of an event with `headers`: the largest [`HOPS_HEADER`] value it carries,
/// 0 when it has none or none that is a number (what a client publishes). The largest, so
/// that a function cannot reset the count by adding a low one of its own.
pub fn hops(headers: &[(String, String)]) -> u32 {
    headers
        .iter()
        .filter(|(k, _)| k == HOPS_HEADER)
        .filter_map(|(_, v)| v.trim().parse::<u32>().ok())
        .max()
        .unwrap_or(0)
}

/// The hop count of an output of an event with `input` hops, or why it is refused: it would
/// pass [`MAX_HOPS`].
pub fn output_hops(input: u32) -> Result<u32, String> {
    match input.checked_add(1) {
        Some(n) if n <= MAX_HOPS => Ok(n),
        _ => Err(format!(
            "hops: the event has passed through {input} invocations ({HOPS_HEADER}: {input}) and an output would make {}, over the hop limit of {MAX_HOPS} (does the function publish to a topic that fires it again?)",
            input.saturating_add(1)
        )),
    }
}

/// Sets an output's hop count: drops every [`HOPS_HEADER`] the function gave and adds
/// `hops`, so only the host decides it.
pub fn set_hops(headers: &mut Vec<(String, String)>, hops: u32) {
    headers.retain(|(k, _)| k != HOPS_HEADER);
    headers.push((HOPS_HEADER.to_string(), hops.to_string()));
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

    fn hdr(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn hops_are_read_from_the_largest_header() {
        assert_eq!(hops(&[]), 0);
        assert_eq!(hops(&hdr(&[("x", "1")])), 0);
        assert_eq!(hops(&hdr(&[("canal-hops", "3")])), 3);
        assert_eq!(hops(&hdr(&[("canal-hops", "9"), ("canal-hops", "0")])), 9);
        assert_eq!(hops(&hdr(&[("canal-hops", "lots")])), 0);
        assert_eq!(hops(&hdr(&[("canal-hops", "-1"), ("canal-hops", "2")])), 2);
    }

    #[test]
    fn an_output_past_the_hop_limit_is_refused() {
        assert_eq!(output_hops(0), Ok(1));
        assert_eq!(output_hops(MAX_HOPS - 1), Ok(MAX_HOPS));
        let e = output_hops(MAX_HOPS).unwrap_err();
        assert!(
            e.contains("hop limit") && e.contains("16") && e.contains("17"),
            "{e}"
        );
        assert!(output_hops(u32::MAX).is_err());
        // A chain from a client publish makes exactly MAX_HOPS outputs.
        let mut h = 0;
        let mut outputs = 0;
        while let Ok(n) = output_hops(h) {
            h = n;
            outputs += 1;
        }
        assert_eq!(outputs, MAX_HOPS);
    }

    #[test]
    fn the_host_alone_sets_an_outputs_hops() {
        let mut h = hdr(&[("canal-hops", "0"), ("a", "b"), ("canal-hops", "1")]);
        set_hops(&mut h, 5);
        assert_eq!(h, hdr(&[("a", "b"), ("canal-hops", "5")]));
        assert_eq!(hops(&h), 5);
    }
}
