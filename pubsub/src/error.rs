//! What can go wrong in publishing and subscribing, each naming the value and what is
//! allowed. The HTTP layer maps each to a status code; [`PubSubError::kind`] is the stable
//! name clients see.

use canal_consensus::ClientError;

/// Why a pubsub operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum PubSubError {
    /// The topic name is not a topic.
    #[error("{0}")]
    InvalidTopic(String),
    /// The filter is not a topic filter, or is missing.
    #[error("{0}")]
    InvalidFilter(String),
    /// The QoS is not 0 or 1.
    #[error("{0}")]
    InvalidQos(String),
    /// The publisher's message id is empty or too long.
    #[error("{0}")]
    InvalidId(String),
    /// A custom header is not printable ASCII.
    #[error("{0}")]
    InvalidHeader(String),
    /// The subscription start (`from`) is not a start, or is past the end of its topic.
    #[error("{0}")]
    InvalidFrom(String),
    /// The durable subscription's name or redelivery settings are not allowed.
    #[error("{0}")]
    InvalidDurable(String),
    /// An acknowledgement is malformed, or refused by the log.
    #[error("{0}")]
    InvalidAck(String),
    /// Topic settings that are not allowed.
    #[error("{0}")]
    InvalidSettings(String),
    /// The payload is larger than the topic allows.
    #[error("payload is {bytes} bytes: at most {limit} are allowed on {topic}")]
    TooLarge {
        /// The topic.
        topic: String,
        /// The payload's size.
        bytes: usize,
        /// The topic's `max_payload_bytes`.
        limit: u64,
    },
    /// The node serves as many subscribers as it may.
    #[error(
        "this node already serves its limit of {limit} subscribers (max_subscribers): subscribe through another node, or later"
    )]
    TooManySubscribers {
        /// The node's `max_subscribers`.
        limit: usize,
    },
    /// A line of a batch publish was refused, so the whole batch was.
    #[error("line {line}: {source} (the whole batch was refused; nothing was stored)")]
    BatchLine {
        /// The line, counted from 1.
        line: usize,
        /// What was wrong with it.
        source: Box<PubSubError>,
    },
    /// A batch publish holds more events than allowed.
    #[error("the batch holds {events} events: at most {limit} are allowed (MAX_BATCH_EVENTS)")]
    TooManyEvents {
        /// How many it holds.
        events: usize,
        /// [`crate::MAX_BATCH_EVENTS`].
        limit: usize,
    },
    /// The Raft groups refused or could not do the operation.
    #[error(transparent)]
    Consensus(#[from] ClientError),
    /// Stored data could not be read or decoded.
    #[error("{0}")]
    Internal(String),
}

impl PubSubError {
    /// The error's stable name, as clients see it (`kind` of the API's error body).
    pub fn kind(&self) -> &'static str {
        match self {
            PubSubError::InvalidTopic(_) => "invalid_topic",
            PubSubError::InvalidFilter(_) => "invalid_filter",
            PubSubError::InvalidQos(_) => "invalid_qos",
            PubSubError::InvalidId(_) => "invalid_id",
            PubSubError::InvalidHeader(_) => "invalid_header",
            PubSubError::InvalidFrom(_) => "invalid_from",
            PubSubError::InvalidDurable(_) => "invalid_durable",
            PubSubError::InvalidAck(_) => "invalid_ack",
            PubSubError::InvalidSettings(_) => "invalid_settings",
            PubSubError::TooLarge { .. } => "too_large",
            PubSubError::TooManySubscribers { .. } => "too_many_subscribers",
            PubSubError::Consensus(e) => match e {
                ClientError::NotInitialized(_) => "not_formed",
                ClientError::NoLeader { .. } | ClientError::NotLeader { .. } => "no_leader",
                ClientError::UnknownGroup(_) => "not_found",
                ClientError::Other(_) => "internal",
                ClientError::TooLarge { .. } => "too_large",
                ClientError::Refused { .. } => "refused",
            },
            PubSubError::BatchLine { source, .. } => source.kind(),
            PubSubError::TooManyEvents { .. } => "too_many_events",
            PubSubError::Internal(_) => "internal",
        }
    }

    /// A storage error, as an internal one.
    pub(crate) fn internal(e: impl std::fmt::Display) -> PubSubError {
        PubSubError::Internal(e.to_string())
    }
}
