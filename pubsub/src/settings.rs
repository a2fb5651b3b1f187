//! Topic settings: stored per topic or filter in the metadata group, resolved per topic by
//! the most specific matching filter (else the defaults).

use crate::error::PubSubError;
use canal_consensus::{Consensus, GroupId, InternalKey, Op, Transport};
use canal_proto::settings::{SettingsAnswer, SettingsRequest, TopicSettings};
use canal_proto::{Topic, TopicFilter, wire};

/// Every topic and filter setting, from this node's replica of the metadata group.
pub fn all_settings<T: Transport>(
    consensus: &Consensus<T>,
) -> Result<Vec<(TopicFilter, TopicSettings)>, PubSubError> {
    let sm = consensus.state_machine(GroupId::METADATA)?;
    let mut out = Vec::new();
    for (filter, settings) in sm
        .scan_table(&canal_consensus::keys::SETTINGS)
        .map_err(PubSubError::internal)?
    {
        let Ok(filter) = TopicFilter::new(&filter) else {
            continue;
        };
        out.push((filter, settings));
    }
    Ok(out)
}

/// The settings in force for `topic`.
pub fn settings_for<T: Transport>(
    consensus: &Consensus<T>,
    topic: &Topic,
) -> Result<TopicSettings, PubSubError> {
    Ok(canal_proto::settings::settings_for(
        topic,
        &all_settings(consensus)?,
    ))
}

/// What applies to `filter` among `all`, and from which filter: its own settings if it has
/// any; for a topic, its most specific matching filter's; else the defaults.
pub fn resolve(filter: &TopicFilter, all: &[(TopicFilter, TopicSettings)]) -> SettingsAnswer {
    if let Some((f, s)) = all.iter().find(|(f, _)| f == filter) {
        return SettingsAnswer {
            topic: filter.to_string(),
            from: Some(f.to_string()),
            settings: *s,
        };
    }
    let found = Topic::new(filter.as_str())
        .ok()
        .and_then(|topic| canal_proto::settings::most_specific(&topic, all).cloned());
    SettingsAnswer {
        topic: filter.to_string(),
        from: found.as_ref().map(|(f, _)| f.to_string()),
        settings: found.map(|(_, s)| s).unwrap_or_default(),
    }
}

/// `current` with the fields `req` gives set, checked against canal's limits.
pub fn apply_request(
    current: TopicSettings,
    req: &SettingsRequest,
) -> Result<TopicSettings, PubSubError> {
    let bad = PubSubError::InvalidSettings;
    let mut s = current;
    if let Some(n) = req.retain_events {
        s.retention.max_events = n;
    }
    if let Some(b) = &req.retain_bytes {
        s.retention.max_bytes =
            canal_proto::size::parse_bytes(b).map_err(|e| bad(format!("retain-bytes: {e}")))?;
    }
    if let Some(a) = &req.retain_age {
        s.retention.max_age_ms = millis(humantime::parse_duration(a).map_err(|e| {
            bad(format!(
                "retain-age {a:?} is not a duration ({e}): write 90s, 24h or 7days"
            ))
        })?);
    }
    if let Some(w) = &req.dedup_window {
        s.retention.dedup_window_ms = millis(humantime::parse_duration(w).map_err(|e| {
            bad(format!(
                "dedup-window {w:?} is not a duration ({e}): write 5s, 90s or 2m"
            ))
        })?);
    }
    if let Some(m) = &req.max_payload {
        s.max_payload_bytes =
            canal_proto::size::parse_bytes(m).map_err(|e| bad(format!("max-payload: {e}")))?;
    }
    s.validate().map_err(|e| bad(e.0))?;
    Ok(s)
}

fn millis(d: std::time::Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

/// `GET /v1/topics/{topic-or-filter}/settings`: what applies, and from which filter.
pub fn get_settings<T: Transport>(
    consensus: &Consensus<T>,
    filter: &TopicFilter,
) -> Result<SettingsAnswer, PubSubError> {
    Ok(resolve(filter, &all_settings(consensus)?))
}

/// `PUT /v1/topics/{topic-or-filter}/settings`: sets the fields given, keeps the others.
pub async fn put_settings<T: Transport>(
    consensus: &Consensus<T>,
    filter: &TopicFilter,
    req: &SettingsRequest,
) -> Result<SettingsAnswer, PubSubError> {
    let current = get_settings(consensus, filter)?.settings;
    let s = apply_request(current, req)?;
    consensus
        .write_op(
            GroupId::METADATA,
            Op::Internal {
                key: InternalKey::Settings(filter.to_string()),
                value: Some(wire::encode(&s).map_err(PubSubError::internal)?),
            },
        )
        .await?;
    Ok(SettingsAnswer {
        topic: filter.to_string(),
        from: Some(filter.to_string()),
        settings: s,
    })
}

/// `DELETE /v1/topics/{topic-or-filter}/settings`: back to what broader filters or the
/// defaults say.
pub async fn delete_settings<T: Transport>(
    consensus: &Consensus<T>,
    filter: &TopicFilter,
) -> Result<(), PubSubError> {
    consensus
        .write_op(
            GroupId::METADATA,
            Op::Internal {
                key: InternalKey::Settings(filter.to_string()),
                value: None,
            },
        )
        .await?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use canal_proto::settings::{MAX_PAYLOAD_BYTES, Retention};

    fn f(s: &str) -> TopicFilter {
        TopicFilter::new(s).unwrap()
    }

    fn with_events(n: u64) -> TopicSettings {
        TopicSettings {
            retention: Retention {
                max_events: n,
                ..Retention::default()
            },
            ..TopicSettings::default()
        }
    }

    #[test]
    fn the_most_specific_filter_wins() {
        let all = vec![
            (f("#"), with_events(1)),
            (f("sensors/#"), with_events(2)),
            (f("sensors/+/temp"), with_events(3)),
            (f("sensors/a/temp"), with_events(4)),
        ];
        let got = |t: &str| {
            let a = resolve(&f(t), &all);
            (a.from, a.settings.retention.max_events)
        };
        assert_eq!(got("sensors/a/temp"), (Some("sensors/a/temp".into()), 4));
        assert_eq!(got("sensors/b/temp"), (Some("sensors/+/temp".into()), 3));
        assert_eq!(got("sensors/b/hum"), (Some("sensors/#".into()), 2));
        assert_eq!(got("other"), (Some("#".into()), 1));
        // A filter asked for by name gets its own settings, not a broader one's.
        assert_eq!(got("sensors/#"), (Some("sensors/#".into()), 2));
    }

    #[test]
    fn a_topic_without_settings_gets_the_defaults() {
        let all = vec![(f("sensors/#"), with_events(2))];
        let a = resolve(&f("logs/x"), &all);
        assert_eq!(a.from, None);
        assert_eq!(a.settings, TopicSettings::default());
        // A filter that is no topic and has no settings of its own: the defaults too.
        assert_eq!(resolve(&f("logs/+"), &all).from, None);
    }

    #[test]
    fn a_request_sets_only_what_it_gives_within_the_limits() {
        let current = with_events(7);
        let req = SettingsRequest {
            retain_age: Some("90s".into()),
            max_payload: Some("1KiB".into()),
            ..SettingsRequest::default()
        };
        let s = apply_request(current, &req).unwrap();
        assert_eq!(s.retention.max_events, 7);
        assert_eq!(s.retention.max_age_ms, 90_000);
        assert_eq!(s.max_payload_bytes, 1024);

        let over = SettingsRequest {
            max_payload: Some(format!("{}", MAX_PAYLOAD_BYTES + 1)),
            ..SettingsRequest::default()
        };
        let e = apply_request(current, &over).unwrap_err();
        assert_eq!(e.kind(), "invalid_settings");
        assert!(e.to_string().contains("max-payload"), "{e}");
        let zero = SettingsRequest {
            retain_events: Some(0),
            ..SettingsRequest::default()
        };
        assert!(
            apply_request(current, &zero)
                .unwrap_err()
                .to_string()
                .contains("retain-events 0")
        );
        let age = SettingsRequest {
            retain_age: Some("soon".into()),
            ..SettingsRequest::default()
        };
        assert!(
            apply_request(current, &age)
                .unwrap_err()
                .to_string()
                .contains("retain-age \"soon\"")
        );
    }
}
