//! MQTT's topic rules at canal's edge.
//!
//! An MQTT topic is a canal topic when canal can store it ([`canal_proto::Topic`]); MQTT also
//! allows empty levels (`/a`, `a//b`), which canal's topics cannot hold, so those are refused
//! here (5.0: reason 0x90 Topic Name invalid; 3.1.1: the connection is closed) with the
//! reason canal's topic check gives. Topics starting with `$` are stored like any other, but
//! a filter whose first level is a wildcard does not match them, as MQTT says. A
//! `$share/GROUP/FILTER` filter is a shared subscription of `GROUP` on `FILTER`.

use canal_proto::{Topic, TopicError, TopicFilter};

/// A checked MQTT subscription filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// The filter as canal reads it (without a `$share/G/` prefix).
    pub filter: TopicFilter,
    /// The share group of a `$share/G/F` filter.
    pub share: Option<String>,
}

/// Why an MQTT filter is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// A `$share/` filter without a group or a filter.
    #[error(
        "shared subscription {0:?} is malformed: write $share/GROUP/FILTER, GROUP without `+`, `#` or `/`"
    )]
    Share(String),
    /// The filter is not one canal can read.
    #[error(transparent)]
    Topic(#[from] TopicError),
}

/// Checks an MQTT topic that a client publishes to.
pub fn topic(s: &str) -> Result<Topic, TopicError> {
    Topic::new(s)
}

/// Checks an MQTT subscription filter, shared or not.
pub fn filter(s: &str) -> Result<Filter, FilterError> {
    if let Some(rest) = s.strip_prefix("$share/") {
        let (group, f) = rest
            .split_once('/')
            .ok_or_else(|| FilterError::Share(s.to_string()))?;
        if group.is_empty() || group.contains(['+', '#']) || f.is_empty() {
            return Err(FilterError::Share(s.to_string()));
        }
        return Ok(Filter {
            filter: TopicFilter::new(f)?,
            share: Some(group.to_string()),
        });
    }
    Ok(Filter {
        filter: TopicFilter::new(s)?,
        share: None,
    })
}

/// Whether `filter` matches `topic` by MQTT's rules: canal's matching, except that a
/// filter starting with a wildcard does not match a topic starting with `$`.
pub fn matches(filter: &TopicFilter, topic: &Topic) -> bool {
    let first_wild = filter
        .as_str()
        .split('/')
        .next()
        .is_some_and(|l| l == "+" || l == "#");
    if first_wild && topic.as_str().starts_with('$') {
        return false;
    }
    filter.matches(topic)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dollar_topics_are_not_matched_by_a_leading_wildcard() {
        let t = Topic::new("$SYS/broker/load").unwrap();
        assert!(!matches(&TopicFilter::new("#").unwrap(), &t));
        assert!(!matches(&TopicFilter::new("+/broker/load").unwrap(), &t));
        assert!(matches(&TopicFilter::new("$SYS/#").unwrap(), &t));
        let n = Topic::new("a/b").unwrap();
        assert!(matches(&TopicFilter::new("#").unwrap(), &n));
        assert!(matches(&TopicFilter::new("+/b").unwrap(), &n));
    }

    #[test]
    fn shared_filters_name_a_group() {
        let f = filter("$share/g1/sensors/+").unwrap();
        assert_eq!(f.share.as_deref(), Some("g1"));
        assert_eq!(f.filter.as_str(), "sensors/+");
        assert!(filter("$share/g1").is_err());
        assert!(filter("$share//a").is_err());
        assert!(filter("$share/g+/a").is_err());
        assert_eq!(filter("a/#").unwrap().share, None);
    }

    #[test]
    fn empty_levels_are_refused_with_the_reason() {
        for bad in ["/a", "a//b", "a/"] {
            let e = topic(bad).unwrap_err();
            assert!(e.to_string().contains("empty level"), "{bad}: {e}");
        }
        assert!(filter("a/#/b").is_err());
        assert!(topic("a/+").is_err());
        assert!(topic("$SYS/x").is_ok());
    }
}
