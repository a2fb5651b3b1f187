//! The capability record: what a peer can do and how busy it is.
//!
//! Every peer measures its own record, advertises it to the mesh and refreshes it; the
//! placement engine reads the table of records. Detected GPUs (found through the driver at run
//! time) and declared ones (`--gpu MODEL:MEMORY`, for peers whose GPU detection cannot see)
//! are kept apart, so a person can tell a measurement from a claim.

use crate::size::{SizeError, format_bytes, parse_bytes};
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
}

impl Capabilities {
    /// All GPUs, detected first.
    pub fn gpus(&self) -> impl Iterator<Item = &Gpu> {
        self.gpus_detected.iter().chain(self.gpus_declared.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn describes_for_tables() {
        let g = Gpu::parse_declared("H100:80GiB").ok();
        assert_eq!(
            g.map(|g| g.describe()).as_deref(),
            Some("H100 80 GiB (declared)")
        );
    }
}
