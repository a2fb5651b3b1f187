//! What a token says: who holds it, until when, for which cluster, and what it may do.
//!
//! Permissions are lists of topic filters ([`TopicFilter`], MQTT syntax). A right is held when
//! an `allow` filter grants it and no `deny` filter touches it: deny wins.
//!
//! - Publishing to a topic: some `allow` filter matches the topic and no `deny` filter does.
//! - Subscribing with a filter: some `allow` filter *covers* the requested filter (every topic
//!   the request can match, the allow filter matches too) and no `deny` filter *overlaps* it
//!   (no topic is matched by both). A request wider than the token's rights is refused whole
//!   (403) rather than narrowed in silence: a subscriber to `sensors/#` holding only
//!   `sensors/room1/#` is told so, and subscribes to `sensors/room1/#` instead.

use canal_proto::{Topic, TopicFilter};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The most filters one allow or deny list may hold.
pub const MAX_FILTERS: usize = 64;
/// The longest subject, in bytes.
pub const MAX_SUBJECT_BYTES: usize = 128;
/// The longest token id, in bytes.
pub const MAX_ID_BYTES: usize = 64;

/// One kind of right a token may hold, as named in a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    /// Publishing to a topic.
    Publish,
    /// Subscribing with a filter (and acknowledging what it delivered).
    Subscribe,
    /// Deploying functions and triggers, topic settings, cluster membership, the KV store,
    /// tokens and metrics.
    Admin,
}

impl Right {
    /// The right's name as a refusal says it.
    pub fn as_str(self) -> &'static str {
        match self {
            Right::Publish => "publish",
            Right::Subscribe => "subscribe",
            Right::Admin => "admin",
        }
    }
}

impl fmt::Display for Right {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A right that a token does not hold (the answer is 403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct Forbidden {
    /// The token's subject.
    pub subject: String,
    /// The right refused.
    pub right: Right,
    /// The topic or filter it was refused for (none for admin).
    pub topic: Option<String>,
    /// The deny filter that refused it, if one did (rather than no allow filter granting it).
    pub denied_by: Option<String>,
}

impl Forbidden {
    fn describe(&self) -> String {
        let what = match (&self.topic, self.right) {
            (Some(t), Right::Subscribe) => format!("subscribe to {t:?}"),
            (Some(t), _) => format!("{} to {t:?}", self.right),
            (None, _) => format!("{} rights", self.right),
        };
        let why = match (&self.denied_by, self.right) {
            (Some(d), _) => format!("its {} deny filter {d:?} refuses it", self.right),
            (None, Right::Admin) => "it is not an admin token".to_string(),
            (None, Right::Subscribe) => {
                "no subscribe allow filter of it covers that whole filter (a wider filter is refused, not narrowed: subscribe within the token's filters)".to_string()
            }
            (None, Right::Publish) => "no publish allow filter of it matches that topic".to_string(),
        };
        format!("token of {:?} may not {what}: {why}", self.subject)
    }
}

/// Allow and deny lists of topic filters for one right.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permission {
    /// Filters that grant the right.
    pub allow: Vec<TopicFilter>,
    /// Filters that take it away again, whatever `allow` says.
    pub deny: Vec<TopicFilter>,
}

impl Permission {
    /// Every topic (`#`), nothing denied.
    pub fn everything() -> Permission {
        Permission {
            // `#` is a valid filter, so this holds exactly it.
            allow: TopicFilter::new("#").into_iter().collect(),
            deny: Vec::new(),
        }
    }

    /// Whether a publish to `topic` is allowed; `Err` holds the deny filter that refused it,
    /// or `None` when no allow filter matched.
    pub fn check_topic(&self, topic: &Topic) -> Result<(), Option<&TopicFilter>> {
        if let Some(d) = self.deny.iter().find(|d| d.matches(topic)) {
            return Err(Some(d));
        }
        if self.allow.iter().any(|a| a.matches(topic)) {
            Ok(())
        } else {
            Err(None)
        }
    }

    /// Whether a subscription with `filter` is allowed (see the module's rules).
    pub fn check_filter(&self, filter: &TopicFilter) -> Result<(), Option<&TopicFilter>> {
        if let Some(d) = self.deny.iter().find(|d| overlaps(d, filter)) {
            return Err(Some(d));
        }
        if self.allow.iter().any(|a| covers(a, filter)) {
            Ok(())
        } else {
            Err(None)
        }
    }

    fn check_bounds(&self, which: &str) -> Result<(), String> {
        for (name, list) in [("allow", &self.allow), ("deny", &self.deny)] {
            if list.len() > MAX_FILTERS {
                return Err(format!(
                    "{which} {name} list has {} filters: at most {MAX_FILTERS} are allowed",
                    list.len()
                ));
            }
        }
        Ok(())
    }
}

/// Whether every topic `inner` can match, `outer` matches too.
pub fn covers(outer: &TopicFilter, inner: &TopicFilter) -> bool {
    let mut o = outer.as_str().split('/');
    let mut i = inner.as_str().split('/');
    let mut level = 0;
    loop {
        let (ol, il) = (o.next(), i.next());
        match (ol, il) {
            (Some("#"), _) => return true,
            // A whole-filter `#` matches every topic, each of which has a first level, so
            // `+/#` covers it.
            (Some("+"), Some("#")) if level == 0 => return o.next() == Some("#"),
            // `a/#` matches `a` too, so `a/b` does not cover `a/b/#` (it misses `a/b/c`),
            // nor does `a/+/#` (it misses `a`).
            (_, Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(ol), Some(il)) if il != "+" && ol == il => {}
            (None, None) => return true,
            _ => return false,
        }
        level += 1;
    }
}

/// Whether some topic matches both filters.
pub fn overlaps(a: &TopicFilter, b: &TopicFilter) -> bool {
    let mut x = a.as_str().split('/');
    let mut y = b.as_str().split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(l), Some(r)) if l == r => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// What a token says. Signed as a whole; nothing in it is trusted before the signature is
/// checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The token's id: what `canal token revoke` names.
    pub id: String,
    /// Who holds it (a user, a service, `admin`).
    pub subject: String,
    /// The cluster whose key signed it ([`crate::cluster_id`] of the key).
    pub cluster: String,
    /// When it was issued, ms since the Unix epoch.
    pub issued_ms: u64,
    /// When it stops being accepted, ms since the Unix epoch.
    pub expires_ms: u64,
    /// Topics it may publish to.
    pub publish: Permission,
    /// Filters it may subscribe with.
    pub subscribe: Permission,
    /// Whether it holds admin rights (functions, triggers, settings, membership, KV, tokens).
    pub admin: bool,
}

impl Claims {
    /// Whether the holder may publish to `topic`.
    pub fn may_publish(&self, topic: &Topic) -> Result<(), Forbidden> {
        self.publish
            .check_topic(topic)
            .map_err(|d| self.forbidden(Right::Publish, Some(topic.as_str()), d))
    }

    /// Whether the holder may subscribe with `filter`.
    pub fn may_subscribe(&self, filter: &TopicFilter) -> Result<(), Forbidden> {
        self.subscribe
            .check_filter(filter)
            .map_err(|d| self.forbidden(Right::Subscribe, Some(filter.as_str()), d))
    }

    /// Whether the holder may read what was published to `topic` (an acknowledgement, a
    /// topic's log bounds): the subscribe rules for that one topic.
    pub fn may_read(&self, topic: &Topic) -> Result<(), Forbidden> {
        self.subscribe
            .check_topic(topic)
            .map_err(|d| self.forbidden(Right::Subscribe, Some(topic.as_str()), d))
    }

    /// Whether the holder has admin rights.
    pub fn may_admin(&self) -> Result<(), Forbidden> {
        if self.admin {
            Ok(())
        } else {
            Err(self.forbidden(Right::Admin, None, None))
        }
    }

    fn forbidden(&self, right: Right, topic: Option<&str>, d: Option<&TopicFilter>) -> Forbidden {
        Forbidden {
            subject: self.subject.clone(),
            right,
            topic: topic.map(str::to_string),
            denied_by: d.map(|d| d.to_string()),
        }
    }

    /// Checks the claims' own bounds (lengths, list sizes, expiry after issue), as the
    /// issuer and the decoder both do.
    pub fn check(&self) -> Result<(), String> {
        if self.subject.is_empty()
            || self.subject.len() > MAX_SUBJECT_BYTES
            || self.subject.chars().any(char::is_control)
        {
            return Err(format!(
                "subject {:?} is refused: 1 to {MAX_SUBJECT_BYTES} bytes, no control characters",
                self.subject
            ));
        }
        if self.id.is_empty()
            || self.id.len() > MAX_ID_BYTES
            || !self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!(
                "token id {:?} is refused: 1 to {MAX_ID_BYTES} ASCII letters, digits or `-`",
                self.id
            ));
        }
        if self.expires_ms <= self.issued_ms {
            return Err(format!(
                "the token expires ({}) no later than it is issued ({})",
                self.expires_ms, self.issued_ms
            ));
        }
        self.publish.check_bounds("publish")?;
        self.subscribe.check_bounds("subscribe")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

    fn f(s: &str) -> TopicFilter {
        TopicFilter::new(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }
    fn t(s: &str) -> Topic {
        Topic::new(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }
    fn perm(allow: &[&str], deny: &[&str]) -> Permission {
        Permission {
            allow: allow.iter().map(|s| f(s)).collect(),
            deny: deny.iter().map(|s| f(s)).collect(),
        }
    }
    fn claims(publish: Permission, subscribe: Permission) -> Claims {
        Claims {
            id: "t1".into(),
            subject: "alice".into(),
            cluster: "c".into(),
            issued_ms: 1,
            expires_ms: 2,
            publish,
            subscribe,
            admin: false,
        }
    }

    #[test]
    fn deny_wins_over_allow() {
        let c = claims(perm(&["sensors/#"], &["sensors/secret/#"]), perm(&[], &[]));
        assert!(c.may_publish(&t("sensors/room1/t")).is_ok());
        let e = c.may_publish(&t("sensors/secret/x")).unwrap_err();
        assert_eq!(e.denied_by.as_deref(), Some("sensors/secret/#"));
        assert!(e.to_string().contains("publish"), "{e}");
        assert!(e.to_string().contains("sensors/secret/x"), "{e}");
        assert!(c.may_publish(&t("alerts/x")).is_err());
    }

    #[test]
    fn a_wider_subscription_is_refused_not_narrowed() {
        let c = claims(perm(&[], &[]), perm(&["sensors/room1/#"], &[]));
        assert!(c.may_subscribe(&f("sensors/room1/#")).is_ok());
        assert!(c.may_subscribe(&f("sensors/room1/+/x")).is_ok());
        assert!(c.may_subscribe(&f("sensors/room1")).is_ok());
        let e = c.may_subscribe(&f("sensors/#")).unwrap_err();
        assert_eq!(e.right, Right::Subscribe);
        assert!(e.to_string().contains("sensors/#"), "{e}");
        assert!(c.may_subscribe(&f("sensors/+/t")).is_err());
    }

    #[test]
    fn a_subscription_touching_a_deny_filter_is_refused() {
        let c = claims(perm(&[], &[]), perm(&["#"], &["private/#"]));
        assert!(c.may_subscribe(&f("public/x")).is_ok());
        assert!(c.may_subscribe(&f("#")).is_err());
        assert!(c.may_subscribe(&f("+/x")).is_err());
        assert!(c.may_subscribe(&f("private")).is_err());
    }

    #[test]
    fn admin_is_its_own_right() {
        let mut c = claims(Permission::everything(), Permission::everything());
        assert_eq!(c.may_admin().unwrap_err().right, Right::Admin);
        c.admin = true;
        assert!(c.may_admin().is_ok());
    }

    #[test]
    fn covers_and_overlaps_on_examples() {
        assert!(covers(&f("a/#"), &f("a")));
        assert!(covers(&f("a/#"), &f("a/#")));
        assert!(!covers(&f("a/b"), &f("a/b/#")));
        assert!(covers(&f("a/+"), &f("a/+")));
        assert!(!covers(&f("a/b"), &f("a/+")));
        assert!(!covers(&f("a/+"), &f("a/#")));
        assert!(overlaps(&f("a/+"), &f("+/b")));
        assert!(!overlaps(&f("a/b"), &f("a/c")));
        assert!(overlaps(&f("a/#"), &f("a")));
        assert!(!overlaps(&f("a/b"), &f("a")));
    }

    /// A small alphabet of levels, so that random filters and topics meet often.
    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("c".to_string())
        ]
    }

    fn topic_strategy() -> impl Strategy<Value = Topic> {
        proptest::collection::vec(level(), 1..5).prop_map(|ls| t(&ls.join("/")))
    }

    fn filter_strategy() -> impl Strategy<Value = TopicFilter> {
        (
            proptest::collection::vec(prop_oneof![3 => level(), 1 => Just("+".to_string())], 0..4),
            any::<bool>(),
        )
            .prop_filter_map("a filter needs a level", |(mut ls, hash)| {
                if hash {
                    ls.push("#".into());
                }
                (!ls.is_empty()).then(|| f(&ls.join("/")))
            })
    }

    /// `covers` and `overlaps` agree with matching on every topic of up to 4 levels over the
    /// alphabet: the permission rules are the matching rules, not an approximation.
    #[test]
    fn covers_and_overlaps_agree_with_matching() {
        let levels = ["a", "b", "c", "d"];
        let mut all = Vec::new();
        let mut frontier = vec![String::new()];
        for _ in 0..4 {
            let mut next = Vec::new();
            for p in &frontier {
                for l in levels {
                    let s = if p.is_empty() {
                        l.to_string()
                    } else {
                        format!("{p}/{l}")
                    };
                    all.push(t(&s));
                    next.push(s);
                }
            }
            frontier = next;
        }
        let config = Config {
            cases: 2000,
            ..Config::default()
        };
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[16; 32]);
        let mut runner = TestRunner::new_with_rng(config, rng);
        let result = runner.run(&(filter_strategy(), filter_strategy()), |(x, y)| {
            // Filters of at most 3 levels plus `#`: topics of 4 levels show every case.
            let both = all.iter().any(|t| x.matches(t) && y.matches(t));
            let x_has_y = all.iter().all(|t| !y.matches(t) || x.matches(t));
            prop_assert_eq!(overlaps(&x, &y), both, "overlaps {} {}", x, y);
            prop_assert_eq!(covers(&x, &y), x_has_y, "covers {} {}", x, y);
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }

    /// A granted subscription never delivers a topic its token could not read one by one.
    #[test]
    fn a_granted_filter_only_reaches_readable_topics() {
        let config = Config {
            cases: 2000,
            ..Config::default()
        };
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[61; 32]);
        let mut runner = TestRunner::new_with_rng(config, rng);
        let strategy = (
            proptest::collection::vec(filter_strategy(), 0..3),
            proptest::collection::vec(filter_strategy(), 0..2),
            filter_strategy(),
            topic_strategy(),
        );
        let result = runner.run(&strategy, |(allow, deny, req, topic)| {
            let c = claims(Permission::default(), Permission { allow, deny });
            if c.may_subscribe(&req).is_ok() && req.matches(&topic) {
                prop_assert!(
                    c.may_read(&topic).is_ok(),
                    "{:?} {} {}",
                    c.subscribe,
                    req,
                    topic
                );
            }
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }
}
