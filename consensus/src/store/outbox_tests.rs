//! The outbox and the idempotent producer: effects keep other groups' outputs in their
//! group's outbox with sequence numbers the apply assigns; a delivery applies each sequence
//! number once and in order; a trim never passes what was handed out. The property test
//! drives a model relay (deliveries, duplicates, reorders, lost answers, restarts) over two
//! state machines and checks that every output lands exactly once, in sequence order.

use super::*;
use crate::functions::{CursorMove, Effects, MAX_OUTBOX_ENTRIES, Outbound, OutboxMeta};
use crate::topics::PublishOp;
use crate::types::{GroupId, Op, Request, Response};
use openraft::storage::RaftStateMachine;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use std::sync::atomic::{AtomicUsize, Ordering};

const SOURCE: GroupId = GroupId(1);
const TARGET: GroupId = GroupId(2);

/// Two groups' state machines in one database, each with its own log index.
struct Two {
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    src: StateMachine,
    dst: StateMachine,
    src_index: u64,
    dst_index: u64,
}

impl Two {
    fn new() -> Two {
        let dir = tempfile::tempdir().unwrap();
        let db = RaftDb::open(&dir.path().join("raft")).unwrap();
        let (_, src) = db.group(SOURCE).unwrap();
        let (_, dst) = db.group(TARGET).unwrap();
        Two {
            _dir: dir,
            rt: tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap(),
            src,
            dst,
            src_index: 0,
            dst_index: 0,
        }
    }

    fn on_src(&mut self, op: Op) -> Response {
        self.src_index += 1;
        let e = super::tests::entry_at(self.src_index, 1000, Request { id: None, op });
        self.rt.block_on(self.src.apply(vec![e])).unwrap().remove(0)
    }

    fn on_dst(&mut self, op: Op) -> Response {
        self.dst_index += 1;
        let e = super::tests::entry_at(self.dst_index, 1000, Request { id: None, op });
        self.rt.block_on(self.dst.apply(vec![e])).unwrap().remove(0)
    }

    fn meta(&self) -> OutboxMeta {
        self.src
            .outbox_producers()
            .unwrap()
            .into_iter()
            .find(|(p, _)| p == &producer())
            .map(|(_, m)| m)
            .unwrap_or_default()
    }

    /// The payloads of `topic` in the target, in offset order.
    fn delivered(&self, topic: &str) -> Vec<Vec<u8>> {
        self.dst
            .events(topic, 0, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|e| e.payload)
            .collect()
    }
}

fn producer() -> String {
    crate::functions::producer_id(SOURCE, "f", TARGET)
}

fn event(topic: &str, payload: Vec<u8>) -> PublishOp {
    PublishOp {
        topic: topic.into(),
        id: None,
        headers: Vec::new(),
        payload,
        retention: Default::default(),
    }
}

fn effects(cursor: Option<(Option<u64>, u64)>, outbox: Vec<PublishOp>) -> Op {
    Op::Effects(Effects {
        function: "f".into(),
        cursors: cursor
            .map(|(expected, next)| CursorMove {
                trigger_uid: "u".into(),
                topic: "in".into(),
                expected,
                next,
            })
            .into_iter()
            .collect(),
        state_version: None,
        state: vec![("k".into(), Some(b"v".to_vec()))],
        outputs: Vec::new(),
        outbox: outbox
            .into_iter()
            .map(|event| Outbound {
                producer: producer(),
                target: TARGET,
                event,
            })
            .collect(),
    })
}

fn deliver(seq: u64, event: PublishOp) -> Op {
    Op::Deliver {
        producer: producer(),
        seq,
        event,
    }
}

#[test]
fn effects_keep_other_groups_outputs_in_the_outbox_with_the_cursor() {
    let mut t = Two::new();
    // The cursor the effects move needs a topic with events.
    t.on_src(Op::Publish(event("in", b"x".to_vec())));
    let r = t.on_src(effects(
        Some((None, 1)),
        vec![event("b/0", b"a".to_vec()), event("b/1", b"b".to_vec())],
    ));
    assert_eq!(r.refused, None);
    assert_eq!(t.src.trigger_cursor("u", "in").unwrap(), Some(1));
    assert_eq!(t.meta(), OutboxMeta { first: 1, next: 3 });
    let entries = t.src.outbox(&producer(), 1, 10).unwrap();
    let seqs: Vec<u64> = entries.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, vec![1, 2]);
    assert_eq!(entries[0].1.target, TARGET);
    assert_eq!(entries[1].1.event.topic, "b/1");
    // Nothing of it is in the source's topics: only the outbox holds it.
    assert!(t.src.topic_meta("b/0").unwrap().is_none());

    // A re-run of the same step is refused as a whole: no second copy in the outbox.
    let again = t.on_src(effects(Some((None, 1)), vec![event("b/0", b"a".to_vec())]));
    assert!(again.refused.is_some());
    assert_eq!(t.meta(), OutboxMeta { first: 1, next: 3 });
    // The next step's outputs get the next sequence numbers.
    t.on_src(effects(
        Some((Some(1), 1)),
        vec![event("b/0", b"c".to_vec())],
    ));
    assert_eq!(t.meta(), OutboxMeta { first: 1, next: 4 });
}

#[test]
fn a_delivery_applies_once_in_order_and_a_gap_is_refused() {
    let mut t = Two::new();
    let r = t.on_dst(deliver(1, event("b", b"1".to_vec())));
    assert_eq!(
        (r.duplicate, r.refused.clone(), r.offset),
        (false, None, Some(0))
    );
    // The same sequence number again: success, a duplicate, nothing appended.
    let r = t.on_dst(deliver(1, event("b", b"1".to_vec())));
    assert_eq!((r.duplicate, r.refused.clone()), (true, None));
    // A gap is refused, naming the producer and what comes next.
    let r = t.on_dst(deliver(3, event("b", b"3".to_vec())));
    let why = r.refused.unwrap_or_default();
    assert!(
        why.contains(&producer()) && why.contains("gap") && why.contains("#2"),
        "{why}"
    );
    assert!(!r.duplicate);
    let r = t.on_dst(deliver(0, event("b", b"0".to_vec())));
    assert!(r.refused.unwrap_or_default().contains("start at 1"));
    let r = t.on_dst(deliver(2, event("b", b"2".to_vec())));
    assert_eq!(r.refused, None);
    assert_eq!(t.delivered("b"), vec![b"1".to_vec(), b"2".to_vec()]);
    assert_eq!(t.dst.producer_seq(&producer()).unwrap(), Some(2));
    // Another producer has a sequence of its own.
    let other = Op::Deliver {
        producer: crate::functions::producer_id(GroupId(3), "f", TARGET),
        seq: 1,
        event: event("b", b"x".to_vec()),
    };
    assert_eq!(t.on_dst(other).refused, None);
    assert_eq!(t.delivered("b").len(), 3);
}

#[test]
fn a_trim_removes_only_what_was_handed_out_and_sequence_numbers_go_on() {
    let mut t = Two::new();
    t.on_src(effects(
        None,
        (0..3u8).map(|i| event("b", vec![i])).collect(),
    ));
    // Past the last one handed out: trims to it, no further.
    let r = t.on_src(Op::OutboxTrim {
        producer: producer(),
        upto: 99,
    });
    assert_eq!(r.offset, Some(4));
    assert_eq!(t.meta(), OutboxMeta { first: 4, next: 4 });
    assert!(t.src.outbox(&producer(), 0, 10).unwrap().is_empty());
    // An empty outbox still hands out the next number, never one used before.
    t.on_src(effects(None, vec![event("b", vec![9])]));
    assert_eq!(t.meta(), OutboxMeta { first: 4, next: 5 });
    assert_eq!(t.src.outbox(&producer(), 0, 10).unwrap()[0].0, 4);
    // A trim below what was trimmed changes nothing.
    t.on_src(Op::OutboxTrim {
        producer: producer(),
        upto: 2,
    });
    assert_eq!(t.meta(), OutboxMeta { first: 4, next: 5 });
    // A producer without an outbox: nothing to do.
    let r = t.on_src(Op::OutboxTrim {
        producer: "9:none:2".into(),
        upto: 5,
    });
    assert_eq!(r.refused, None);
}

#[test]
fn a_full_outbox_refuses_the_effects_naming_its_limit() {
    let mut t = Two::new();
    let full: Vec<PublishOp> = (0..MAX_OUTBOX_ENTRIES)
        .map(|_| event("b", Vec::new()))
        .collect();
    assert_eq!(t.on_src(effects(None, full)).refused, None);
    assert_eq!(t.meta().len(), MAX_OUTBOX_ENTRIES);
    t.on_src(Op::Publish(event("in", b"x".to_vec())));
    let r = t.on_src(effects(Some((None, 1)), vec![event("b", b"x".to_vec())]));
    let why = r.refused.unwrap_or_default();
    assert!(
        why.contains("MAX_OUTBOX_ENTRIES") && why.contains(&MAX_OUTBOX_ENTRIES.to_string()),
        "{why}"
    );
    // Refused as a whole: the cursor did not move, the state did not change version.
    assert_eq!(t.src.trigger_cursor("u", "in").unwrap(), None);
    t.on_src(Op::OutboxTrim {
        producer: producer(),
        upto: 1,
    });
    let r = t.on_src(effects(Some((None, 1)), vec![event("b", b"x".to_vec())]));
    assert_eq!(r.refused, None);
}

#[test]
fn bad_names_are_refused() {
    let mut t = Two::new();
    let r = t.on_dst(Op::Deliver {
        producer: "a\u{0}b".into(),
        seq: 1,
        event: event("b", Vec::new()),
    });
    assert!(r.refused.unwrap_or_default().contains("producer"));
    let r = t.on_dst(deliver(1, event("bad\u{1}topic", Vec::new())));
    assert!(r.refused.is_some());
    let r = t.on_src(Op::OutboxTrim {
        producer: String::new(),
        upto: 1,
    });
    assert!(r.refused.is_some());
    let Op::Effects(mut fx) = effects(None, vec![event("b", Vec::new())]) else {
        unreachable!()
    };
    fx.outbox[0].producer = "\u{7}".into();
    assert!(t.on_src(Op::Effects(fx)).refused.is_some());
}

/// What the model relay and the executor do, one step at a time.
#[derive(Debug, Clone)]
enum Act {
    /// The executor commits a step with this many outputs for the target.
    Commit(u8),
    /// The relay sends up to `count` entries from where it stands: in order or reversed
    /// (a reorder), and hears the answers or loses them all.
    Send {
        count: u8,
        reverse: bool,
        lose: bool,
    },
    /// The relay trims up to what it heard was delivered.
    Trim,
    /// The relay crashes and starts again from the outbox.
    Restart,
    /// A stale relay (an old leader) sends an entry it sent before, or a gap.
    Stale { back: u8, ahead: bool },
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        3 => (0u8..4).prop_map(Act::Commit),
        4 => (1u8..5, proptest::prelude::any::<bool>(), proptest::bool::weighted(0.2))
            .prop_map(|(count, reverse, lose)| Act::Send { count, reverse, lose }),
        2 => Just(Act::Trim),
        1 => Just(Act::Restart),
        1 => (0u8..4, proptest::prelude::any::<bool>()).prop_map(|(back, ahead)| Act::Stale { back, ahead }),
    ]
}

/// The model relay: where it sends next, and the last sequence number it heard delivered.
struct Relay {
    next: u64,
    acked: u64,
}

impl Relay {
    /// Starts from the outbox, as after a crash: from its oldest entry.
    fn start(t: &Two) -> Relay {
        let first = t.meta().first;
        Relay {
            next: first,
            acked: first - 1,
        }
    }
}

static DUPLICATES: AtomicUsize = AtomicUsize::new(0);
static GAPS: AtomicUsize = AtomicUsize::new(0);

/// The payload of the `n`th output committed, and its topic (two topics, one sequence).
fn output(n: u32) -> PublishOp {
    event(&format!("b/{}", n % 2), n.to_be_bytes().to_vec())
}

/// Sends entry `seq` as the relay would; returns whether it was applied or a duplicate.
fn send(t: &mut Two, seq: u64) -> Option<bool> {
    let entry = t.src.outbox(&producer(), seq, 1).unwrap();
    let (s, e) = entry.into_iter().next()?;
    if s != seq {
        return None;
    }
    let r = t.on_dst(deliver(seq, e.event));
    if r.duplicate {
        DUPLICATES.fetch_add(1, Ordering::Relaxed);
    }
    if r.refused.is_some() {
        GAPS.fetch_add(1, Ordering::Relaxed);
        return Some(false);
    }
    Some(true)
}

/// Checks that the target holds a prefix of the outputs committed, each once, in order.
fn check_prefix(t: &Two, committed: u32) -> Result<u32, TestCaseError> {
    let last = t.dst.producer_seq(&producer()).unwrap().unwrap_or(0);
    prop_assert!(last <= u64::from(committed));
    for topic in 0..2u32 {
        let want: Vec<Vec<u8>> = (0..last as u32)
            .filter(|n| n % 2 == topic)
            .map(|n| output(n).payload)
            .collect();
        prop_assert_eq!(t.delivered(&format!("b/{topic}")), want);
    }
    Ok(last as u32)
}

#[test]
fn any_interleaving_of_deliveries_lands_each_output_once_in_order() {
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: 384,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &[14; 32]),
    );
    runner
        .run(&proptest::collection::vec(act(), 1..40), |acts| {
            let mut t = Two::new();
            let mut committed: u32 = 0;
            let mut relay = Relay::start(&t);
            for a in acts {
                match a {
                    Act::Commit(n) => {
                        let outs: Vec<PublishOp> =
                            (0..u32::from(n)).map(|i| output(committed + i)).collect();
                        prop_assert_eq!(t.on_src(effects(None, outs)).refused, None);
                        committed += u32::from(n);
                    }
                    Act::Send {
                        count,
                        reverse,
                        lose,
                    } => {
                        let mut seqs: Vec<u64> = (relay.next..relay.next + u64::from(count))
                            .filter(|s| *s < t.meta().next)
                            .collect();
                        if reverse {
                            seqs.reverse();
                        }
                        let mut answers = Vec::new();
                        for s in seqs {
                            if let Some(ok) = send(&mut t, s) {
                                answers.push((s, ok));
                            }
                        }
                        if !lose {
                            answers.sort();
                            for (s, ok) in answers {
                                if ok && s == relay.acked + 1 {
                                    relay.acked = s;
                                }
                            }
                        }
                        // It goes on from what it heard delivered (a refusal or a lost
                        // answer means sending again from there).
                        relay.next = relay.acked + 1;
                    }
                    Act::Trim => {
                        t.on_src(Op::OutboxTrim {
                            producer: producer(),
                            upto: relay.acked,
                        });
                        // Nothing trimmed was undelivered.
                        let delivered = t.dst.producer_seq(&producer()).unwrap().unwrap_or(0);
                        prop_assert!(t.meta().first - 1 <= delivered);
                    }
                    Act::Restart => relay = Relay::start(&t),
                    Act::Stale { back, ahead } => {
                        let seq = if ahead {
                            relay.next + 1 + u64::from(back)
                        } else {
                            relay.next.saturating_sub(u64::from(back)).max(1)
                        };
                        let _ = send(&mut t, seq);
                    }
                }
                check_prefix(&t, committed)?;
            }
            // The relay restarts once more and drains the outbox.
            relay = Relay::start(&t);
            while relay.next < t.meta().next {
                prop_assert_eq!(send(&mut t, relay.next), Some(true));
                relay.acked = relay.next;
                relay.next += 1;
            }
            t.on_src(Op::OutboxTrim {
                producer: producer(),
                upto: relay.acked,
            });
            prop_assert_eq!(check_prefix(&t, committed)?, committed);
            prop_assert!(t.meta().is_empty());
            Ok(())
        })
        .unwrap();
    // The histories did exercise duplicates and gaps, or the test proves little.
    assert!(DUPLICATES.load(Ordering::Relaxed) > 0);
    assert!(GAPS.load(Ordering::Relaxed) > 0);
}
