//! # canal-pubsub — topics between the Raft groups and the client API
//!
//! Everything canal does with topics, with no HTTP in it: the node's HTTP layer turns
//! requests into the typed requests here and deliveries into SSE events or WebSocket
//! frames; the Raft groups come as a [`Consensus`] over any [`Transport`], so all of it runs
//! in tests over an in-memory transport.
//!
//! - [`PubSub`]: publish (QoS 0 and 1), subscribe (QoS 0, QoS 1, durable) and acknowledge.
//! - [`settings`]: topic settings, stored per topic or filter, resolved per topic.
//! - [`trim`]: the [`trim::Trimmer`] worker that applies age limits to quiet topics.
//! - [`qos0`]: the [`Qos0Hub`] of local QoS 0 subscribers and the fan-out to interested
//!   peers over a [`Qos0Link`].
//! - [`consumer`]: a subscription's position as pure state ([`ConsumerState`]), and
//!   [`subscribe`], the drivers that turn it into deliveries.
//! - [`feed`]: the bounded queue between a subscription's driver and its connection.
//! - [`metrics`]: what subscriptions count (redeliveries, give-ups, events missed).
//!
//! ```text
//!   QoS 1 publish ─> check topic, payload vs settings ─> write_batched(route.topic(t), Publish)
//!                    └─> answer after commit: offset, duplicate
//!   QoS 0 publish ─> Qos0Hub (local subscribers) + Qos0Link::send (interested peers)
//!   subscribe ─> ConsumerState::step(now, log view) ─> Send/Gap/Redeliver/GiveUp ─> feed
//! ```

pub mod consumer;
pub mod error;
pub mod event;
pub mod feed;
pub mod metrics;
pub mod qos0;
pub mod settings;
pub mod subscribe;
pub mod trim;

pub use consumer::{Action, ConsumerState, LogView, Redelivery, Start};
pub use error::PubSubError;
pub use event::Delivery;
pub use metrics::PubSubMetrics;
pub use qos0::{Qos0Hub, Qos0Interest, Qos0Link, Qos0Message, publish_qos0};
pub use subscribe::{Inputs, SubscribeRequest};

use canal_consensus::topics::PublishOp;
use canal_consensus::{Consensus, Op, Request, Transport};
use canal_proto::Topic;
use canal_proto::api::Published;
use std::sync::Arc;
use tokio::sync::{Semaphore, watch};

/// The answer of a publish started with [`PubSub::start_publish`], to await.
pub type Starting = futures::future::BoxFuture<'static, Result<Published, PubSubError>>;

/// The largest payload accepted (a topic's settings may lower it).
pub const MAX_PAYLOAD_BYTES: usize = canal_proto::settings::MAX_PAYLOAD_BYTES as usize;

/// The most publishes one batch may hold.
pub const MAX_BATCH_EVENTS: usize = canal_proto::api::MAX_BATCH_EVENTS;

/// The longest message id a publisher may give.
pub const MAX_ID_LEN: usize = 256;

use canal_proto::time::{fresh_id, now_ms};

pub use canal_proto::Qos;

/// Reads a QoS as written in a header or a query (`1` if not given).
pub fn parse_qos(s: Option<&str>) -> Result<Qos, PubSubError> {
    Ok(s.map(str::parse::<Qos>)
        .transpose()
        .map_err(|e| PubSubError::InvalidQos(e.to_string()))?
        .unwrap_or_default())
}

/// A publish, as the client gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishRequest {
    /// The topic (checked).
    pub topic: String,
    /// How it is delivered.
    pub qos: Qos,
    /// The publisher's message id: a retry with the same id is stored once.
    pub id: Option<String>,
    /// Custom headers.
    pub headers: Vec<(String, String)>,
    /// The payload.
    pub payload: Vec<u8>,
}

/// A publish that passed its checks, with what its topic's settings add to it.
struct Checked {
    topic: Topic,
    retention: canal_proto::settings::Retention,
    req: PublishRequest,
}

/// Checks a topic name.
pub fn check_topic(topic: &str) -> Result<Topic, PubSubError> {
    Topic::new(topic).map_err(|e| PubSubError::InvalidTopic(e.to_string()))
}

/// Checks a publisher's message id: 1 to [`MAX_ID_LEN`] characters.
pub fn check_id(id: Option<&str>) -> Result<String, PubSubError> {
    id.filter(|v| !v.is_empty() && v.len() <= MAX_ID_LEN)
        .map(str::to_string)
        .ok_or_else(|| {
            PubSubError::InvalidId(format!(
                "canal-id must be 1 to {MAX_ID_LEN} printable ASCII characters"
            ))
        })
}

/// Limits and identity of the node a [`PubSub`] serves.
pub struct NodeContext {
    /// This node's peer id, as written in event sources (`canal://{peer}`).
    pub local_peer: String,
    /// One permit per subscriber this node may serve at once.
    pub subscribers: Arc<Semaphore>,
    /// How many that is, for the error that says so.
    pub max_subscribers: usize,
    /// Becomes true when the node shuts down; subscriptions end then.
    pub closing: watch::Receiver<bool>,
    /// What durable subscriptions count.
    pub metrics: PubSubMetrics,
}

/// Publishing and subscribing on one node. Cheap to clone.
pub struct PubSub<T: Transport, L: Qos0Link> {
    consensus: Consensus<T>,
    hub: Qos0Hub,
    link: Arc<L>,
    node: Arc<NodeContext>,
}

impl<T: Transport, L: Qos0Link> Clone for PubSub<T, L> {
    fn clone(&self) -> Self {
        PubSub {
            consensus: self.consensus.clone(),
            hub: self.hub.clone(),
            link: self.link.clone(),
            node: self.node.clone(),
        }
    }
}

impl<T: Transport, L: Qos0Link> PubSub<T, L> {
    /// Publishing and subscribing through `consensus`, QoS 0 through `hub` and `link`.
    pub fn new(
        consensus: Consensus<T>,
        hub: Qos0Hub,
        link: Arc<L>,
        node: NodeContext,
    ) -> PubSub<T, L> {
        PubSub {
            consensus,
            hub,
            link,
            node: Arc::new(node),
        }
    }

    /// The Raft groups.
    pub fn consensus(&self) -> &Consensus<T> {
        &self.consensus
    }

    /// What this node's publishes and subscriptions count.
    pub fn metrics(&self) -> &PubSubMetrics {
        &self.node.metrics
    }

    /// The node's QoS 0 hub.
    pub fn hub(&self) -> &Qos0Hub {
        &self.hub
    }

    /// `POST /v1/topics/{topic}/events`: checks the publish against the topic's settings;
    /// QoS 1 is answered after commit with the event's offset, QoS 0 once handed on.
    pub async fn publish(&self, req: PublishRequest) -> Result<Published, PubSubError> {
        self.start_publish(req).await?.await
    }

    /// [`PubSub::publish`] in two steps: returns once the publish is checked and on its way
    /// (a QoS 1 one queued for its group's batch, a QoS 0 one handed on), with its answer to
    /// await. QoS 1 publishes started one after another get offsets in that order while
    /// their group's leader stays, however many are awaited at once: a publish stream starts
    /// each in frame order and awaits their answers together.
    pub async fn start_publish(&self, req: PublishRequest) -> Result<Starting, PubSubError> {
        let checked = self.check(req)?;
        self.start(checked).await
    }

    /// A batch publish (NDJSON): every request is checked first, and the whole batch is
    /// refused, nothing stored, if any is bad ([`PubSubError::BatchLine`] names the 1-based
    /// line). Then the QoS 1 ones go to their groups at once, so that they share Raft
    /// entries; the answers come in the order of the requests (their offsets need not:
    /// a large batch spans entries).
    pub async fn publish_many(
        &self,
        reqs: Vec<PublishRequest>,
    ) -> Result<Vec<Published>, PubSubError> {
        if reqs.len() > MAX_BATCH_EVENTS {
            self.node.metrics.batches_refused.inc();
            return Err(PubSubError::TooManyEvents {
                events: reqs.len(),
                limit: MAX_BATCH_EVENTS,
            });
        }
        let mut checked = Vec::with_capacity(reqs.len());
        for (i, req) in reqs.into_iter().enumerate() {
            checked.push(self.check(req).map_err(|e| {
                self.node.metrics.batches_refused.inc();
                PubSubError::BatchLine {
                    line: i + 1,
                    source: Box::new(e),
                }
            })?);
        }
        // All the writes are queued at once, so they share Raft entries (tokio's cooperative
        // budget would otherwise stall a large batch's sends part-way). The answers come in
        // line order; the offsets need not, as a batch may span entries.
        tokio::task::unconstrained(futures::future::try_join_all(
            checked.into_iter().map(|c| self.commit(c)),
        ))
        .await
    }

    /// Checks a publish against its topic's settings, without storing anything.
    fn check(&self, req: PublishRequest) -> Result<Checked, PubSubError> {
        let topic = check_topic(&req.topic)?;
        if let Some(id) = &req.id {
            check_id(Some(id))?;
        }
        let settings = settings::settings_for(&self.consensus, &topic)?;
        if req.payload.len() as u64 > settings.max_payload_bytes {
            return Err(PubSubError::TooLarge {
                topic: topic.to_string(),
                bytes: req.payload.len(),
                limit: settings.max_payload_bytes,
            });
        }
        Ok(Checked {
            topic,
            retention: settings.retention,
            req,
        })
    }

    /// Stores (QoS 1) or hands on (QoS 0) a checked publish.
    async fn commit(&self, c: Checked) -> Result<Published, PubSubError> {
        self.start(c).await?.await
    }

    /// Hands on (QoS 0) or queues for its group (QoS 1) a checked publish; the answer comes
    /// with commit.
    async fn start(&self, c: Checked) -> Result<Starting, PubSubError> {
        let Checked {
            topic,
            retention,
            req,
        } = c;
        if req.qos == Qos::AtMostOnce {
            let m = Qos0Message {
                topic: topic.to_string(),
                id: req.id.unwrap_or_else(|| fresh_id(&self.node.local_peer)),
                source: format!("canal://{}", self.node.local_peer),
                time_ms: now_ms(),
                headers: req.headers,
                payload: req.payload,
            };
            publish_qos0(&*self.link, &self.hub, m).await;
            let published = Published {
                topic: topic.to_string(),
                qos: 0,
                offset: None,
                duplicate: false,
            };
            return Ok(Box::pin(std::future::ready(Ok(published))));
        }
        // The message id is the Raft request id, so a retried publish is stored once.
        let request_id = match &req.id {
            Some(id) => format!("pub/{topic}/{id}"),
            None => fresh_id(&self.node.local_peer),
        };
        let group = self.consensus.routing().await?.topic(topic.as_str());
        let answer = self
            .consensus
            .queue_write(
                group,
                Request {
                    id: Some(request_id),
                    op: Op::Publish(PublishOp {
                        topic: topic.to_string(),
                        id: req.id,
                        headers: req.headers,
                        payload: req.payload,
                        retention,
                    }),
                },
            )
            .await?;
        Ok(Box::pin(async move {
            let r = answer.await?;
            Ok(Published {
                topic: topic.to_string(),
                qos: 1,
                offset: r.offset,
                duplicate: r.duplicate,
            })
        }))
    }

    /// `GET /v1/subscribe`: checks a subscription and starts feeding it; the receiver ends
    /// when the node shuts down or the log is gone.
    pub async fn subscribe(
        &self,
        req: &SubscribeRequest,
    ) -> Result<feed::FeedRx<Delivery>, PubSubError> {
        self.open(req, false).await
    }

    /// A QoS 1 subscription that also gets the node's QoS 0 events on its filter, in the
    /// same queue (QoS 0 ones with no offset): what an MQTT subscription reads, in one of
    /// the node's subscriber slots. Refused for a QoS 0 request.
    pub async fn subscribe_with_qos0(
        &self,
        req: &SubscribeRequest,
    ) -> Result<feed::FeedRx<Delivery>, PubSubError> {
        self.open(req, true).await
    }

    async fn open(
        &self,
        req: &SubscribeRequest,
        with_qos0: bool,
    ) -> Result<feed::FeedRx<Delivery>, PubSubError> {
        // A slot first: past the node's limit, nothing else is worth checking.
        let slot = self
            .node
            .subscribers
            .clone()
            .try_acquire_owned()
            .map_err(|_| PubSubError::TooManySubscribers {
                limit: self.node.max_subscribers,
            })?;
        let sub = subscribe::check(req)?;
        let (tx, rx) = feed::feed::<Delivery>(slot);
        let mut closing = self.node.closing.clone();
        if sub.qos == 0 {
            if with_qos0 {
                return Err(PubSubError::InvalidQos(
                    "a subscription with QoS 0 events too reads the log: ask for QoS 1".into(),
                ));
            }
            // The hub puts the events straight into the queue; this task only ends the
            // subscription when the client goes or the node closes.
            let attached = self.hub.attach(sub.filter, tx.clone());
            tokio::spawn(async move {
                let _attached = attached;
                tokio::select! {
                    _ = tx.closed() => {}
                    _ = closing.wait_for(|c| *c) => {}
                }
            });
            return Ok(rx);
        }
        let route = self.consensus.routing().await?;
        let sources = subscribe::Inputs::open(&self.consensus, route, &sub.filter)?;
        // A durable subscription keeps the start it was created with, for topics it has not
        // acknowledged anything on yet.
        let from = match &sub.durable {
            Some((name, _)) => {
                subscribe::durable_start(&self.consensus, route, name, sub.from).await?
            }
            None => sub.from,
        };
        let exact = sources.reader_of(sub.filter.as_str()).cloned();
        subscribe::check_offset(exact, &sub.filter, from).await?;
        let state = ConsumerState::new(from, sub.durable.as_ref().map(|(_, r)| *r));
        let durable = sub.durable.map(|(name, _)| subscribe::Durable {
            name,
            consensus: self.consensus.clone(),
            route,
        });
        let metrics = self.node.metrics.clone();
        let attached = with_qos0.then(|| self.hub.attach(sub.filter.clone(), tx.clone()));
        tokio::spawn(async move {
            let _attached = attached;
            tokio::select! {
                _ = subscribe::drive_qos1(sources, sub.filter, state, durable, metrics, tx) => {}
                _ = closing.wait_for(|c| *c) => {}
            }
        });
        Ok(rx)
    }

    /// `POST /v1/subscriptions/{name}/ack?topic=T&offset=N`: durable subscription `name`
    /// has processed `topic` up to and including `offset`; it resumes after it, on any
    /// node. The answer is the offset it resumes at.
    pub async fn ack(
        &self,
        name: &str,
        topic: Option<&str>,
        offset: Option<&str>,
    ) -> Result<u64, PubSubError> {
        let name = subscribe::check_subscription_name(name)?;
        let topic = topic.ok_or_else(|| {
            PubSubError::InvalidAck("topic is missing: add ?topic=T&offset=N".into())
        })?;
        let topic = check_topic(topic)?;
        let offset: u64 = offset.and_then(|o| o.parse().ok()).ok_or_else(|| {
            PubSubError::InvalidAck("offset must be a whole number: add ?topic=T&offset=N".into())
        })?;
        let group = self.consensus.routing().await?.topic(topic.as_str());
        let r = self
            .consensus
            .write_batched(
                group,
                Request {
                    // Acks are idempotent (a cursor only moves forward), so need no id.
                    id: None,
                    op: Op::Ack {
                        subscription: name,
                        topic: topic.to_string(),
                        offset,
                    },
                },
            )
            .await?;
        if let Some(why) = r.refused {
            return Err(PubSubError::InvalidAck(why));
        }
        Ok(r.offset.unwrap_or(offset + 1))
    }
}
