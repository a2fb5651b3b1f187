//! MQTT packets in and out, for 3.1.1 and 5.0 alike.
//!
//! The bytes are read and written by the codec of the `rumqttc` crate (its `mqttbytes`
//! modules, `v4` for 3.1.1 and `v5`); this module frames a packet first with its own small
//! decoder of the fixed header ([`frame`]: packet type, remaining length, the size limit),
//! reads the protocol level of a CONNECT ([`connect_version`]) to pick the codec, and turns
//! both codecs' types into one [`Inbound`] and one [`Outbound`] the session works with, so
//! the session logic is written once.
//!
//! ```text
//!   bytes ─> frame() ─> (first CONNECT: connect_version()) ─> v4 | v5 codec ─> Inbound
//!   Outbound ─> v4 | v5 codec ─> bytes
//! ```

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

/// The protocol versions a client may speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

/// Why bytes from a client are not a packet canal accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The remaining length is not a valid variable byte integer (more than 4 bytes).
    #[error("malformed remaining length: at most 4 bytes of variable length are allowed")]
    MalformedLength,
    /// The packet is larger than the node accepts.
    #[error("packet of {size} bytes is over the limit of {limit} bytes (max_packet_bytes)")]
    TooLarge {
        /// The packet's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The first packet is not a CONNECT.
    #[error("the first packet must be CONNECT, not packet type {0}")]
    NotConnect(u8),
    /// The CONNECT names a protocol canal does not speak.
    #[error(
        "protocol {name:?} level {level} is not supported: MQTT 3.1.1 (level 4) and 5.0 (level 5) are"
    )]
    Protocol {
        /// The protocol name given.
        name: String,
        /// The level given.
        level: u8,
    },
    /// The packet does not parse.
    #[error("malformed {what} packet: {why}")]
    Malformed {
        /// The packet type.
        what: &'static str,
        /// What the codec said.
        why: String,
    },
    /// A topic or string is not UTF-8.
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
}

/// A framed packet: its type and flags, and where it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// The packet type (1 CONNECT ... 15 AUTH).
    pub kind: u8,
    /// The low four bits of the first byte.
    pub flags: u8,
    /// Bytes of the fixed header.
    pub header_len: usize,
    /// Bytes after the fixed header.
    pub remaining: usize,
}

impl Frame {
    /// The whole packet's length.
    pub fn len(&self) -> usize {
        self.header_len + self.remaining
    }

    /// Whether the packet has no bytes at all (never: a fixed header is at least 2).
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Frames the packet at the start of `buf`: `Ok(None)` if more bytes are needed, an error
/// if the length is malformed or the packet is over `limit` bytes (said as soon as the
/// fixed header is read, before the body arrives).
pub fn frame(buf: &[u8], limit: usize) -> Result<Option<Frame>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut remaining: usize = 0;
    let mut shift = 0;
    let mut i = 1;
    loop {
        if i > 4 {
            return Err(DecodeError::MalformedLength);
        }
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        remaining |= ((b & 0x7f) as usize) << shift;
        shift += 7;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    let f = Frame {
        kind: first >> 4,
        flags: first & 0x0f,
        header_len: i,
        remaining,
    };
    if f.len() > limit {
        return Err(DecodeError::TooLarge {
            size: f.len(),
            limit,
        });
    }
    if buf.len() < f.len() {
        return Ok(None);
    }
    Ok(Some(f))
}

/// The protocol version of a framed CONNECT packet (`packet` is the whole packet).
pub fn connect_version(f: &Frame, packet: &[u8]) -> Result<Version, DecodeError> {
    if f.kind != 1 {
        return Err(DecodeError::NotConnect(f.kind));
    }
    let body = packet.get(f.header_len..f.len()).unwrap_or_default();
    let malformed = || DecodeError::Malformed {
        what: "CONNECT",
        why: "too short for a protocol name and level".into(),
    };
    let n = match body.get(0..2) {
        Some(&[a, b]) => u16::from_be_bytes([a, b]) as usize,
        _ => return Err(malformed()),
    };
    let name = body.get(2..2 + n).ok_or_else(malformed)?;
    let level = *body.get(2 + n).ok_or_else(malformed)?;
    let name = String::from_utf8_lossy(name).into_owned();
    match (name.as_str(), level) {
        ("MQTT", 4) => Ok(Version::V311),
        ("MQTT", 5) => Ok(Version::V5),
        _ => Err(DecodeError::Protocol { name, level }),
    }
}

/// A will message, as a CONNECT gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Bytes,
    /// Its QoS.
    pub qos: u8,
    /// Whether it is retained.
    pub retain: bool,
    /// Seconds after the connection ends before it is sent (5.0).
    pub delay_s: u32,
    /// Its message expiry (5.0).
    pub expiry_s: Option<u32>,
    /// Its user properties (5.0).
    pub user_properties: Vec<(String, String)>,
}

/// A CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// The protocol version.
    pub version: Version,
    /// The client id (may be empty).
    pub client_id: String,
    /// Clean session (3.1.1) / clean start (5.0).
    pub clean_start: bool,
    /// Keep-alive, seconds (0: none).
    pub keep_alive: u16,
    /// How long the session outlives the connection, seconds: 5.0's Session Expiry
    /// Interval; on 3.1.1, 0 for a clean session and `u32::MAX` (never) otherwise.
    pub session_expiry_s: u32,
    /// How many QoS 1 publishes the client takes before it acknowledges (Receive Maximum).
    pub receive_maximum: u16,
    /// The largest packet the client takes (5.0).
    pub max_packet_size: Option<u32>,
    /// How many topic aliases the client takes from the server (5.0).
    pub topic_alias_max: u16,
    /// The will, if any.
    pub will: Option<Will>,
    /// The user name, if any.
    pub username: Option<String>,
    /// The password, if any.
    pub password: Option<String>,
}

/// A PUBLISH, either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// The topic (empty when a 5.0 topic alias stands for it).
    pub topic: String,
    /// QoS 0, 1 or 2.
    pub qos: u8,
    /// The retain flag.
    pub retain: bool,
    /// The duplicate flag.
    pub dup: bool,
    /// The packet id (QoS 1 and 2).
    pub pkid: u16,
    /// The payload.
    pub payload: Bytes,
    /// User properties (5.0).
    pub user_properties: Vec<(String, String)>,
    /// Message expiry, seconds (5.0).
    pub expiry_s: Option<u32>,
    /// Topic alias (5.0).
    pub topic_alias: Option<u16>,
    /// Subscription identifiers (5.0, server to client).
    pub subscription_ids: Vec<usize>,
    /// Content type (5.0).
    pub content_type: Option<String>,
}

/// One filter of a SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The filter as given (may be `$share/G/F`).
    pub filter: String,
    /// The QoS asked for.
    pub qos: u8,
    /// No Local (5.0): not sent this client's own publishes.
    pub no_local: bool,
    /// Retain As Published (5.0).
    pub retain_as_published: bool,
    /// Retain Handling (5.0): 0 send retained, 1 only if new, 2 never.
    pub retain_handling: u8,
}

/// A packet from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// CONNECT.
    Connect(Box<Connect>),
    /// PUBLISH.
    Publish(Publish),
    /// PUBACK.
    PubAck(u16),
    /// PUBREC, PUBREL or PUBCOMP: QoS 2, which canal does not offer.
    Qos2(&'static str),
    /// SUBSCRIBE.
    Subscribe {
        /// Packet id.
        pkid: u16,
        /// The filters.
        filters: Vec<Subscription>,
        /// The subscription identifier (5.0).
        id: Option<usize>,
    },
    /// UNSUBSCRIBE.
    Unsubscribe {
        /// Packet id.
        pkid: u16,
        /// The filters.
        filters: Vec<String>,
    },
    /// PINGREQ.
    PingReq,
    /// DISCONNECT.
    Disconnect {
        /// The reason (0 normal, 4 with will; 3.1.1: 0).
        reason: u8,
        /// A new session expiry (5.0).
        session_expiry_s: Option<u32>,
    },
    /// A packet a client never sends (CONNACK, SUBACK, ...) or AUTH.
    Unexpected(&'static str),
}

impl Inbound {
    /// The packet type's name, as metrics label it.
    pub fn kind(&self) -> &'static str {
        match self {
            Inbound::Connect(_) => "connect",
            Inbound::Publish(_) => "publish",
            Inbound::PubAck(_) => "puback",
            Inbound::Qos2(k) => k,
            Inbound::Subscribe { .. } => "subscribe",
            Inbound::Unsubscribe { .. } => "unsubscribe",
            Inbound::PingReq => "pingreq",
            Inbound::Disconnect { .. } => "disconnect",
            Inbound::Unexpected(k) => k,
        }
    }
}

/// What CONNACK tells a 5.0 client of the server's limits.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerLimits {
    /// Receive Maximum: QoS 1 publishes the server takes before it acknowledges.
    pub receive_maximum: u16,
    /// The largest packet the server takes.
    pub max_packet_size: u32,
    /// Topic aliases the client may use.
    pub topic_alias_max: u16,
    /// The client id the server gave, when the client sent none.
    pub assigned_client_id: Option<String>,
    /// The session expiry the server uses, when it differs from the client's.
    pub session_expiry_s: Option<u32>,
}

/// A packet to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// CONNACK: `code` is the 5.0 reason code; 3.1.1 gets the nearest return code.
    ConnAck {
        /// Session present.
        session_present: bool,
        /// The 5.0 reason code (0 success).
        code: u8,
        /// The server's limits (5.0 only).
        limits: Box<ServerLimits>,
    },
    /// PUBLISH.
    Publish(Publish),
    /// PUBACK with a 5.0 reason code (3.1.1 has none).
    PubAck {
        /// Packet id.
        pkid: u16,
        /// 5.0 reason code.
        reason: u8,
    },
    /// SUBACK: a granted QoS (0, 1) or a 5.0 failure code per filter; 3.1.1 turns failures
    /// into 0x80.
    SubAck {
        /// Packet id.
        pkid: u16,
        /// One per filter.
        codes: Vec<u8>,
    },
    /// UNSUBACK: a 5.0 reason per filter.
    UnsubAck {
        /// Packet id.
        pkid: u16,
        /// One per filter (0 success, 0x11 no subscription existed).
        codes: Vec<u8>,
    },
    /// PINGRESP.
    PingResp,
    /// DISCONNECT with a 5.0 reason code (3.1.1: the connection is closed, nothing sent).
    Disconnect {
        /// The reason code.
        reason: u8,
    },
}

impl Outbound {
    /// The packet type's name, as metrics label it.
    pub fn kind(&self) -> &'static str {
        match self {
            Outbound::ConnAck { .. } => "connack",
            Outbound::Publish(_) => "publish",
            Outbound::PubAck { .. } => "puback",
            Outbound::SubAck { .. } => "suback",
            Outbound::UnsubAck { .. } => "unsuback",
            Outbound::PingResp => "pingresp",
            Outbound::Disconnect { .. } => "disconnect",
        }
    }
}

fn packet_name(kind: u8) -> &'static str {
    match kind {
        1 => "CONNECT",
        2 => "CONNACK",
        3 => "PUBLISH",
        4 => "PUBACK",
        5 => "PUBREC",
        6 => "PUBREL",
        7 => "PUBCOMP",
        8 => "SUBSCRIBE",
        9 => "SUBACK",
        10 => "UNSUBSCRIBE",
        11 => "UNSUBACK",
        12 => "PINGREQ",
        13 => "PINGRESP",
        14 => "DISCONNECT",
        15 => "AUTH",
        _ => "reserved",
    }
}

/// Decodes the framed packet `f` at the start of `buf` (which holds all of it) and removes
/// it from `buf`.
pub fn decode(version: Version, f: &Frame, buf: &mut BytesMut) -> Result<Inbound, DecodeError> {
    let what = packet_name(f.kind);
    // The fixed header's reserved flags are fixed by the spec; a wrong one is malformed.
    let flags_ok = match f.kind {
        3 => (f.flags >> 1) & 3 != 3,
        6 | 8 | 10 => f.flags == 2,
        0 => false,
        _ => f.flags == 0,
    };
    if !flags_ok {
        let _ = buf.split_to(f.len());
        return Err(DecodeError::Malformed {
            what,
            why: format!("reserved flags {:#06b} in the fixed header", f.flags),
        });
    }
    // Empty bodies: the codecs refuse some that the spec allows (a 5.0 DISCONNECT).
    if f.remaining == 0 {
        let _ = buf.split_to(f.len());
        return match f.kind {
            12 => Ok(Inbound::PingReq),
            14 => Ok(Inbound::Disconnect {
                reason: 0,
                session_expiry_s: None,
            }),
            _ => Err(DecodeError::Malformed {
                what,
                why: "the packet has no body".into(),
            }),
        };
    }
    let malformed = |why: String| DecodeError::Malformed { what, why };
    match version {
        Version::V311 => {
            let p = v4::Packet::read(buf, usize::MAX).map_err(|e| malformed(e.to_string()))?;
            Ok(from_v4(p))
        }
        Version::V5 => {
            let p = v5::Packet::read(buf, None).map_err(|e| malformed(e.to_string()))?;
            from_v5(p)
        }
    }
}

fn qos_u8(q: rumqttc::mqttbytes::QoS) -> u8 {
    q as u8
}

fn qos5_u8(q: rumqttc::v5::mqttbytes::QoS) -> u8 {
    q as u8
}

fn from_v4(p: v4::Packet) -> Inbound {
    match p {
        v4::Packet::Connect(c) => Inbound::Connect(Box::new(Connect {
            version: Version::V311,
            client_id: c.client_id,
            clean_start: c.clean_session,
            keep_alive: c.keep_alive,
            session_expiry_s: if c.clean_session { 0 } else { u32::MAX },
            receive_maximum: u16::MAX,
            max_packet_size: None,
            topic_alias_max: 0,
            will: c.last_will.map(|w| Will {
                topic: w.topic,
                payload: w.message,
                qos: qos_u8(w.qos),
                retain: w.retain,
                delay_s: 0,
                expiry_s: None,
                user_properties: Vec::new(),
            }),
            username: c.login.as_ref().map(|l| l.username.clone()),
            password: c.login.map(|l| l.password),
        })),
        v4::Packet::Publish(p) => Inbound::Publish(Publish {
            topic: p.topic,
            qos: qos_u8(p.qos),
            retain: p.retain,
            dup: p.dup,
            pkid: p.pkid,
            payload: p.payload,
            user_properties: Vec::new(),
            expiry_s: None,
            topic_alias: None,
            subscription_ids: Vec::new(),
            content_type: None,
        }),
        v4::Packet::PubAck(a) => Inbound::PubAck(a.pkid),
        v4::Packet::PubRec(_) => Inbound::Qos2("pubrec"),
        v4::Packet::PubRel(_) => Inbound::Qos2("pubrel"),
        v4::Packet::PubComp(_) => Inbound::Qos2("pubcomp"),
        v4::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| Subscription {
                    filter: f.path,
                    qos: qos_u8(f.qos),
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                })
                .collect(),
            id: None,
        },
        v4::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::Disconnect => Inbound::Disconnect {
            reason: 0,
            session_expiry_s: None,
        },
        v4::Packet::ConnAck(_) => Inbound::Unexpected("connack"),
        v4::Packet::SubAck(_) => Inbound::Unexpected("suback"),
        v4::Packet::UnsubAck(_) => Inbound::Unexpected("unsuback"),
        v4::Packet::PingResp => Inbound::Unexpected("pingresp"),
    }
}

fn from_v5(p: v5::Packet) -> Result<Inbound, DecodeError> {
    Ok(match p {
        v5::Packet::Connect(c, will, login) => {
            let props = c.properties.as_ref();
            let will = match will {
                Some(w) => {
                    let topic = String::from_utf8(w.topic.to_vec())
                        .map_err(|_| DecodeError::NotUtf8("the will topic"))?;
                    let wp = w.properties.as_ref();
                    Some(Will {
                        topic,
                        payload: w.message,
                        qos: qos5_u8(w.qos),
                        retain: w.retain,
                        delay_s: wp.and_then(|p| p.delay_interval).unwrap_or(0),
                        expiry_s: wp.and_then(|p| p.message_expiry_interval),
                        user_properties: wp.map(|p| p.user_properties.clone()).unwrap_or_default(),
                    })
                }
                None => None,
            };
            Inbound::Connect(Box::new(Connect {
                version: Version::V5,
                client_id: c.client_id,
                clean_start: c.clean_start,
                keep_alive: c.keep_alive,
                session_expiry_s: props.and_then(|p| p.session_expiry_interval).unwrap_or(0),
                receive_maximum: props
                    .and_then(|p| p.receive_maximum)
                    .filter(|n| *n > 0)
                    .unwrap_or(u16::MAX),
                max_packet_size: props.and_then(|p| p.max_packet_size).filter(|n| *n > 0),
                topic_alias_max: props.and_then(|p| p.topic_alias_max).unwrap_or(0),
                will,
                username: login.as_ref().map(|l| l.username.clone()),
                password: login.map(|l| l.password),
            }))
        }
        v5::Packet::Publish(p) => {
            let topic = String::from_utf8(p.topic.to_vec())
                .map_err(|_| DecodeError::NotUtf8("the topic"))?;
            let props = p.properties.unwrap_or_default();
            Inbound::Publish(Publish {
                topic,
                qos: qos5_u8(p.qos),
                retain: p.retain,
                dup: p.dup,
                pkid: p.pkid,
                payload: p.payload,
                user_properties: props.user_properties,
                expiry_s: props.message_expiry_interval,
                topic_alias: props.topic_alias,
                subscription_ids: Vec::new(),
                content_type: props.content_type,
            })
        }
        v5::Packet::PubAck(a) => Inbound::PubAck(a.pkid),
        v5::Packet::PubRec(_) => Inbound::Qos2("pubrec"),
        v5::Packet::PubRel(_) => Inbound::Qos2("pubrel"),
        v5::Packet::PubComp(_) => Inbound::Qos2("pubcomp"),
        v5::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            id: s.properties.as_ref().and_then(|p| p.id),
            filters: s
                .filters
                .into_iter()
                .map(|f| Subscription {
                    filter: f.path,
                    qos: qos5_u8(f.qos),
                    no_local: f.nolocal,
                    retain_as_published: f.preserve_retain,
                    retain_handling: f.retain_forward_rule as u8,
                })
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => Inbound::PingReq,
        v5::Packet::Disconnect(d) => Inbound::Disconnect {
            reason: d.reason_code as u8,
            session_expiry_s: d.properties.and_then(|p| p.session_expiry_interval),
        },
        v5::Packet::Auth(_) => Inbound::Unexpected("auth"),
        v5::Packet::ConnAck(_) => Inbound::Unexpected("connack"),
        v5::Packet::SubAck(_) => Inbound::Unexpected("suback"),
        v5::Packet::UnsubAck(_) => Inbound::Unexpected("unsuback"),
        v5::Packet::PingResp(_) => Inbound::Unexpected("pingresp"),
    })
}

/// Why a packet could not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode {what}: {why}")]
pub struct EncodeError {
    /// The packet type.
    pub what: &'static str,
    /// What the codec said.
    pub why: String,
}

fn qos_of(q: u8) -> rumqttc::mqttbytes::QoS {
    match q {
        0 => rumqttc::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::mqttbytes::QoS::ExactlyOnce,
    }
}

fn v5_qos(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// The 3.1.1 CONNACK return code nearest a 5.0 reason code.
fn v4_connack_code(code: u8) -> v4::ConnectReturnCode {
    match code {
        0 => v4::ConnectReturnCode::Success,
        0x84 => v4::ConnectReturnCode::RefusedProtocolVersion,
        0x85 => v4::ConnectReturnCode::BadClientId,
        0x86 => v4::ConnectReturnCode::BadUserNamePassword,
        0x87 => v4::ConnectReturnCode::NotAuthorized,
        _ => v4::ConnectReturnCode::ServiceUnavailable,
    }
}

fn v5_connack_code(code: u8) -> v5::ConnectReturnCode {
    use v5::ConnectReturnCode as C;
    match code {
        0 => C::Success,
        0x81 => C::MalformedPacket,
        0x82 => C::ProtocolError,
        0x83 => C::ImplementationSpecificError,
        0x84 => C::UnsupportedProtocolVersion,
        0x85 => C::ClientIdentifierNotValid,
        0x86 => C::BadUserNamePassword,
        0x87 => C::NotAuthorized,
        0x88 => C::ServerUnavailable,
        0x89 => C::ServerBusy,
        0x90 => C::TopicNameInvalid,
        0x95 => C::PacketTooLarge,
        0x97 => C::QuotaExceeded,
        0x9A => C::RetainNotSupported,
        0x9B => C::QoSNotSupported,
        _ => C::UnspecifiedError,
    }
}

fn v5_suback_code(code: u8) -> v5::SubscribeReasonCode {
    use v5::SubscribeReasonCode as S;
    match code {
        0..=2 => S::Success(v5_qos(code)),
        0x83 => S::ImplementationSpecific,
        0x87 => S::NotAuthorized,
        0x8F => S::TopicFilterInvalid,
        0x91 => S::PkidInUse,
        0x97 => S::QuotaExceeded,
        0x9E => S::SharedSubscriptionsNotSupported,
        0xA1 => S::SubscriptionIdNotSupported,
        0xA2 => S::WildcardSubscriptionsNotSupported,
        _ => S::Unspecified,
    }
}

fn v5_puback_reason(code: u8) -> v5::PubAckReason {
    use v5::PubAckReason as R;
    match code {
        0 => R::Success,
        0x10 => R::NoMatchingSubscribers,
        0x83 => R::ImplementationSpecificError,
        0x87 => R::NotAuthorized,
        0x90 => R::TopicNameInvalid,
        0x91 => R::PacketIdentifierInUse,
        0x97 => R::QuotaExceeded,
        0x99 => R::PayloadFormatInvalid,
        _ => R::UnspecifiedError,
    }
}

#[cfg(test)]
fn v5_disconnect_reason(code: u8) -> v5::DisconnectReasonCode {
    use v5::DisconnectReasonCode as D;
    match code {
        0 => D::NormalDisconnection,
        0x81 => D::MalformedPacket,
        0x82 => D::ProtocolError,
        0x83 => D::ImplementationSpecificError,
        0x87 => D::NotAuthorized,
        0x89 => D::ServerBusy,
        0x8B => D::ServerShuttingDown,
        0x8D => D::KeepAliveTimeout,
        0x8E => D::SessionTakenOver,
        0x8F => D::TopicFilterInvalid,
        0x90 => D::TopicNameInvalid,
        0x93 => D::ReceiveMaximumExceeded,
        0x94 => D::TopicAliasInvalid,
        0x95 => D::PacketTooLarge,
        0x97 => D::QuotaExceeded,
        0x9A => D::RetainNotSupported,
        0x9B => D::QoSNotSupported,
        _ => D::UnspecifiedError,
    }
}

/// Writes `p` for a client of `version` onto `buf`. A 3.1.1 DISCONNECT writes nothing (a
/// 3.1.1 server closes the connection instead).
pub fn encode(version: Version, p: &Outbound, buf: &mut BytesMut) -> Result<(), EncodeError> {
    let what = p.kind();
    let err = |e: String| EncodeError { what, why: e };
    match version {
        Version::V311 => {
            let packet = match p {
                Outbound::ConnAck {
                    session_present,
                    code,
                    ..
                } => {
                    v4::Packet::ConnAck(v4::ConnAck::new(v4_connack_code(*code), *session_present))
                }
                Outbound::Publish(p) => v4::Packet::Publish(v4::Publish {
                    dup: p.dup,
                    qos: qos_of(p.qos),
                    retain: p.retain,
                    topic: p.topic.clone(),
                    pkid: p.pkid,
                    payload: p.payload.clone(),
                }),
                Outbound::PubAck { pkid, .. } => v4::Packet::PubAck(v4::PubAck::new(*pkid)),
                Outbound::SubAck { pkid, codes } => v4::Packet::SubAck(v4::SubAck::new(
                    *pkid,
                    codes
                        .iter()
                        .map(|c| match c {
                            0..=2 => v4::SubscribeReasonCode::Success(qos_of(*c)),
                            _ => v4::SubscribeReasonCode::Failure,
                        })
                        .collect(),
                )),
                Outbound::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(*pkid)),
                Outbound::PingResp => v4::Packet::PingResp,
                Outbound::Disconnect { .. } => return Ok(()),
            };
            packet
                .write(buf, usize::MAX)
                .map(|_| ())
                .map_err(|e| err(e.to_string()))
        }
        Version::V5 => {
            if let Outbound::Disconnect { reason } = p {
                // Written here, not by the crate's codec: for a reason other than 0 and no
                // properties it says a remaining length of 1 and then writes 2 bytes (the
                // reason and a property length), which leaves a stray byte that clients
                // (the crate's own among them) fail on. Reason, property length 0.
                buf.extend_from_slice(&[0xE0, 0x02, *reason, 0x00]);
                return Ok(());
            }
            let packet = match p {
                Outbound::ConnAck {
                    session_present,
                    code,
                    limits,
                } => v5::Packet::ConnAck(v5::ConnAck {
                    session_present: *session_present,
                    code: v5_connack_code(*code),
                    properties: (*code == 0).then(|| v5::ConnAckProperties {
                        session_expiry_interval: limits.session_expiry_s,
                        receive_max: Some(limits.receive_maximum),
                        max_qos: Some(1),
                        retain_available: Some(1),
                        max_packet_size: Some(limits.max_packet_size),
                        assigned_client_identifier: limits.assigned_client_id.clone(),
                        topic_alias_max: Some(limits.topic_alias_max),
                        reason_string: None,
                        user_properties: Vec::new(),
                        wildcard_subscription_available: Some(1),
                        subscription_identifiers_available: Some(1),
                        shared_subscription_available: Some(1),
                        server_keep_alive: None,
                        response_information: None,
                        server_reference: None,
                        authentication_method: None,
                        authentication_data: None,
                    }),
                }),
                Outbound::Publish(p) => {
                    let props = v5::PublishProperties {
                        message_expiry_interval: p.expiry_s,
                        topic_alias: p.topic_alias,
                        user_properties: p.user_properties.clone(),
                        subscription_identifiers: p.subscription_ids.clone(),
                        content_type: p.content_type.clone(),
                        ..Default::default()
                    };
                    let empty = props == v5::PublishProperties::default();
                    v5::Packet::Publish(v5::Publish {
                        dup: p.dup,
                        qos: v5_qos(p.qos),
                        retain: p.retain,
                        topic: Bytes::from(p.topic.clone().into_bytes()),
                        pkid: p.pkid,
                        payload: p.payload.clone(),
                        properties: (!empty).then_some(props),
                    })
                }
                Outbound::PubAck { pkid, reason } => v5::Packet::PubAck(v5::PubAck {
                    pkid: *pkid,
                    reason: v5_puback_reason(*reason),
                    properties: None,
                }),
                Outbound::SubAck { pkid, codes } => v5::Packet::SubAck(v5::SubAck {
                    pkid: *pkid,
                    return_codes: codes.iter().map(|c| v5_suback_code(*c)).collect(),
                    properties: None,
                }),
                Outbound::UnsubAck { pkid, codes } => v5::Packet::UnsubAck(v5::UnsubAck {
                    pkid: *pkid,
                    reasons: codes
                        .iter()
                        .map(|c| match c {
                            0 => v5::UnsubAckReason::Success,
                            0x11 => v5::UnsubAckReason::NoSubscriptionExisted,
                            0x8F => v5::UnsubAckReason::TopicFilterInvalid,
                            _ => v5::UnsubAckReason::UnspecifiedError,
                        })
                        .collect(),
                    properties: None,
                }),
                Outbound::PingResp => v5::Packet::PingResp(v5::PingResp),
                // Written above.
                Outbound::Disconnect { .. } => return Ok(()),
            };
            packet
                .write(buf, None)
                .map(|_| ())
                .map_err(|e| err(e.to_string()))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_5_0_disconnect_is_one_whole_packet_clients_read() {
        for reason in [0x00, 0x8E, 0x9B, 0x82] {
            let mut b = BytesMut::new();
            encode(Version::V5, &Outbound::Disconnect { reason }, &mut b).unwrap();
            assert_eq!(&b[..], &[0xE0, 0x02, reason, 0x00]);
            let p = v5::Packet::read(&mut b, None).unwrap();
            let v5::Packet::Disconnect(d) = p else {
                panic!("{p:?}")
            };
            assert_eq!(d.reason_code, v5_disconnect_reason(reason));
            assert!(b.is_empty(), "nothing left over: {b:?}");
        }
    }

    fn encode_v4(p: v4::Packet) -> BytesMut {
        let mut b = BytesMut::new();
        p.write(&mut b, usize::MAX).unwrap();
        b
    }

    fn decode_all(
        version: Version,
        bytes: &[u8],
        limit: usize,
    ) -> Vec<Result<Inbound, DecodeError>> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        loop {
            match frame(&buf, limit) {
                Ok(Some(f)) => out.push(decode(version, &f, &mut buf)),
                Ok(None) => break,
                Err(e) => {
                    out.push(Err(e));
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn lengths_are_framed_and_limited() {
        assert_eq!(frame(&[], 100), Ok(None));
        assert_eq!(frame(&[0x30], 100), Ok(None));
        assert_eq!(frame(&[0x30, 0x80], 100), Ok(None));
        let f = frame(&[0xC0, 0x00], 100).unwrap().unwrap();
        assert_eq!((f.kind, f.len()), (12, 2));
        assert_eq!(
            frame(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], 100),
            Err(DecodeError::MalformedLength)
        );
        // Over the limit as soon as the header says so, before the body comes.
        assert_eq!(
            frame(&[0x30, 0xE8, 0x07], 100),
            Err(DecodeError::TooLarge {
                size: 1003,
                limit: 100
            })
        );
    }

    #[test]
    fn connect_versions_are_read_before_decoding() {
        let b = encode_v4(v4::Packet::Connect(v4::Connect::new("c1")));
        let f = frame(&b, 1000).unwrap().unwrap();
        assert_eq!(connect_version(&f, &b), Ok(Version::V311));
        let mut b5 = BytesMut::new();
        v5::Packet::Connect(
            v5::Connect {
                keep_alive: 10,
                client_id: "c5".into(),
                clean_start: true,
                properties: None,
            },
            None,
            None,
        )
        .write(&mut b5, None)
        .unwrap();
        let f5 = frame(&b5, 1000).unwrap().unwrap();
        assert_eq!(connect_version(&f5, &b5), Ok(Version::V5));
        let mut b5m = b5.clone();
        match decode(Version::V5, &f5, &mut b5m).unwrap() {
            Inbound::Connect(c) => {
                assert_eq!(c.client_id, "c5");
                assert_eq!(c.session_expiry_s, 0);
            }
            other => panic!("{other:?}"),
        }
        // MQTT 3.1 (MQIsdp, level 3) is refused by name.
        let mut old = b.to_vec();
        old[4..8].copy_from_slice(b"MQTT");
        old[8] = 3;
        assert!(matches!(
            connect_version(&f, &old),
            Err(DecodeError::Protocol { level: 3, .. })
        ));
        assert_eq!(
            connect_version(&frame(&[0xC0, 0], 9).unwrap().unwrap(), &[0xC0, 0]),
            Err(DecodeError::NotConnect(12))
        );
    }

    #[test]
    fn packets_round_trip_both_versions() {
        let p = Publish {
            topic: "a/b".into(),
            qos: 1,
            retain: true,
            dup: false,
            pkid: 7,
            payload: Bytes::from_static(b"hi"),
            user_properties: vec![("k".into(), "v".into())],
            expiry_s: Some(9),
            topic_alias: None,
            subscription_ids: Vec::new(),
            content_type: None,
        };
        for v in [Version::V311, Version::V5] {
            let mut b = BytesMut::new();
            encode(v, &Outbound::Publish(p.clone()), &mut b).unwrap();
            let got = decode_all(v, &b, 1000);
            let Some(Ok(Inbound::Publish(q))) = got.into_iter().next() else {
                panic!("no publish")
            };
            assert_eq!(q.topic, "a/b");
            assert_eq!(q.payload, p.payload);
            assert_eq!(q.pkid, 7);
            if v == Version::V5 {
                assert_eq!(q.user_properties, p.user_properties);
                assert_eq!(q.expiry_s, Some(9));
            }
        }
        // A 5.0 DISCONNECT with no body is a normal disconnect.
        assert_eq!(
            decode_all(Version::V5, &[0xE0, 0x00], 10),
            vec![Ok(Inbound::Disconnect {
                reason: 0,
                session_expiry_s: None
            })]
        );
        // A SUBSCRIBE with the wrong reserved flags is malformed.
        let mut s = encode_v4(v4::Packet::Subscribe(v4::Subscribe::new(
            "a/#",
            rumqttc::mqttbytes::QoS::AtLeastOnce,
        )));
        s[0] = 0x80;
        assert!(matches!(
            decode_all(Version::V311, &s, 1000)[0],
            Err(DecodeError::Malformed { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4000, rng_seed: proptest::test_runner::RngSeed::Fixed(15), ..ProptestConfig::default() })]

        /// Any bytes at all: the decoder answers packets or errors, never panics, and
        /// never reads past what it framed.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), v5 in any::<bool>()) {
            let version = if v5 { Version::V5 } else { Version::V311 };
            let _ = decode_all(version, &bytes, 256);
            if let Ok(Some(f)) = frame(&bytes, 1 << 20) {
                let _ = connect_version(&f, &bytes);
                prop_assert!(f.len() <= bytes.len());
            }
        }

        /// A valid publish with one byte flipped still never panics.
        #[test]
        fn flipped_publishes_never_panic(pos in 0usize..40, bit in 0u8..8, v5 in any::<bool>()) {
            let version = if v5 { Version::V5 } else { Version::V311 };
            let p = Publish {
                topic: "sensors/room1/temp".into(), qos: 1, retain: false, dup: false, pkid: 3,
                payload: Bytes::from_static(b"21.5"), user_properties: vec![("u".into(), "1".into())],
                expiry_s: None, topic_alias: None, subscription_ids: Vec::new(), content_type: None,
            };
            let mut b = BytesMut::new();
            encode(version, &Outbound::Publish(p), &mut b).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let i = pos % b.len();
            b[i] ^= 1 << bit;
            let _ = decode_all(version, &b, 1000);
        }
    }
}
