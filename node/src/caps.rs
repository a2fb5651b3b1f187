//! Measuring this peer's capability record: CPU, memory, GPUs, load.
//!
//! GPUs are found through NVML, loaded at run time: a machine without the NVIDIA driver simply
//! has no detected GPU. Declared GPUs come from the configuration and are kept apart.

use canal_dht::LocalRecord;
use canal_proto::{Capabilities, Gpu, GpuSource, Load};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use sysinfo::System;
use tracing::{info, warn};

/// Live load counters that the parts of the node doing work keep up to date.
#[derive(Debug, Default)]
pub struct LoadCounters {
    /// Events waiting to be processed.
    pub queue_len: AtomicU64,
    /// Function invocations running now.
    pub running_invocations: AtomicU64,
    /// Whether this node is a member of the cluster's Raft groups.
    pub raft_member: std::sync::atomic::AtomicBool,
    /// The filters of this node's QoS 0 subscribers and triggers.
    pub qos0: Arc<canal_pubsub::Qos0Interest>,
}

impl LoadCounters {
    /// The QoS 0 interest this node advertises: its subscribers' and its triggers' filters,
    /// summarised when there are too many for a capability record
    /// ([`canal_proto::caps::summarise_interest`]: wider filters, never narrower ones).
    pub fn interest(&self) -> Vec<String> {
        canal_proto::caps::summarise_interest(self.qos0.filters())
    }
}

/// Finds the GPUs the NVIDIA driver can see. `Err` says why there are none to find (no
/// driver library, no device); that is not an error for the node.
pub fn detect_gpus() -> Result<Vec<Gpu>, String> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|e| format!("NVML not available: {e}"))?;
    let count = nvml
        .device_count()
        .map_err(|e| format!("NVML cannot count devices: {e}"))?;
    let mut gpus = Vec::new();
    for i in 0..count {
        let device = match nvml.device_by_index(i) {
            Ok(d) => d,
            Err(e) => {
                warn!(index = i, error = %e, "GPU not readable, skipped");
                continue;
            }
        };
        let model = device.name().unwrap_or_else(|_| format!("GPU {i}"));
        let memory_bytes = device.memory_info().map(|m| m.total).unwrap_or(0);
        gpus.push(Gpu {
            model,
            memory_bytes,
            source: GpuSource::Detected,
        });
    }
    Ok(gpus)
}

/// Measures this peer's record for every advertisement.
pub struct Measurer {
    sys: Option<System>,
    template: Capabilities,
    load: Arc<LoadCounters>,
}

impl Measurer {
    /// Says in the record that this peer forms the cluster (`--bootstrap-expect`).
    pub fn forming(mut self, forms: bool) -> Measurer {
        self.template.forms_cluster = forms;
        self
    }

    /// A measurer for a peer of the given tier, labels and declared GPUs, whose API listens
    /// on `api_addr`. Detects GPUs once, now.
    pub fn new(
        tier: String,
        labels: BTreeMap<String, String>,
        declared: Vec<Gpu>,
        api_addr: Option<String>,
        mqtt_addr: Option<String>,
        load: Arc<LoadCounters>,
    ) -> Measurer {
        let detected = match detect_gpus() {
            Ok(g) => {
                info!(count = g.len(), gpus = ?g.iter().map(Gpu::describe).collect::<Vec<_>>(), "GPU detection");
                g
            }
            Err(why) => {
                info!("no GPU detected: {why}");
                Vec::new()
            }
        };
        let sys = match System::new() {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot read system statistics; CPU and memory will show as 0");
                None
            }
        };
        let cores = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        Measurer {
            sys,
            template: Capabilities {
                peer_id: String::new(),
                version: canal_proto::VERSION.to_string(),
                listen_addrs: Vec::new(),
                api_addr,
                mqtt_addr,
                tier,
                labels,
                cpu_cores: cores,
                memory_total_bytes: 0,
                memory_available_bytes: 0,
                gpus_detected: detected,
                gpus_declared: declared,
                load: Load::default(),
                raft_member: false,
                forms_cluster: false,
                interest: Vec::new(),
                seq: 0,
                measured_at_ms: 0,
            },
            load,
        }
    }
}

impl LocalRecord for Measurer {
    fn measure(&mut self) -> Capabilities {
        let mut caps = self.template.clone();
        if let Some(sys) = self.sys.as_mut() {
            sys.refresh_memory();
            sys.refresh_cpu_usage();
            caps.memory_total_bytes = sys.total_memory();
            caps.memory_available_bytes = sys.available_memory();
            // Peers refuse a record whose CPU use is not a number from 0 to 100.
            let cpu = sys.global_cpu_usage();
            caps.load.cpu_percent = if cpu.is_finite() {
                cpu.clamp(0.0, 100.0)
            } else {
                0.0
            };
        }
        caps.load.queue_len = self.load.queue_len.load(Ordering::Relaxed);
        caps.load.running_invocations = self.load.running_invocations.load(Ordering::Relaxed);
        caps.raft_member = self.load.raft_member.load(Ordering::Relaxed);
        caps.interest = self.load.interest();
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_this_machine() {
        let load = Arc::new(LoadCounters::default());
        load.queue_len.store(3, Ordering::Relaxed);
        let declared = vec![Gpu::parse_declared("H100:80GiB").unwrap()];
        let mut m = Measurer::new(
            "edge".into(),
            BTreeMap::new(),
            declared.clone(),
            None,
            None,
            load,
        );
        let caps = m.measure();
        assert!(caps.cpu_cores >= 1);
        assert!(caps.memory_total_bytes > 0);
        assert!(caps.memory_available_bytes <= caps.memory_total_bytes);
        assert_eq!(caps.gpus_declared, declared);
        assert!(
            caps.gpus_detected
                .iter()
                .all(|g| g.source == GpuSource::Detected)
        );
        assert_eq!(caps.load.queue_len, 3);
    }

    #[test]
    fn interest_is_summarised_to_fit_the_record() {
        let load = LoadCounters::default();
        let hub = canal_pubsub::Qos0Hub::new(load.qos0.clone());
        let _subscribers: Vec<_> = (0..1000)
            .filter_map(|i| {
                canal_proto::TopicFilter::new(&format!("devices/{}/sensor{i}", i % 4)).ok()
            })
            .map(|f| hub.register(&f))
            .collect();
        hub.set_trigger_filters(vec!["alerts/#".into()]);
        let interest = load.interest();
        assert!(interest.len() <= canal_proto::caps::MAX_INTEREST_FILTERS);
        assert!(interest.contains(&"alerts/#".to_string()), "{interest:?}");
        assert!(
            interest.contains(&"devices/3/#".to_string()),
            "{interest:?}"
        );
        let mut m = Measurer::new(
            "edge".into(),
            BTreeMap::new(),
            Vec::new(),
            None,
            None,
            Arc::new(load),
        );
        let mut caps = m.measure();
        caps.peer_id = "12D3KooW".into();
        assert_eq!(caps.validate(), Ok(()));
    }

    #[test]
    fn gpu_detection_never_panics() {
        // On a machine without the driver this is Err with a reason; with one, a list.
        match detect_gpus() {
            Ok(gpus) => assert!(gpus.iter().all(|g| !g.model.is_empty())),
            Err(why) => assert!(why.contains("NVML")),
        }
    }
}
