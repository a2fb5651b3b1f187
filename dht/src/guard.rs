//! Bad-message accounting: what to do about a peer that sent something it should not have.
//!
//! Pure state, no clock and no I/O: the swarm reports each offence with the time, and acts on
//! the [`Verdict`] (log, disconnect, ban) and on the bans that [`PeerGuard::expire`] ends.
//!
//! ```text
//!   offence(peer, now) ──> strikes in the window ──> >= ban_after? ──> ban for first_ban,
//!                               │                                     doubling per repeat
//!                               └─> log at most once per log_every     up to max_ban
//! ```
//!
//! Every offence disconnects the peer; a ban also refuses its connections until it expires.
//! A peer that behaves for `forget_after` is forgotten, so its next ban starts short again.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// The policy of a [`PeerGuard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardConfig {
    /// At most one log line per peer this often; the others are counted and reported with it.
    pub log_every: Duration,
    /// This many offences within `ban_window` ban the peer.
    pub ban_after: usize,
    /// The window in which offences are counted toward a ban.
    pub ban_window: Duration,
    /// How long a peer's first ban lasts; each later ban lasts twice the one before.
    pub first_ban: Duration,
    /// The longest ban.
    pub max_ban: Duration,
    /// A peer without an offence (and not banned) for this long is forgotten.
    pub forget_after: Duration,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            log_every: Duration::from_secs(60),
            ban_after: 3,
            ban_window: Duration::from_secs(600),
            first_ban: Duration::from_secs(600),
            max_ban: Duration::from_secs(24 * 3600),
            forget_after: Duration::from_secs(24 * 3600),
        }
    }
}

/// What to do about one offence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Whether to log this offence (the first for this peer in `log_every`).
    pub log: bool,
    /// Offences of this peer not logged since the last line that was, to report with this one.
    pub unlogged: u64,
    /// Whether to close the peer's connections (always: a peer that sent a bad message is
    /// not talked to on that connection again).
    pub disconnect: bool,
    /// A new ban and its length, when this offence was one too many.
    pub ban: Option<Duration>,
}

#[derive(Debug, Clone)]
struct Record {
    strikes: VecDeque<Instant>,
    last_offence: Instant,
    last_logged: Option<Instant>,
    unlogged: u64,
    bans: u32,
    banned_until: Option<Instant>,
}

/// The offences of every peer and who is banned until when. `K` is the peer's id.
#[derive(Debug, Clone)]
pub struct PeerGuard<K> {
    config: GuardConfig,
    peers: HashMap<K, Record>,
}

impl<K: Eq + Hash + Clone> PeerGuard<K> {
    /// A guard with the given policy and no offences.
    pub fn new(config: GuardConfig) -> Self {
        PeerGuard {
            config,
            peers: HashMap::new(),
        }
    }

    /// Records an offence of `peer` at `now` and says what to do about it.
    pub fn offence(&mut self, peer: &K, now: Instant) -> Verdict {
        let c = self.config;
        let r = self.peers.entry(peer.clone()).or_insert_with(|| Record {
            strikes: VecDeque::new(),
            last_offence: now,
            last_logged: None,
            unlogged: 0,
            bans: 0,
            banned_until: None,
        });
        r.last_offence = now;
        let log = r
            .last_logged
            .is_none_or(|t| now.saturating_duration_since(t) >= c.log_every);
        let unlogged = if log {
            r.last_logged = Some(now);
            std::mem::take(&mut r.unlogged)
        } else {
            r.unlogged += 1;
            0
        };
        let banned_now = r.banned_until.is_some_and(|until| now < until);
        let mut ban = None;
        if !banned_now {
            r.strikes.push_back(now);
            while r
                .strikes
                .front()
                .is_some_and(|t| now.saturating_duration_since(*t) >= c.ban_window)
            {
                r.strikes.pop_front();
            }
            if r.strikes.len() >= c.ban_after.max(1) {
                let length = c
                    .first_ban
                    .saturating_mul(2u32.saturating_pow(r.bans.min(31)))
                    .min(c.max_ban);
                r.bans = r.bans.saturating_add(1);
                r.banned_until = Some(now + length);
                r.strikes.clear();
                ban = Some(length);
            }
        }
        Verdict {
            log,
            unlogged,
            disconnect: true,
            ban,
        }
    }

    /// Whether `peer` is banned at `now`.
    pub fn is_banned(&self, peer: &K, now: Instant) -> bool {
        self.peers
            .get(peer)
            .and_then(|r| r.banned_until)
            .is_some_and(|until| now < until)
    }

    /// How many peers are banned at `now`.
    pub fn banned(&self, now: Instant) -> usize {
        self.peers
            .values()
            .filter(|r| r.banned_until.is_some_and(|until| now < until))
            .count()
    }

    /// Ends the bans that are over at `now` and returns their peers (to unblock), and forgets
    /// peers that have behaved for `forget_after`.
    pub fn expire(&mut self, now: Instant) -> Vec<K> {
        let mut ended = Vec::new();
        for (peer, r) in self.peers.iter_mut() {
            if r.banned_until.is_some_and(|until| now >= until) {
                r.banned_until = None;
                ended.push(peer.clone());
            }
        }
        let forget = self.config.forget_after;
        self.peers.retain(|_, r| {
            r.banned_until.is_some() || now.saturating_duration_since(r.last_offence) < forget
        });
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn guard() -> PeerGuard<&'static str> {
        PeerGuard::new(GuardConfig::default())
    }

    #[test]
    fn logs_once_per_peer_per_minute_and_counts_the_rest() {
        let mut g = guard();
        let t0 = Instant::now();
        let v = g.offence(&"a", t0);
        assert!(v.log && v.disconnect && v.unlogged == 0);
        // Another peer logs on its own schedule.
        assert!(g.offence(&"b", t0).log);
        assert!(!g.offence(&"a", t0 + 10 * S).log);
        let v = g.offence(&"a", t0 + 60 * S);
        assert!(v.log);
        assert_eq!(v.unlogged, 1);
        assert!(!g.offence(&"a", t0 + 61 * S).log);
    }

    #[test]
    fn every_offence_disconnects_and_the_third_in_ten_minutes_bans() {
        let mut g = guard();
        let t0 = Instant::now();
        assert_eq!(g.offence(&"a", t0).ban, None);
        assert_eq!(g.offence(&"a", t0 + S).ban, None);
        assert!(!g.is_banned(&"a", t0 + S));
        let v = g.offence(&"a", t0 + 2 * S);
        assert!(v.disconnect);
        assert_eq!(v.ban, Some(600 * S));
        assert!(g.is_banned(&"a", t0 + 3 * S));
        assert_eq!(g.banned(t0 + 3 * S), 1);
        // Offences while banned (messages already in flight) do not extend the ban.
        assert_eq!(g.offence(&"a", t0 + 4 * S).ban, None);
        assert!(g.offence(&"a", t0 + 4 * S).disconnect);
    }

    #[test]
    fn offences_spread_out_do_not_ban() {
        let mut g = guard();
        let t0 = Instant::now();
        for i in 0..10 {
            let v = g.offence(&"a", t0 + i * 301 * S);
            assert_eq!(v.ban, None, "offence {i}");
        }
    }

    #[test]
    fn bans_expire_and_repeat_bans_double_up_to_the_cap() {
        let config = GuardConfig {
            max_ban: 2500 * S,
            ..GuardConfig::default()
        };
        let mut g = PeerGuard::new(config);
        let mut now = Instant::now();
        let mut lengths = Vec::new();
        for _ in 0..4 {
            let mut ban = None;
            for _ in 0..3 {
                now += S;
                ban = ban.or(g.offence(&"a", now).ban);
            }
            let length = ban.unwrap_or_default();
            lengths.push(length);
            assert_eq!(g.expire(now + length - S), Vec::<&str>::new());
            assert!(g.is_banned(&"a", now + length - S));
            now += length;
            assert_eq!(g.expire(now), vec!["a"]);
            assert!(!g.is_banned(&"a", now));
            assert_eq!(g.banned(now), 0);
        }
        assert_eq!(lengths, vec![600 * S, 1200 * S, 2400 * S, 2500 * S]);
    }

    #[test]
    fn a_peer_that_behaves_is_forgotten() {
        let mut g = guard();
        let mut now = Instant::now();
        for _ in 0..3 {
            now += S;
            g.offence(&"a", now);
        }
        now += 600 * S;
        assert_eq!(g.expire(now), vec!["a"]);
        // A day of good behaviour later its next ban is the first again.
        now += 24 * 3600 * S;
        g.expire(now);
        let mut ban = None;
        for _ in 0..3 {
            now += S;
            ban = ban.or(g.offence(&"a", now).ban);
        }
        assert_eq!(ban, Some(600 * S));
    }
}
