//! What a subscriber is handed: events as CloudEvents JSON, and notices of events it missed.

use crate::feed::Weighed;
use base64::Engine;
use canal_consensus::topics::StoredEvent;
use canal_proto::api::Event;
use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

/// One thing a subscription hands its client: an event, or news of events it missed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// An event: its SSE id (`topic:offset` for QoS 1) and its JSON.
    Message {
        /// `topic:offset`, for QoS 1 events.
        id: Option<String>,
        /// The event as CloudEvents structured JSON.
        json: String,
    },
    /// Events the subscriber missed, as JSON (a [`canal_proto::api::Lagged`] gap, a give-up
    /// notice, or `{"dropped":N}` for QoS 0).
    Lagged(String),
}

impl Weighed for Delivery {
    fn weight(&self) -> usize {
        match self {
            Delivery::Message { id, json } => json.len() + id.as_ref().map_or(0, String::len),
            Delivery::Lagged(json) => json.len(),
        }
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

/// The delivery of `e` with SSE id `id`; `None` if it cannot be written as JSON.
pub(crate) fn message(id: Option<String>, e: &Event) -> Option<Delivery> {
    serde_json::to_string(e)
        .ok()
        .map(|json| Delivery::Message { id, json })
}
