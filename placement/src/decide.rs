//! The decision: check every candidate against the requirements, rank those that fit by
//! the policy, keep or repair the previous choice (hysteresis), and explain every candidate.

use crate::constraint::{Constraint, headline};
use crate::estimates::Estimates;
use crate::score::{Prediction, load_score, unknown_rtt_ms};
use canal_proto::caps::Capabilities;
use canal_proto::function::Requirements;
use canal_proto::placement::{Decision, Policy, Verdict};
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// Under `latency`, a challenger replaces a kept peer only when its prediction is lower by
/// more than this fraction of the kept peer's prediction ...
pub const LATENCY_MARGIN_RATIO: f64 = 0.2;
/// ... and by more than this many milliseconds.
pub const LATENCY_MARGIN_MS: f64 = 2.0;
/// Under `least-loaded`, a challenger replaces a kept peer only when its load score is lower
/// by more than this fraction of the kept peer's score ...
pub const LOAD_MARGIN_RATIO: f64 = 0.2;
/// ... and by more than this many points.
pub const LOAD_MARGIN_POINTS: f64 = 10.0;

/// A peer the engine may choose, with what the node knows of it now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// The peer id (base58); ids should be unique (see [`decide`] for duplicates).
    pub peer_id: String,
    /// Its latest capability record.
    pub caps: Capabilities,
    /// Whether its capability record is fresh (the node judges freshness, not this crate).
    pub alive: bool,
    /// Its place by XOR distance to the key: 0 is the closest.
    pub distance_rank: usize,
    /// Measured round trip, in ms, from the event source (the node where events enter) to
    /// this peer; `None` (or a value that is not a finite, non-negative number) if unknown.
    pub rtt_ms: Option<f64>,
}

/// One candidate as checked and scored.
struct Eval<'a> {
    index: usize,
    cand: &'a Candidate,
    /// `(reason, category)` when it cannot be chosen.
    rejected: Option<(String, String)>,
    /// Preferred constraints it misses: (index in the constraint list, text).
    misses: Vec<(usize, String)>,
    score: f64,
    prediction: Option<Prediction>,
}

impl Eval<'_> {
    fn id(&self) -> &str {
        &self.cand.peer_id
    }
    fn rank(&self) -> usize {
        self.cand.distance_rank
    }
}

/// One peer that fits, as hysteresis compares it.
struct Entry<'a> {
    peer: &'a str,
    unmet: usize,
    score: f64,
}

/// Decides where `function` runs: rejects candidates that are not alive or miss a hard
/// constraint, ranks the rest by `policy`, and chooses up to `req.replicas` (0 reads as 1).
///
/// Preferred constraints (`req.hard == false`): one that no live peer meets is relaxed (and
/// `fallback` says so); peers that miss fewer of the others rank first, whatever the policy.
/// With `previous` under a measured policy ([`Policy::is_measured`]), the previous peers
/// still fitting are kept, in their order; a free slot is filled with the best peer left,
/// and a kept peer is swapped out only for a challenger that misses fewer preferences or
/// beats it by the margin ([`LATENCY_MARGIN_RATIO`] and [`LATENCY_MARGIN_MS`], or
/// [`LOAD_MARGIN_RATIO`] and [`LOAD_MARGIN_POINTS`]). Under `topology` and `spread` the
/// ranking moves only with membership, so the fresh choice is taken as it is.
///
/// Deterministic: ties break by distance rank, then peer id, so the order of `candidates`
/// does not matter — except between duplicate records of one peer that also tie on
/// (alive, seq, measured_at_ms), where the first is used.
pub fn decide(
    req: &Requirements,
    policy: Policy,
    function: &str,
    candidates: &[Candidate],
    estimates: &Estimates,
    previous: Option<&Decision>,
) -> Decision {
    let want = req.replicas.max(1) as usize;
    let constraints = Constraint::of(req);
    let mut evals = check(req, &constraints, candidates);
    let eligible: Vec<usize> = (0..evals.len())
        .filter(|&i| evals[i].rejected.is_none())
        .collect();
    if eligible.is_empty() {
        let head = if req.hard {
            headline(&constraints)
        } else {
            headline(&[])
        };
        return Decision {
            policy,
            replicas: want,
            chosen: Vec::new(),
            unplaceable: Some(unplaceable_reason(&head, &constraints, &evals)),
            fallback: None,
            shortfall: None,
            verdicts: rejected_verdicts(&evals),
        };
    }

    // Preferred constraints that no live peer meets are relaxed.
    let relaxed: Vec<usize> = (0..constraints.len())
        .filter(|&k| {
            eligible
                .iter()
                .all(|&i| evals[i].misses.iter().any(|(m, _)| *m == k))
        })
        .collect();
    for &i in &eligible {
        evals[i].misses.retain(|(k, _)| !relaxed.contains(k));
    }

    let unknown_rtt = unknown_rtt_ms(eligible.iter().map(|&i| evals[i].cand));
    for &i in &eligible {
        let e = &mut evals[i];
        e.score = match policy {
            Policy::Topology | Policy::Spread => e.rank() as f64,
            Policy::LeastLoaded => load_score(&e.cand.caps),
            Policy::Latency => {
                let p = Prediction::of(estimates, function, e.cand, unknown_rtt);
                e.prediction = Some(p);
                p.total_ms()
            }
        };
    }

    let ranking = rank(policy, &evals, &eligible);
    let target = want.min(ranking.len());
    let fresh: Vec<usize> = ranking[..target].to_vec();
    let held = previous.filter(|p| p.policy == policy && policy.is_measured());
    let chosen: Vec<usize> = match held {
        Some(prev) => {
            let entries: Vec<Entry<'_>> = ranking.iter().map(|&i| entry(&evals[i])).collect();
            hold(policy, &prev.chosen, &entries, want)
                .into_iter()
                .map(|slot| ranking[slot])
                .collect()
        }
        None => fresh.clone(),
    };
    let kept: Vec<usize> = match held {
        Some(prev) => chosen
            .iter()
            .copied()
            .filter(|&i| prev.chosen.iter().any(|p| p == evals[i].id()))
            .collect(),
        None => Vec::new(),
    };

    let ctx = Explain {
        policy,
        constraints: &constraints,
        want,
        evals: &evals,
        chosen: &chosen,
        fresh: &fresh,
        kept: &kept,
    };
    let mut verdicts: Vec<Verdict> = chosen
        .iter()
        .enumerate()
        .map(|(slot, &i)| ctx.verdict(i, ctx.chosen_reason(slot, i), true))
        .collect();
    verdicts.extend(
        ranking
            .iter()
            .filter(|i| !chosen.contains(i))
            .map(|&i| ctx.verdict(i, ctx.other_reason(i), false)),
    );
    verdicts.extend(rejected_verdicts(&evals));

    Decision {
        policy,
        replicas: want,
        chosen: chosen.iter().map(|&i| evals[i].id().to_string()).collect(),
        unplaceable: None,
        fallback: fallback(
            policy,
            &constraints,
            &relaxed,
            &evals,
            &chosen,
            eligible.len(),
        ),
        shortfall: (chosen.len() < want).then(|| {
            let n = chosen.len();
            let fit = if req.hard && !constraints.is_empty() {
                if n == 1 {
                    " meets the requirements"
                } else {
                    " meet the requirements"
                }
            } else {
                ""
            };
            format!(
                "{n} of {want} replicas placed: only {n} live peer{}{fit}",
                plural(n)
            )
        }),
        verdicts,
    }
}

/// Whether `fresh` — a decision made with no `previous` on the current inputs — should
/// replace `previous`: the policy changed, a chosen peer is gone or rejected, a free slot
/// can be filled, or (measured policies) a challenger misses fewer preferences or beats a
/// chosen peer by the margin; under `topology` and `spread`, whenever the choice differs.
/// Under one policy it agrees with [`decide`]: `decide(.., Some(previous))` changes
/// `previous.chosen` exactly when this is true. The node commits a decision when it is.
pub fn should_replace(previous: &Decision, fresh: &Decision) -> bool {
    if previous.policy != fresh.policy {
        return true;
    }
    if !fresh.policy.is_measured() {
        return previous.chosen != fresh.chosen;
    }
    let mut ranking: Vec<Entry<'_>> = fresh
        .verdicts
        .iter()
        .filter(|v| !v.rejected)
        .map(|v| Entry {
            peer: &v.peer_id,
            unmet: v.unmet.len(),
            score: v.score.unwrap_or(f64::INFINITY),
        })
        .collect();
    ranking.sort_by(|a, b| a.unmet.cmp(&b.unmet).then(a.score.total_cmp(&b.score)));
    let held: Vec<&str> = hold(fresh.policy, &previous.chosen, &ranking, fresh.replicas)
        .into_iter()
        .map(|slot| ranking[slot].peer)
        .collect();
    held != previous.chosen
}

/// Checks every candidate: duplicates, liveness, then each constraint.
fn check<'a>(
    req: &Requirements,
    constraints: &[Constraint],
    candidates: &'a [Candidate],
) -> Vec<Eval<'a>> {
    // Of several records for one peer, the live, newest one counts.
    let mut winner: BTreeMap<&str, usize> = BTreeMap::new();
    let freshness = |c: &Candidate| (c.alive, c.caps.seq, c.caps.measured_at_ms);
    for (i, c) in candidates.iter().enumerate() {
        winner
            .entry(&c.peer_id)
            .and_modify(|w| {
                if freshness(c) > freshness(&candidates[*w]) {
                    *w = i;
                }
            })
            .or_insert(i);
    }
    let word = if req.hard { "required" } else { "preferred" };
    candidates
        .iter()
        .enumerate()
        .map(|(index, cand)| {
            let mut e = Eval {
                index,
                cand,
                rejected: None,
                misses: Vec::new(),
                score: f64::INFINITY,
                prediction: None,
            };
            if winner.get(cand.peer_id.as_str()) != Some(&index) {
                e.rejected = Some((
                    "rejected: duplicate record for this peer (a newer one is used)".into(),
                    "with a duplicate record".into(),
                ));
            } else if !cand.alive {
                e.rejected = Some((
                    "rejected: not reachable (no fresh capability record)".into(),
                    "not reachable".into(),
                ));
            } else {
                e.misses = constraints
                    .iter()
                    .enumerate()
                    .filter_map(|(k, c)| c.miss(&cand.caps, word).map(|m| (k, m)))
                    .collect();
                if req.hard && !e.misses.is_empty() {
                    let first = &constraints[e.misses[0].0];
                    e.rejected = Some((
                        format!("rejected: {}", miss_texts(&e.misses)),
                        first.category(),
                    ));
                    e.misses.clear();
                }
            }
            e
        })
        .collect()
}

/// The eligible candidates, best first: by preferences missed, then by the policy.
fn rank(policy: Policy, evals: &[Eval<'_>], eligible: &[usize]) -> Vec<usize> {
    let by = |a: &usize, b: &usize, score: bool| {
        let (x, y) = (&evals[*a], &evals[*b]);
        let s = if score {
            x.score.total_cmp(&y.score)
        } else {
            Ordering::Equal
        };
        x.misses
            .len()
            .cmp(&y.misses.len())
            .then(s)
            .then(x.rank().cmp(&y.rank()))
            .then(x.id().cmp(y.id()))
    };
    let mut order = eligible.to_vec();
    if policy != Policy::Spread {
        order.sort_by(|a, b| by(a, b, true));
        return order;
    }
    // Spread: round-robin over tiers — the next pick is from the tier with the fewest
    // picks so far, closest to the key first, within the best preference group left.
    order.sort_by(|a, b| by(a, b, false));
    let mut picks: BTreeMap<&str, usize> = BTreeMap::new();
    let mut out = Vec::with_capacity(order.len());
    while let Some(&first) = order.first() {
        let group = evals[first].misses.len();
        let pos = order
            .iter()
            .take_while(|&&i| evals[i].misses.len() == group)
            .enumerate()
            .min_by_key(|(_, i)| {
                picks
                    .get(evals[**i].cand.caps.tier.as_str())
                    .copied()
                    .unwrap_or(0)
            })
            .map_or(0, |(pos, _)| pos);
        let i = order.remove(pos);
        *picks.entry(evals[i].cand.caps.tier.as_str()).or_default() += 1;
        out.push(i);
    }
    out
}

fn entry<'a>(e: &'a Eval<'_>) -> Entry<'a> {
    Entry {
        peer: e.id(),
        unmet: e.misses.len(),
        score: e.score,
    }
}

/// The hysteresis: from `previous`, keeps the peers still in `ranking` (best first), drops
/// the worst past `want`, fills free slots best first, then swaps the worst kept peer for
/// the best one outside while that one beats it. Returns slots in `ranking`.
fn hold(policy: Policy, previous: &[String], ranking: &[Entry<'_>], want: usize) -> Vec<usize> {
    let target = want.min(ranking.len());
    let worst = |set: &[usize]| {
        (0..set.len()).max_by(|&a, &b| {
            let (x, y) = (&ranking[set[a]], &ranking[set[b]]);
            x.unmet
                .cmp(&y.unmet)
                .then(x.score.total_cmp(&y.score))
                .then(set[a].cmp(&set[b]))
        })
    };
    let mut set: Vec<usize> = Vec::with_capacity(target);
    for p in previous {
        if let Some(slot) = ranking.iter().position(|e| e.peer == p)
            && !set.contains(&slot)
        {
            set.push(slot);
        }
    }
    while set.len() > target {
        if let Some(w) = worst(&set) {
            set.remove(w);
        }
    }
    for slot in 0..ranking.len() {
        if set.len() >= target {
            break;
        }
        if !set.contains(&slot) {
            set.push(slot);
        }
    }
    // A peer swapped out never comes back (the worst kept only gets better), so this ends
    // within ranking.len() swaps.
    for _ in 0..ranking.len() {
        let Some(challenger) = (0..ranking.len()).find(|s| !set.contains(s)) else {
            break;
        };
        let Some(w) = worst(&set) else { break };
        if beats(policy, &ranking[challenger], &ranking[set[w]]) {
            set[w] = challenger;
        } else {
            break;
        }
    }
    set
}

/// The margin a challenger must win by: (fraction of the incumbent's score, absolute).
fn margin(policy: Policy) -> (f64, f64) {
    match policy {
        Policy::Latency => (LATENCY_MARGIN_RATIO, LATENCY_MARGIN_MS),
        Policy::LeastLoaded => (LOAD_MARGIN_RATIO, LOAD_MARGIN_POINTS),
        Policy::Topology | Policy::Spread => (0.0, 0.0),
    }
}

/// Whether `challenger` should take `incumbent`'s place: it misses fewer preferences, or as
/// many and its score is lower by more than both parts of the margin.
fn beats(policy: Policy, challenger: &Entry<'_>, incumbent: &Entry<'_>) -> bool {
    match challenger.unmet.cmp(&incumbent.unmet) {
        Ordering::Less => true,
        Ordering::Greater => false,
        Ordering::Equal => {
            let gain = incumbent.score - challenger.score;
            let (ratio, abs) = margin(policy);
            gain > abs && gain > ratio * incumbent.score
        }
    }
}

fn miss_texts(misses: &[(usize, String)]) -> String {
    let mut texts: Vec<&str> = Vec::new();
    for (_, m) in misses {
        if !texts.contains(&m.as_str()) {
            texts.push(m);
        }
    }
    texts.join("; ")
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn rejected_verdicts(evals: &[Eval<'_>]) -> Vec<Verdict> {
    let mut rejected: Vec<&Eval<'_>> = evals.iter().filter(|e| e.rejected.is_some()).collect();
    rejected.sort_by(|a, b| a.id().cmp(b.id()).then(a.index.cmp(&b.index)));
    rejected
        .into_iter()
        .map(|e| Verdict {
            peer_id: e.id().to_string(),
            chosen: false,
            rejected: true,
            reason: e.rejected.as_ref().map(|r| r.0.clone()).unwrap_or_default(),
            predicted_ms: None,
            score: None,
            unmet: Vec::new(),
        })
        .collect()
}

/// `no live peer has a GPU: 3 peers considered (2 without a GPU, 1 not reachable)`; each
/// peer is counted under the first reason it fell for.
fn unplaceable_reason(head: &str, constraints: &[Constraint], evals: &[Eval<'_>]) -> String {
    let mut order: Vec<String> = constraints.iter().map(|c| c.category()).collect();
    order.push("not reachable".into());
    order.push("with a duplicate record".into());
    let counts: Vec<String> = order
        .iter()
        .enumerate()
        .filter(|(i, cat)| !order[..*i].contains(cat))
        .filter_map(|(_, cat)| {
            let n = evals
                .iter()
                .filter(|e| e.rejected.as_ref().is_some_and(|r| &r.1 == cat))
                .count();
            (n > 0).then(|| format!("{n} {cat}"))
        })
        .collect();
    let n = evals.len();
    let mut out = format!("{head}: {n} peer{} considered", plural(n));
    if !counts.is_empty() {
        out.push_str(&format!(" ({})", counts.join(", ")));
    }
    out
}

fn fallback(
    policy: Policy,
    constraints: &[Constraint],
    relaxed: &[usize],
    evals: &[Eval<'_>],
    chosen: &[usize],
    live: usize,
) -> Option<String> {
    let mut parts = Vec::new();
    if !relaxed.is_empty() {
        let nouns: Vec<String> = relaxed.iter().map(|&k| constraints[k].noun()).collect();
        parts.push(format!(
            "preferred {} met by no live peer: relaxed, chosen by {policy} among {live} live peer{}",
            nouns.join(" and "),
            plural(live)
        ));
    }
    let missing: Vec<usize> = chosen
        .iter()
        .copied()
        .filter(|&i| !evals[i].misses.is_empty())
        .collect();
    if !missing.is_empty() {
        let nouns: Vec<String> = (0..constraints.len())
            .filter(|k| {
                missing
                    .iter()
                    .any(|&i| evals[i].misses.iter().any(|(m, _)| m == k))
            })
            .map(|k| constraints[k].noun())
            .collect();
        parts.push(format!(
            "{} of {} chosen peer{} {} a preference ({}): too few live peers meet them all",
            missing.len(),
            chosen.len(),
            plural(chosen.len()),
            if missing.len() == 1 { "misses" } else { "miss" },
            nouns.join(", ")
        ));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// What the verdict texts of fitting peers need to know.
struct Explain<'a, 'b> {
    policy: Policy,
    constraints: &'a [Constraint],
    want: usize,
    evals: &'a [Eval<'b>],
    chosen: &'a [usize],
    fresh: &'a [usize],
    kept: &'a [usize],
}

impl Explain<'_, '_> {
    fn verdict(&self, i: usize, reason: String, chosen: bool) -> Verdict {
        let e = &self.evals[i];
        Verdict {
            peer_id: e.id().to_string(),
            chosen,
            rejected: false,
            reason,
            predicted_ms: e.prediction.map(|p| p.total_ms()),
            score: Some(e.score),
            unmet: e
                .misses
                .iter()
                .map(|(k, _)| self.constraints[*k].noun())
                .collect(),
        }
    }

    fn load_text(&self, e: &Eval<'_>) -> String {
        let c = &e.cand.caps;
        format!(
            "load score {:.1} (cpu {:.0}%, {} queued, {} running on {} core{})",
            e.score,
            c.load.cpu_percent,
            c.load.queue_len,
            c.load.running_invocations,
            c.cpu_cores,
            plural(c.cpu_cores as usize)
        )
    }

    fn chosen_reason(&self, slot: usize, i: usize) -> String {
        let e = &self.evals[i];
        let displaced = self.kept.contains(&i) && !self.fresh.contains(&i);
        let mut out = match self.policy {
            Policy::Topology if slot == 0 => {
                format!("chosen: closest to the key (rank {})", e.rank())
            }
            Policy::Topology => format!(
                "chosen: rank {} from the key (replica {} of {})",
                e.rank(),
                slot + 1,
                self.want
            ),
            Policy::Spread => format!(
                "chosen: spread to tier {} (rank {}), replica {} of {}",
                e.cand.caps.tier,
                e.rank(),
                slot + 1,
                self.want
            ),
            Policy::LeastLoaded if displaced => format!(
                "chosen: kept, {}; no peer is lower by the margin ({:.0}% and {:.0} points)",
                self.load_text(e),
                LOAD_MARGIN_RATIO * 100.0,
                LOAD_MARGIN_POINTS
            ),
            Policy::LeastLoaded => format!("chosen: {}", self.load_text(e)),
            Policy::Latency => {
                let p = e.prediction.map(|p| p.explain()).unwrap_or_default();
                if displaced {
                    format!(
                        "chosen: kept, {p}; no peer is faster by the margin ({:.0}% and {:.0} ms)",
                        LATENCY_MARGIN_RATIO * 100.0,
                        LATENCY_MARGIN_MS
                    )
                } else {
                    format!("chosen: {p}")
                }
            }
        };
        if !e.misses.is_empty() {
            out.push_str(&format!("; misses a preference: {}", miss_texts(&e.misses)));
        }
        out
    }

    fn other_reason(&self, i: usize) -> String {
        let e = &self.evals[i];
        let chosen: Vec<&Eval<'_>> = self.chosen.iter().map(|&c| &self.evals[c]).collect();
        let most_missed = chosen.iter().map(|c| c.misses.len()).max().unwrap_or(0);
        if e.misses.len() > most_missed {
            return format!("not chosen: misses a preference: {}", miss_texts(&e.misses));
        }
        let worst = chosen.iter().map(|c| c.score).fold(f64::MIN, f64::max);
        let kept_worst = self
            .kept
            .iter()
            .map(|&k| self.evals[k].score)
            .fold(f64::MIN, f64::max);
        let displaced = self.fresh.contains(&i);
        let one = chosen.len() == 1;
        match self.policy {
            Policy::Topology => format!(
                "not chosen: rank {}, farther than the chosen peer{} (up to rank {})",
                e.rank(),
                plural(chosen.len()),
                chosen.iter().map(|c| c.rank()).max().unwrap_or(0)
            ),
            Policy::Spread => {
                let mut tiers: Vec<&str> =
                    chosen.iter().map(|c| c.cand.caps.tier.as_str()).collect();
                tiers.sort_unstable();
                tiers.dedup();
                format!(
                    "not chosen: rank {} in tier {}; the {} replica{} already cover tier{} {}",
                    e.rank(),
                    e.cand.caps.tier,
                    chosen.len(),
                    plural(chosen.len()),
                    plural(tiers.len()),
                    tiers.join(", ")
                )
            }
            Policy::LeastLoaded if displaced => format!(
                "not chosen: load score {:.1}, not lower than the kept peers' {:.1} by the margin ({:.0}% and {:.0} points)",
                e.score,
                kept_worst,
                LOAD_MARGIN_RATIO * 100.0,
                LOAD_MARGIN_POINTS
            ),
            Policy::LeastLoaded if one => format!(
                "not chosen: load score {:.1}, chosen peer {:.1}",
                e.score, worst
            ),
            Policy::LeastLoaded => format!(
                "not chosen: load score {:.1}, chosen peers up to {:.1}",
                e.score, worst
            ),
            Policy::Latency => {
                let mut out = if displaced {
                    format!(
                        "not chosen: predicted {:.1} ms, not faster than the kept peers' {:.1} ms by the margin ({:.0}% and {:.0} ms)",
                        e.score,
                        kept_worst,
                        LATENCY_MARGIN_RATIO * 100.0,
                        LATENCY_MARGIN_MS
                    )
                } else if one {
                    format!(
                        "not chosen: predicted {:.1} ms, chosen peer {:.1} ms",
                        e.score, worst
                    )
                } else {
                    format!(
                        "not chosen: predicted {:.1} ms, chosen peers up to {:.1} ms",
                        e.score, worst
                    )
                };
                if let Some(g) = e.prediction.and_then(|p| p.guesses()) {
                    out.push_str("; ");
                    out.push_str(&g);
                }
                out
            }
        }
    }
}
