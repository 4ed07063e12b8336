//! The embedded store's file: connection settings, the tables (`outcomes` and `guard_log`, both
//! appended in time order, neither indexed), the migrations from earlier layouts, and pruning by
//! rowid, which follows time.

use std::time::Duration;

use rusqlite::{params, Connection};

use super::key_index::KeyIndex;

/// How long opening waits for another process to let go of the file.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Rows deleted per pruning statement, so pruning never holds the store for long.
const PRUNE_BATCH: usize = 1000;
/// WAL pages between checkpoints (4 MiB). The file only appends, so a page reaches the WAL about
/// once whatever the interval; a shorter one keeps each checkpoint, which holds the store, short
/// (32 MiB ones put the worker's p99 publish-to-outcome latency near 55 ms, 4 MiB near 11).
const CHECKPOINT_PAGES: i64 = 1024;
/// Schema version kept in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 5;

/// Sets the connection up, takes the file for this process, migrates the schema, and drops the
/// claims a dead process left (so their keys run again at once); returns how many there were.
pub(super) fn migrate(db: &Connection) -> rusqlite::Result<usize> {
    db.busy_timeout(BUSY_TIMEOUT)?;
    db.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "NORMAL")?;
    db.pragma_update(None, "wal_autocheckpoint", CHECKPOINT_PAGES)?;
    db.pragma_update(None, "journal_size_limit", CHECKPOINT_PAGES * 4096 * 2)?;
    // The first write takes the exclusive lock and keeps it for the connection's life.
    db.execute_batch("BEGIN IMMEDIATE")?;
    match migrate_in_transaction(db) {
        Ok(orphans) => {
            db.execute_batch("COMMIT")?;
            Ok(orphans)
        }
        Err(e) => {
            let _ = db.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// Brings the schema from the file's version to [`SCHEMA_VERSION`], one step at a time;
/// returns how many running claims of the first schema were dropped.
fn migrate_in_transaction(db: &Connection) -> rusqlite::Result<usize> {
    let version: i64 = db.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(rusqlite::Error::ToSqlConversionFailure(
            format!(
                "the file's layout is version {version}, written by a newer release; this one reads up to version {SCHEMA_VERSION} (use that release, or another idempotency.path)"
            )
            .into(),
        ));
    }
    let mut orphans = 0;
    if version < 3 {
        orphans = migrate_to_3(db)?;
    }
    if version < 4 {
        migrate_to_4(db)?;
    }
    if version < 5 {
        migrate_to_5(db)?;
    }
    if version < SCHEMA_VERSION {
        db.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    Ok(orphans)
}

/// Version 3: finished outcomes only (claims live in memory), in a rowid table: rows are
/// appended in time order, nothing is written at a random place. Returns how many running
/// claims of the first schema were dropped.
fn migrate_to_3(db: &Connection) -> rusqlite::Result<usize> {
    db.execute_batch(&outcomes_table("outcomes"))?;
    // From the first schema (one WITHOUT ROWID table of claims and outcomes), found by
    // name: an early release could stop between creating it and recording the version.
    if !schema_has(db, "table", "name", "idempotency")? {
        return Ok(0);
    }
    // Rows a dead process left running are void: their keys run again.
    let orphans = db.execute("DELETE FROM idempotency WHERE state = 'running'", [])?;
    db.execute_batch(
        "INSERT OR IGNORE INTO outcomes (key, fingerprint, owner, outcome, expires_at)
             SELECT key, fingerprint, owner, outcome, expires_at FROM idempotency
             WHERE outcome IS NOT NULL ORDER BY expires_at;
         DROP TABLE idempotency;",
    )?;
    Ok(orphans)
}

/// Version 4: loop-guard executions as an appended log instead of one row per step at a random
/// place; version 2 and 3 counts become that many log rows of their window.
fn migrate_to_4(db: &Connection) -> rusqlite::Result<()> {
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS guard_log (
             id           INTEGER PRIMARY KEY,
             fingerprint  TEXT NOT NULL,
             window_start INTEGER NOT NULL
         );
         DROP INDEX IF EXISTS outcomes_expires;",
    )?;
    if schema_has(db, "table", "name", "guard")? {
        db.execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n
                 WHERE i < (SELECT max(executions) FROM guard))
             INSERT INTO guard_log (fingerprint, window_start)
                 SELECT fingerprint, window_start FROM guard JOIN n ON n.i <= guard.executions
                 ORDER BY window_start;
             DROP TABLE guard;",
        )?;
    }
    Ok(())
}

/// Version 5: no index on the key (the key index is in memory). Versions 3 and 4 had a unique
/// one, which goes only with its table.
fn migrate_to_5(db: &Connection) -> rusqlite::Result<()> {
    if schema_has(db, "index", "tbl_name", "outcomes")? {
        db.execute_batch(&outcomes_table("outcomes_v5"))?;
        db.execute_batch(
            "INSERT INTO outcomes_v5 (id, key, fingerprint, owner, outcome, expires_at)
                 SELECT id, key, fingerprint, owner, outcome, expires_at FROM outcomes
                 ORDER BY id;
             DROP TABLE outcomes;
             ALTER TABLE outcomes_v5 RENAME TO outcomes;",
        )?;
    }
    Ok(())
}

/// Whether the schema has an object of `kind` whose `column` (`name`, or `tbl_name` for what
/// belongs to a table) is `value`.
fn schema_has(db: &Connection, kind: &str, column: &str, value: &str) -> rusqlite::Result<bool> {
    db.query_row(
        &format!("SELECT count(*) > 0 FROM sqlite_master WHERE type = ?1 AND {column} = ?2"),
        [kind, value],
        |r| r.get(0),
    )
}

/// The outcomes table as version 5 has it, under `name`.
pub(super) fn outcomes_table(name: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {name} (
             id          INTEGER PRIMARY KEY,
             key         TEXT NOT NULL,
             fingerprint TEXT NOT NULL,
             owner       TEXT NOT NULL,
             outcome     TEXT NOT NULL,
             expires_at  INTEGER NOT NULL
         );"
    )
}

/// Deletes up to [`PRUNE_BATCH`] rows of `table` (`outcomes` by `expires_at`, `guard_log` by
/// `window_start`) after rowid `after` whose time is below `cutoff`, and takes the deleted
/// outcomes out of `keys`. Returns how many went and where the next batch starts, or `None` when
/// pruning should stop: rows are appended in time order, so a batch with nothing to delete means
/// the rest is newer still. (A lowered `idempotency.ttl` breaks that order for a while: the
/// newer, shorter lived rows then wait until the older ones expire, at most the old TTL.)
pub(super) fn prune_batch(
    conn: &Connection,
    table: &str,
    after: i64,
    cutoff: i64,
    keys: Option<&mut KeyIndex>,
) -> rusqlite::Result<(usize, Option<i64>)> {
    let column = if table == "outcomes" {
        "expires_at"
    } else {
        "window_start"
    };
    let (last, rows): (Option<i64>, i64) = conn
        .prepare_cached(&format!(
            "SELECT max(id), count(*) FROM (SELECT id FROM {table} WHERE id > ?1 ORDER BY id LIMIT ?2)"
        ))?
        .query_row(params![after, PRUNE_BATCH as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let Some(last) = last else {
        return Ok((0, None));
    };
    let deleted = match keys {
        Some(keys) => {
            let mut delete = conn.prepare_cached(&format!(
                "DELETE FROM {table} WHERE id > ?1 AND id <= ?2 AND {column} < ?3 RETURNING id, key"
            ))?;
            let mut rows = delete.query(params![after, last, cutoff])?;
            let mut deleted = 0;
            while let Some(row) = rows.next()? {
                let (id, key): (i64, String) = (row.get(0)?, row.get(1)?);
                keys.remove(&key, id);
                deleted += 1;
            }
            deleted
        }
        None => conn
            .prepare_cached(&format!(
                "DELETE FROM {table} WHERE id > ?1 AND id <= ?2 AND {column} < ?3"
            ))?
            .execute(params![after, last, cutoff])?,
    };
    let more = deleted > 0 && rows == PRUNE_BATCH as i64;
    Ok((deleted, more.then_some(last)))
}
