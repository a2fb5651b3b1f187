use super::*;
use crate::types::{GroupId, Op, Proposal, Request, TypeConfig};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{Entry, EntryPayload, LogId, StorageIOError};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), SErr> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
        let db = RaftDb::open(&dir.path().join("raft")).map_err(|e| StorageIOError::write(&e))?;
        let (log, sm) = db
            .group(crate::routing::DEFAULT_GROUP)
            .map_err(|e| StorageIOError::write(&e))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn passes_the_openraft_storage_suite() {
    Suite::test_all(Builder).unwrap();
}

#[test]
fn refuses_a_damaged_or_foreign_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft");
    drop(RaftDb::open(&path).unwrap());
    // Reopening is fine.
    let db = RaftDb::open(&path).unwrap();
    db.group(GroupId(3)).unwrap();
    assert_eq!(db.groups(), vec![GroupId(3)]);
    drop(db);
    // A directory with files but no marker is refused, naming the path.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("junk"), b"not sled").unwrap();
    let e = RaftDb::open(&foreign)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains(&foreign.display().to_string()), "{e}");
}

#[test]
fn a_log_shorter_than_its_watermark_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft");
    let db = RaftDb::open(&path).unwrap();
    db.group(crate::Route::Single.topic("t")).unwrap();
    drop(db);
    // The mark says entry 5 of group 1 was durable, but the log is empty.
    std::fs::write(
        path.join("watermark.json"),
        r#"{"version":1,"groups":{"1":5}}"#,
    )
    .unwrap();
    let e = RaftDb::open(&path)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("truncated") && e.contains(&path.display().to_string()),
        "{e}"
    );
    std::fs::write(path.join("watermark.json"), "{").unwrap();
    assert!(RaftDb::open(&path).is_err());
    std::fs::write(
        path.join("watermark.json"),
        r#"{"version":1,"groups":{"1":0}}"#,
    )
    .unwrap();
    assert!(RaftDb::open(&path).is_ok());
}

/// A client key.
fn user(key: &str) -> crate::UserKey {
    crate::UserKey::new(key).unwrap()
}

pub(super) fn entry(index: u64, req: Request) -> Entry<TypeConfig> {
    entry_at(index, 0, req)
}

/// An entry the leader stamped at `time_ms`.
pub(super) fn entry_at(index: u64, time_ms: u64, req: Request) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Proposal {
            time_ms,
            request: req,
        }),
    }
}

#[test]
fn publish_ids_are_remembered_for_the_dedup_window() {
    use crate::topics::DEDUP_WINDOW_MS;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let db = RaftDb::open(dir.path()).unwrap();
        let (_, mut sm) = db.group(crate::Route::Single.topic("t")).unwrap();
        let publish = |i: u64, id: &str, t: u64| {
            entry_at(
                i,
                t,
                Request {
                    id: Some(format!("pub/t/{id}")),
                    op: Op::Publish(crate::topics::PublishOp {
                        topic: "t".into(),
                        id: Some(id.into()),
                        headers: Vec::new(),
                        payload: b"x".to_vec(),
                        retention: Default::default(),
                    }),
                },
            )
        };
        let r = sm.apply(vec![publish(1, "a", 1_000)]).await.unwrap();
        assert!(!r[0].duplicate);
        // Within the window: the same id is the same event.
        let r = sm
            .apply(vec![publish(2, "a", 1_000 + DEDUP_WINDOW_MS - 1)])
            .await
            .unwrap();
        assert!(r[0].duplicate && r[0].offset == Some(0));
        // Past it, another publish makes the node forget `a`; `a` again is a new event.
        let later = 1_000 + DEDUP_WINDOW_MS + 1;
        sm.apply(vec![publish(3, "b", later)]).await.unwrap();
        let r = sm.apply(vec![publish(4, "a", later)]).await.unwrap();
        assert!(!r[0].duplicate);
        assert_eq!(r[0].offset, Some(2));
        assert_eq!(sm.topic_meta("t").unwrap().unwrap().next, 3);
    });
}

#[test]
fn retention_drops_the_oldest_by_count_bytes_and_age() {
    use canal_proto::settings::Retention;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let db = RaftDb::open(dir.path()).unwrap();
        let (_, mut sm) = db.group(crate::Route::Single.topic("t")).unwrap();
        let publish = |i: u64, t: u64, size: usize, retention: Retention| {
            entry_at(
                i,
                t,
                Request {
                    id: None,
                    op: Op::Publish(crate::topics::PublishOp {
                        topic: "t".into(),
                        id: None,
                        headers: Vec::new(),
                        payload: vec![b'x'; size],
                        retention,
                    }),
                },
            )
        };
        let by_bytes = Retention {
            max_events: 100,
            max_bytes: 250,
            max_age_ms: 0,
            ..Retention::default()
        };
        let mut i = 0;
        for t in 0..5 {
            i += 1;
            sm.apply(vec![publish(i, t, 100, by_bytes)]).await.unwrap();
        }
        let meta = sm.topic_meta("t").unwrap().unwrap();
        assert_eq!((meta.first, meta.next, meta.bytes), (3, 5, 200));
        // Age: at t=1000 with a 500 ms limit, everything but the new event goes.
        let by_age = Retention {
            max_events: 100,
            max_bytes: 0,
            max_age_ms: 500,
            ..Retention::default()
        };
        i += 1;
        sm.apply(vec![publish(i, 1000, 10, by_age)]).await.unwrap();
        let meta = sm.topic_meta("t").unwrap().unwrap();
        assert_eq!((meta.first, meta.next, meta.bytes), (5, 6, 10));
        // A trim on a quiet topic never drops the newest event.
        i += 1;
        let trim = Request {
            id: None,
            op: Op::Trim {
                topic: "t".into(),
                retention: by_age,
            },
        };
        sm.apply(vec![entry_at(i, 10_000, trim)]).await.unwrap();
        assert_eq!(sm.topic_meta("t").unwrap().unwrap().first, 5);
        assert_eq!(sm.events("t", 0, 10).unwrap().len(), 1);
    });
}

#[test]
fn a_batch_answers_each_request_and_keeps_their_ids() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let db = RaftDb::open(dir.path()).unwrap();
        let (_, mut sm) = db.group(crate::Route::Single.topic("t")).unwrap();
        let add = |id: &str| Request {
            id: Some(id.into()),
            op: Op::Add {
                key: "n".into(),
                delta: 1,
            },
        };
        let batch = |reqs: Vec<Request>| Request {
            id: None,
            op: Op::Batch(reqs),
        };
        let r = sm
            .apply(vec![entry(1, batch(vec![add("a"), add("b"), add("a")]))])
            .await
            .unwrap();
        let answers: Vec<bool> = r[0].batch.iter().map(|a| a.duplicate).collect();
        assert_eq!(answers, [false, false, true]);
        // A retried batch applies only what is new.
        let r = sm
            .apply(vec![entry(2, batch(vec![add("b"), add("c")]))])
            .await
            .unwrap();
        assert!(r[0].batch[0].duplicate && !r[0].batch[1].duplicate);
        assert_eq!(sm.get(&user("n")).unwrap(), Some(b"3".to_vec()));
        // A batch inside a batch is refused, changing nothing.
        let r = sm
            .apply(vec![entry(3, batch(vec![batch(vec![add("d")])]))])
            .await
            .unwrap();
        assert!(r[0].batch[0].refused.is_some());
        assert_eq!(sm.get(&user("n")).unwrap(), Some(b"3".to_vec()));
    });
}

#[test]
fn a_request_id_is_applied_once() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let db = RaftDb::open(dir.path()).unwrap();
        let (_, mut sm) = db.group(crate::Route::Single.topic("t")).unwrap();
        let put = |v: &str| Request {
            id: Some("w1".into()),
            op: crate::types::Op::Put {
                key: "k".into(),
                value: v.as_bytes().to_vec(),
            },
        };
        // Twice in one batch, and again in a later one.
        let r = sm
            .apply(vec![entry(1, put("a")), entry(2, put("b"))])
            .await
            .unwrap();
        assert!(!r[0].duplicate && r[1].duplicate && r[1].index == 1);
        let r = sm.apply(vec![entry(3, put("c"))]).await.unwrap();
        assert!(r[0].duplicate);
        assert_eq!(sm.get(&user("k")).unwrap(), Some(b"a".to_vec()));
        assert_eq!(sm.applied().unwrap().map(|l| l.index), Some(3));
    });
}

#[test]
fn typed_reads_see_only_their_own_records() {
    use crate::functions::Effects;
    use crate::keys;
    use crate::topics::PublishOp;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let db = RaftDb::open(dir.path()).unwrap();
        let (_, mut sm) = db.group(crate::Route::Single.topic("a")).unwrap();
        let publish = |topic: &str| Request {
            id: None,
            op: Op::Publish(PublishOp {
                topic: topic.into(),
                id: None,
                headers: Vec::new(),
                payload: topic.as_bytes().to_vec(),
                retention: Default::default(),
            }),
        };
        let effects = |function: &str, key: &str| Request {
            id: None,
            op: Op::Effects(Effects {
                function: function.into(),
                cursors: Vec::new(),
                state_version: None,
                state: vec![(key.into(), Some(function.as_bytes().to_vec()))],
                outputs: Vec::new(),
                outbox: Vec::new(),
            }),
        };
        let settings = canal_proto::settings::TopicSettings {
            max_payload_bytes: 77,
            ..Default::default()
        };
        let reqs = vec![
            publish("a"),
            publish("a/b"),
            publish("ab"),
            publish("a"),
            effects("f", "k1"),
            effects("f", "x/k2"),
            effects("f2", "k1"),
            effects("f/g", "k1"),
            Request {
                id: None,
                op: Op::Internal {
                    key: crate::InternalKey::Settings("a/#".into()),
                    value: Some(keys::SETTINGS.encode(&settings).unwrap()),
                },
            },
            Request {
                id: None,
                op: user("k").put(b"v".to_vec()),
            },
        ];
        let entries: Vec<_> = reqs
            .into_iter()
            .enumerate()
            .map(|(i, r)| entry(i as u64 + 1, r))
            .collect();
        sm.apply(entries).await.unwrap();

        // One topic's events never include a topic whose name extends it.
        let events = sm.events("a", 0, 10).unwrap();
        assert_eq!(events.iter().map(|e| e.offset).collect::<Vec<_>>(), [0, 1]);
        assert!(events.iter().all(|e| e.payload == b"a"));
        assert_eq!(sm.events("a/b", 0, 10).unwrap().len(), 1);
        let topics: Vec<String> = sm.topics().unwrap().into_iter().map(|(t, _)| t).collect();
        assert_eq!(topics, ["a", "a/b", "ab"]);

        // One function's state, under a prefix of its keys or all of it.
        let state = |f: &str, tail: &str| -> Vec<String> {
            sm.scan_group(&keys::STATE, f, tail, 10)
                .unwrap()
                .into_iter()
                .map(|((function, key), value)| {
                    assert_eq!(function, f);
                    assert_eq!(value, f.as_bytes());
                    key
                })
                .collect()
        };
        assert_eq!(state("f", ""), ["k1", "x/k2"]);
        assert_eq!(state("f", "x/"), ["x/k2"]);
        assert_eq!(state("f2", ""), ["k1"]);
        assert_eq!(sm.scan_group(&keys::STATE, "f", "", 1).unwrap().len(), 1);
        assert_eq!(sm.record(&keys::STATE_VERSIONS, "f").unwrap(), Some(2));
        assert_eq!(sm.record(&keys::STATE_VERSIONS, "nobody").unwrap(), None);

        // Settings decode as settings; the client key is a client key.
        assert_eq!(
            sm.scan_table(&keys::SETTINGS).unwrap(),
            vec![("a/#".to_string(), settings)]
        );
        assert_eq!(sm.get(&user("k")).unwrap(), Some(b"v".to_vec()));
        assert!(sm.scan_table(&keys::FUNCTIONS).unwrap().is_empty());
        // 4 events, 3 topics, 4 state entries, 3 versions, settings, the client key.
        assert_eq!(sm.key_count().unwrap(), 16);

        // A damaged record, or a key under a table's prefix that is not its own, is an error
        // that names it, never skipped or misread.
        sm.sm
            .insert(data_key(&keys::SETTINGS.key("b")), b"junk".to_vec())
            .unwrap();
        let e = sm.scan_table(&keys::SETTINGS).unwrap_err();
        assert!(
            matches!(&e, ReadError::Damaged { key, .. } if key == &keys::SETTINGS.key("b")),
            "{e}"
        );
        sm.sm
            .insert(data_key("\u{1}t/a\u{0}junk"), Vec::new())
            .unwrap();
        let e = sm.topics().unwrap_err();
        assert!(matches!(e, ReadError::ForeignKey { .. }), "{e}");
        assert!(e.to_string().contains("topic metadata"), "{e}");
    });
}

#[test]
fn an_apply_tells_waiters_the_topics_it_changed() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let db = RaftDb::open(dir.path()).unwrap();
        let (_, mut sm) = db.group(crate::Route::Single.topic("t")).unwrap();
        let mut changes = sm.watch_changes();
        let publish = |topic: &str| Request {
            id: None,
            op: Op::Publish(crate::topics::PublishOp {
                topic: topic.into(),
                id: None,
                headers: Vec::new(),
                payload: b"x".to_vec(),
                retention: Default::default(),
            }),
        };
        let topics =
            |names: &[&str]| Some(Wake::Topics(names.iter().map(|n| n.to_string()).collect()));
        // One call, two entries, a batch inside one: one notice, each topic once, sorted.
        let batch = Request {
            id: None,
            op: Op::Batch(vec![publish("b"), publish("a")]),
        };
        sm.apply(vec![entry(1, publish("b")), entry(2, batch)])
            .await
            .unwrap();
        assert_eq!(changes.next().await, topics(&["a", "b"]));
        // A client key changes no topic: no notice (the applied index still moves).
        let put = Request {
            id: None,
            op: Op::Put {
                key: "k".into(),
                value: b"v".to_vec(),
            },
        };
        sm.apply(vec![entry(3, put)]).await.unwrap();
        assert_eq!(*sm.watch_applied().borrow(), 3);
        // A refused ack changes nothing; an accepted one moves a cursor on its topic.
        let ack = |topic: &str, offset| Request {
            id: None,
            op: Op::Ack {
                subscription: "s".into(),
                topic: topic.into(),
                offset,
            },
        };
        sm.apply(vec![entry(4, ack("a", 9)), entry(5, ack("b", 0))])
            .await
            .unwrap();
        assert_eq!(changes.next().await, topics(&["b"]));
        // Notices never wait for a waiter: one that fell behind is told to rescan.
        for i in 0..(CHANGE_NOTICES as u64 + 1) {
            sm.apply(vec![entry(6 + i, publish("c"))]).await.unwrap();
        }
        assert_eq!(changes.next().await, Some(Wake::Everything));
    });
}

#[test]
fn effects_over_several_topics_apply_whole_or_not_at_all() {
    use crate::functions::{CursorMove, Effects};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let db = RaftDb::open(dir.path()).unwrap();
        let (_, mut sm) = db.group(crate::Route::Single.function("f")).unwrap();
        let step = |i: u64, moves: &[(&str, Option<u64>, u64)]| {
            entry(
                i,
                Request {
                    id: None,
                    op: Op::Effects(Effects {
                        function: "f".into(),
                        cursors: moves
                            .iter()
                            .map(|(topic, expected, next)| CursorMove {
                                trigger_uid: "u".into(),
                                topic: (*topic).into(),
                                expected: *expected,
                                next: *next,
                            })
                            .collect(),
                        state_version: None,
                        state: vec![("k".into(), Some(vec![i as u8]))],
                        outputs: vec![crate::topics::PublishOp {
                            topic: "out".into(),
                            id: None,
                            headers: Vec::new(),
                            payload: vec![i as u8],
                            retention: Default::default(),
                        }],
                        outbox: Vec::new(),
                    }),
                },
            )
        };
        let r = sm
            .apply(vec![step(1, &[("a", None, 3), ("b", None, 2)])])
            .await
            .unwrap();
        assert_eq!(r[0].refused, None);
        assert_eq!(sm.trigger_cursor("u", "a").unwrap(), Some(3));
        assert_eq!(sm.trigger_cursor("u", "b").unwrap(), Some(2));
        // One cursor that moved already refuses the whole step: no cursor, state or output.
        let r = sm
            .apply(vec![step(2, &[("a", Some(3), 5), ("b", None, 4)])])
            .await
            .unwrap();
        let why = r[0].refused.clone().unwrap_or_default();
        assert!(why.contains("cursor on b"), "{why}");
        assert_eq!(sm.trigger_cursor("u", "a").unwrap(), Some(3));
        assert_eq!(
            sm.record(&crate::keys::STATE, ("f", "k")).unwrap(),
            Some(vec![1])
        );
        assert_eq!(sm.topic_meta("out").unwrap().unwrap().next, 1);
        // A step that moves one cursor twice is refused, naming the topic.
        let r = sm
            .apply(vec![step(3, &[("a", Some(3), 4), ("a", Some(4), 5)])])
            .await
            .unwrap();
        let why = r[0].refused.clone().unwrap_or_default();
        assert!(why.contains("twice"), "{why}");
        assert_eq!(sm.trigger_cursor("u", "a").unwrap(), Some(3));
    });
}

#[test]
fn the_token_key_is_set_once() {
    use crate::InternalKey;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let db = RaftDb::open(dir.path()).unwrap();
        let (_, mut sm) = db.group(crate::GroupId(0)).unwrap();
        let set = |value: Option<&[u8]>| Request {
            id: None,
            op: Op::Internal {
                key: InternalKey::TokenKey("ed25519".into()),
                value: value.map(<[u8]>::to_vec),
            },
        };
        let r = sm.apply(vec![entry(1, set(Some(b"first")))]).await.unwrap();
        assert!(r[0].refused.is_none());
        // Setting the same value again is no change, so it is no refusal either.
        let r = sm.apply(vec![entry(2, set(Some(b"first")))]).await.unwrap();
        assert!(r[0].refused.is_none());
        for (i, v) in [Some(&b"second"[..]), None].into_iter().enumerate() {
            let r = sm.apply(vec![entry(3 + i as u64, set(v))]).await.unwrap();
            let why = r[0].refused.as_deref().unwrap_or_default();
            assert!(why.contains("set once"), "{why}");
        }
        assert_eq!(
            sm.record(&crate::keys::TOKEN_KEY, "ed25519").unwrap(),
            Some(b"first".to_vec())
        );
    });
}

/// A shard map of `shards` shards at `epoch`, each shard on peers `a` and `b`.
fn shard_map(epoch: u64, shards: u32) -> canal_proto::shards::ShardMap {
    use canal_proto::shards::{SHARD_MAP_FORMAT, ShardMap, ShardReplicas};
    ShardMap {
        format: SHARD_MAP_FORMAT,
        epoch,
        shards,
        replication: 2,
        spread: None,
        assignments: (0..shards)
            .map(|s| ShardReplicas {
                shard: s,
                replicas: if epoch.is_multiple_of(2) {
                    vec!["a".into(), "b".into()]
                } else {
                    vec!["b".into(), "a".into()]
                },
                shortfall: None,
            })
            .collect(),
        notes: Vec::new(),
    }
}

#[test]
fn a_shard_map_replaces_only_the_committed_epoch_plus_one() {
    use crate::InternalKey;
    use crate::keys::{SHARD_MAP, SHARD_MAP_CURRENT, SHARD_MAP_PREVIOUS};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let db = RaftDb::open(dir.path()).unwrap();
        let (_, mut sm) = db.group(crate::GroupId(0)).unwrap();
        let set = |value: Option<Vec<u8>>| Request {
            id: None,
            op: Op::Internal {
                key: InternalKey::ShardMap,
                value,
            },
        };
        let bytes = |epoch: u64, shards: u32| Some(shard_map(epoch, shards).encode().unwrap());
        let mut index = 0;
        macro_rules! apply {
            ($req:expr) => {{
                index += 1;
                sm.apply(vec![entry(index, $req)]).await.unwrap().remove(0)
            }};
        }
        let stored = |sm: &StateMachine, name: &str| sm.record(&SHARD_MAP, name).unwrap();

        // The first map must be epoch 1.
        let r = apply!(set(bytes(2, 4)));
        let why = r.refused.unwrap_or_default();
        assert!(why.contains("first must be epoch 1"), "{why}");
        let r = apply!(set(bytes(1, 4)));
        assert_eq!(r.refused, None);
        let first = bytes(1, 4);
        assert_eq!(stored(&sm, SHARD_MAP_CURRENT), first);
        assert_eq!(stored(&sm, SHARD_MAP_PREVIOUS), None);

        // Refused, each changing nothing: a stale epoch, a skipped one, another shard count,
        // bytes that are no map, a map that breaks its invariants, a removal.
        let mut broken = shard_map(2, 4);
        broken.assignments[1].shard = 3;
        let cases: Vec<(Option<Vec<u8>>, &str)> = vec![
            (bytes(1, 4), "committed map is at epoch 1, so only epoch 2"),
            (bytes(3, 4), "only epoch 2 may replace it"),
            (
                bytes(2, 8),
                "the cluster has 4 shards, fixed when it was created",
            ),
            (Some(b"\x01not a map".to_vec()), "does not decode"),
            (Some(broken.encode().unwrap()), "assignments[1].shard is 3"),
            (None, "cannot be removed"),
        ];
        for (value, text) in cases {
            let r = apply!(set(value));
            let why = r.refused.unwrap_or_default();
            assert!(why.contains(text), "{why:?} lacks {text:?}");
            assert_eq!(stored(&sm, SHARD_MAP_CURRENT), first, "after {text}");
            assert_eq!(stored(&sm, SHARD_MAP_PREVIOUS), None, "after {text}");
        }

        // The next epoch replaces it, and the map it replaced is kept as the previous one.
        let r = apply!(set(bytes(2, 4)));
        assert_eq!(r.refused, None);
        assert_eq!(stored(&sm, SHARD_MAP_CURRENT), bytes(2, 4));
        assert_eq!(stored(&sm, SHARD_MAP_PREVIOUS), first);
        let r = apply!(set(bytes(2, 4)));
        assert!(r.refused.is_some(), "the same epoch twice is stale");
        let r = apply!(set(bytes(3, 4)));
        assert_eq!(r.refused, None);
        assert_eq!(stored(&sm, SHARD_MAP_PREVIOUS), bytes(2, 4));
    });
}

fn publish_to(topic: &str, id: &str) -> Request {
    Request {
        id: Some(format!("pub/{topic}/{id}")),
        op: Op::Publish(crate::topics::PublishOp {
            topic: topic.into(),
            id: Some(id.into()),
            headers: Vec::new(),
            payload: id.as_bytes().to_vec(),
            retention: canal_proto::settings::Retention::default(),
        }),
    }
}

/// A crash half-way through an apply's writes leaves its write set in the intent tree and
/// a prefix of its writes in the state: opening the database finishes it, so the state is
/// the whole apply, as on a node that did not crash.
#[test]
fn an_apply_cut_short_by_a_crash_is_finished_on_open() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let g = crate::Route::Single.topic("t");
        let first = || {
            vec![
                entry(1, publish_to("t", "a")),
                entry(2, publish_to("u", "b")),
            ]
        };
        let second = || {
            vec![
                entry(3, publish_to("t", "c")),
                entry(4, publish_to("u", "d")),
            ]
        };
        // The node that did not crash: both applies whole.
        let whole_dir = tempfile::tempdir().unwrap();
        let (whole, set) = {
            let db = RaftDb::open(whole_dir.path()).unwrap();
            let (_, mut sm) = db.group(g).unwrap();
            sm.apply(first()).await.unwrap();
            sm.apply(second()).await.unwrap();
            let set: Vec<(Vec<u8>, Option<Vec<u8>>)> =
                dec(&sm.intent.get(b"w").unwrap().unwrap()).unwrap();
            ((sm.digest().unwrap(), sm.applied().unwrap()), set)
        };
        assert!(set.len() > 3, "the second apply wrote {} keys", set.len());
        // The node that crashed: the first apply whole, of the second its write set and
        // its first write only.
        let dir = tempfile::tempdir().unwrap();
        {
            let db = RaftDb::open(dir.path()).unwrap();
            let (_, mut sm) = db.group(g).unwrap();
            sm.apply(first()).await.unwrap();
            sm.intent.insert(b"w", enc(&set).unwrap()).unwrap();
            let (k, v) = set[0].clone();
            sm.sm.insert(k, v.unwrap()).unwrap();
            assert_ne!(sm.digest().unwrap(), whole.0);
        }
        let db = RaftDb::open(dir.path()).unwrap();
        let (_, sm) = db.group(g).unwrap();
        assert_eq!((sm.digest().unwrap(), sm.applied().unwrap()), whole);
        assert_eq!(sm.events("t", 0, 10).unwrap().len(), 2);
    });
}

/// Installing a snapshot forgets the last apply's write set: finished again on open, it
/// would bring back keys the snapshot does not have.
#[test]
fn a_snapshot_installed_is_not_undone_on_open() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let g = crate::Route::Single.topic("t");
        let src_dir = tempfile::tempdir().unwrap();
        let src = RaftDb::open(src_dir.path()).unwrap();
        let (_, mut from) = src.group(g).unwrap();
        from.apply(vec![entry_at(1, 1_000, publish_to("t", "a"))])
            .await
            .unwrap();
        let snap = from
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        {
            let db = RaftDb::open(dir.path()).unwrap();
            let (_, mut sm) = db.group(g).unwrap();
            sm.apply(vec![entry_at(1, 2_000, publish_to("other", "x"))])
                .await
                .unwrap();
            sm.install_snapshot(&snap.meta, snap.snapshot)
                .await
                .unwrap();
            assert_eq!(sm.digest().unwrap(), from.digest().unwrap());
        }
        let db = RaftDb::open(dir.path()).unwrap();
        let (_, sm) = db.group(g).unwrap();
        assert_eq!(sm.digest().unwrap(), from.digest().unwrap());
        assert!(sm.topic_meta("other").unwrap().is_none());
    });
}

/// A damaged write set in the intent tree is refused on open, naming the group, never
/// written into the state.
#[test]
fn a_damaged_intent_is_refused_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let g = crate::Route::Single.topic("t");
    {
        let db = RaftDb::open(dir.path()).unwrap();
        let (_, sm) = db.group(g).unwrap();
        sm.intent
            .insert(b"w", vec![canal_proto::wire::WIRE_VERSION, 9, 9])
            .unwrap();
    }
    let db = RaftDb::open(dir.path()).unwrap();
    let e = db.group(g).err().unwrap().to_string();
    assert!(
        e.contains("write set does not decode") && e.contains(&g.to_string()),
        "{e}"
    );
}

/// A store open elsewhere is refused with a reason naming the lock; one closed a moment
/// ago opens again (sled's write-back jobs hold its lock briefly after the close), which
/// the reopening tests here do hundreds of times.
#[test]
fn a_store_held_open_is_refused_and_one_just_closed_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let held = RaftDb::open(dir.path()).unwrap();
    let e = RaftDb::open(dir.path()).err().unwrap().to_string();
    assert!(
        e.contains("another process holds this data directory"),
        "{e}"
    );
    drop(held);
    for _ in 0..20 {
        let db = RaftDb::open(dir.path()).unwrap();
        let (_, sm) = db.group(crate::Route::Single.topic("t")).unwrap();
        sm.intent.insert(b"x", vec![1]).unwrap();
    }
}
