//! What a replay knows about the brand database it writes alone (a rebuild's shadow, or the
//! old copy a rollback brings up to date): the rows' and removal markers' codes and revisions,
//! and which event ids it recorded. Kept in memory, it answers the two lookups the projection
//! makes before every write ([`super::store::stored_revisions`] and [`crate::store::applied::seen`])
//! without asking MySQL, which is where a replay spent most of its time.
//!
//! Exact, not a cache that may be stale: loaded from the database, then changed by the same
//! statements the transaction runs (if the transaction fails, the replay fails and the state is
//! dropped with it). Codes compare as the table's collation does: for codes of ASCII letters,
//! digits, `.`, `_` and `-` that is ASCII case-insensitively, and an update keeps the stored
//! spelling. Any other code (spaces, accents: the collation folds those too) turns the state
//! off for good and every lookup goes to MySQL again. Event ids are held as 64-bit hashes; an id
//! whose hash is present is looked up in the database as before, so a collision costs one
//! query, never a wrongly skipped event.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

use futures::TryStreamExt;
use sqlx::MySqlConnection;

use super::change::NetChange;
use super::spec::{CatalogSpec, Cell};
use super::store::Removed;
use crate::tenant::DatabaseName;

/// folded code → (the code as stored, its revision)
type Codes = HashMap<String, (String, i64)>;

#[derive(Debug)]
pub struct ShadowState {
    rows: Codes,
    markers: Codes,
    ids: HashSet<u64>,
    /// False once a code the folding above cannot judge was seen.
    exact: bool,
}

fn hash(id: &str) -> u64 {
    let mut h = DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

/// The code as the collation compares it, for the codes whose comparison is known.
fn fold(code: &str) -> Option<String> {
    code.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        .then(|| code.to_ascii_lowercase())
}

/// An upsert or marker write: a new key, or the stored spelling with the new revision.
fn put(codes: &mut Codes, folded: String, code: &str, revision: impl FnOnce(Option<i64>) -> i64) {
    match codes.get_mut(&folded) {
        Some((_, held)) => *held = revision(Some(*held)),
        None => {
            codes.insert(folded, (code.to_owned(), revision(None)));
        }
    }
}

impl ShadowState {
    /// The state of an empty database.
    fn new() -> ShadowState {
        ShadowState {
            rows: Codes::new(),
            markers: Codes::new(),
            ids: HashSet::new(),
            exact: true,
        }
    }

    /// Reads what `db` holds now: every row's and removal marker's code and revision, and the
    /// event ids the catalog projection recorded.
    pub async fn load(
        conn: &mut MySqlConnection,
        db: &DatabaseName,
        spec: &CatalogSpec,
    ) -> Result<ShadowState, sqlx::Error> {
        let mut state = ShadowState::new();
        let sql = format!(
            "SELECT CAST(`{key}` AS CHAR), `{rev}`, 0 FROM {db}.`{rows}` \
             UNION ALL SELECT CAST(`{key}` AS CHAR), `{rev}`, 1 FROM {db}.`{removed}`",
            key = spec.key_column,
            rev = spec.brand_revision_column,
            db = db.quoted(),
            rows = spec.brand_table,
            removed = spec.brand_removed_table,
        );
        let mut rows = sqlx::query_as::<_, (String, i64, i32)>(&sql).fetch(&mut *conn);
        while let Some((code, revision, marker)) = rows.try_next().await? {
            let Some(folded) = fold(&code) else {
                state.exact = false;
                continue;
            };
            let table = match marker {
                1 => &mut state.markers,
                _ => &mut state.rows,
            };
            table.insert(folded, (code, revision));
        }
        drop(rows);
        let sql = format!(
            "SELECT event_id FROM {}.applied_events WHERE projection = ?",
            db.quoted()
        );
        let mut ids = sqlx::query_scalar::<_, String>(&sql)
            .bind(&spec.projection)
            .fetch(&mut *conn);
        while let Some(id) = ids.try_next().await? {
            state.ids.insert(hash(&id));
        }
        Ok(state)
    }

    /// What [`super::store::stored_revisions`] would read for `codes`; `None` when the state
    /// cannot say (see the module's note on codes).
    pub fn stored_revisions(
        &mut self,
        codes: &[String],
    ) -> Option<(HashMap<String, i64>, Removed)> {
        let mut stored: HashMap<String, i64> = HashMap::new();
        let mut removed = Removed::new();
        for code in codes {
            let Some(folded) = fold(code).filter(|_| self.exact) else {
                self.exact = false;
                return None;
            };
            for (table, is_marker) in [(&self.rows, false), (&self.markers, true)] {
                if let Some((spelling, revision)) = table.get(&folded) {
                    let entry = stored.entry(spelling.clone()).or_insert(*revision);
                    *entry = (*entry).max(*revision);
                    if is_marker {
                        removed.insert(spelling.clone());
                    }
                }
            }
        }
        Some((stored, removed))
    }

    /// The ids among `ids` that may have been recorded before: the only ones worth looking up.
    pub fn maybe_seen<'a>(&self, ids: &[&'a str]) -> Vec<&'a str> {
        ids.iter()
            .copied()
            .filter(|id| self.ids.contains(&hash(id)))
            .collect()
    }

    /// What [`super::store::write_brand`] does with `change` (given the `removed` markers it
    /// was handed), and the event ids recorded with it, statement by statement.
    pub fn written<'a>(
        &mut self,
        spec: &CatalogSpec,
        change: &NetChange,
        removed: &Removed,
        ids: impl IntoIterator<Item = &'a str>,
    ) {
        self.ids.extend(ids.into_iter().map(hash));
        if !self.exact {
            return;
        }
        let key = spec.key_index();
        for row in &change.upserts {
            let (Cell::Text(code), Some(Cell::Int(revision))) = (&row[key], row.last()) else {
                self.exact = false;
                return;
            };
            let Some(folded) = fold(code) else {
                self.exact = false;
                return;
            };
            // Only a marker named exactly as the upsert is deleted (write_brand's `back`).
            if removed.contains(code) {
                self.markers.remove(&folded);
            }
            put(&mut self.rows, folded, code, |_| *revision);
        }
        for (code, revision) in &change.removals {
            let Some(folded) = fold(code) else {
                self.exact = false;
                return;
            };
            self.rows.remove(&folded);
            put(&mut self.markers, folded, code, |held| {
                held.map_or(*revision, |h| h.max(*revision))
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_fold_only_where_the_collation_is_known() {
        assert_eq!(fold("F-001.a_B").as_deref(), Some("f-001.a_b"));
        assert_eq!(fold("f 1"), None);
        assert_eq!(fold("é"), None);
        assert_eq!(fold("a "), None);
    }

    /// An upsert of `code` at `revision`, cells in the spec's order with the revision last.
    fn upsert(spec: &CatalogSpec, code: &str, revision: i64) -> Vec<Cell> {
        let mut row: Vec<Cell> = spec.columns.iter().map(|_| Cell::Null).collect();
        row[spec.key_index()] = Cell::Text(code.into());
        row.push(Cell::Int(revision));
        row
    }

    /// What MySQL does with the same statements: the removal deletes the row whatever its
    /// case and keeps its own spelling for the marker; a later upsert in another case leaves
    /// that marker (write_brand deletes only an exact name), and both are read back.
    #[test]
    fn lookups_follow_the_statements_as_mysql_runs_them() {
        let spec = CatalogSpec::load().unwrap();
        let mut state = ShadowState::new();
        let none = Removed::new();
        let change = |upserts, removals| NetChange { upserts, removals };
        state.written(
            &spec,
            &change(vec![upsert(&spec, "ABC", 1)], vec![]),
            &none,
            ["e1"],
        );
        state.written(
            &spec,
            &change(vec![], vec![("abc".into(), 3)]),
            &none,
            ["e2"],
        );
        let (stored, removed) = state.stored_revisions(&["Abc".into()]).unwrap();
        assert_eq!(stored, HashMap::from([("abc".to_owned(), 3)]));
        assert_eq!(removed, Removed::from(["abc".to_owned()]));

        let (_, removed) = state.stored_revisions(&["ABC".into()]).unwrap();
        state.written(
            &spec,
            &change(vec![upsert(&spec, "ABC", 4)], vec![]),
            &removed,
            ["e3"],
        );
        let (stored, removed) = state.stored_revisions(&["abc".into()]).unwrap();
        assert_eq!(
            stored,
            HashMap::from([("ABC".to_owned(), 4), ("abc".to_owned(), 3)])
        );
        assert_eq!(removed, Removed::from(["abc".to_owned()]));

        assert_eq!(state.maybe_seen(&["e2", "e9"]), vec!["e2"]);
    }

    #[test]
    fn a_code_the_folding_cannot_judge_turns_the_state_off() {
        let mut state = ShadowState::new();
        assert!(state.stored_revisions(&["A".into()]).is_some());
        assert!(state.stored_revisions(&["a b".into()]).is_none());
        assert!(
            state.stored_revisions(&["A".into()]).is_none(),
            "off for good"
        );
    }

    #[test]
    fn an_update_keeps_the_stored_spelling() {
        let mut codes = Codes::new();
        put(&mut codes, "abc".into(), "ABC", |_| 1);
        put(&mut codes, "abc".into(), "abc", |held| held.unwrap() + 1);
        assert_eq!(codes["abc"], ("ABC".to_owned(), 2));
    }
}
