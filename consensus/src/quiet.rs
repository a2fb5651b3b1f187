//! Quiescent groups: an idle group stops heartbeating and its followers stop their election
//! timers, so a node hosting many groups pays for the busy ones only (TiKV's "hibernate
//! regions", CockroachDB's "quiesced ranges").
//!
//! ```text
//!   leader, idle for quiesce_after, a majority matched its last entry
//!     ──Quiesce(g, vote, last)──> each member: same leader, vote, last entry applied?
//!                                   yes: election timer off ("following quietly")
//!     nobody said no, a majority said yes, the rest did not answer (down), and nothing
//!     happened meanwhile: heartbeats and ticks off
//!
//!   every heartbeat interval, one Alive{leading, quiet} per peer pair (not per group)
//!     follower: its quiet group's leader lists the group as led ─> confirmed
//!               not confirmed for `patience` (the leader lease plus a random time in
//!               the election timeout range, as long as an active follower waits)
//!               ─> wake: elections run as before
//!     leader:   a member does not list a quiet group as followed quietly ─> wake
//!
//!   wake: a client operation, an entry, a vote, a snapshot, another leader's append
//! ```
//!
//! Safety does not depend on any of this: quiescence only switches openraft's timers, and
//! openraft keeps deciding who leads and what commits. What this module must get right is
//! liveness: a member never waits quietly on a leader it has not heard leading the group
//! within `patience`.

use crate::types::{NodeId, RaftNode};
use openraft::{LogId, RaftMetrics, ServerState, Vote};
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

/// Where a group stands as far as quiescence goes, on one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Quiet {
    /// Timers run as openraft has them.
    Active,
    /// This member leads the group and has stopped heartbeating it, since `since`.
    Leading {
        /// When it went quiet.
        since: Instant,
    },
    /// This member follows `leader` (at `vote`) with its election timer off.
    Following {
        /// The leader it follows.
        leader: NodeId,
        /// The leader's vote when the group went quiet: an append under any other vote wakes.
        vote: Vote<NodeId>,
        /// When the leader last said it leads the group.
        confirmed: Instant,
        /// How long without that confirmation before this member wakes and may stand.
        patience: Duration,
    },
}

impl Quiet {
    /// The label of `canal_raft_groups{state}`.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Quiet::Active => "active",
            Quiet::Leading { .. } | Quiet::Following { .. } => "quiescent",
        }
    }
}

/// What a leader asks its members to agree to: its vote, its last entry, and the members to
/// ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QuiesceOffer {
    /// The leader's vote.
    pub(crate) vote: Vote<NodeId>,
    /// Its last log entry (applied, matched by a majority).
    pub(crate) last: Option<LogId<NodeId>>,
    /// Every member but the leader, voters and learners.
    pub(crate) members: Vec<(NodeId, RaftNode)>,
    /// The voters, the leader included.
    pub(crate) voters: std::collections::BTreeSet<NodeId>,
}

/// How a member answered a [`crate::rpc::RpcRequest::Quiesce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// It follows quietly now.
    Yes,
    /// It differs from the leader (or does not host the group): the group stays active.
    No,
    /// No answer (down, or cut off): it gets no heartbeats either way, and when it is back
    /// its liveness signal, which does not list the group as quiet, wakes the leader.
    Unreachable,
}

/// Whether the answers to an offer take the group quiet: nobody said no, and the voters
/// that said yes, with the leader, are a majority (the others did not answer).
pub(crate) fn answers_quiesce(offer: &QuiesceOffer, answers: &[(NodeId, Answer)]) -> bool {
    if answers.iter().any(|(_, a)| *a == Answer::No) {
        return false;
    }
    let yes = answers
        .iter()
        .filter(|(id, a)| *a == Answer::Yes && offer.voters.contains(id))
        .count();
    // The leader is a voter (checked by `quiesce_offer`).
    (yes + 1) * 2 > offer.voters.len()
}

/// Whether leader `me` may offer to quiesce the group its metrics `m` describe: it leads,
/// its membership is not changing (no joint configuration), it has applied its last entry,
/// and a majority of voters has matched that entry (the others must then not answer, see
/// [`answers_quiesce`]). The error says what is missing.
pub(crate) fn quiesce_offer(
    m: &RaftMetrics<NodeId, RaftNode>,
    me: NodeId,
) -> Result<QuiesceOffer, &'static str> {
    if m.state != ServerState::Leader || m.current_leader != Some(me) {
        return Err("not the leader");
    }
    let membership = m.membership_config.membership();
    if membership.get_joint_config().len() != 1 {
        return Err("a membership change is under way");
    }
    if !membership.voter_ids().any(|v| v == me) {
        return Err("the leader is leaving the group");
    }
    if m.last_applied.map(|l| l.index) != m.last_log_index {
        return Err("the last entry is not applied yet");
    }
    let members: Vec<(NodeId, RaftNode)> = membership
        .nodes()
        .filter(|(id, _)| **id != me)
        .map(|(id, n)| (*id, n.clone()))
        .collect();
    let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
    let matched = match &m.replication {
        Some(replication) => voters
            .iter()
            .filter(|v| **v != me && replication.get(v).copied().flatten() == m.last_applied)
            .count(),
        None => 0,
    };
    if (matched + 1) * 2 <= voters.len() {
        return Err("no majority of voters has matched the last entry");
    }
    Ok(QuiesceOffer {
        vote: m.vote,
        last: m.last_applied,
        members,
        voters,
    })
}

/// Whether this member (metrics `m`) may follow `leader` quietly at `vote` up to entry
/// `last`: it knows `leader` as the leader under that same vote, and has `last` as its own
/// last entry, applied. The error says what differs.
pub(crate) fn may_follow_quietly(
    m: &RaftMetrics<NodeId, RaftNode>,
    leader: NodeId,
    vote: &Vote<NodeId>,
    last: Option<LogId<NodeId>>,
) -> Result<(), &'static str> {
    if m.current_leader != Some(leader) || m.state == ServerState::Leader {
        return Err("the sender is not the leader known here");
    }
    if !vote.is_committed() || &m.vote != vote {
        return Err("the vote differs");
    }
    if m.last_log_index != last.map(|l| l.index) || m.last_applied != last {
        return Err("this member's last entry differs or is not applied");
    }
    Ok(())
}

/// Whether an AppendEntries under `vote`, carrying entries or not, wakes a member that
/// follows quietly at `quiet_vote`. A bare heartbeat of the same leader does not: one sent
/// just before the leader went quiet must not wake its members behind its back (they would
/// then stand for election when the leader stays quiet).
pub(crate) fn append_wakes(quiet_vote: &Vote<NodeId>, vote: &Vote<NodeId>, entries: bool) -> bool {
    entries || quiet_vote != vote
}

/// A random wait in `min..max` (both from the election timeout range): members of a group
/// whose leader went silent wake at different moments, as election timers do, so the first
/// to wake usually wins the election instead of splitting the vote.
pub(crate) fn patience(min: Duration, max: Duration) -> Duration {
    let span = max.saturating_sub(min).as_millis() as u64;
    if span == 0 {
        return min;
    }
    // Only spread matters, not quality: a fresh std hasher key is random per call.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9);
    min + Duration::from_millis(h.finish() % span)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, Membership, StoredMembership};
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;

    fn node(id: NodeId) -> RaftNode {
        RaftNode {
            peer_id: format!("n{id}"),
            addrs: vec![],
        }
    }

    fn log_id(index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(3, 1), index)
    }

    /// Leader 1's metrics over voters 1, 2, 3, all matched at 7.
    fn leader_metrics() -> RaftMetrics<NodeId, RaftNode> {
        let mut m = RaftMetrics::new_initial(1);
        let voters: BTreeSet<NodeId> = [1, 2, 3].into();
        let nodes: BTreeMap<NodeId, RaftNode> = voters.iter().map(|&i| (i, node(i))).collect();
        m.membership_config = Arc::new(StoredMembership::new(
            Some(log_id(1)),
            Membership::new(vec![voters], nodes),
        ));
        m.state = ServerState::Leader;
        m.current_leader = Some(1);
        m.vote = Vote::new_committed(3, 1);
        m.last_log_index = Some(7);
        m.last_applied = Some(log_id(7));
        m.replication = Some(
            [
                (1, Some(log_id(7))),
                (2, Some(log_id(7))),
                (3, Some(log_id(7))),
            ]
            .into(),
        );
        m
    }

    #[test]
    fn a_leader_offers_only_when_every_member_matched_its_applied_last_entry() {
        let m = leader_metrics();
        let offer = quiesce_offer(&m, 1).unwrap();
        assert_eq!(offer.vote, Vote::new_committed(3, 1));
        assert_eq!(offer.last, Some(log_id(7)));
        assert_eq!(
            offer.members.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![2, 3]
        );
        // One member behind (or down): still offered, its answer decides.
        let mut lagging = m.clone();
        lagging.replication = Some([(2, Some(log_id(7))), (3, Some(log_id(6)))].into());
        assert!(quiesce_offer(&lagging, 1).is_ok());
        let mut two = m.clone();
        two.replication = Some([(2, Some(log_id(6))), (3, Some(log_id(6)))].into());
        assert!(quiesce_offer(&two, 1).unwrap_err().contains("majority"));
        let mut missing = m.clone();
        missing.replication = None;
        assert!(quiesce_offer(&missing, 1).is_err());
        let mut unapplied = m.clone();
        unapplied.last_log_index = Some(8);
        assert!(
            quiesce_offer(&unapplied, 1)
                .unwrap_err()
                .contains("applied")
        );
        let mut follower = m.clone();
        follower.state = ServerState::Follower;
        assert!(quiesce_offer(&follower, 1).is_err());
        assert!(quiesce_offer(&m, 2).is_err());
    }

    #[test]
    fn a_group_goes_quiet_only_if_nobody_refused_and_a_majority_agreed() {
        let offer = quiesce_offer(&leader_metrics(), 1).unwrap();
        use Answer::*;
        assert!(answers_quiesce(&offer, &[(2, Yes), (3, Yes)]));
        // A member that is down gets no heartbeats anyway: a majority suffices.
        assert!(answers_quiesce(&offer, &[(2, Yes), (3, Unreachable)]));
        assert!(!answers_quiesce(
            &offer,
            &[(2, Unreachable), (3, Unreachable)]
        ));
        // A member that differs (lagging, another leader, group closed) keeps it active.
        assert!(!answers_quiesce(&offer, &[(2, Yes), (3, No)]));
        // Learners do not make a majority.
        let mut with_learner = offer.clone();
        with_learner.voters = [1, 2, 3].into();
        assert!(!answers_quiesce(
            &with_learner,
            &[(2, Unreachable), (3, Unreachable), (4, Yes)]
        ));
    }

    #[test]
    fn a_member_follows_quietly_only_the_leader_and_entries_it_knows() {
        let mut m = leader_metrics();
        m.id = 2;
        m.state = ServerState::Follower;
        m.replication = None;
        let vote = Vote::new_committed(3, 1);
        assert!(may_follow_quietly(&m, 1, &vote, Some(log_id(7))).is_ok());
        assert!(may_follow_quietly(&m, 3, &vote, Some(log_id(7))).is_err());
        assert!(may_follow_quietly(&m, 1, &Vote::new_committed(4, 1), Some(log_id(7))).is_err());
        assert!(may_follow_quietly(&m, 1, &Vote::new(3, 1), Some(log_id(7))).is_err());
        assert!(may_follow_quietly(&m, 1, &vote, Some(log_id(8))).is_err());
        let mut behind = m.clone();
        behind.last_applied = Some(log_id(6));
        assert!(may_follow_quietly(&behind, 1, &vote, Some(log_id(7))).is_err());
    }

    #[test]
    fn only_entries_or_another_vote_wake_a_quiet_member() {
        let v = Vote::new_committed(3, 1);
        assert!(!append_wakes(&v, &v, false));
        assert!(append_wakes(&v, &v, true));
        assert!(append_wakes(&v, &Vote::new_committed(4, 2), false));
    }

    #[test]
    fn patience_stays_in_the_election_range_and_spreads() {
        let (min, max) = (Duration::from_millis(200), Duration::from_millis(400));
        let waits: BTreeSet<Duration> = (0..200).map(|_| patience(min, max)).collect();
        assert!(waits.iter().all(|w| *w >= min && *w < max), "{waits:?}");
        assert!(waits.len() > 20, "not spread: {waits:?}");
        assert_eq!(patience(min, min), min);
    }
}
