//! What a subscriber is handed: events, built once and shared by every subscriber of them
//! (their CloudEvents JSON written on first need, once), and notices of events it missed.

use crate::feed::Weighed;
use base64::Engine;
use canal_consensus::topics::StoredEvent;
use canal_proto::api::Event;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, UNIX_EPOCH};

/// One thing a subscription hands its client: an event, or news of events it missed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// An event: its SSE id (`topic:offset` for QoS 1) and the event.
    Message {
        /// `topic:offset`, for QoS 1 events.
        id: Option<String>,
        /// The event, shared with the other subscribers it goes to: SSE and WebSocket
        /// write [`EventData::json`], MQTT reads the fields.
        event: Arc<EventData>,
    },
    /// Events the subscriber missed, as JSON (a [`canal_proto::api::Lagged`] gap, a give-up
    /// notice, or `{"dropped":N}` for QoS 0).
    Lagged(String),
}

impl Weighed for Delivery {
    fn weight(&self) -> usize {
        match self {
            Delivery::Message { id, event } => event.weight() + id.as_ref().map_or(0, String::len),
            Delivery::Lagged(json) => json.len(),
        }
    }
}

/// An event as subscribers get it: the fields of a QoS 0 message or of a stored QoS 1
/// event, made once for all the subscribers it goes to (they share it in an `Arc`), so a
/// delivery costs no copy and no JSON unless its client wants JSON.
#[derive(Debug)]
pub struct EventData {
    /// Its topic.
    pub topic: String,
    /// Its id: the publisher's message id, else one canal gave it (`topic:offset` for QoS 1).
    pub id: String,
    /// Its CloudEvents source: `canal://{peer}` for QoS 0, `canal://topic/{topic}` for QoS 1.
    pub source: String,
    /// When it was published (QoS 0) or stored (QoS 1), ms since the epoch.
    pub time_ms: u64,
    /// Its custom headers, in the order given.
    pub headers: Vec<(String, String)>,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Its offset in the topic's log: `Some` for QoS 1, `None` for QoS 0.
    pub offset: Option<u64>,
    json: OnceLock<String>,
}

impl PartialEq for EventData {
    fn eq(&self, o: &Self) -> bool {
        // The JSON is derived from the rest, written or not.
        (
            &self.topic,
            &self.id,
            &self.source,
            self.time_ms,
            &self.headers,
            &self.payload,
            self.offset,
        ) == (
            &o.topic, &o.id, &o.source, o.time_ms, &o.headers, &o.payload, o.offset,
        )
    }
}

impl Eq for EventData {}

impl EventData {
    /// A QoS 0 event, as it came to the hub.
    pub fn qos0(m: crate::Qos0Message) -> EventData {
        EventData {
            topic: m.topic,
            id: m.id,
            source: m.source,
            time_ms: m.time_ms,
            headers: m.headers,
            payload: m.payload,
            offset: None,
            json: OnceLock::new(),
        }
    }

    /// A QoS 1 event of `topic`'s log.
    pub fn stored(topic: &str, e: StoredEvent) -> EventData {
        EventData {
            id: e.id.unwrap_or_else(|| format!("{topic}:{}", e.offset)),
            topic: topic.to_string(),
            source: format!("canal://topic/{topic}"),
            time_ms: e.time_ms,
            headers: e.headers,
            payload: e.payload,
            offset: Some(e.offset),
            json: OnceLock::new(),
        }
    }

    /// 1 for an event of the log, 0 for one of the hub.
    pub fn qos(&self) -> u8 {
        if self.offset.is_some() { 1 } else { 0 }
    }

    /// The event in CloudEvents form.
    pub fn event(&self) -> Event {
        to_event(EventParts {
            topic: &self.topic,
            id: self.id.clone(),
            source: self.source.clone(),
            time_ms: self.time_ms,
            headers: &self.headers,
            payload: &self.payload,
            offset: self.offset,
        })
    }

    /// The event as CloudEvents structured JSON, written the first time it is asked for
    /// and then shared by every subscriber.
    pub fn json(&self) -> &str {
        // An `Event` is strings, numbers and a string map: writing it cannot fail.
        self.json
            .get_or_init(|| serde_json::to_string(&self.event()).unwrap_or_default())
    }

    /// The bytes it holds while queued.
    fn weight(&self) -> usize {
        96 + self.topic.len()
            + self.id.len()
            + self.source.len()
            + self.payload.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// The fields of an event, before it is written as CloudEvents JSON.
pub(crate) struct EventParts<'a> {
    pub(crate) topic: &'a str,
    pub(crate) id: String,
    pub(crate) source: String,
    pub(crate) time_ms: u64,
    pub(crate) headers: &'a [(String, String)],
    pub(crate) payload: &'a [u8],
    pub(crate) offset: Option<u64>,
}

/// An event as subscribers see it: text payloads as `data`, others as `data_base64`.
pub(crate) fn to_event(p: EventParts<'_>) -> Event {
    let (ct, data, data_base64) = match std::str::from_utf8(p.payload) {
        Ok(text) => ("text/plain; charset=utf-8", Some(text.to_string()), None),
        Err(_) => (
            "application/octet-stream",
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(p.payload)),
        ),
    };
    Event {
        specversion: "1.0".into(),
        id: p.id,
        source: p.source,
        kind: "canal.event".into(),
        time: rfc3339(p.time_ms),
        datacontenttype: ct.into(),
        data,
        data_base64,
        topic: p.topic.to_string(),
        offset: p.offset,
        qos: if p.offset.is_some() { 1 } else { 0 },
        headers: p.headers.iter().cloned().collect::<BTreeMap<_, _>>(),
    }
}

/// A QoS 1 event of `topic`'s log as subscribers see it.
pub fn stored_event(topic: &str, e: &StoredEvent) -> Event {
    let id =
        e.id.clone()
            .unwrap_or_else(|| format!("{topic}:{}", e.offset));
    to_event(EventParts {
        topic,
        id,
        source: format!("canal://topic/{topic}"),
        time_ms: e.time_ms,
        headers: &e.headers,
        payload: &e.payload,
        offset: Some(e.offset),
    })
}

/// The delivery of `e`, with SSE id `id`.
pub(crate) fn message(id: Option<String>, e: EventData) -> Delivery {
    Delivery::Message {
        id,
        event: Arc::new(e),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_event_writes_the_same_json_as_before_once() {
        let e = EventData::stored(
            "a/b",
            StoredEvent {
                offset: 7,
                id: None,
                time_ms: 1000,
                headers: vec![("k".into(), "v".into())],
                payload: vec![0xff, 0],
            },
        );
        let want = serde_json::to_string(&stored_event(
            "a/b",
            &StoredEvent {
                offset: 7,
                id: None,
                time_ms: 1000,
                headers: vec![("k".into(), "v".into())],
                payload: vec![0xff, 0],
            },
        ))
        .unwrap();
        assert_eq!(e.json(), want);
        assert!(std::ptr::eq(e.json(), e.json()), "written once");
        let back: Event = serde_json::from_str(e.json()).unwrap();
        assert_eq!(
            (back.qos, back.offset, back.id.as_str()),
            (1, Some(7), "a/b:7")
        );
        assert_eq!(back.data_base64.as_deref(), Some("/wA="));
        let q0 = EventData::qos0(crate::Qos0Message {
            topic: "a/b".into(),
            id: "m1".into(),
            source: "canal://p".into(),
            time_ms: 5,
            headers: vec![],
            payload: b"hi".to_vec(),
        });
        let back: Event = serde_json::from_str(q0.json()).unwrap();
        assert_eq!(
            (back.qos, back.offset, back.data.as_deref()),
            (0, None, Some("hi"))
        );
        assert_eq!(q0.qos(), 0);
    }
}
