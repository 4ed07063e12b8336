//! The `reply_to` policy (`amqp.reply_to`): whether a request's `reply_to` queue gets a copy of
//! its outcome. One pure function decides; the worker applies it to every delivery, replays
//! included, and logs each refused name once through [`RefusalLog`].
//!
//! Why a policy: the worker publishes the copy to the default exchange with `reply_to` as the
//! routing key, so an unchecked name lets any producer put outcomes (with up to 64 KiB of its own
//! `metadata`) into any queue of the vhost: the request queue, the DLQ, another team's queue.

use std::collections::HashSet;
use std::sync::Mutex;

use crate::config::{AmqpConfig, ReplyToPolicy};

/// RabbitMQ's direct reply-to pseudo-queue; the broker rewrites it to
/// `amq.rabbitmq.reply-to.<suffix>` in the delivered property.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Prefix of the names RabbitMQ reserves for itself.
const RESERVED_PREFIX: &str = "amq.";

/// The decision for one `reply_to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Publish the outcome's copy to this queue.
    Honour,
    /// Do not: the outcome goes to the results exchange only.
    Refuse(Refusal),
}

/// Why a `reply_to` was refused; also the `reason` label of `swr_stage_reply_to_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `amqp.reply_to = "deny"`.
    Denied,
    /// The name is one of the worker's own queues or exchanges.
    OwnTopology,
    /// An `amq.*` name other than direct reply-to, under `"safe"`.
    Reserved,
    /// Under a prefix list, the name starts with none of them.
    Unlisted,
}

impl Refusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Denied => "denied",
            Refusal::OwnTopology => "own_topology",
            Refusal::Reserved => "reserved",
            Refusal::Unlisted => "unlisted",
        }
    }

    /// Why, for the log line.
    pub fn explain(self) -> &'static str {
        match self {
            Refusal::Denied => "amqp.reply_to = \"deny\" ignores every reply_to",
            Refusal::OwnTopology => {
                "it names one of the worker's own queues or exchanges (amqp.request_queue, dead_letter_queue, the exchanges)"
            }
            Refusal::Reserved => {
                "amq.* names belong to the broker; only direct reply-to (amq.rabbitmq.reply-to) is honoured under amqp.reply_to = \"safe\""
            }
            Refusal::Unlisted => "it starts with none of the prefixes listed in amqp.reply_to",
        }
    }
}

/// The policy, row by row (docs/contract.md, §4).
pub fn decide(amqp: &AmqpConfig, reply_to: &str) -> Decision {
    let own_topology = || {
        [
            &amqp.request_queue,
            &amqp.dead_letter_queue,
            &amqp.dead_letter_exchange,
            &amqp.results_exchange,
        ]
        .into_iter()
        .chain(&amqp.request_exchanges)
        .any(|name| name == reply_to)
    };
    match &amqp.reply_to {
        ReplyToPolicy::Any => Decision::Honour,
        ReplyToPolicy::Deny => Decision::Refuse(Refusal::Denied),
        _ if own_topology() => Decision::Refuse(Refusal::OwnTopology),
        ReplyToPolicy::Safe if reply_to.starts_with(RESERVED_PREFIX) => {
            let direct = reply_to
                .strip_prefix(DIRECT_REPLY_TO)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'));
            if direct {
                Decision::Honour
            } else {
                Decision::Refuse(Refusal::Reserved)
            }
        }
        ReplyToPolicy::Safe => Decision::Honour,
        ReplyToPolicy::Prefixes(prefixes) => {
            if prefixes.iter().any(|p| reply_to.starts_with(p.as_str())) {
                Decision::Honour
            } else {
                Decision::Refuse(Refusal::Unlisted)
            }
        }
    }
}

/// How many refused names are remembered to log each once: a producer sending a new name with
/// every request must not grow the worker's memory.
pub const REMEMBERED_REFUSALS: usize = 1024;

/// The refused names already logged, at most a bounded number of them.
pub struct RefusalLog {
    /// Most names remembered.
    capacity: usize,
    /// The names logged so far, and whether the "no more names are remembered" line was logged.
    seen: Mutex<(HashSet<String>, bool)>,
}

/// What to log for one refusal.
#[derive(Debug, PartialEq, Eq)]
pub enum Sighting {
    /// A name not seen before: log it.
    New,
    /// Logged before: only count it.
    Known,
    /// A new name with the memory full: only count it; `first` is true once, to say so in the log.
    Unremembered {
        /// The first such name: log that new names are no longer logged.
        first: bool,
    },
}

impl Default for RefusalLog {
    fn default() -> Self {
        RefusalLog::new(REMEMBERED_REFUSALS)
    }
}

impl RefusalLog {
    /// A log that remembers at most `capacity` names.
    pub fn new(capacity: usize) -> Self {
        RefusalLog {
            capacity,
            seen: Mutex::new((HashSet::new(), false)),
        }
    }

    /// Records a refusal of `name` and says what to log.
    pub fn sight(&self, name: &str) -> Sighting {
        let mut guard = self.seen.lock().expect("reply_to refusal log lock");
        let (names, full_logged) = &mut *guard;
        if names.contains(name) {
            Sighting::Known
        } else if names.len() < self.capacity {
            names.insert(name.to_owned());
            Sighting::New
        } else {
            let first = !*full_logged;
            *full_logged = true;
            Sighting::Unremembered { first }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use Decision::*;
    use Refusal::*;

    /// The default topology (`swr.stage.*`) with `exchanges` bound to the request queue.
    fn amqp(policy: ReplyToPolicy, exchanges: &[&str]) -> AmqpConfig {
        let mut amqp = Config::load(None, Vec::new()).unwrap().amqp;
        amqp.reply_to = policy;
        amqp.request_exchanges = exchanges.iter().map(|e| e.to_string()).collect();
        amqp
    }

    fn prefixes(list: &[&str]) -> ReplyToPolicy {
        ReplyToPolicy::Prefixes(list.iter().map(|p| p.to_string()).collect())
    }

    const OWN: [&str; 5] = [
        "swr.stage.requests",
        "swr.stage.dead",
        "swr.stage.dlx",
        "swr.stage.results",
        "ops.requests-in",
    ];

    #[test]
    fn safe_refuses_the_workers_own_names() {
        let a = amqp(ReplyToPolicy::Safe, &["ops.requests-in"]);
        for name in OWN {
            assert_eq!(decide(&a, name), Refuse(OwnTopology), "{name}");
        }
    }

    #[test]
    fn safe_refuses_amq_names_but_direct_reply_to() {
        let a = amqp(ReplyToPolicy::Safe, &[]);
        for name in [
            "amq.gen-JzTY20BRgKO-HjmUJj0wLg",
            "amq.direct",
            "amq.topic",
            "amq.rabbitmq.trace",
            "amq.rabbitmq.reply-tox",
            "amq.",
        ] {
            assert_eq!(decide(&a, name), Refuse(Reserved), "{name}");
        }
        for name in [DIRECT_REPLY_TO, "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAy"] {
            assert_eq!(decide(&a, name), Honour, "{name}");
        }
    }

    #[test]
    fn safe_honours_every_other_name() {
        let a = amqp(ReplyToPolicy::Safe, &[]);
        for name in [
            "replies",
            "swr.stage.requests.replies",
            "swr.stage",
            "other-team.inbox",
            "AMQ.upper-case-is-not-reserved",
        ] {
            assert_eq!(decide(&a, name), Honour, "{name}");
        }
    }

    #[test]
    fn any_honours_everything_even_own_names() {
        let a = amqp(ReplyToPolicy::Any, &["ops.requests-in"]);
        for name in OWN.into_iter().chain(["amq.gen-x", "replies"]) {
            assert_eq!(decide(&a, name), Honour, "{name}");
        }
    }

    #[test]
    fn deny_refuses_everything() {
        let a = amqp(ReplyToPolicy::Deny, &[]);
        for name in ["replies", DIRECT_REPLY_TO, "swr.stage.requests"] {
            assert_eq!(decide(&a, name), Refuse(Denied), "{name}");
        }
    }

    #[test]
    fn a_prefix_list_honours_only_matching_names() {
        let a = amqp(prefixes(&["replies.", DIRECT_REPLY_TO, "amq.gen-"]), &[]);
        for name in [
            "replies.team-a",
            "replies.",
            "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAy",
            "amq.gen-JzTY20BRgKO-HjmUJj0wLg",
        ] {
            assert_eq!(decide(&a, name), Honour, "{name}");
        }
        for name in ["replies", "team-a.replies", "amq.direct", ""] {
            assert_eq!(decide(&a, name), Refuse(Unlisted), "{name:?}");
        }
    }

    #[test]
    fn a_prefix_list_still_refuses_the_workers_own_names() {
        let a = amqp(prefixes(&["swr.", "ops."]), &["ops.requests-in"]);
        for name in OWN {
            assert_eq!(decide(&a, name), Refuse(OwnTopology), "{name}");
        }
        assert_eq!(decide(&a, "swr.replies"), Honour);
    }

    #[test]
    fn each_refused_name_is_logged_once_and_memory_is_bounded() {
        let log = RefusalLog::new(2);
        assert_eq!(log.sight("a"), Sighting::New);
        assert_eq!(log.sight("a"), Sighting::Known);
        assert_eq!(log.sight("b"), Sighting::New);
        assert_eq!(log.sight("c"), Sighting::Unremembered { first: true });
        assert_eq!(log.sight("d"), Sighting::Unremembered { first: false });
        assert_eq!(log.sight("c"), Sighting::Unremembered { first: false });
        assert_eq!(log.sight("b"), Sighting::Known);
        assert_eq!(log.seen.lock().unwrap().0.len(), 2);
    }
}
