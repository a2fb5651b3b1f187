//! What subscriptions count, for `/metrics`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Counters of this node's subscriptions. Cheap to clone; clones count together.
#[derive(Debug, Clone, Default)]
pub struct PubSubMetrics {
    /// Times a durable subscription went back to its ack floor because the event there was
    /// not acknowledged within `ack_timeout`.
    pub redeliveries: Counter,
    /// Events given up on after `max_deliveries` deliveries (acknowledged for the client).
    pub given_up: Counter,
    /// Events subscribers missed because retention dropped them before they were read.
    pub lagged_events: Counter,
    /// Topic logs QoS 1 subscriptions looked at (read the meta of, and stepped): one per
    /// changed topic a subscription reads, not one per topic the node has.
    pub topic_reads: Counter,
    /// Full passes of QoS 1 subscriptions over every topic: one at each start, and one each
    /// time a subscription fell behind the change notices (or a snapshot was installed).
    pub rescans: Counter,
    /// Publish streams (`GET /v1/publish`) open on this node.
    pub publish_streams: Gauge,
    /// Publish streams refused because the node served its `max_publish_streams`.
    pub publish_streams_refused: Counter,
    /// Batch publishes refused whole for a bad line or past `MAX_BATCH_EVENTS`.
    pub batches_refused: Counter,
}

impl PubSubMetrics {
    /// Counters registered in `registry`.
    pub fn register(registry: &mut Registry) -> PubSubMetrics {
        let m = PubSubMetrics::default();
        registry.register(
            "canal_pubsub_redeliveries",
            "Durable subscriptions sent again from their ack floor after ack_timeout",
            m.redeliveries.clone(),
        );
        registry.register(
            "canal_pubsub_given_up",
            "Events given up on after max_deliveries deliveries, acknowledged for the client",
            m.given_up.clone(),
        );
        registry.register(
            "canal_pubsub_lagged_events",
            "Events subscribers missed because retention dropped them before they were read",
            m.lagged_events.clone(),
        );
        registry.register(
            "canal_pubsub_subscription_topic_reads",
            "Topic logs QoS 1 subscriptions looked at after a change notice or a redelivery timer",
            m.topic_reads.clone(),
        );
        registry.register(
            "canal_pubsub_subscription_rescans",
            "Full passes of QoS 1 subscriptions over every topic: at start, and after falling behind the change notices",
            m.rescans.clone(),
        );
        registry.register(
            "canal_pubsub_publish_streams",
            "Publish streams (GET /v1/publish) open on this node",
            m.publish_streams.clone(),
        );
        registry.register(
            "canal_pubsub_publish_streams_refused",
            "Publish streams refused at the node's max_publish_streams",
            m.publish_streams_refused.clone(),
        );
        registry.register(
            "canal_pubsub_batches_refused",
            "Batch publishes refused whole, for a bad line or past MAX_BATCH_EVENTS",
            m.batches_refused.clone(),
        );
        m
    }
}
