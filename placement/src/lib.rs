//! # canal-placement
//!
//! Where functions and shard replicas run, and why. Pure policy with no I/O and no clock:
//! from a function's or shard's [`Requirements`](canal_proto::function::Requirements), the
//! table of peers (capability records, load, Kademlia distance rank, round-trip time) and
//! execution-time [`Estimates`], [`decide`] computes a [`Decision`]: an ordered set of peers
//! and a [`Verdict`] for every candidate — chosen, not chosen, or rejected, and why. Topology
//! says who is near; placement says who serves.
//!
//! ## Layout
//!
//! - `policy` — [`Policy`]: `topology` (default), `spread`, `least-loaded`, `latency`.
//! - `constraint` — the requirements as constraints (GPU, GPU memory, tier, labels) and
//!   the text of each miss (`GPU memory 8 GiB < 16 GiB required`).
//! - `estimates` — [`Estimates`]: an EWMA of each function's execution time on each peer,
//!   fed back from real invocations, and the queueing delay derived from a peer's load.
//! - `score` — [`load_score`] and the latency policy's predicted response time.
//! - [`shards`] — the shard map: every shard's K replicas under the same constraints, spread
//!   over a failure-domain label, balanced, moved as little as possible ([`shards::compute`],
//!   [`shards::plan_moves`], [`shards::movement`]). Groups do not use it yet.
//! - `decide` — [`Candidate`], [`decide`], [`should_replace`] (the hysteresis), and the
//!   explanations.
//!
//! ```text
//!  Requirements   Candidates (caps, alive, rank, rtt)   Estimates   previous Decision
//!       │                     │                             │              │
//!       └──────► check ◄──────┘                             │              │
//!          dead / hard miss ─► rejected                     │              │
//!          preferred miss ───► unmet (relaxed if nobody     │              │
//!                 │             meets it: `fallback`)       │              │
//!                 ▼                                         │              │
//!           rank by policy ◄────────────────────────────────┘              │
//!     (fewest unmet, then rank | tier round-robin | load | prediction)     │
//!                 │                                                        │
//!                 ▼                                                        │
//!        hold (measured policies) ◄────────────────────────────────────────┘
//!     keep previous peers unless gone or beaten by the margin
//!                 │
//!                 ▼
//!   Decision { chosen, unplaceable, fallback, shortfall, verdicts }
//! ```
//!
//! ## Formulas
//!
//! - `least-loaded`: [`load_score`] `= cpu% + 10 × (queue_len + running) / cores`.
//! - `latency`: predicted ms `= queue + exec + network`, where `exec` is the peer's EWMA for
//!   the function (alpha [`EWMA_ALPHA`]), else the mean over peers that ran it, else
//!   [`DEFAULT_EXEC_MS`]; `queue = (queue_len + running) × exec / cores`; `network` is the
//!   measured round trip from the event source, else the slowest measured one plus
//!   [`UNKNOWN_RTT_PENALTY_MS`].
//! - Hysteresis: a kept peer is replaced by a challenger only if it is better by more than
//!   20 % and 2 ms (latency) or 20 % and 10 points (least-loaded).

mod constraint;
mod decide;
mod estimates;
mod score;
pub mod shards;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use decide::{
    Candidate, LATENCY_MARGIN_MS, LATENCY_MARGIN_RATIO, LOAD_MARGIN_POINTS, LOAD_MARGIN_RATIO,
    decide, should_replace,
};
pub use estimates::{DEFAULT_EXEC_MS, EWMA_ALPHA, Estimates};
// The decision and the policies are API data, so they live in proto; the engine's callers
// keep naming them through this crate.
pub use canal_proto::placement::{Decision, Policy, PolicyError, Verdict};
pub use score::{LOAD_EVENT_WEIGHT, UNKNOWN_RTT_PENALTY_MS, load_score};
