//! What the MQTT layer counts, for `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// A packet's type and direction.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PacketLabels {
    /// `connect`, `publish`, `puback`, ...
    pub r#type: String,
    /// `in` (from clients) or `out`.
    pub direction: String,
}

/// Why something was refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `malformed`, `too_large`, `protocol`, `connect_twice`, `topic_invalid`,
    /// `filter_invalid`, `qos2`, `not_authorized`, `inflight_limit`, `subscriptions_limit`,
    /// `keep_alive`, ... (docs/mqtt.md lists them all).
    pub reason: String,
}

/// Who sent a will.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct WillLabels {
    /// `connection`: the node the client was connected to; `keeper`: another node (or a
    /// restarted one), as the client's node was gone.
    pub by: String,
}

/// Counters of the MQTT listener. Cheap to clone; clones count together.
#[derive(Debug, Clone, Default)]
pub struct MqttMetrics {
    /// Open MQTT connections (past CONNECT).
    pub connections: Gauge,
    /// Packets by type and direction.
    pub packets: Family<PacketLabels, Counter>,
    /// Refusals by reason.
    pub refused: Family<RefusedLabels, Counter>,
    /// PUBACKs of persistent sessions' QoS 1 deliveries committed as durable acks.
    pub acks: Counter,
    /// Messages MQTT subscribers missed: QoS 0 ones dropped while the subscriber was behind
    /// (MQTT has no way to tell the client), QoS 1 ones retention removed before they were read.
    pub missed: Counter,
    /// Wills sent, by who sent them.
    pub wills: Family<WillLabels, Counter>,
}

impl MqttMetrics {
    /// Counters registered in `registry`.
    pub fn register(registry: &mut Registry) -> MqttMetrics {
        let m = MqttMetrics::default();
        registry.register(
            "canal_mqtt_connections",
            "Open MQTT connections (past CONNECT)",
            m.connections.clone(),
        );
        registry.register(
            "canal_mqtt_packets",
            "MQTT packets by type and direction (in: from clients)",
            m.packets.clone(),
        );
        registry.register(
            "canal_mqtt_refused",
            "MQTT packets, connections and subscriptions refused, by reason (limits are named: inflight_limit, subscriptions_limit, too_large)",
            m.refused.clone(),
        );
        registry.register(
            "canal_mqtt_acks_recorded",
            "PUBACKs of persistent sessions' QoS 1 deliveries committed as durable subscription acks",
            m.acks.clone(),
        );
        registry.register(
            "canal_mqtt_missed",
            "Messages MQTT subscribers missed: QoS 0 dropped while they were behind, QoS 1 removed by retention before they were read",
            m.missed.clone(),
        );
        registry.register(
            "canal_mqtt_wills_sent",
            "MQTT wills sent, by the client's node (connection) or, as it was gone, by another node's keeper (keeper)",
            m.wills.clone(),
        );
        m
    }

    /// Counts one will sent by `by` (`connection` or `keeper`).
    pub fn will_sent(&self, by: &str) {
        self.wills
            .get_or_create(&WillLabels { by: by.to_string() })
            .inc();
    }

    /// Counts one packet.
    pub fn packet(&self, kind: &str, inbound: bool) {
        self.packets
            .get_or_create(&PacketLabels {
                r#type: kind.to_string(),
                direction: if inbound { "in" } else { "out" }.to_string(),
            })
            .inc();
    }

    /// Counts one refusal.
    pub fn refuse(&self, reason: &str) {
        self.refused
            .get_or_create(&RefusedLabels {
                reason: reason.to_string(),
            })
            .inc();
    }
}
