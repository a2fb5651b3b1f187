//! Property tests of the state machine: replicas that group the same entries differently
//! into `apply` calls hold the same state; time comes from the entries and never goes back;
//! internal keys stay internal; the decoders of stored bytes fail cleanly on any input.

use super::snapshot::{SnapshotData, decode_snapshot};
use super::*;
use crate::functions::{CursorMove, Effects};
use crate::topics::PublishOp;
use crate::types::InternalKey;
use crate::types::{GroupId, Op, Request, Response, TypeConfig};
use canal_proto::settings::Retention;
use openraft::Entry;
use openraft::RaftSnapshotBuilder;
use openraft::storage::RaftStateMachine;
use proptest::prelude::any;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Counts the largest single allocation of the current thread, so a decoder test can show
/// that no length prefix made the decoder allocate what it claims.
struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|m| {
        if size > m.get() {
            m.set(size);
        }
    });
}

// SAFETY: every call is passed to the system allocator unchanged; only sizes are noted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `test` on `cases` values of `strategy` from a fixed seed, so a failure reproduces.
fn run_seeded<S: Strategy>(
    seed: u8,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]);
    let mut runner = TestRunner::new_with_rng(config, rng);
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

/// One client request of a generated history.
#[derive(Debug, Clone)]
enum Step {
    /// A publish, with an id from a small pool (so ids are reused), a short dedup window and
    /// an age limit, so ids are forgotten and events trimmed within the history.
    Publish {
        topic: u8,
        id: Option<u8>,
        size: u8,
        window_ms: u64,
        max_events: u64,
        max_age_ms: u64,
    },
    Trim {
        topic: u8,
        max_age_ms: u64,
    },
    Ack {
        subscription: u8,
        topic: u8,
        offset: u8,
    },
    Effects {
        topic: u8,
        expected: Option<u8>,
        output_topic: u8,
        key: u8,
    },
    Put {
        key: u8,
        internal: bool,
    },
    Add {
        key: u8,
    },
    Internal {
        name: u8,
        delete: bool,
    },
    /// A delivery of one producer's sequence number (small, so repeats and gaps happen).
    Deliver {
        seq: u8,
    },
    /// A trim of the outbox the effects fill.
    OutboxTrim {
        upto: u8,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (
            0u8..3,
            proptest::option::weighted(0.8, 0u8..40),
            0u8..32,
            prop_oneof![Just(1u64), Just(40), Just(150), Just(600)],
            1u64..20,
            prop_oneof![Just(0u64), Just(100), Just(400)],
        )
            .prop_map(|(topic, id, size, window_ms, max_events, max_age_ms)| {
                Step::Publish {
                    topic,
                    id,
                    size,
                    window_ms,
                    max_events,
                    max_age_ms,
                }
            }),
        1 => (0u8..3, prop_oneof![Just(50u64), Just(300)])
            .prop_map(|(topic, max_age_ms)| Step::Trim { topic, max_age_ms }),
        1 => (0u8..2, 0u8..3, 0u8..20).prop_map(|(subscription, topic, offset)| Step::Ack {
            subscription,
            topic,
            offset
        }),
        1 => (0u8..3, proptest::option::of(0u8..4), 0u8..3, 0u8..4).prop_map(
            |(topic, expected, output_topic, key)| Step::Effects {
                topic,
                expected,
                output_topic,
                key
            }
        ),
        1 => (0u8..5, any::<bool>()).prop_map(|(key, internal)| Step::Put { key, internal }),
        1 => (0u8..5).prop_map(|key| Step::Add { key }),
        1 => (0u8..3, any::<bool>()).prop_map(|(name, delete)| Step::Internal { name, delete }),
        1 => (0u8..12).prop_map(|seq| Step::Deliver { seq }),
        1 => (0u8..12).prop_map(|upto| Step::OutboxTrim { upto }),
    ]
}

fn request(n: usize, s: &Step) -> Request {
    let topic = |t: u8| format!("t/{t}");
    match s {
        Step::Publish {
            topic: t,
            id,
            size,
            window_ms,
            max_events,
            max_age_ms,
        } => Request {
            id: Some(match id {
                Some(id) => format!("pub/{}/{id}", topic(*t)),
                None => format!("fresh-{n}"),
            }),
            op: Op::Publish(PublishOp {
                topic: topic(*t),
                id: id.map(|i| i.to_string()),
                headers: Vec::new(),
                payload: vec![b'x'; usize::from(*size)],
                retention: Retention {
                    max_events: *max_events,
                    max_bytes: 0,
                    max_age_ms: *max_age_ms,
                    dedup_window_ms: *window_ms,
                },
            }),
        },
        Step::Trim {
            topic: t,
            max_age_ms,
        } => Request {
            id: None,
            op: Op::Trim {
                topic: topic(*t),
                retention: Retention {
                    max_age_ms: *max_age_ms,
                    ..Retention::default()
                },
            },
        },
        Step::Ack {
            subscription,
            topic: t,
            offset,
        } => Request {
            id: None,
            op: Op::Ack {
                subscription: format!("s{subscription}"),
                topic: topic(*t),
                offset: u64::from(*offset),
            },
        },
        Step::Effects {
            topic: t,
            expected,
            output_topic,
            key,
        } => Request {
            id: Some(format!("fx-{n}")),
            op: Op::Effects(Effects {
                function: "f".into(),
                cursors: vec![CursorMove {
                    trigger_uid: "u".into(),
                    topic: topic(*t),
                    expected: expected.map(u64::from),
                    next: expected.map_or(1, |e| u64::from(e) + 1),
                }],
                state_version: None,
                state: vec![(format!("k{key}"), Some(vec![*key]))],
                outputs: vec![PublishOp {
                    topic: format!("out/{output_topic}"),
                    id: Some(format!("o{n}")),
                    headers: Vec::new(),
                    payload: b"out".to_vec(),
                    retention: Retention {
                        max_events: 5,
                        ..Retention::default()
                    },
                }],
                outbox: vec![crate::functions::Outbound {
                    producer: "1:f:2".into(),
                    target: GroupId(2),
                    event: PublishOp {
                        topic: format!("far/{output_topic}"),
                        id: None,
                        headers: Vec::new(),
                        payload: vec![*key],
                        retention: Retention::default(),
                    },
                }],
            }),
        },
        Step::Deliver { seq } => Request {
            id: None,
            op: Op::Deliver {
                producer: "2:g:1".into(),
                seq: u64::from(*seq),
                event: PublishOp {
                    topic: "in/far".into(),
                    id: None,
                    headers: Vec::new(),
                    payload: vec![*seq],
                    retention: Retention::default(),
                },
            },
        },
        Step::OutboxTrim { upto } => Request {
            id: None,
            op: Op::OutboxTrim {
                producer: "1:f:2".into(),
                upto: u64::from(*upto),
            },
        },
        Step::Put { key, internal } => Request {
            id: Some(format!("put-{n}")),
            op: Op::Put {
                key: if *internal {
                    crate::keys::FUNCTIONS.key(&format!("forged{key}"))
                } else {
                    format!("k/{key}")
                },
                value: n.to_string().into_bytes(),
            },
        },
        Step::Add { key } => Request {
            id: None,
            op: Op::Add {
                key: format!("n/{key}"),
                delta: 1,
            },
        },
        Step::Internal { name, delete } => Request {
            id: None,
            op: Op::Internal {
                key: InternalKey::Function(format!("fn{name}")),
                value: (!delete).then(|| n.to_string().into_bytes()),
            },
        },
    }
}

/// One entry of a history: the leader's stamp as a step from the previous one (it may go
/// back, as when leadership moves to a node whose clock is behind), and its requests (more
/// than one: a group-commit batch).
type EntrySpec = (i64, Vec<Step>);

fn entries(specs: &[EntrySpec]) -> Vec<Entry<TypeConfig>> {
    let mut time: i64 = 1_000_000;
    let mut n = 0;
    specs
        .iter()
        .enumerate()
        .map(|(i, (dt, steps))| {
            time = (time + dt).max(0);
            let mut reqs: Vec<Request> = steps
                .iter()
                .map(|s| {
                    n += 1;
                    request(n, s)
                })
                .collect();
            let req = if reqs.len() == 1 {
                reqs.remove(0)
            } else {
                Request {
                    id: None,
                    op: Op::Batch(reqs),
                }
            };
            super::tests::entry_at(i as u64 + 1, time as u64, req)
        })
        .collect()
}

/// Applies `entries` in calls of the given sizes (cycled); returns the replies and the
/// digest.
fn apply_grouped(
    rt: &tokio::runtime::Runtime,
    entries: &[Entry<TypeConfig>],
    sizes: &[usize],
) -> (Vec<Response>, String, StateMachine, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let db = RaftDb::open(dir.path()).unwrap();
    let (_, mut sm) = db.group(crate::Route::Single.topic("t")).unwrap();
    let mut replies = Vec::new();
    let mut rest = entries;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes[i % sizes.len()].clamp(1, rest.len());
        i += 1;
        let (now, later) = rest.split_at(n);
        replies.extend(rt.block_on(sm.apply(now.to_vec())).unwrap());
        rest = later;
    }
    let digest = sm.digest().unwrap();
    (replies, digest, sm, dir)
}

fn history() -> impl Strategy<Value = (Vec<EntrySpec>, Vec<usize>)> {
    (
        proptest::collection::vec(
            (
                prop_oneof![8 => 0i64..60, 1 => -300i64..0, 1 => 200i64..1000],
                proptest::collection::vec(step(), 1..6),
            ),
            150..300,
        ),
        proptest::collection::vec(1usize..200, 1..8),
    )
}

#[test]
fn the_grouping_of_entries_into_apply_calls_never_changes_the_state() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    run_seeded(1, 48, history(), |(specs, sizes)| {
        let entries = entries(&specs);
        let (one_by_one, d1, sm, _dir1) = apply_grouped(&rt, &entries, &[1]);
        let (grouped, d2, _, _dir2) = apply_grouped(&rt, &entries, &sizes);
        let (all_at_once, d3, _, _dir3) = apply_grouped(&rt, &entries, &[usize::MAX]);
        prop_assert_eq!(&one_by_one, &grouped);
        prop_assert_eq!(&one_by_one, &all_at_once);
        prop_assert_eq!(&d1, &d2);
        prop_assert_eq!(&d1, &d3);
        // The history did exercise forgetting and refusals, or the test proves little.
        let dups = one_by_one
            .iter()
            .flat_map(|r| std::iter::once(r).chain(r.batch.iter()))
            .filter(|r| r.duplicate)
            .count();
        prop_assert!(dups > 0, "no duplicate in the history");
        prop_assert!(sm.topics().unwrap().len() > 1);
        Ok(())
    });
}

/// Many ids expire at once, more than one publish forgets: the ones left over are forgotten
/// by later publishes, alike whether those come in the same call or in later ones.
#[test]
fn many_expired_ids_in_one_call_are_forgotten_alike() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let publish = |id: u32, window_ms| Request {
        id: Some(format!("pub/t/{id}")),
        op: Op::Publish(PublishOp {
            topic: "t".into(),
            id: Some(id.to_string()),
            headers: Vec::new(),
            payload: b"x".to_vec(),
            retention: Retention {
                dedup_window_ms: window_ms,
                ..Retention::default()
            },
        }),
    };
    let mut entries = Vec::new();
    // 300 ids at t=1000 with a 10 ms window, then 300 more publishes at t=2000, reusing them.
    for id in 0..300 {
        entries.push(super::tests::entry_at(
            entries.len() as u64 + 1,
            1000,
            publish(id, 10),
        ));
    }
    for id in 0..300 {
        entries.push(super::tests::entry_at(
            entries.len() as u64 + 1,
            2000,
            publish(id, 10),
        ));
    }
    let (a, da, sm, _d1) = apply_grouped(&rt, &entries, &[1]);
    for sizes in [vec![600], vec![64], vec![65], vec![299, 3]] {
        let (b, db, _, _d2) = apply_grouped(&rt, &entries, &sizes);
        assert_eq!(a, b, "grouping {sizes:?}");
        assert_eq!(da, db, "grouping {sizes:?}");
    }
    // Every reuse came after its window: all 600 publishes are events.
    assert!(a.iter().all(|r| !r.duplicate));
    assert_eq!(sm.topic_meta("t").unwrap().unwrap().next, 600);
}

#[test]
fn time_comes_from_the_entries_never_goes_back_and_survives_a_snapshot() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let db = RaftDb::open(dir.path()).unwrap();
        let (_, mut sm) = db.group(crate::Route::Single.topic("t")).unwrap();
        let publish = |id: &str| Request {
            id: Some(format!("pub/t/{id}")),
            op: Op::Publish(PublishOp {
                topic: "t".into(),
                id: Some(id.into()),
                headers: Vec::new(),
                payload: b"x".to_vec(),
                retention: Retention {
                    max_age_ms: 1_000,
                    dedup_window_ms: 500,
                    ..Retention::default()
                },
            }),
        };
        use super::tests::entry_at;
        sm.apply(vec![entry_at(1, 10_000, publish("a"))])
            .await
            .unwrap();
        // A stamp from behind (a new leader whose clock is slow) does not move time back:
        // the event is stored at 10 000, and `a` is still within its window.
        let r = sm
            .apply(vec![
                entry_at(2, 9_000, publish("b")),
                entry_at(3, 9_200, publish("a")),
            ])
            .await
            .unwrap();
        assert!(!r[0].duplicate && r[1].duplicate);
        let events = sm.events("t", 0, 10).unwrap();
        assert_eq!(
            events.iter().map(|e| e.time_ms).collect::<Vec<_>>(),
            [10_000, 10_000]
        );
        // The clock travels with a snapshot: a member installed from it stamps the same.
        let mut builder = sm.get_snapshot_builder().await;
        let snap = builder.build_snapshot().await.unwrap();
        let dir2 = tempfile::tempdir().unwrap();
        let db2 = RaftDb::open(dir2.path()).unwrap();
        let (_, mut sm2) = db2.group(crate::Route::Single.topic("t")).unwrap();
        sm2.install_snapshot(&snap.meta, snap.snapshot)
            .await
            .unwrap();
        assert_eq!(sm.digest().unwrap(), sm2.digest().unwrap());
        for m in [&mut sm, &mut sm2] {
            m.apply(vec![entry_at(4, 1, publish("c"))]).await.unwrap();
        }
        assert_eq!(sm.digest().unwrap(), sm2.digest().unwrap());
        assert_eq!(sm2.events("t", 2, 1).unwrap()[0].time_ms, 10_000);
        // Past the window by the entries' clock, `a` is new again; past the age limit the
        // old events go.
        let r = sm
            .apply(vec![entry_at(5, 10_600, publish("a"))])
            .await
            .unwrap();
        assert!(!r[0].duplicate);
        sm.apply(vec![entry_at(6, 11_001, publish("d"))])
            .await
            .unwrap();
        assert_eq!(sm.topic_meta("t").unwrap().unwrap().first, 3);
    });
}

#[test]
fn client_key_operations_cannot_touch_internal_keys() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let db = RaftDb::open(dir.path()).unwrap();
        let (_, mut sm) = db.group(GroupId(0)).unwrap();
        let removed = InternalKey::Removed("12D3KooWPeer".into());
        let set = Request {
            id: None,
            op: Op::Internal {
                key: removed.clone(),
                value: Some(b"removed".to_vec()),
            },
        };
        use super::tests::entry;
        sm.apply(vec![entry(1, set)]).await.unwrap();
        assert_eq!(
            sm.record(&crate::keys::REMOVED, "12D3KooWPeer").unwrap(),
            Some(b"removed".to_vec())
        );
        let forged = [
            Op::Put {
                key: removed.key(),
                value: Vec::new(),
            },
            Op::Delete { key: removed.key() },
            Op::Add {
                key: crate::keys::TOPIC_META.key("t"),
                delta: 1,
            },
            Op::Put {
                key: crate::keys::MODULES.key("h"),
                value: b"\0asm".to_vec(),
            },
            // Names that would reach into other records' keys.
            Op::Internal {
                key: InternalKey::Measurement {
                    function: "f\u{0}x".into(),
                    peer: "p".into(),
                },
                value: Some(Vec::new()),
            },
            Op::Internal {
                key: InternalKey::Function(String::new()),
                value: None,
            },
            Op::Publish(PublishOp {
                topic: "t\u{0}00000000000000000001".into(),
                id: None,
                headers: Vec::new(),
                payload: Vec::new(),
                retention: Retention::default(),
            }),
            Op::Ack {
                subscription: "s\u{0}x".into(),
                topic: "t".into(),
                offset: 1,
            },
        ];
        let before = sm.digest().unwrap();
        let mut i = 1;
        for op in forged {
            i += 1;
            let shown = format!("{op:?}");
            let r = sm
                .apply(vec![entry(i, Request { id: None, op })])
                .await
                .unwrap();
            let why = r[0].refused.clone().unwrap_or_default();
            assert!(
                why.contains("internal keyspace") || why.contains("refused"),
                "{shown}: {why:?}"
            );
        }
        assert_eq!(
            sm.record(&crate::keys::REMOVED, "12D3KooWPeer").unwrap(),
            Some(b"removed".to_vec())
        );
        // Nothing but the applied index moved.
        assert_eq!(before, sm.digest().unwrap());
        // A plain key is fine.
        let r = sm
            .apply(vec![entry(
                i + 1,
                Request {
                    id: None,
                    op: Op::Put {
                        key: "cluster/removed/x".into(),
                        value: Vec::new(),
                    },
                },
            )])
            .await
            .unwrap();
        assert_eq!(r[0].refused, None);
        // The tombstone is not where a client key could be.
        assert!(crate::keys::is_internal(&removed.key()));
    });
}

/// Valid encodings of each stored format, for mutation.
fn samples() -> Vec<(&'static str, Vec<u8>)> {
    let event = crate::topics::StoredEvent {
        offset: 7,
        time_ms: 1_700_000_000_000,
        id: Some("id-1".into()),
        headers: vec![("k".into(), "v".into())],
        payload: b"hello".to_vec(),
    };
    let meta = crate::topics::TopicMeta {
        first: 1,
        next: 9,
        bytes: 300,
    };
    let response = Response {
        index: 4,
        duplicate: false,
        previous: Some(b"p".to_vec()),
        refused: Some("why".into()),
        offset: Some(3),
        batch: vec![Response::default()],
    };
    let snapshot = SnapshotData {
        data: vec![
            ("a".into(), b"1".to_vec()),
            ("\u{1}t/x".into(), vec![0; 40]),
        ],
        requests: vec![("r1".into(), response.clone())],
        clock: 1_700_000_000_000,
    };
    let outbox = crate::functions::OutboxEntry {
        target: GroupId(2),
        event: PublishOp {
            topic: "t/x".into(),
            id: Some("id".into()),
            headers: vec![("k".into(), "v".into())],
            payload: b"hello".to_vec(),
            retention: Retention::default(),
        },
    };
    let deliver = crate::types::Proposal {
        time_ms: 5,
        request: Request {
            id: None,
            op: Op::Deliver {
                producer: "1:f:2".into(),
                seq: 3,
                event: outbox.event.clone(),
            },
        },
    };
    vec![
        ("event", enc(&event).unwrap()),
        ("meta", enc(&meta).unwrap()),
        ("response", enc(&response).unwrap()),
        ("snapshot", enc(&snapshot).unwrap()),
        ("outbox", enc(&outbox).unwrap()),
        (
            "outbox-meta",
            enc(&crate::functions::OutboxMeta { first: 2, next: 9 }).unwrap(),
        ),
        ("proposal", enc(&deliver).unwrap()),
        (
            "intent",
            enc(&vec![
                (b"d/k".to_vec(), Some(b"v".to_vec())),
                (b"m/applied".to_vec(), None::<Vec<u8>>),
            ])
            .unwrap(),
        ),
    ]
}

/// Decodes `bytes` as the format `kind` names; returns whether it decoded and the largest
/// single allocation made meanwhile.
fn decode_as(kind: &str, bytes: &[u8]) -> (bool, usize) {
    LARGEST.with(|m| m.set(0));
    let ok = match kind {
        "event" => dec::<crate::topics::StoredEvent>(bytes).is_ok(),
        "meta" => dec::<crate::topics::TopicMeta>(bytes).is_ok(),
        "response" => dec::<Response>(bytes).is_ok(),
        "outbox" => crate::keys::OUTBOX.decode(bytes).is_ok(),
        "outbox-meta" => crate::keys::OUTBOX_META.decode(bytes).is_ok(),
        "proposal" => dec::<crate::types::Proposal>(bytes).is_ok(),
        "intent" => super::state::decode_intent(bytes).is_ok(),
        _ => decode_snapshot(bytes).is_ok(),
    };
    (ok, LARGEST.with(|m| m.get()))
}

/// What a decoder of `len` bytes may allocate at most at once: its claims are limited to
/// the wire format's claim budget for that length, and serde preallocates at most 1 MiB for
/// a sequence.
fn allowed(len: usize) -> usize {
    canal_proto::wire::claim_budget(len).saturating_add(1 << 20)
}

#[test]
fn stored_formats_refuse_random_bytes_without_big_allocations() {
    let kinds = [
        "event",
        "meta",
        "response",
        "snapshot",
        "outbox",
        "outbox-meta",
        "proposal",
        "intent",
    ];
    run_seeded(
        2,
        4096,
        (
            0..kinds.len(),
            proptest::collection::vec(any::<u8>(), 0..64),
        ),
        |(k, mut bytes)| {
            // Half the cases carry the right version byte, so the body is what is tested.
            if bytes.len() > 1 && bytes[0] % 2 == 0 {
                bytes[0] = canal_proto::wire::WIRE_VERSION;
            }
            let (_, largest) = decode_as(kinds[k], &bytes);
            prop_assert!(largest <= allowed(bytes.len()), "{largest} bytes at once");
            Ok(())
        },
    );
}

#[test]
fn stored_formats_refuse_mutated_values_without_big_allocations() {
    let samples = samples();
    for (kind, bytes) in &samples {
        assert!(decode_as(kind, bytes).0, "{kind} does not round-trip");
    }
    let n = samples.len();
    run_seeded(
        3,
        4096,
        (
            0..n,
            proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            any::<prop::sample::Index>(),
            any::<bool>(),
        ),
        |(k, changes, cut, truncate)| {
            let (kind, valid) = &samples[k];
            let mut bytes = valid.clone();
            for (at, b) in changes {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
            if truncate {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            let (_, largest) = decode_as(kind, &bytes);
            prop_assert!(largest <= allowed(bytes.len()), "{largest} bytes at once");
            Ok(())
        },
    );
}

#[test]
fn a_length_prefix_claiming_a_terabyte_is_an_error() {
    // The fields before a string, then a string whose length claims 2^40 bytes.
    let v = canal_proto::wire::WIRE_VERSION;
    let cases: [(&str, Vec<u8>); 3] = [
        // offset 0, time 0, id Some(..)
        ("event", vec![v, 0, 0, 1]),
        // index 0, not a duplicate, no previous, refused Some(..)
        ("response", vec![v, 0, 0, 0, 1]),
        // one data pair, its key
        ("snapshot", vec![v, 1]),
    ];
    for (kind, mut bytes) in cases {
        bytes.push(253);
        bytes.extend((1u64 << 40).to_le_bytes());
        bytes.extend(b"abc");
        let (ok, largest) = decode_as(kind, &bytes);
        assert!(!ok && largest <= allowed(bytes.len()), "{kind}: {largest}");
    }
}

#[test]
fn values_full_of_small_numbers_decode() {
    // Each number is one byte encoded but claims eight while it decodes.
    let batch = Request {
        id: None,
        op: Op::Batch(
            (0..5000)
                .map(|i| Request {
                    id: None,
                    op: Op::Ack {
                        subscription: "s".into(),
                        topic: "t".into(),
                        offset: i % 100,
                    },
                })
                .collect(),
        ),
    };
    let e = super::tests::entry_at(1, 2, batch);
    let back: Entry<TypeConfig> = dec(&enc(&e).unwrap()).unwrap();
    assert_eq!(back.log_id, e.log_id);
    let numbers: Vec<u64> = (0..10_000).map(|i| i % 7).collect();
    let back: Vec<u64> = dec(&enc(&numbers).unwrap()).unwrap();
    assert_eq!(back, numbers);
}

#[test]
fn a_snapshot_larger_than_a_message_decodes() {
    // More than the 64 MiB a peer message may carry.
    let big = SnapshotData {
        data: vec![("big".into(), vec![7u8; 65 << 20])],
        requests: Vec::new(),
        clock: 0,
    };
    let bytes = enc(&big).unwrap();
    let back = decode_snapshot(&bytes).unwrap();
    assert_eq!(back.data[0].1.len(), 65 << 20);
}
