//! The embedded store's loop guard: each step's current window in memory (at most
//! [`GUARD_CAP`] steps), every allowed execution appended to `guard_log`, from which the windows
//! are rebuilt when the file is opened, so a restart keeps them.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use rusqlite::{params, Connection};

use super::{millis, Db};

/// Steps whose loop-guard window is tracked in memory at most (about 52 bytes each, so 26 MiB at
/// the cap). Past it the oldest windows are forgotten first, with a warning: the guard then lets
/// those steps run again.
pub const GUARD_CAP: usize = 500_000;

/// One step's current loop-guard window.
#[derive(Clone, Copy)]
pub(super) struct GuardWindow {
    start: i64,
    executions: u32,
}

/// Records one execution of `fingerprint` if fewer than `max` were recorded in its current
/// window, and says whether it was allowed. A fixed window per step, from its first execution:
/// one that started `window` ago or earlier has ended, and the next execution starts a new one.
pub(super) fn count_execution(
    db: &mut Db,
    fingerprint: &str,
    window: Duration,
    max: u32,
    now: i64,
) -> rusqlite::Result<bool> {
    let window_ms = millis(window);
    db.guard_window_ms = Some(window_ms);
    let key = guard_key(fingerprint);
    let current = db
        .guard
        .get(&key)
        .copied()
        .filter(|w| w.start > now.saturating_sub(window_ms));
    let next = match current {
        Some(w) if w.executions >= max => return Ok(false),
        Some(w) => GuardWindow {
            start: w.start,
            executions: w.executions + 1,
        },
        None => GuardWindow {
            start: now,
            executions: 1,
        },
    };
    db.conn
        .prepare_cached("INSERT INTO guard_log (fingerprint, window_start) VALUES (?1, ?2)")?
        .execute(params![fingerprint, next.start])?;
    if db.guard.len() >= db.guard_cap && !db.guard.contains_key(&key) {
        make_guard_room(db, now);
    }
    db.guard.insert(key, next);
    Ok(true)
}

/// Forgets the windows that ended (those that started more than the last asked-for window
/// before `now`); returns the cutoff `guard_log` rows are pruned below, or `None` while no
/// window has been asked for.
pub(super) fn forget_ended_windows(db: &mut Db, now: i64) -> Option<i64> {
    let window_ms = db.guard_window_ms?;
    let cutoff = now.saturating_sub(window_ms) + 1;
    db.guard.retain(|_, w| w.start >= cutoff);
    Some(cutoff)
}

/// The loop-guard windows, replayed from `guard_log` in order (pruning keeps it to the windows
/// that had not ended).
pub(super) fn load_guard(db: &Connection) -> rusqlite::Result<HashMap<u64, GuardWindow>> {
    let mut guard: HashMap<u64, GuardWindow> = HashMap::new();
    let mut rows = db.prepare("SELECT fingerprint, window_start FROM guard_log ORDER BY id")?;
    let mut rows = rows.query([])?;
    while let Some(row) = rows.next()? {
        let (fingerprint, start): (String, i64) = (row.get(0)?, row.get(1)?);
        let window = guard.entry(guard_key(&fingerprint)).or_insert(GuardWindow {
            start,
            executions: 0,
        });
        if window.start != start {
            *window = GuardWindow {
                start,
                executions: 0,
            };
        }
        window.executions += 1;
    }
    Ok(guard)
}

/// A step's fingerprint (`pipeline:stage:mode`, see [`crate::idempotency::fingerprint`])
/// packed exactly into 63 bits; anything else is hashed, with the top bit set so the two never
/// meet.
fn guard_key(fingerprint: &str) -> u64 {
    let mut parts = fingerprint.split(':');
    let packed = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(pipeline), Some(stage), Some(mode), None) => {
            match (pipeline.parse::<u32>(), stage.parse::<u32>(), mode) {
                (Ok(p), Ok(s), "retry" | "rollback") if p < 1 << 31 && s < 1 << 31 => {
                    Some(u64::from(p) << 32 | u64::from(s) << 1 | u64::from(mode == "rollback"))
                }
                _ => None,
            }
        }
        _ => None,
    };
    packed.unwrap_or_else(|| {
        let mut hasher = std::hash::DefaultHasher::new();
        fingerprint.hash(&mut hasher);
        hasher.finish() | 1 << 63
    })
}

/// Makes room for one more step in a full loop-guard map: windows that ended go first, then the
/// oldest tenth.
fn make_guard_room(db: &mut Db, now: i64) {
    // Down to nine tenths of the cap, so the next sweep is a tenth of the cap's steps away.
    let target = db.guard_cap - db.guard_cap / 10;
    if let Some(window_ms) = db.guard_window_ms {
        db.guard
            .retain(|_, w| w.start > now.saturating_sub(window_ms));
    }
    forget_oldest_guard_windows(&mut db.guard, target, db.guard_cap);
}

/// Drops the oldest windows until at most `target` are left (ties may take a few more).
pub(super) fn forget_oldest_guard_windows(
    guard: &mut HashMap<u64, GuardWindow>,
    target: usize,
    cap: usize,
) {
    let Some(excess) = guard.len().checked_sub(target).filter(|&n| n > 0) else {
        return;
    };
    let mut starts: Vec<i64> = guard.values().map(|w| w.start).collect();
    let (_, &mut newest_dropped, _) = starts.select_nth_unstable(excess - 1);
    guard.retain(|_, w| w.start > newest_dropped);
    tracing::warn!(
        cap,
        forgotten = excess,
        "more steps ran within guard.window than the loop guard tracks; the oldest windows were forgotten and those steps may run again"
    );
}
