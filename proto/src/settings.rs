//! Per-topic settings: how much of a topic's log is kept, and how large its events may be.
//! Set on a topic or a filter (`sensors/#`); the most specific match applies.

use crate::TopicFilter;
use serde::{Deserialize, Serialize};

/// How many events a topic's log keeps by default.
pub const DEFAULT_RETAIN_EVENTS: u64 = 100_000;
/// The largest payload accepted by default, and the most a setting may allow.
pub const MAX_PAYLOAD_BYTES: u64 = 1 << 20;

/// How long a publish id is remembered by default (a retry with the same id within it is
/// stored once).
pub const DEFAULT_DEDUP_WINDOW_MS: u64 = 2 * 60 * 1000;
/// The shortest dedup window a setting may give.
pub const MIN_DEDUP_WINDOW_MS: u64 = 1;
/// The longest dedup window a setting may give: every id published within it is kept.
pub const MAX_DEDUP_WINDOW_MS: u64 = 60 * 60 * 1000;

/// What a topic's log keeps: the oldest events go once any limit is passed (the newest
/// event always stays); and how long publish ids are remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// At most this many events.
    pub max_events: u64,
    /// At most this many payload bytes in all (0: no limit).
    pub max_bytes: u64,
    /// Events older than this many milliseconds go (0: no limit). Checked when events are
    /// appended and when the node trims its topics.
    pub max_age_ms: u64,
    /// How long, in milliseconds of the state machine's clock, a publish's id is
    /// remembered: a publish with the same id within it is the same event. Carried in each
    /// publish, so every replica applies the window the publish was accepted with.
    pub dedup_window_ms: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_events: DEFAULT_RETAIN_EVENTS,
            max_bytes: 0,
            max_age_ms: 0,
            dedup_window_ms: DEFAULT_DEDUP_WINDOW_MS,
        }
    }
}

/// A topic's (or a filter's) settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicSettings {
    /// What the log keeps.
    pub retention: Retention,
    /// The largest payload a publish may carry.
    pub max_payload_bytes: u64,
}

impl Default for TopicSettings {
    fn default() -> Self {
        TopicSettings {
            retention: Retention::default(),
            max_payload_bytes: MAX_PAYLOAD_BYTES,
        }
    }
}

/// Why a setting is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SettingsError(pub String);

impl TopicSettings {
    /// Checks the settings are within what canal allows.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.retention.max_events == 0 {
            return Err(SettingsError(
                "retain-events 0 would keep nothing: give 1 or more".into(),
            ));
        }
        let w = self.retention.dedup_window_ms;
        if !(MIN_DEDUP_WINDOW_MS..=MAX_DEDUP_WINDOW_MS).contains(&w) {
            return Err(SettingsError(format!(
                "dedup-window {w}ms is not allowed: use {MIN_DEDUP_WINDOW_MS}ms to {}s (default {}s)",
                MAX_DEDUP_WINDOW_MS / 1000,
                DEFAULT_DEDUP_WINDOW_MS / 1000
            )));
        }
        if self.max_payload_bytes == 0 || self.max_payload_bytes > MAX_PAYLOAD_BYTES {
            return Err(SettingsError(format!(
                "max-payload {} is not allowed: use 1 byte to {}",
                crate::size::format_bytes(self.max_payload_bytes),
                crate::size::format_bytes(MAX_PAYLOAD_BYTES)
            )));
        }
        Ok(())
    }
}

/// How specific a filter is: exact topics first, then more literal levels, then longer.
fn specificity(f: &TopicFilter) -> (bool, usize, usize) {
    let literal = f
        .as_str()
        .split('/')
        .filter(|l| *l != "+" && *l != "#")
        .count();
    (f.is_exact(), literal, f.as_str().len())
}

/// The most specific of `all` (filter, settings) pairs whose filter matches `topic`.
pub fn most_specific<'a>(
    topic: &crate::Topic,
    all: &'a [(TopicFilter, TopicSettings)],
) -> Option<&'a (TopicFilter, TopicSettings)> {
    all.iter()
        .filter(|(f, _)| f.matches(topic))
        .max_by_key(|(f, _)| specificity(f))
}

/// The settings that apply to `topic` among `all` (filter, settings) pairs: the most
/// specific matching filter's, else the defaults.
pub fn settings_for(topic: &crate::Topic, all: &[(TopicFilter, TopicSettings)]) -> TopicSettings {
    most_specific(topic, all)
        .map(|(_, s)| *s)
        .unwrap_or_default()
}

/// What `PUT /v1/topics/{topic-or-filter}/settings` takes: the fields to set (others keep
/// their current or default values).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingsRequest {
    /// Keep at most this many events.
    #[serde(default)]
    pub retain_events: Option<u64>,
    /// Keep at most this many payload bytes (`0`: no limit), e.g. `512MiB`.
    #[serde(default)]
    pub retain_bytes: Option<String>,
    /// Keep events at most this long (`0s`: no limit), e.g. `24h`.
    #[serde(default)]
    pub retain_age: Option<String>,
    /// The largest payload, e.g. `64KiB`.
    #[serde(default)]
    pub max_payload: Option<String>,
    /// How long publish ids are remembered, e.g. `5s` (default 2 minutes, at most 1 hour).
    #[serde(default)]
    pub dedup_window: Option<String>,
}

/// What `GET /v1/topics/{topic}/settings` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingsAnswer {
    /// The topic or filter asked about.
    pub topic: String,
    /// The filter whose settings apply (`None`: the defaults).
    pub from: Option<String>,
    /// The settings in force.
    pub settings: TopicSettings,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Topic;

    fn s(events: u64) -> TopicSettings {
        TopicSettings {
            retention: Retention {
                max_events: events,
                ..Retention::default()
            },
            ..TopicSettings::default()
        }
    }

    #[test]
    fn the_most_specific_filter_wins() {
        let all = vec![
            (TopicFilter::new("#").unwrap(), s(1)),
            (TopicFilter::new("sensors/#").unwrap(), s(2)),
            (TopicFilter::new("sensors/+/temp").unwrap(), s(3)),
            (TopicFilter::new("sensors/r1/temp").unwrap(), s(4)),
        ];
        let pick = |t: &str| {
            settings_for(&Topic::new(t).unwrap(), &all)
                .retention
                .max_events
        };
        assert_eq!(pick("sensors/r1/temp"), 4);
        assert_eq!(pick("sensors/r2/temp"), 3);
        assert_eq!(pick("sensors/r2/hum"), 2);
        assert_eq!(pick("other"), 1);
        assert_eq!(
            settings_for(&Topic::new("x").unwrap(), &[]),
            TopicSettings::default()
        );
    }

    #[test]
    fn settings_are_checked() {
        assert!(TopicSettings::default().validate().is_ok());
        assert!(s(0).validate().is_err());
        let big = TopicSettings {
            max_payload_bytes: MAX_PAYLOAD_BYTES + 1,
            ..TopicSettings::default()
        };
        assert!(big.validate().unwrap_err().0.contains("max-payload"));
        for bad in [0, MAX_DEDUP_WINDOW_MS + 1] {
            let mut s = TopicSettings::default();
            s.retention.dedup_window_ms = bad;
            let e = s.validate().unwrap_err().0;
            assert!(e.contains("dedup-window") && e.contains("3600s"), "{e}");
        }
        let mut short = TopicSettings::default();
        short.retention.dedup_window_ms = 5_000;
        assert!(short.validate().is_ok());
    }
}
