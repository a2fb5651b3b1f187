//! The quality of service of a publish or a subscription, as written in headers, queries
//! and on the command line (`0` or `1`).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// How hard canal tries to deliver an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum Qos {
    /// `0`: at most once, fanned out live and never stored.
    AtMostOnce,
    /// `1`: committed to the topic's log before the publish is answered.
    #[default]
    Committed,
}

/// A QoS that is neither `0` nor `1`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a QoS: use 0 (at most once) or 1 (committed before the answer)")]
pub struct QosError {
    /// What was given.
    pub value: String,
}

impl Qos {
    /// The number written on the API: 0 or 1.
    pub fn as_u8(self) -> u8 {
        match self {
            Qos::AtMostOnce => 0,
            Qos::Committed => 1,
        }
    }
}

impl From<Qos> for u8 {
    fn from(q: Qos) -> u8 {
        q.as_u8()
    }
}

impl TryFrom<u8> for Qos {
    type Error = QosError;

    fn try_from(v: u8) -> Result<Qos, QosError> {
        match v {
            0 => Ok(Qos::AtMostOnce),
            1 => Ok(Qos::Committed),
            other => Err(QosError {
                value: other.to_string(),
            }),
        }
    }
}

impl FromStr for Qos {
    type Err = QosError;

    fn from_str(s: &str) -> Result<Qos, QosError> {
        match s {
            "0" => Ok(Qos::AtMostOnce),
            "1" => Ok(Qos::Committed),
            other => Err(QosError {
                value: other.to_string(),
            }),
        }
    }
}

impl fmt::Display for Qos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_u8())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_two_levels_and_names_the_allowed_ones() {
        assert_eq!("0".parse::<Qos>(), Ok(Qos::AtMostOnce));
        assert_eq!("1".parse::<Qos>(), Ok(Qos::Committed));
        for bad in ["", "2", "01", " 1", "one"] {
            let e = bad.parse::<Qos>().expect_err(bad);
            assert_eq!(
                e.to_string(),
                format!(
                    "{bad:?} is not a QoS: use 0 (at most once) or 1 (committed before the answer)"
                )
            );
        }
        assert_eq!(Qos::default(), Qos::Committed);
        assert_eq!(Qos::AtMostOnce.to_string(), "0");
    }

    #[test]
    fn serializes_as_the_number() {
        assert_eq!(
            serde_json::to_string(&Qos::AtMostOnce).ok().as_deref(),
            Some("0")
        );
        assert_eq!(serde_json::from_str::<Qos>("1").ok(), Some(Qos::Committed));
        assert!(serde_json::from_str::<Qos>("2").is_err());
    }
}
