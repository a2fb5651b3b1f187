//! The constraints a function's requirements set, and how a peer's capabilities meet them.

use canal_proto::caps::Capabilities;
use canal_proto::function::Requirements;
use canal_proto::size::format_bytes;

/// One thing a peer must (hard) or should (preferred) have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Constraint {
    /// Any GPU, detected or declared.
    Gpu,
    /// A GPU with at least this many bytes of memory.
    GpuMemory(u64),
    /// This tier, exactly.
    Tier(String),
    /// This label key with this value.
    Label(String, String),
}

impl Constraint {
    /// The constraints of `req`, in the order they are checked: GPU, GPU memory, tier, labels
    /// (by key). A GPU memory minimum implies a GPU even when `req.gpu` is false.
    pub(crate) fn of(req: &Requirements) -> Vec<Constraint> {
        let memory = req.gpu_memory_bytes.filter(|&b| b > 0);
        let mut out = Vec::new();
        if req.gpu || memory.is_some() {
            out.push(Constraint::Gpu);
        }
        if let Some(b) = memory {
            out.push(Constraint::GpuMemory(b));
        }
        if let Some(t) = &req.tier {
            out.push(Constraint::Tier(t.clone()));
        }
        for (k, v) in &req.labels {
            out.push(Constraint::Label(k.clone(), v.clone()));
        }
        out
    }

    /// What is asked for, as a noun: `a GPU`, `a GPU with at least 16 GiB`, `tier edge`,
    /// `label zone=eu`.
    pub(crate) fn noun(&self) -> String {
        match self {
            Constraint::Gpu => "a GPU".into(),
            Constraint::GpuMemory(b) => format!("a GPU with at least {}", format_bytes(*b)),
            Constraint::Tier(t) => format!("tier {t}"),
            Constraint::Label(k, v) => format!("label {k}={v}"),
        }
    }

    /// What no peer had, after "no live peer": `has a GPU`, `is in tier edge`.
    pub(crate) fn predicate(&self) -> String {
        match self {
            Constraint::Tier(t) => format!("is in tier {t}"),
            other => format!("has {}", other.noun()),
        }
    }

    /// The group a peer that fails this constraint first is counted in: `without a GPU`.
    pub(crate) fn category(&self) -> String {
        match self {
            Constraint::Gpu => "without a GPU".into(),
            Constraint::GpuMemory(_) => "with too little GPU memory".into(),
            Constraint::Tier(_) => "in another tier".into(),
            Constraint::Label(k, v) => format!("without label {k}={v}"),
        }
    }

    /// `None` when `caps` meets the constraint; otherwise what is wrong, ending in `word`
    /// (`required` or `preferred`) where there is a wanted value to name:
    /// `no GPU`, `GPU memory 8 GiB < 16 GiB required`, `tier cloud, edge required`,
    /// `label zone=us, zone=eu required`, `no label zone, zone=eu required`.
    pub(crate) fn miss(&self, caps: &Capabilities, word: &str) -> Option<String> {
        match self {
            Constraint::Gpu => caps.gpus().next().is_none().then(|| "no GPU".to_string()),
            Constraint::GpuMemory(need) => match caps.gpus().map(|g| g.memory_bytes).max() {
                None => Some("no GPU".into()),
                Some(have) if have < *need => Some(format!(
                    "GPU memory {} < {} {word}",
                    format_bytes(have),
                    format_bytes(*need)
                )),
                Some(_) => None,
            },
            Constraint::Tier(t) => (caps.tier != *t).then(|| {
                let have = if caps.tier.is_empty() {
                    "(none)"
                } else {
                    caps.tier.as_str()
                };
                format!("tier {have}, {t} {word}")
            }),
            Constraint::Label(k, v) => match caps.labels.get(k) {
                None => Some(format!("no label {k}, {k}={v} {word}")),
                Some(have) if have != v => Some(format!("label {k}={have}, {k}={v} {word}")),
                Some(_) => None,
            },
        }
    }
}

/// The headline of an unplaceable decision: `no live peer has a GPU`,
/// `no live peer meets every requirement (a GPU, tier edge)`, or `no live peer`.
pub(crate) fn headline(constraints: &[Constraint]) -> String {
    // A memory minimum says everything the plain GPU constraint says.
    let shown: Vec<&Constraint> = constraints
        .iter()
        .filter(|c| {
            !(**c == Constraint::Gpu
                && constraints
                    .iter()
                    .any(|o| matches!(o, Constraint::GpuMemory(_))))
        })
        .collect();
    match shown.as_slice() {
        [] => "no live peer".into(),
        [one] => format!("no live peer {}", one.predicate()),
        many => format!(
            "no live peer meets every requirement ({})",
            many.iter().map(|c| c.noun()).collect::<Vec<_>>().join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::caps;
    use std::collections::BTreeMap;

    #[test]
    fn requirements_become_constraints() {
        let req = Requirements {
            gpu: false,
            gpu_memory_bytes: Some(16 << 30),
            tier: Some("edge".into()),
            labels: BTreeMap::from([("zone".into(), "eu".into())]),
            replicas: 1,
            hard: true,
        };
        assert_eq!(
            Constraint::of(&req),
            vec![
                Constraint::Gpu,
                Constraint::GpuMemory(16 << 30),
                Constraint::Tier("edge".into()),
                Constraint::Label("zone".into(), "eu".into()),
            ]
        );
        assert!(Constraint::of(&Requirements::default()).is_empty());
        let zero = Requirements {
            gpu_memory_bytes: Some(0),
            ..Requirements::default()
        };
        assert!(Constraint::of(&zero).is_empty());
    }

    #[test]
    fn headlines() {
        use Constraint::*;
        assert_eq!(headline(&[]), "no live peer");
        assert_eq!(headline(&[Gpu]), "no live peer has a GPU");
        assert_eq!(
            headline(&[Gpu, GpuMemory(16 << 30)]),
            "no live peer has a GPU with at least 16 GiB"
        );
        assert_eq!(
            headline(&[Tier("edge".into())]),
            "no live peer is in tier edge"
        );
        assert_eq!(
            headline(&[Gpu, Label("zone".into(), "eu".into())]),
            "no live peer meets every requirement (a GPU, label zone=eu)"
        );
    }

    #[test]
    fn an_empty_tier_reads_as_none() {
        let mut c = caps("p", "", &[]);
        c.tier.clear();
        assert_eq!(
            Constraint::Tier("edge".into()).miss(&c, "required"),
            Some("tier (none), edge required".into())
        );
    }
}
