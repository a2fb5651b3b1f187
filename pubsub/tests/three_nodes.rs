//! Three nodes in one process over the in-memory transport: QoS 1 events published,
//! subscribed to durably, partly acknowledged; a member is killed (the data group's leader,
//! or the node the subscriber was on); the subscriber, reconnecting on a surviving node,
//! gets every unacknowledged event and none it acknowledged, in order.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use canal_consensus::mem::{MemNet, MemTransport};
use canal_consensus::{Consensus, GroupId, NodeId, RaftDb, RaftNode, Settings};
use canal_proto::api::Event;
use canal_pubsub::feed::FeedRx;
use canal_pubsub::{
    Delivery, NodeContext, PubSub, PubSubMetrics, PublishRequest, Qos, Qos0Hub, Qos0Link,
    SubscribeRequest,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};

const DATA: GroupId = GroupId(1);
const TOPIC: &str = "orders/eu";

/// No peers: QoS 0 stays on the node (these tests are about QoS 1).
struct NoPeers;

impl Qos0Link for NoPeers {
    type Peer = ();
    fn peers(&self) -> Vec<((), Vec<String>)> {
        Vec::new()
    }
    async fn send(&self, _: (), _: Vec<u8>) {}
}

type Node = PubSub<MemTransport, NoPeers>;

struct Cluster {
    net: MemNet,
    nodes: BTreeMap<NodeId, Node>,
    metrics: BTreeMap<NodeId, PubSubMetrics>,
    _closing: watch::Sender<bool>,
    _dirs: Vec<tempfile::TempDir>,
}

fn raft_node(id: NodeId) -> RaftNode {
    RaftNode {
        peer_id: format!("n{id}"),
        addrs: vec![],
    }
}

async fn cluster() -> Cluster {
    let net = MemNet::default();
    let (closing_tx, closing) = watch::channel(false);
    let mut nodes = BTreeMap::new();
    let mut dirs = Vec::new();
    let mut metrics: BTreeMap<NodeId, PubSubMetrics> = BTreeMap::new();
    for id in [1, 2, 3] {
        let dir = tempfile::tempdir().unwrap();
        let db = RaftDb::open(&dir.path().join("raft")).unwrap();
        let c = Consensus::start(
            &db,
            id,
            raft_node(id),
            &[GroupId::METADATA, DATA],
            Settings::with_election_timeout(Duration::from_millis(200)),
            net.transport(id),
            &mut prometheus_client::registry::Registry::default(),
        )
        .await
        .unwrap();
        net.insert(&raft_node(id).peer_id, c.clone());
        let ps = PubSub::new(
            c,
            Qos0Hub::new(Arc::default()),
            Arc::new(NoPeers),
            NodeContext {
                local_peer: raft_node(id).peer_id,
                subscribers: Arc::new(Semaphore::new(16)),
                max_subscribers: 16,
                closing: closing.clone(),
                metrics: metrics.entry(id).or_default().clone(),
            },
        );
        nodes.insert(id, ps);
        dirs.push(dir);
    }
    let members = [1, 2, 3].into_iter().map(|i| (i, raft_node(i))).collect();
    nodes[&1].consensus().initialize(members).await.unwrap();
    let c = Cluster {
        net,
        nodes,
        metrics,
        _closing: closing_tx,
        _dirs: dirs,
    };
    c.leader().await;
    c
}

async fn wait(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within 20 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Cluster {
    /// The data group's leader, as every running node sees it.
    async fn leader(&self) -> NodeId {
        let mut leader = None;
        wait("one leader of the data group", || {
            let seen: Vec<Option<NodeId>> = self
                .nodes
                .values()
                .map(|n| {
                    n.consensus()
                        .metrics(DATA)
                        .ok()
                        .and_then(|m| m.current_leader)
                })
                .collect();
            leader = seen[0].filter(|l| self.nodes.contains_key(l));
            leader.is_some() && seen.iter().all(|s| *s == leader)
        })
        .await;
        leader.unwrap()
    }

    /// Crashes node `id`: unreachable, and its groups stopped.
    async fn kill(&mut self, id: NodeId) {
        let node = self.nodes.remove(&id).unwrap();
        self.net.remove(&raft_node(id).peer_id);
        node.consensus().shutdown().await;
    }

    /// Publishes `n` QoS 1 events through node `via`, retried while a new leader is elected.
    async fn publish(&self, via: NodeId, n: usize, first_id: usize) {
        for i in first_id..first_id + n {
            let req = PublishRequest {
                topic: TOPIC.into(),
                qos: Qos::Committed,
                id: Some(format!("e{i}")),
                headers: vec![],
                payload: format!("event {i}").into_bytes(),
            };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match self.nodes[&via].publish(req.clone()).await {
                    Ok(p) => {
                        assert_eq!(p.offset, Some(i as u64), "{p:?}");
                        break;
                    }
                    Err(e) => {
                        assert!(Instant::now() < deadline, "publish {i}: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }
}

fn durable() -> SubscribeRequest {
    SubscribeRequest {
        filter: Some("orders/+".into()),
        from: Some("earliest".into()),
        durable: Some("billing".into()),
        ..SubscribeRequest::default()
    }
}

/// The offsets of the next `n` events, failing on anything else or a stall.
async fn offsets(rx: &mut FeedRx<Delivery>, n: usize) -> Vec<u64> {
    let mut out = Vec::new();
    while out.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {out:?} within 20 s"))
            .expect("the subscription ended");
        match d {
            Delivery::Message { id, event } => {
                let e: Event = serde_json::from_str(event.json()).unwrap();
                let offset = e.offset.unwrap();
                assert_eq!(id, Some(format!("{TOPIC}:{offset}")));
                assert_eq!(e.data, Some(format!("event {offset}")));
                out.push(offset);
            }
            Delivery::Lagged(json) => panic!("nothing was trimmed or given up, got {json}"),
        }
    }
    out
}

/// Publishes 10 events, reads them durably on `sub_on`, acknowledges 0..=3, kills `victim`,
/// publishes 5 more and reconnects on `again_on`: 4..15, in order, each once.
async fn survives_the_loss_of(victim: impl Fn(NodeId, NodeId) -> NodeId) {
    let mut c = cluster().await;
    let leader = c.leader().await;
    let follower = [1, 2, 3].into_iter().find(|i| *i != leader).unwrap();
    c.publish(follower, 10, 0).await;

    let sub_on = follower;
    let mut rx = c.nodes[&sub_on].subscribe(&durable()).await.unwrap();
    assert_eq!(offsets(&mut rx, 10).await, (0..10).collect::<Vec<_>>());
    let next = c.nodes[&sub_on]
        .ack("billing", Some(TOPIC), Some("3"))
        .await
        .unwrap();
    assert_eq!(next, 4);
    drop(rx);

    let victim = victim(leader, sub_on);
    c.kill(victim).await;
    let again_on = *c.nodes.keys().next().unwrap();
    c.leader().await;
    c.publish(again_on, 5, 10).await;

    // The reconnecting node has applied the acknowledgement and the events.
    let sm = c.nodes[&again_on].consensus().state_machine(DATA).unwrap();
    wait(
        "the surviving replica to apply the ack and the events",
        || {
            sm.subscription_cursor("billing", TOPIC).unwrap() == Some(4)
                && sm.topic_meta(TOPIC).unwrap().map(|m| m.next) == Some(15)
        },
    )
    .await;
    let mut rx = c.nodes[&again_on].subscribe(&durable()).await.unwrap();
    assert_eq!(offsets(&mut rx, 11).await, (4..15).collect::<Vec<_>>());
    // And nothing more: no event twice.
    let extra = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
    assert!(
        extra.is_err(),
        "more than the unacknowledged events: {extra:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_subscriber_survives_the_loss_of_the_leader() {
    survives_the_loss_of(|leader, _| leader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_subscriber_survives_the_loss_of_its_node() {
    survives_the_loss_of(|_, sub_on| sub_on).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_event_is_redelivered_then_given_up_on() {
    let c = cluster().await;
    let leader = c.leader().await;
    c.publish(leader, 2, 0).await;
    let req = SubscribeRequest {
        ack_timeout: Some("200ms".into()),
        max_deliveries: Some("2".into()),
        ..durable()
    };
    let mut rx = c.nodes[&leader].subscribe(&req).await.unwrap();
    assert_eq!(offsets(&mut rx, 2).await, vec![0, 1]);
    c.nodes[&leader]
        .ack("billing", Some(TOPIC), Some("0"))
        .await
        .unwrap();
    // 1 is not acknowledged: sent again, then given up on and acknowledged for the client.
    assert_eq!(offsets(&mut rx, 1).await, vec![1]);
    let notice = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let Delivery::Lagged(json) = notice else {
        panic!("not a give-up notice: {notice:?}")
    };
    assert!(
        json.contains("not acknowledged after 2 deliveries"),
        "{json}"
    );
    let sm = c.nodes[&leader].consensus().state_machine(DATA).unwrap();
    wait("the give-up to be acknowledged", || {
        sm.subscription_cursor("billing", TOPIC).unwrap() == Some(2)
    })
    .await;
    let m = &c.metrics[&leader];
    assert_eq!((m.redeliveries.get(), m.given_up.get()), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_are_checked_against_the_topic_settings_and_qos0_stays_off_the_log() {
    let c = cluster().await;
    let via = &c.nodes[&c.leader().await];
    let req = canal_proto::settings::SettingsRequest {
        max_payload: Some("4".into()),
        ..Default::default()
    };
    let filter = canal_proto::TopicFilter::new("orders/#").unwrap();
    let set = canal_pubsub::settings::put_settings(via.consensus(), &filter, &req)
        .await
        .unwrap();
    assert_eq!(set.settings.max_payload_bytes, 4);
    let publish = |topic: &str, qos, id: Option<&str>, payload: &[u8]| PublishRequest {
        topic: topic.into(),
        qos,
        id: id.map(str::to_string),
        headers: vec![("k".into(), "v".into())],
        payload: payload.to_vec(),
    };
    // Every node reads the settings from its own replica of the metadata group.
    for n in c.nodes.values() {
        wait("the settings to reach every replica", || {
            canal_pubsub::settings::get_settings(n.consensus(), &filter)
                .map(|a| a.settings.max_payload_bytes == 4)
                .unwrap_or(false)
        })
        .await;
    }
    let e = via
        .publish(publish(TOPIC, Qos::Committed, None, b"12345"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "too_large");
    assert!(e.to_string().contains("at most 4"), "{e}");
    let e = via
        .publish(publish("orders/+", Qos::Committed, None, b"1"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "invalid_topic");
    let e = via
        .publish(publish(TOPIC, Qos::Committed, Some(""), b"1"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "invalid_id");
    // Another topic is not bound by the filter.
    let p = via
        .publish(publish("logs/x", Qos::Committed, Some("a"), b"12345"))
        .await
        .unwrap();
    assert_eq!((p.offset, p.duplicate), (Some(0), false));
    // The same id again is the same event.
    let p = via
        .publish(publish("logs/x", Qos::Committed, Some("a"), b"12345"))
        .await
        .unwrap();
    assert_eq!((p.offset, p.duplicate), (Some(0), true));

    // QoS 0: a local QoS 0 subscriber gets it, the log never sees it.
    let sub = SubscribeRequest {
        filter: Some("orders/#".into()),
        qos: Some("0".into()),
        ..SubscribeRequest::default()
    };
    let mut rx = via.subscribe(&sub).await.unwrap();
    let p = via
        .publish(publish(TOPIC, Qos::AtMostOnce, None, b"hi"))
        .await
        .unwrap();
    assert_eq!((p.qos, p.offset), (0, None));
    let d = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let Delivery::Message { id: None, event } = d else {
        panic!("not a QoS 0 event: {d:?}")
    };
    let e: Event = serde_json::from_str(event.json()).unwrap();
    assert_eq!((e.qos, e.data.as_deref()), (0, Some("hi")));
    assert_eq!(e.headers.get("k").map(String::as_str), Some("v"));
    let sm = via.consensus().state_machine(DATA).unwrap();
    assert_eq!(sm.topic_meta(TOPIC).unwrap(), None);
}

/// Publishes one QoS 1 event to `topic` through `via`.
async fn publish_to(via: &Node, topic: &str, payload: &str) -> u64 {
    let req = PublishRequest {
        topic: topic.into(),
        qos: Qos::Committed,
        id: None,
        headers: vec![],
        payload: payload.as_bytes().to_vec(),
    };
    via.publish(req).await.unwrap().offset.unwrap()
}

/// The next delivery's topic and offset.
async fn next_event(rx: &mut FeedRx<Delivery>) -> (String, u64) {
    let d = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("no event within 20 s")
        .expect("the subscription ended");
    let Delivery::Message { event, .. } = d else {
        panic!("not an event: {d:?}")
    };
    let e: Event = serde_json::from_str(event.json()).unwrap();
    (e.topic, e.offset.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_reads_only_the_topics_it_waits_for() {
    let c = cluster().await;
    let leader = c.leader().await;
    let follower = [1, 2, 3].into_iter().find(|i| *i != leader).unwrap();
    let via = &c.nodes[&leader];
    for i in 0..200 {
        publish_to(via, &format!("fleet/{i}"), "first").await;
    }
    let sm = c.nodes[&follower].consensus().state_machine(DATA).unwrap();
    wait("the follower to apply the 200 topics", || {
        sm.topics().unwrap().len() == 200
    })
    .await;

    // One subscriber on the follower, on one of the 200 topics: its start reads that
    // topic's log and no other.
    let reads = &c.metrics[&follower].topic_reads;
    let exact = SubscribeRequest {
        filter: Some("fleet/7".into()),
        from: Some("earliest".into()),
        ..SubscribeRequest::default()
    };
    let mut rx = c.nodes[&follower].subscribe(&exact).await.unwrap();
    assert_eq!(next_event(&mut rx).await, ("fleet/7".into(), 0));
    assert_eq!(reads.get(), 1, "the start reads the one matching topic");

    // 500 publishes to the other topics cost it no read; the next to its own costs one.
    for i in 0..500 {
        let topic = format!("fleet/{}", [3, 8, 150, 199][i % 4]);
        publish_to(via, &topic, "other").await;
    }
    assert_eq!(publish_to(via, "fleet/7", "mine").await, 1);
    assert_eq!(next_event(&mut rx).await, ("fleet/7".into(), 1));
    assert_eq!(
        reads.get(),
        2,
        "the publishes to other topics made the subscriber read their logs"
    );
    drop(rx);

    // A wildcard subscriber from `latest`: a topic created after it started joins, from its
    // first event, and the ones before it started keep being read from their end.
    let wildcard = SubscribeRequest {
        filter: Some("fleet/+".into()),
        ..SubscribeRequest::default()
    };
    let mut rx = c.nodes[&follower].subscribe(&wildcard).await.unwrap();
    let before = reads.get();
    wait("the wildcard subscriber's first pass", || {
        reads.get() >= before + 200
    })
    .await;
    publish_to(via, "fleet/new", "a").await;
    publish_to(via, "fleet/new", "b").await;
    publish_to(via, "fleet/3", "c").await;
    let mut got = vec![
        next_event(&mut rx).await,
        next_event(&mut rx).await,
        next_event(&mut rx).await,
    ];
    // In offset order per topic; across topics in whatever order the notices came.
    let new: Vec<u64> = got
        .iter()
        .filter(|(t, _)| t == "fleet/new")
        .map(|(_, o)| *o)
        .collect();
    assert_eq!(new, vec![0, 1], "{got:?}");
    got.sort();
    assert_eq!(
        got,
        vec![
            ("fleet/3".into(), 126),
            ("fleet/new".into(), 0),
            ("fleet/new".into(), 1)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_behind_the_change_notices_rescans_and_misses_nothing() {
    let c = cluster().await;
    let leader = c.leader().await;
    let via = &c.nodes[&leader];
    let metrics = &c.metrics[&leader];
    let req = SubscribeRequest {
        filter: Some(TOPIC.into()),
        from: Some("earliest".into()),
        ..SubscribeRequest::default()
    };
    let mut rx = via.subscribe(&req).await.unwrap();
    wait("the subscription's first pass", || {
        metrics.rescans.get() == 1
    })
    .await;
    // Not read while far more applies than the notices hold (1024) go by: its queue fills,
    // it stops on it, and the notices it has not taken are overwritten.
    let n = canal_consensus::store::CHANGE_NOTICES + 300;
    for i in 0..n {
        assert_eq!(
            publish_to(via, TOPIC, &format!("event {i}")).await,
            i as u64
        );
    }
    // Every event once, in order, all the same.
    assert_eq!(offsets(&mut rx, n).await, (0..n as u64).collect::<Vec<_>>());
    assert!(
        metrics.rescans.get() >= 2,
        "the subscriber never fell behind the notices: the test shows nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_stored_whole_or_refused_whole() {
    let c = cluster().await;
    let via = &c.nodes[&c.leader().await];
    let publish = |i: usize, id: &str| PublishRequest {
        topic: TOPIC.into(),
        qos: Qos::Committed,
        id: Some(id.to_string()),
        headers: vec![],
        payload: format!("event {i}").into_bytes(),
    };
    // Line 3 is bad, so nothing of the batch is stored.
    let bad = vec![publish(0, "b0"), publish(1, "b1"), publish(2, "")];
    let e = via.publish_many(bad).await.unwrap_err();
    assert_eq!(e.kind(), "invalid_id");
    assert!(e.to_string().starts_with("line 3: "), "{e}");
    let batch: Vec<PublishRequest> = (0..200).map(|i| publish(i, &format!("b{i}"))).collect();
    let (answers, retried) = publish_many_retried(via, batch.clone()).await;
    // One answer a line, each its own event: the batch's writes may span Raft entries that
    // the group commits in any order, so the offsets are 0..200 in some order.
    assert_eq!(answers.len(), 200);
    let mut offsets: Vec<Option<u64>> = answers.iter().map(|p| p.offset).collect();
    offsets.sort();
    assert_eq!(offsets, (0..200).map(Some).collect::<Vec<_>>());
    if !retried {
        assert!(answers.iter().all(|p| !p.duplicate));
    }
    // The same batch again stores nothing new.
    let (again, _) = publish_many_retried(via, batch).await;
    assert!(again.iter().all(|p| p.duplicate), "{again:?}");
    let e = via
        .publish_many(
            (0..canal_pubsub::MAX_BATCH_EVENTS + 1)
                .map(|i| publish(i, "x"))
                .collect(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "too_many_events");
}

/// A batch through `via`, retried while the Raft groups fail it (an election on a loaded
/// machine): the ids make a retry the same events. Also answers whether it was retried.
async fn publish_many_retried(
    via: &Node,
    batch: Vec<PublishRequest>,
) -> (Vec<canal_proto::api::Published>, bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut retried = false;
    loop {
        match via.publish_many(batch.clone()).await {
            Ok(a) => return (a, retried),
            Err(e) => {
                assert!(Instant::now() < deadline, "the batch: {e}");
                assert!(matches!(e, canal_pubsub::PubSubError::Consensus(_)), "{e}");
                retried = true;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
