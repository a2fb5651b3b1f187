//! The decisions of a session that need no I/O: what headers an MQTT publish becomes, what
//! a delivery becomes for a client (or why it is not sent), and the client's topic aliases.
//! [`crate::conn`] does the I/O around them.

use crate::codec::Publish;
use crate::records::SessionSub;
use bytes::Bytes;
use std::collections::HashMap;

/// The header that carries a 5.0 Message Expiry Interval (seconds) with an event.
pub const EXPIRY_HEADER: &str = "mqtt-message-expiry";
/// The header that names the MQTT client that published an event (for No Local).
pub const FROM_HEADER: &str = "mqtt-client";
/// The header that marks an event published with the retain flag (for Retain As Published).
pub const RETAIN_HEADER: &str = "mqtt-retain";
/// The header that carries a 5.0 content type.
pub const CONTENT_TYPE_HEADER: &str = "mqtt-content-type";

/// The headers canal adds to what MQTT publishes, which MQTT subscribers do not get as
/// user properties.
pub const INTERNAL_HEADERS: [&str; 4] = [
    FROM_HEADER,
    EXPIRY_HEADER,
    RETAIN_HEADER,
    CONTENT_TYPE_HEADER,
];

/// The canal headers of `p`, published by `client`: its user properties, then what canal
/// keeps of MQTT's own fields.
pub fn publish_headers(p: &Publish, client: &str) -> Vec<(String, String)> {
    let mut h = p.user_properties.clone();
    h.push((FROM_HEADER.into(), client.to_string()));
    if let Some(e) = p.expiry_s {
        h.push((EXPIRY_HEADER.into(), e.to_string()));
    }
    if let Some(ct) = &p.content_type {
        h.push((CONTENT_TYPE_HEADER.into(), ct.clone()));
    }
    if p.retain {
        h.push((RETAIN_HEADER.into(), "1".into()));
    }
    h
}

/// A message on its way to a client, before it is a PUBLISH.
#[derive(Debug, Clone)]
pub struct Delivery<'a> {
    /// Its topic.
    pub topic: &'a str,
    /// Its payload.
    pub payload: &'a Bytes,
    /// The QoS it goes out at (already the lower of the message's and the subscription's).
    pub qos: u8,
    /// Whether it is sent as a retained message (on SUBSCRIBE).
    pub retained: bool,
    /// Its canal headers.
    pub headers: &'a [(String, String)],
    /// When it was published, ms since the epoch.
    pub time_ms: u64,
    /// The subscription it came through.
    pub sub: &'a SessionSub,
}

/// What becomes of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Send this PUBLISH (its packet id still to be given).
    Send(Publish),
    /// Not sent, for this reason (`no_local`, `expired`).
    Skip(&'static str),
}

/// What delivery `d` becomes for client `client` at `now_ms`.
pub fn outgoing(d: &Delivery<'_>, client: &str, now_ms: u64) -> Verdict {
    let header = |k: &str| {
        d.headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    };
    if d.sub.no_local && header(FROM_HEADER) == Some(client) {
        return Verdict::Skip("no_local");
    }
    let expiry_s = match header(EXPIRY_HEADER).and_then(|e| e.parse::<u64>().ok()) {
        Some(e) => {
            let age_s = now_ms.saturating_sub(d.time_ms) / 1000;
            if age_s >= e {
                return Verdict::Skip("expired");
            }
            Some(u32::try_from(e - age_s).unwrap_or(u32::MAX))
        }
        None => None,
    };
    let retain = d.retained || (d.sub.retain_as_published && header(RETAIN_HEADER) == Some("1"));
    Verdict::Send(Publish {
        topic: d.topic.to_string(),
        qos: d.qos,
        retain,
        dup: false,
        pkid: 0,
        payload: d.payload.clone(),
        user_properties: d
            .headers
            .iter()
            .filter(|(k, _)| !INTERNAL_HEADERS.contains(&k.as_str()))
            .cloned()
            .collect(),
        expiry_s,
        topic_alias: None,
        subscription_ids: d.sub.id.into_iter().collect(),
        content_type: header(CONTENT_TYPE_HEADER).map(str::to_string),
    })
}

/// Why a topic alias was refused: the 5.0 DISCONNECT reason is [`AliasError::code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AliasError {
    /// 0, or over the maximum the server gave.
    #[error("topic alias {alias} is out of range: 1 to {max} (Topic Alias Maximum)")]
    OutOfRange {
        /// The alias.
        alias: u16,
        /// The maximum.
        max: u16,
    },
    /// An empty topic with an alias never set.
    #[error("topic alias {0} was never set: send it with a topic first")]
    Unknown(u16),
}

impl AliasError {
    /// The DISCONNECT reason: 0x94 Topic Alias invalid, 0x82 Protocol Error.
    pub fn code(&self) -> u8 {
        match self {
            AliasError::OutOfRange { .. } => 0x94,
            AliasError::Unknown(_) => 0x82,
        }
    }
}

/// A 5.0 client's topic aliases (client to server).
#[derive(Debug, Clone, Default)]
pub struct Aliases {
    max: u16,
    map: HashMap<u16, String>,
}

impl Aliases {
    /// No aliases yet; at most `max` of them.
    pub fn new(max: u16) -> Aliases {
        Aliases {
            max,
            map: HashMap::new(),
        }
    }

    /// The topic of a PUBLISH with `topic` and `alias`: a topic with an alias sets it, an
    /// empty topic takes the alias's.
    pub fn resolve(&mut self, topic: String, alias: Option<u16>) -> Result<String, AliasError> {
        let Some(a) = alias else { return Ok(topic) };
        if a == 0 || a > self.max {
            return Err(AliasError::OutOfRange {
                alias: a,
                max: self.max,
            });
        }
        if topic.is_empty() {
            return self.map.get(&a).cloned().ok_or(AliasError::Unknown(a));
        }
        self.map.insert(a, topic.clone());
        Ok(topic)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sub() -> SessionSub {
        SessionSub {
            filter: "a/#".into(),
            qos: 1,
            no_local: false,
            retain_as_published: false,
            id: Some(7),
            retain_handling: 0,
        }
    }

    fn publish(retain: bool) -> Publish {
        Publish {
            topic: "a/b".into(),
            qos: 1,
            retain,
            dup: false,
            pkid: 9,
            payload: Bytes::from_static(b"p"),
            user_properties: vec![("unit".into(), "C".into())],
            expiry_s: Some(60),
            topic_alias: None,
            subscription_ids: Vec::new(),
            content_type: Some("text/plain".into()),
        }
    }

    #[test]
    fn mqtt_fields_ride_in_headers_and_come_back() {
        let h = publish_headers(&publish(true), "c1");
        let payload = Bytes::from_static(b"p");
        let s = SessionSub {
            retain_as_published: true,
            ..sub()
        };
        let d = Delivery {
            topic: "a/b",
            payload: &payload,
            qos: 1,
            retained: false,
            headers: &h,
            time_ms: 10_000,
            sub: &s,
        };
        let Verdict::Send(p) = outgoing(&d, "c2", 25_000) else {
            panic!("sent")
        };
        // Only the client's own properties come back as user properties.
        assert_eq!(
            p.user_properties,
            vec![("unit".to_string(), "C".to_string())]
        );
        assert_eq!(p.expiry_s, Some(45), "what is left of the expiry");
        assert_eq!(p.content_type.as_deref(), Some("text/plain"));
        assert!(p.retain, "retain as published");
        assert_eq!(p.subscription_ids, vec![7]);
        // Without Retain As Published a live message is not flagged retained.
        let d2 = Delivery {
            sub: &sub(),
            ..d.clone()
        };
        assert!(matches!(outgoing(&d2, "c2", 25_000), Verdict::Send(p) if !p.retain));
        // Expired: not sent.
        assert_eq!(outgoing(&d, "c2", 70_000), Verdict::Skip("expired"));
        // No Local: not sent to its own publisher.
        let nl = SessionSub {
            no_local: true,
            ..sub()
        };
        let d3 = Delivery {
            sub: &nl,
            ..d.clone()
        };
        assert_eq!(outgoing(&d3, "c1", 25_000), Verdict::Skip("no_local"));
        assert!(matches!(outgoing(&d3, "c2", 25_000), Verdict::Send(_)));
        // HTTP publishers' headers are user properties to MQTT subscribers.
        let http = vec![("trace".to_string(), "x".to_string())];
        let d4 = Delivery {
            headers: &http,
            ..d.clone()
        };
        let Verdict::Send(p) = outgoing(&d4, "c2", 0) else {
            panic!("sent")
        };
        assert_eq!(p.user_properties, http);
        assert_eq!((p.expiry_s, p.retain), (None, false));
    }

    #[test]
    fn topic_aliases_are_set_used_and_bounded() {
        let mut a = Aliases::new(2);
        assert_eq!(a.resolve("t/1".into(), None), Ok("t/1".into()));
        assert_eq!(a.resolve("t/1".into(), Some(1)), Ok("t/1".into()));
        assert_eq!(a.resolve(String::new(), Some(1)), Ok("t/1".into()));
        assert_eq!(a.resolve("t/2".into(), Some(1)), Ok("t/2".into()));
        assert_eq!(a.resolve(String::new(), Some(1)), Ok("t/2".into()));
        let e = a.resolve(String::new(), Some(2)).unwrap_err();
        assert_eq!((e.code(), e), (0x82, AliasError::Unknown(2)));
        for bad in [0, 3] {
            let e = a.resolve("x".into(), Some(bad)).unwrap_err();
            assert_eq!(e.code(), 0x94);
            assert!(e.to_string().contains("1 to 2"), "{e}");
        }
    }
}
