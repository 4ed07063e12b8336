//! The in-memory key index of the embedded store: where each stored key's outcome row is, so
//! the `outcomes` table needs no index of its own (see the store's module documentation for
//! what that saves). It follows the open transaction: a rollback takes its changes back.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};

use rusqlite::{Connection, OptionalExtension};

/// Keys held in the in-memory key index past which each pruning pass (and opening) logs a
/// warning: about 40 MiB.
const KEYS_WARN: usize = 1_000_000;

/// on the key, so recording an outcome writes nothing at a random place. The hash only points;
/// the row's own key is compared on every lookup. A key whose hash another stored key already
/// has is kept whole in `collided` (nearly always empty).
///
/// Changes follow the open transaction: each is logged in `undo` and taken back if the
/// transaction rolls back, and the log is cleared when it commits.
pub(super) struct KeyIndex {
    /// Seeded per process: the map is rebuilt on open, so the hash never reaches the file.
    seed: RandomState,
    /// `u64::MAX`, or 0 in tests to make every key collide.
    pub(super) mask: u64,
    rows: HashMap<u64, i64>,
    collided: HashMap<String, i64>,
    /// What the open transaction changed, oldest first, with the value before.
    undo: Vec<Undo>,
}

/// One change to the index, with what it replaced.
enum Undo {
    Row { hash: u64, before: Option<i64> },
    Collided { key: String, before: Option<i64> },
}

/// Sets `key` to `id`, or removes it for `None`; returns what it was.
fn put<K: Hash + Eq>(map: &mut HashMap<K, i64>, key: K, id: Option<i64>) -> Option<i64> {
    match id {
        Some(id) => map.insert(key, id),
        None => map.remove(&key),
    }
}

/// A stored outcome, found by key.
pub(super) struct StoredRow {
    pub(super) id: i64,
    pub(super) outcome: String,
    pub(super) expires_at: i64,
}

/// Where a key stands in the index.
pub(super) struct Found {
    /// The key's row, live or expired.
    pub(super) row: Option<StoredRow>,
    /// The key's hash points at another key's row: a new row of this key goes to `collided`.
    pub(super) slot_taken: bool,
}

impl KeyIndex {
    /// Every row of `outcomes`, in order (were a key to have two rows, the later one wins).
    pub(super) fn load(conn: &Connection) -> rusqlite::Result<KeyIndex> {
        let mut index = KeyIndex {
            seed: RandomState::new(),
            mask: u64::MAX,
            rows: HashMap::new(),
            collided: HashMap::new(),
            undo: Vec::new(),
        };
        let mut rows = conn.prepare("SELECT id, key FROM outcomes ORDER BY id")?;
        let mut rows = rows.query([])?;
        while let Some(row) = rows.next()? {
            let (id, key): (i64, String) = (row.get(0)?, row.get(1)?);
            let found = index.find(conn, &key)?;
            if let Some(earlier) = found.row {
                index.remove(&key, earlier.id);
            }
            index.insert(&key, id, found.slot_taken);
        }
        index.undo.clear();
        Ok(index)
    }

    fn hash(&self, key: &str) -> u64 {
        self.seed.hash_one(key) & self.mask
    }

    /// The key and the outcome of row `id`, if it exists.
    fn read(conn: &Connection, id: i64) -> rusqlite::Result<Option<(String, StoredRow)>> {
        conn.prepare_cached("SELECT key, outcome, expires_at FROM outcomes WHERE id = ?1")?
            .query_row([id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    StoredRow {
                        id,
                        outcome: r.get(1)?,
                        expires_at: r.get(2)?,
                    },
                ))
            })
            .optional()
    }

    /// The row `key` has, if any, and whether its hash's slot belongs to another key. A pointer
    /// to a row that is gone, or that holds another key, finds nothing.
    pub(super) fn find(&self, conn: &Connection, key: &str) -> rusqlite::Result<Found> {
        let mut slot_taken = false;
        if let Some(&id) = self.rows.get(&self.hash(key)) {
            match KeyIndex::read(conn, id)? {
                Some((stored, row)) if stored == key => {
                    return Ok(Found {
                        row: Some(row),
                        slot_taken: false,
                    })
                }
                Some(_) => slot_taken = true,
                None => {}
            }
        }
        if let Some(&id) = self.collided.get(key) {
            if let Some((stored, row)) = KeyIndex::read(conn, id)? {
                if stored == key {
                    return Ok(Found {
                        row: Some(row),
                        slot_taken,
                    });
                }
            }
        }
        Ok(Found {
            row: None,
            slot_taken,
        })
    }

    /// Records that `key`'s outcome is row `id` (the key has no other row); `slot_taken` as
    /// [`find`](Self::find) answered it.
    pub(super) fn insert(&mut self, key: &str, id: i64, slot_taken: bool) {
        if slot_taken {
            self.set_collided(key, Some(id));
            return;
        }
        self.set_row(self.hash(key), Some(id));
        if self.collided.contains_key(key) {
            self.set_collided(key, None);
        }
    }

    /// Forgets row `id` of `key` (deleted).
    pub(super) fn remove(&mut self, key: &str, id: i64) {
        if self.collided.get(key) == Some(&id) {
            self.set_collided(key, None);
            return;
        }
        let hash = self.hash(key);
        if self.rows.get(&hash) == Some(&id) {
            self.set_row(hash, None);
        }
    }

    fn set_row(&mut self, hash: u64, id: Option<i64>) {
        let before = put(&mut self.rows, hash, id);
        self.undo.push(Undo::Row { hash, before });
    }

    fn set_collided(&mut self, key: &str, id: Option<i64>) {
        let before = put(&mut self.collided, key.to_owned(), id);
        self.undo.push(Undo::Collided {
            key: key.to_owned(),
            before,
        });
    }

    /// The open transaction committed: its changes stay.
    pub(super) fn committed(&mut self) {
        self.undo.clear();
    }

    /// The open transaction rolled back: its changes are taken back, newest first.
    pub(super) fn rolled_back(&mut self) {
        while let Some(change) = self.undo.pop() {
            match change {
                Undo::Row { hash, before } => put(&mut self.rows, hash, before),
                Undo::Collided { key, before } => put(&mut self.collided, key, before),
            };
        }
    }

    /// Says so when the index has grown past [`KEYS_WARN`]: its memory follows the outcomes kept
    /// within the TTL, which the operator controls.
    pub(super) fn warn_if_large(&self) {
        if self.len() > KEYS_WARN {
            tracing::warn!(
                keys = self.len(),
                approx_mib = self.len() * 40 / (1 << 20),
                "the embedded idempotency store indexes many outcomes in memory (about 40 bytes each); a shorter idempotency.ttl or idempotency.backend = \"postgres\" keeps it smaller"
            );
        }
    }

    /// Gives memory back after pruning emptied most of the map.
    pub(super) fn shrink(&mut self) {
        if self.rows.capacity() > 1024 && self.rows.capacity() > 4 * self.rows.len() {
            self.rows.shrink_to_fit();
        }
    }

    pub(super) fn len(&self) -> usize {
        self.rows.len() + self.collided.len()
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::super::schema::outcomes_table;
    use super::KeyIndex;

    /// An in-memory database with the outcomes table and an index over it where every key
    /// collides.
    fn colliding_index() -> (Connection, KeyIndex) {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(&outcomes_table("outcomes")).unwrap();
        let mut index = KeyIndex::load(&conn).unwrap();
        index.mask = 0;
        (conn, index)
    }

    /// Adds a row for `key` the way `complete` does; returns its id.
    fn add(conn: &Connection, index: &mut KeyIndex, key: &str) -> i64 {
        let found = index.find(conn, key).unwrap();
        assert!(found.row.is_none(), "{key} has no row yet");
        conn.execute(
            "INSERT INTO outcomes (key, fingerprint, owner, outcome, expires_at)
             VALUES (?1, '1:0:retry', 'w', '{}', 0)",
            [key],
        )
        .unwrap();
        let id = conn.last_insert_rowid();
        index.insert(key, id, found.slot_taken);
        id
    }

    fn row_of(conn: &Connection, index: &KeyIndex, key: &str) -> Option<i64> {
        index.find(conn, key).unwrap().row.map(|r| r.id)
    }

    #[test]
    fn a_rolled_back_transaction_takes_its_index_changes_back() {
        let (conn, mut index) = colliding_index();
        conn.execute_batch("BEGIN").unwrap();
        let a = add(&conn, &mut index, "key-a");
        let b = add(&conn, &mut index, "key-b");
        conn.execute_batch("COMMIT").unwrap();
        index.committed();
        conn.execute_batch("BEGIN").unwrap();
        conn.execute("DELETE FROM outcomes WHERE id = ?1", [a])
            .unwrap();
        index.remove("key-a", a);
        add(&conn, &mut index, "key-c");
        conn.execute_batch("ROLLBACK").unwrap();
        index.rolled_back();
        assert_eq!(row_of(&conn, &index, "key-a"), Some(a));
        assert_eq!(row_of(&conn, &index, "key-b"), Some(b));
        assert_eq!(row_of(&conn, &index, "key-c"), None);
        assert_eq!(index.len(), 2);
    }

    /// A collided key whose row went without the index hearing of it (a prune that failed half
    /// way) is found again once it has a new row, even when that row takes the free slot.
    #[test]
    fn a_stale_collided_entry_does_not_hide_a_new_row() {
        let (conn, mut index) = colliding_index();
        let a = add(&conn, &mut index, "key-a");
        let b = add(&conn, &mut index, "key-b");
        assert!(index.collided.contains_key("key-b"));
        conn.execute("DELETE FROM outcomes WHERE id = ?1", [b])
            .unwrap();
        conn.execute("DELETE FROM outcomes WHERE id = ?1", [a])
            .unwrap();
        index.remove("key-a", a);
        let new_b = add(&conn, &mut index, "key-b");
        assert_eq!(row_of(&conn, &index, "key-b"), Some(new_b));
        assert!(index.collided.is_empty());
        let new_a = add(&conn, &mut index, "key-a");
        assert_eq!(row_of(&conn, &index, "key-a"), Some(new_a));
        assert_eq!(row_of(&conn, &index, "key-b"), Some(new_b));
    }
}
