//! What the simulator remembers: the installed fault rules, the idempotent answer store with
//! its per-key execution counts, the bounded call log and the counters, and the operations the
//! handle and the request flow use on them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use super::wire::Mode;
use super::{Answer, Call, Sim};
use crate::sim::iam::Iam;
use crate::sim::{FaultRule, RecordedCall, RuleEntry, SimConfig, SimStats};

/// What an idempotency key is bound to once it has executed.
#[derive(Debug)]
pub(super) struct KeyEntry {
    /// Times this key executed the step: 1, since later uses replay instead.
    pub(super) executions: u32,
    /// The request the key was first used for; reuse for another is a 409.
    pub(super) target: (i64, i64, Mode),
    /// The answer to replay.
    pub(super) answer: Answer,
}

/// Installed rules, in insertion order.
#[derive(Debug, Default)]
pub(super) struct Rules {
    /// Never reused, so a stale id can't delete a newer rule after a reset.
    pub(super) next_id: u64,
    /// Checked in order; the first applicable wins.
    pub(super) entries: Vec<RuleEntry>,
}

/// Everything recorded about executions and calls (record mode only).
#[derive(Debug, Default)]
pub(super) struct Book {
    /// Idempotency store and per-key execution counts.
    pub(super) keys: HashMap<String, KeyEntry>,
    /// Call log, oldest first, bounded by `max_recorded`.
    pub(super) calls: VecDeque<RecordedCall>,
}

/// A poisoned lock only means a panic elsewhere (e.g. a failing test
/// thread); the data is still consistent because no critical section here
/// can panic halfway, so keep serving.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sim {
    pub(crate) fn new(config: SimConfig) -> std::io::Result<Sim> {
        if config.stages == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "simulator needs at least 1 stage per pipeline (the deploy step)",
            ));
        }
        Ok(Sim {
            tokens: config.tokens.into_iter().collect(),
            stages: config.stages,
            record: config.record,
            max_recorded: config.max_recorded,
            requests: AtomicU64::new(0),
            executions: AtomicU64::new(0),
            overflow: AtomicU64::new(0),
            rules: Mutex::new(Rules {
                next_id: 1,
                entries: Vec::new(),
            }),
            book: Mutex::new(Book::default()),
            iam: Iam::new(&config.iam_users, config.token_ttl),
        })
    }

    /// The IAM token endpoint, for the HTTP layer and the handle.
    pub(crate) fn iam(&self) -> &Iam {
        &self.iam
    }

    pub(crate) fn stages(&self) -> u32 {
        self.stages
    }

    pub(crate) fn recording(&self) -> bool {
        self.record
    }

    /// First applicable rule, consuming one of its `times`.
    pub(super) fn pick_rule(
        &self,
        pipeline_id: Option<i64>,
        stage_index: Option<i64>,
        mode: Option<&str>,
    ) -> Option<(u64, FaultRule)> {
        let mut rules = lock(&self.rules);
        let entry = rules
            .entries
            .iter_mut()
            .find(|e| e.remaining != Some(0) && e.rule.matches(pipeline_id, stage_index, mode))?;
        if let Some(left) = entry.remaining.as_mut() {
            *left -= 1;
        }
        entry.applied += 1;
        Some((entry.id, entry.rule.clone()))
    }

    pub(super) fn record_of(
        &self,
        call: &Call<'_>,
        status: Option<u16>,
        rule_id: Option<u64>,
    ) -> RecordedCall {
        RecordedCall {
            seq: call.seq,
            at_unix_ms: call.at_unix_ms,
            request_id: call.request_id.clone(),
            method: call.req.method.to_owned(),
            path: call.req.path.to_owned(),
            query: call.req.query.map(str::to_owned),
            pipeline_id: call.pipeline_id,
            stage_index: call.stage_index,
            mode: call.mode_raw().map(str::to_owned),
            source: call.source_raw().map(str::to_owned),
            idempotency_key: call.req.idempotency_key.map(str::to_owned),
            traceparent: call.req.traceparent.map(str::to_owned),
            token_valid: call.token_valid,
            status,
            executed: false,
            replayed: false,
            fault_rule: rule_id,
        }
    }

    /// Appends to the bounded log, evicting the oldest entry when full: the
    /// latest calls are the ones a failing test or a live run needs.
    pub(super) fn push_record(&self, book: &mut Book, record: RecordedCall) {
        if self.max_recorded == 0 {
            self.overflow.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if book.calls.len() >= self.max_recorded {
            book.calls.pop_front();
            self.overflow.fetch_add(1, Ordering::Relaxed);
        }
        book.calls.push_back(record);
    }

    pub(crate) fn add_rule(&self, rule: FaultRule) -> u64 {
        let mut rules = lock(&self.rules);
        let id = rules.next_id;
        rules.next_id += 1;
        rules.entries.push(RuleEntry {
            id,
            remaining: rule.times,
            rule,
            applied: 0,
        });
        id
    }

    pub(crate) fn remove_rule(&self, id: u64) -> bool {
        let mut rules = lock(&self.rules);
        let before = rules.entries.len();
        rules.entries.retain(|e| e.id != id);
        rules.entries.len() != before
    }

    /// Returns how many rules were removed.
    pub(crate) fn clear_rules(&self) -> usize {
        let mut rules = lock(&self.rules);
        let n = rules.entries.len();
        rules.entries.clear();
        n
    }

    pub(crate) fn rules(&self) -> Vec<RuleEntry> {
        lock(&self.rules).entries.clone()
    }

    pub(crate) fn calls(&self) -> Vec<RecordedCall> {
        lock(&self.book).calls.iter().cloned().collect()
    }

    pub(crate) fn executions(&self) -> HashMap<String, u32> {
        lock(&self.book)
            .keys
            .iter()
            .map(|(k, e)| (k.clone(), e.executions))
            .collect()
    }

    pub(crate) fn stats(&self) -> SimStats {
        SimStats {
            requests: self.requests.load(Ordering::Relaxed),
            executions: self.executions.load(Ordering::Relaxed),
            recorded_overflow: self.overflow.load(Ordering::Relaxed),
            iam_requests: self.iam.requests(),
            tokens_issued: self.iam.tokens_issued(),
        }
    }

    pub(crate) fn reset(&self) {
        lock(&self.rules).entries.clear();
        let mut book = lock(&self.book);
        book.keys.clear();
        book.calls.clear();
        self.requests.store(0, Ordering::Relaxed);
        self.executions.store(0, Ordering::Relaxed);
        self.overflow.store(0, Ordering::Relaxed);
        self.iam.reset_counters();
    }
}

pub(super) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
