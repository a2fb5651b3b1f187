//! The versioned binary envelope for peer-to-peer messages.
//!
//! Every message on the wire is one version byte followed by the bincode (standard config)
//! encoding of the value. A peer refuses a version it does not know with an error naming both
//! versions, instead of misreading the bytes.

use serde::{Serialize, de::DeserializeOwned};

/// The wire format version this build writes and reads.
pub const WIRE_VERSION: u8 = 1;

/// Why bytes from the wire could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The message was empty.
    #[error("empty message: expected a version byte and a body")]
    Empty,
    /// The version byte is not one this build reads.
    #[error("message has wire version {got}: this build reads version {WIRE_VERSION}")]
    Version {
        /// The version found.
        got: u8,
    },
    /// The body did not decode.
    #[error("message body does not decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    /// The value did not encode.
    #[error("message does not encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// The body decoded but bytes were left over.
    #[error("message has {0} trailing bytes after its body")]
    Trailing(usize),
}

/// Encodes `value` with the version byte in front.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, WireError> {
    let mut out = vec![WIRE_VERSION];
    out.extend(bincode::serde::encode_to_vec(
        value,
        bincode::config::standard(),
    )?);
    Ok(out)
}

/// Decodes bytes written by [`encode`], checking the version and that nothing is left over.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    let (&version, body) = bytes.split_first().ok_or(WireError::Empty)?;
    if version != WIRE_VERSION {
        return Err(WireError::Version { got: version });
    }
    let (value, used) = bincode::serde::decode_from_slice(body, bincode::config::standard())?;
    if used != body.len() {
        return Err(WireError::Trailing(body.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caps::{Capabilities, Load};

    fn caps() -> Capabilities {
        Capabilities {
            peer_id: "12D3KooW".into(),
            version: "0.1.0".into(),
            listen_addrs: vec!["/ip4/127.0.0.1/tcp/7000".into()],
            api_addr: Some("127.0.0.1:7070".into()),
            tier: "edge".into(),
            labels: [("zone".to_string(), "a".to_string())].into(),
            cpu_cores: 2,
            memory_total_bytes: 1 << 30,
            memory_available_bytes: 1 << 29,
            gpus_detected: vec![],
            gpus_declared: vec![],
            load: Load::default(),
            raft_member: false,
            forms_cluster: false,
            interest: Vec::new(),
            seq: 7,
            measured_at_ms: 1,
        }
    }

    #[test]
    fn round_trips() {
        let bytes = encode(&caps()).ok();
        let back: Option<Capabilities> = bytes.and_then(|b| decode(&b).ok());
        assert_eq!(back, Some(caps()));
    }

    #[test]
    fn refuses_other_versions_and_garbage() {
        let mut bytes = encode(&caps()).unwrap_or_default();
        bytes[0] = 9;
        assert!(matches!(
            decode::<Capabilities>(&bytes),
            Err(WireError::Version { got: 9 })
        ));
        assert!(matches!(decode::<Capabilities>(&[]), Err(WireError::Empty)));
        assert!(decode::<Capabilities>(&[1, 255, 255, 255]).is_err());
        let mut long = encode(&caps()).unwrap_or_default();
        long.push(0);
        assert!(matches!(
            decode::<Capabilities>(&long),
            Err(WireError::Trailing(1))
        ));
    }
}
