//! The capability record: what a peer can do and how busy it is.
//!
//! Every peer measures its own record, advertises it to the mesh and refreshes it; the
//! placement engine reads the table of records. Detected GPUs (found through the driver at run
//! time) and declared ones (`--gpu MODEL:MEMORY`, for peers whose GPU detection cannot see)
//! are kept apart, so a person can tell a measurement from a claim.

use crate::TopicFilter;
use crate::size::{SizeError, format_bytes, parse_bytes};
use crate::topic::MAX_TOPIC_BYTES;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where a GPU entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuSource {
    /// Found through the GPU driver (NVML) on this peer.
    Detected,
    /// Declared by the operator with `--gpu MODEL:MEMORY`.
    Declared,
}

/// One GPU of a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// The model name, such as `H100` or `NVIDIA A10G`.
    pub model: String,
    /// Total device memory in bytes.
    pub memory_bytes: u64,
    /// Whether the GPU was detected or declared.
    pub source: GpuSource,
}

/// Why a `--gpu MODEL:MEMORY` declaration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuSpecError {
    /// The text has no `:` or an empty model.
    #[error("GPU declaration {0:?} is not MODEL:MEMORY: write, for example, H100:80GiB")]
    Shape(String),
    /// The memory part is not a byte size.
    #[error("GPU declaration has a bad memory size: {0}")]
    Memory(#[from] SizeError),
}

impl Gpu {
    /// Reads a declaration written as `MODEL:MEMORY` (`H100:80GiB`).
    pub fn parse_declared(spec: &str) -> Result<Gpu, GpuSpecError> {
        let (model, mem) = spec
            .rsplit_once(':')
            .ok_or_else(|| GpuSpecError::Shape(spec.to_string()))?;
        let model = model.trim();
        if model.is_empty() || model.chars().any(char::is_control) {
            return Err(GpuSpecError::Shape(spec.to_string()));
        }
        Ok(Gpu {
            model: model.to_string(),
            memory_bytes: parse_bytes(mem)?,
            source: GpuSource::Declared,
        })
    }

    /// A short form for tables: `H100 80 GiB (declared)`.
    pub fn describe(&self) -> String {
        let src = match self.source {
            GpuSource::Detected => "detected",
            GpuSource::Declared => "declared",
        };
        format!("{} {} ({src})", self.model, format_bytes(self.memory_bytes))
    }
}

/// A peer's live load, refreshed with every advertisement.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Whole-machine CPU use, 0-100 % of all cores.
    pub cpu_percent: f32,
    /// Events waiting to be processed on this peer.
    pub queue_len: u64,
    /// Function invocations running now.
    pub running_invocations: u64,
}

/// What a peer can do, as it advertises it to the mesh.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The peer id (base58), the key of the record.
    pub peer_id: String,
    /// The canal version the peer runs.
    pub version: String,
    /// Multiaddrs the peer listens on for other peers.
    pub listen_addrs: Vec<String>,
    /// The address of the peer's HTTP client API, if it has one.
    pub api_addr: Option<String>,
    /// The peer's tier (`edge`, `cloud`, ...), as configured.
    pub tier: String,
    /// Operator labels (`zone=eu-1`).
    pub labels: BTreeMap<String, String>,
    /// Logical CPU cores.
    pub cpu_cores: u32,
    /// Total memory in bytes.
    pub memory_total_bytes: u64,
    /// Memory available for new work, in bytes.
    pub memory_available_bytes: u64,
    /// GPUs found through the driver.
    pub gpus_detected: Vec<Gpu>,
    /// GPUs declared by the operator.
    pub gpus_declared: Vec<Gpu>,
    /// Live load.
    pub load: Load,
    /// Whether the peer is a member of the cluster's Raft groups (formed, or added).
    pub raft_member: bool,
    /// Whether the peer was started to form the cluster (`--bootstrap-expect`): only such
    /// peers are counted and chosen when the cluster is formed.
    #[serde(default)]
    pub forms_cluster: bool,
    /// The topic filters this peer wants QoS 0 events of (its QoS 0 subscribers and the QoS 0
    /// triggers it executes): a QoS 0 publish is sent only to peers whose interest matches.
    #[serde(default)]
    pub interest: Vec<String>,
    /// Increases with every advertisement of this peer, so a stale record never replaces a
    /// newer one.
    pub seq: u64,
    /// Milliseconds since the Unix epoch when the record was measured.
    pub measured_at_ms: u64,
    /// The address of the peer's MQTT listener (TCP), if it has one. Last, so a peer of a
    /// build without it refuses the record (trailing bytes) instead of misreading it.
    #[serde(default)]
    pub mqtt_addr: Option<String>,
}

impl Capabilities {
    /// All GPUs, detected first.
    pub fn gpus(&self) -> impl Iterator<Item = &Gpu> {
        self.gpus_detected.iter().chain(self.gpus_declared.iter())
    }

    /// Checks every field of a record against the limits below: a record from a peer is used
    /// only if it passes, and a peer's own record is kept within them (see
    /// [`summarise_interest`]) so it always does. The error names the field, its value (cut
    /// short) and the limit.
    pub fn validate(&self) -> Result<(), CapsError> {
        text("peer_id", &self.peer_id, MAX_ID_BYTES)?;
        text("version", &self.version, MAX_NAME_BYTES)?;
        count("listen_addrs", self.listen_addrs.len(), MAX_LISTEN_ADDRS)?;
        for (i, a) in self.listen_addrs.iter().enumerate() {
            text(&format!("listen_addrs[{i}]"), a, MAX_ADDR_BYTES)?;
        }
        if let Some(a) = &self.api_addr {
            text("api_addr", a, MAX_ADDR_BYTES)?;
        }
        if let Some(a) = &self.mqtt_addr {
            text("mqtt_addr", a, MAX_ADDR_BYTES)?;
        }
        text("tier", &self.tier, MAX_NAME_BYTES)?;
        count("labels", self.labels.len(), MAX_LABELS)?;
        for (k, v) in &self.labels {
            text("label name", k, MAX_NAME_BYTES)?;
            text(&format!("labels[{}]", preview(k)), v, MAX_LABEL_VALUE_BYTES)?;
        }
        for (field, gpus) in [
            ("gpus_detected", &self.gpus_detected),
            ("gpus_declared", &self.gpus_declared),
        ] {
            count(field, gpus.len(), MAX_GPUS)?;
            for (i, g) in gpus.iter().enumerate() {
                text(&format!("{field}[{i}].model"), &g.model, MAX_NAME_BYTES)?;
            }
        }
        let cpu = self.load.cpu_percent;
        if !cpu.is_finite() || !(0.0..=100.0).contains(&cpu) {
            return Err(CapsError::Invalid {
                field: "load.cpu_percent".into(),
                value: cpu.to_string(),
                allowed: "a number from 0 to 100".into(),
            });
        }
        count("interest", self.interest.len(), MAX_INTEREST_FILTERS)?;
        for (i, f) in self.interest.iter().enumerate() {
            let field = format!("interest[{i}]");
            text(&field, f, MAX_TOPIC_BYTES)?;
            if let Err(e) = TopicFilter::new(f) {
                return Err(CapsError::Invalid {
                    field,
                    value: preview(f),
                    allowed: format!("a topic filter ({e})"),
                });
            }
        }
        Ok(())
    }
}

/// The most bytes of a peer id in a capability record.
pub const MAX_ID_BYTES: usize = 128;
/// The most bytes of a version, tier, label name or GPU model.
pub const MAX_NAME_BYTES: usize = 64;
/// The most bytes of a label value.
pub const MAX_LABEL_VALUE_BYTES: usize = 256;
/// The most bytes of one address.
pub const MAX_ADDR_BYTES: usize = 256;
/// The most listen addresses in a record.
pub const MAX_LISTEN_ADDRS: usize = 16;
/// The most labels in a record.
pub const MAX_LABELS: usize = 32;
/// The most GPUs of each kind (detected, declared) in a record.
pub const MAX_GPUS: usize = 32;
/// The most QoS 0 interest filters in a record; a peer with more summarises them
/// ([`summarise_interest`]).
pub const MAX_INTEREST_FILTERS: usize = 64;
/// The most bytes of all interest filters together in a record.
pub const MAX_INTEREST_BYTES: usize = 4 << 10;

/// With every field at its limit a record stays far below this many encoded bytes, the
/// gossip limit the swarm sets: a valid record always fits a gossip message.
pub const MAX_RECORD_BYTES: usize = 32 << 10;

/// Why a capability record from a peer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapsError {
    /// A list has too many entries.
    #[error("capability record field {field} has {count} entries: at most {limit} are allowed")]
    TooMany {
        /// The field.
        field: String,
        /// How many entries it has.
        count: usize,
        /// The most allowed.
        limit: usize,
    },
    /// A string is too long.
    #[error(
        "capability record field {field} is {len} bytes long ({value:?}): at most {limit} are allowed"
    )]
    TooLong {
        /// The field.
        field: String,
        /// Its first characters.
        value: String,
        /// Its length in bytes.
        len: usize,
        /// The most allowed.
        limit: usize,
    },
    /// A value is not one that is allowed.
    #[error("capability record field {field} is {value:?}: expected {allowed}")]
    Invalid {
        /// The field.
        field: String,
        /// The value (its first characters).
        value: String,
        /// What is allowed.
        allowed: String,
    },
}

/// The first characters of `s`, for error messages about values that may be huge.
fn preview(s: &str) -> String {
    const CHARS: usize = 32;
    if s.chars().count() <= CHARS {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(CHARS).collect::<String>())
    }
}

fn text(field: &str, value: &str, limit: usize) -> Result<(), CapsError> {
    if value.len() > limit {
        return Err(CapsError::TooLong {
            field: field.to_string(),
            value: preview(value),
            len: value.len(),
            limit,
        });
    }
    Ok(())
}

fn count(field: &str, n: usize, limit: usize) -> Result<(), CapsError> {
    if n > limit {
        return Err(CapsError::TooMany {
            field: field.to_string(),
            count: n,
            limit,
        });
    }
    Ok(())
}

/// Summarises QoS 0 interest filters so that there are at most [`MAX_INTEREST_FILTERS`] of
/// them, of at most [`MAX_INTEREST_BYTES`] together: each filter is cut to its first levels
/// followed by `#`, using as many levels as still fit, down to `#` alone. The result matches
/// every topic any of the given filters matches (it may match more), which keeps QoS 0
/// correct: interest only narrows which peers are sent an event, and each subscriber filters
/// what it is handed. Invalid filters are dropped. Filters that already fit are returned
/// as they are (sorted, without duplicates).
pub fn summarise_interest<I, S>(filters: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let valid: Vec<TopicFilter> = filters
        .into_iter()
        .filter_map(|f| TopicFilter::new(f.as_ref()).ok())
        .collect();
    let fits = |set: &std::collections::BTreeSet<String>| {
        set.len() <= MAX_INTEREST_FILTERS
            && set.iter().map(String::len).sum::<usize>() <= MAX_INTEREST_BYTES
    };
    for levels in (0..=crate::topic::MAX_TOPIC_LEVELS).rev() {
        let cut: std::collections::BTreeSet<String> = valid
            .iter()
            .map(|f| cut_filter(f.as_str(), levels))
            .collect();
        if fits(&cut) {
            return cut.into_iter().collect();
        }
    }
    vec!["#".to_string()]
}

/// `filter` with only its first `levels` levels, followed by `#` if any were cut.
fn cut_filter(filter: &str, levels: usize) -> String {
    let parts: Vec<&str> = filter.split('/').collect();
    if parts.len() <= levels {
        return filter.to_string();
    }
    let mut kept: Vec<&str> = parts[..levels].to_vec();
    kept.push("#");
    kept.join("/")
}

/// Parses a `KEY=VALUE` label (`zone=eu-1`), as written in the node's config, its
/// `--label` flag and `canal fn deploy --label`: the key must not be empty, the value may be.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!(
            "{s:?} is not KEY=VALUE: write, for example, zone=eu-1"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_key_equals_value() {
        assert_eq!(parse_label("zone=eu-1"), Ok(("zone".into(), "eu-1".into())));
        assert_eq!(parse_label("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_label("k="), Ok(("k".into(), String::new())));
        assert!(parse_label("zone").is_err());
        assert!(parse_label("=x").is_err());
    }

    #[test]
    fn parses_gpu_declarations() {
        let g = Gpu::parse_declared("H100:80GiB");
        assert_eq!(
            g,
            Ok(Gpu {
                model: "H100".into(),
                memory_bytes: 80 << 30,
                source: GpuSource::Declared
            })
        );
        // The model may itself contain a colon; the memory is after the last one.
        assert!(matches!(Gpu::parse_declared("nv:A10G:24GiB"), Ok(g) if g.model == "nv:A10G"));
        assert!(matches!(
            Gpu::parse_declared("H100"),
            Err(GpuSpecError::Shape(_))
        ));
        assert!(matches!(
            Gpu::parse_declared(":80GiB"),
            Err(GpuSpecError::Shape(_))
        ));
        assert!(matches!(
            Gpu::parse_declared("H100:lots"),
            Err(GpuSpecError::Memory(_))
        ));
    }

    fn record() -> Capabilities {
        Capabilities {
            peer_id: "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN".into(),
            version: "0.1.0".into(),
            listen_addrs: vec!["/ip4/127.0.0.1/tcp/7000".into()],
            tier: "edge".into(),
            interest: vec!["a/#".into()],
            ..Capabilities::default()
        }
    }

    type Spoil = Box<dyn Fn(&mut Capabilities)>;

    #[test]
    fn validates_every_field() {
        assert_eq!(record().validate(), Ok(()));
        let cases: Vec<(&str, Spoil)> = vec![
            ("peer_id", Box::new(|c| c.peer_id = "x".repeat(129))),
            ("version", Box::new(|c| c.version = "x".repeat(65))),
            (
                "listen_addrs",
                Box::new(|c| c.listen_addrs = vec!["a".into(); 17]),
            ),
            (
                "listen_addrs[0]",
                Box::new(|c| c.listen_addrs = vec!["a".repeat(257)]),
            ),
            ("api_addr", Box::new(|c| c.api_addr = Some("a".repeat(257)))),
            (
                "mqtt_addr",
                Box::new(|c| c.mqtt_addr = Some("a".repeat(257))),
            ),
            ("tier", Box::new(|c| c.tier = "t".repeat(65))),
            (
                "labels",
                Box::new(|c| c.labels = (0..33).map(|i| (i.to_string(), String::new())).collect()),
            ),
            (
                "label name",
                Box::new(|c| c.labels = [("k".repeat(65), String::new())].into()),
            ),
            (
                "labels[zone]",
                Box::new(|c| c.labels = [("zone".into(), "v".repeat(257))].into()),
            ),
            (
                "gpus_detected",
                Box::new(|c| {
                    c.gpus_detected = vec![
                        Gpu {
                            model: "H100".into(),
                            memory_bytes: 1,
                            source: GpuSource::Detected
                        };
                        33
                    ]
                }),
            ),
            (
                "gpus_declared[0].model",
                Box::new(|c| {
                    c.gpus_declared = vec![Gpu {
                        model: "m".repeat(65),
                        memory_bytes: 1,
                        source: GpuSource::Declared,
                    }]
                }),
            ),
            (
                "load.cpu_percent",
                Box::new(|c| c.load.cpu_percent = f32::NAN),
            ),
            ("load.cpu_percent", Box::new(|c| c.load.cpu_percent = 101.0)),
            ("interest", Box::new(|c| c.interest = vec!["a".into(); 65])),
            (
                "interest[0]",
                Box::new(|c| c.interest = vec!["a".repeat(257)]),
            ),
            (
                "interest[0]",
                Box::new(|c| c.interest = vec!["a/#/b".into()]),
            ),
        ];
        for (field, spoil) in cases {
            let mut c = record();
            spoil(&mut c);
            let err = c
                .validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                err.contains(&format!("field {field} ")),
                "{field}: got {err:?}"
            );
        }
        let long = record_with(|c| c.peer_id = "p".repeat(200));
        let err = long
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("200 bytes long") && err.contains("at most 128"),
            "{err}"
        );
    }

    fn record_with(f: impl Fn(&mut Capabilities)) -> Capabilities {
        let mut c = record();
        f(&mut c);
        c
    }

    #[test]
    fn a_record_at_every_limit_fits_a_gossip_message() {
        let gpu = |source| Gpu {
            model: "m".repeat(MAX_NAME_BYTES),
            memory_bytes: u64::MAX,
            source,
        };
        let c = Capabilities {
            peer_id: "p".repeat(MAX_ID_BYTES),
            version: "v".repeat(MAX_NAME_BYTES),
            listen_addrs: vec!["a".repeat(MAX_ADDR_BYTES); MAX_LISTEN_ADDRS],
            api_addr: Some("a".repeat(MAX_ADDR_BYTES)),
            mqtt_addr: Some("a".repeat(MAX_ADDR_BYTES)),
            tier: "t".repeat(MAX_NAME_BYTES),
            labels: (0..MAX_LABELS)
                .map(|i| (format!("{i:0>64}"), "v".repeat(MAX_LABEL_VALUE_BYTES)))
                .collect(),
            gpus_detected: vec![gpu(GpuSource::Detected); MAX_GPUS],
            gpus_declared: vec![gpu(GpuSource::Declared); MAX_GPUS],
            interest: (0..MAX_INTEREST_FILTERS)
                .map(|i| format!("{i:0>63}"))
                .collect(),
            seq: u64::MAX,
            measured_at_ms: u64::MAX,
            ..Capabilities::default()
        };
        assert_eq!(c.validate(), Ok(()));
        let len = crate::wire::encode(&c)
            .map(|b| b.len())
            .unwrap_or(usize::MAX);
        assert!(len <= MAX_RECORD_BYTES, "{len} bytes");
    }

    #[test]
    fn summarised_interest_fits_and_covers_every_filter() {
        use crate::Topic;
        // Few filters are kept as they are.
        assert_eq!(
            summarise_interest(["b/+", "a/#", "a/#"]),
            vec!["a/#", "b/+"]
        );
        // Many filters collapse to their common prefixes.
        let many: Vec<String> = (0..500)
            .map(|i| format!("sensors/{}/room{i}/temp", i % 3))
            .chain(["alerts/x".to_string()])
            .collect();
        let sum = summarise_interest(&many);
        assert!(sum.len() <= MAX_INTEREST_FILTERS, "{sum:?}");
        assert!(sum.contains(&"alerts/x".to_string()), "{sum:?}");
        assert!(sum.contains(&"sensors/0/#".to_string()), "{sum:?}");
        let c = record_with(|c| c.interest = sum.clone());
        assert_eq!(c.validate(), Ok(()));
        for f in &many {
            let t = Topic::new(f).ok();
            let covered = t.is_some_and(|t| {
                sum.iter()
                    .filter_map(|s| TopicFilter::new(s).ok())
                    .any(|s| s.matches(&t))
            });
            assert!(covered, "{f} not covered by {sum:?}");
        }
        // Too many top levels: everything.
        let wide: Vec<String> = (0..100).map(|i| format!("t{i}")).collect();
        assert_eq!(summarise_interest(&wide), vec!["#"]);
        // Invalid filters are dropped.
        assert_eq!(summarise_interest(["a/#/b", "ok"]), vec!["ok"]);
    }

    #[test]
    fn describes_for_tables() {
        let g = Gpu::parse_declared("H100:80GiB").ok();
        assert_eq!(
            g.map(|g| g.describe()).as_deref(),
            Some("H100 80 GiB (declared)")
        );
    }
}
