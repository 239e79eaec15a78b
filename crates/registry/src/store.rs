//! Subjects, versions, global schema ids and compatibility configuration.
//!
//! This is the registry's model, independent of HTTP. It follows Confluent's semantics:
//!
//! * a schema id is global and belongs to a unique schema: registering the same schema under
//!   two subjects yields the same id;
//! * versions are per subject, start at 1 and are never reused, even after a soft delete;
//! * registering a schema the subject already has (in any live version) returns its id and
//!   creates nothing;
//! * a new version must pass the subject's compatibility level (or the global one) against the
//!   subject's live versions.
//!
//! The whole state sits behind a `std::sync::Mutex`: it is small, every operation on it is a
//! short synchronous computation, and no `.await` ever happens while it is held, so an async
//! mutex would add cost without benefit. Holding the lock across "check compatibility, pick id,
//! append version, persist" is also what makes registration atomic. Mutations work on a copy
//! of the state and only replace the shared state once the copy is safely on disk, so a failed
//! write changes nothing, and a panic mid-mutation cannot leave a half-updated state behind —
//! which is why a poisoned lock is simply recovered.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard, PoisonError};

use apache_avro::Schema;
use serde::{Deserialize, Serialize};

use super::compatibility::{self, CompatibilityLevel};
use super::error::RegistryError;
use super::schema::ParsedSchema;
use super::snapshot;

/// Version of the on-disk layout, checked on load so a future change cannot be misread.
const FORMAT: u32 = 1;

/// Which version of a subject a request refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionSelector {
    /// The highest live version (`latest` or `-1` on the wire).
    Latest,
    /// A specific version number.
    Number(u32),
}

impl FromStr for VersionSelector {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("latest") || s == "-1" {
            return Ok(Self::Latest);
        }
        match s.parse::<u32>() {
            Ok(n) if (1..=i32::MAX as u32).contains(&n) => Ok(Self::Number(n)),
            _ => Err(RegistryError::InvalidVersion(s.to_owned())),
        }
    }
}

impl fmt::Display for VersionSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Latest => f.write_str("latest"),
            Self::Number(n) => write!(f, "{n}"),
        }
    }
}

/// One version of one subject, as the API reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SubjectVersion {
    /// Subject name.
    pub subject: String,
    /// Version within the subject (1-based).
    pub version: u32,
    /// Global schema id.
    pub id: u32,
    /// Schema text.
    pub schema: String,
}

/// Everything the registry persists.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct State {
    format: u32,
    /// Global compatibility level.
    compatibility: CompatibilityLevel,
    /// Every schema ever registered, by global id. Ids are never reused or removed.
    schemas: BTreeMap<u32, StoredSchema>,
    subjects: BTreeMap<String, Subject>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            format: FORMAT,
            compatibility: CompatibilityLevel::default(),
            schemas: BTreeMap::new(),
            subjects: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredSchema {
    schema: String,
    identity: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Subject {
    /// Subject-level compatibility, overriding the global level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    compatibility: Option<CompatibilityLevel>,
    /// Ascending by version.
    #[serde(default)]
    versions: Vec<VersionEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct VersionEntry {
    version: u32,
    id: u32,
    #[serde(default)]
    deleted: bool,
}

impl Subject {
    fn visible(&self, include_deleted: bool) -> impl Iterator<Item = &VersionEntry> + '_ {
        self.versions
            .iter()
            .filter(move |v| include_deleted || !v.deleted)
    }

    fn has_live_versions(&self) -> bool {
        self.visible(false).next().is_some()
    }
}

impl State {
    fn level_for(&self, subject: &str) -> CompatibilityLevel {
        self.subjects
            .get(subject)
            .and_then(|s| s.compatibility)
            .unwrap_or(self.compatibility)
    }

    /// The subject, if it has any versions visible under `include_deleted`.
    fn subject(&self, name: &str, include_deleted: bool) -> Result<&Subject, RegistryError> {
        self.subjects
            .get(name)
            .filter(|s| s.visible(include_deleted).next().is_some())
            .ok_or_else(|| RegistryError::SubjectNotFound(name.to_owned()))
    }

    fn schema_text(&self, id: u32) -> Result<&str, RegistryError> {
        self.schemas
            .get(&id)
            .map(|s| s.schema.as_str())
            .ok_or_else(|| RegistryError::Storage(format!("version refers to unknown id {id}")))
    }

    fn subject_version(
        &self,
        subject: &str,
        entry: &VersionEntry,
    ) -> Result<SubjectVersion, RegistryError> {
        Ok(SubjectVersion {
            subject: subject.to_owned(),
            version: entry.version,
            id: entry.id,
            schema: self.schema_text(entry.id)?.to_owned(),
        })
    }

    /// Live versions of `subject`, parsed, oldest first.
    fn live_schemas(&self, subject: &Subject) -> Result<Vec<(u32, Schema)>, RegistryError> {
        subject
            .visible(false)
            .map(|v| {
                Ok((
                    v.version,
                    ParsedSchema::reparse(self.schema_text(v.id)?)?.schema,
                ))
            })
            .collect()
    }

    fn id_of(&self, identity: &str) -> Option<u32> {
        self.schemas
            .iter()
            .find(|(_, s)| s.identity == identity)
            .map(|(id, _)| *id)
    }

    fn find_version<'a>(
        &self,
        name: &str,
        subject: &'a Subject,
        selector: VersionSelector,
        include_deleted: bool,
    ) -> Result<&'a VersionEntry, RegistryError> {
        let found = match selector {
            VersionSelector::Latest => subject.visible(include_deleted).last(),
            VersionSelector::Number(n) => subject.visible(include_deleted).find(|v| v.version == n),
        };
        found.ok_or_else(|| {
            tracing::debug!(subject = name, %selector, "version not found");
            RegistryError::VersionNotFound {
                version: selector.to_string(),
            }
        })
    }
}

/// The registry store: in memory, optionally backed by a state file.
pub struct Store {
    /// State file; `None` for an in-memory store.
    path: Option<PathBuf>,
    state: Mutex<State>,
    /// The data directory's lock file, held exclusively while the store is open: two
    /// registries on one directory would each overwrite the other's schemas.
    _lock: Option<std::fs::File>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the store kept in `data_dir`, creating the directory and an empty registry if
    /// needed. Blocking (file I/O).
    pub fn open(data_dir: &Path) -> Result<Self, RegistryError> {
        std::fs::create_dir_all(data_dir).map_err(|err| {
            RegistryError::Storage(format!("cannot create {}: {err}", data_dir.display()))
        })?;
        let lock = Self::lock_dir(data_dir)?;
        let path = snapshot::path_in(data_dir);
        let state: State = snapshot::load(&path)
            .map_err(|err| {
                RegistryError::Storage(format!("cannot load {}: {err}", path.display()))
            })?
            .unwrap_or_default();
        if state.format != FORMAT {
            return Err(RegistryError::Storage(format!(
                "{} has format {}, this build understands {FORMAT}",
                path.display(),
                state.format
            )));
        }
        Ok(Self {
            path: Some(path),
            state: Mutex::new(state),
            _lock: Some(lock),
        })
    }

    /// Takes `data_dir/.lock` exclusively, or says who holds it. The OS releases it when the
    /// process ends, however it ends.
    fn lock_dir(data_dir: &Path) -> Result<std::fs::File, RegistryError> {
        let lock_path = data_dir.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|err| {
                RegistryError::Storage(format!("cannot open {}: {err}", lock_path.display()))
            })?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => Err(RegistryError::Storage(format!(
                "another schema registry already serves {} (it holds {}): one registry per \
                 data directory",
                data_dir.display(),
                lock_path.display()
            ))),
            Err(std::fs::TryLockError::Error(err)) => Err(RegistryError::Storage(format!(
                "cannot lock {}: {err}",
                lock_path.display()
            ))),
        }
    }

    /// A store that forgets everything when dropped, for tests.
    pub fn in_memory() -> Self {
        Self {
            path: None,
            state: Mutex::new(State::default()),
            _lock: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // See the module docs: the shared state is only ever replaced wholesale, so it is
        // consistent even if a previous holder panicked.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `change` on a copy of the state; if it reports a change, persists the copy and
    /// only then makes it the current state. Blocking when the store is file-backed.
    fn mutate<T>(
        &self,
        change: impl FnOnce(&mut State) -> Result<(T, bool), RegistryError>,
    ) -> Result<T, RegistryError> {
        let mut current = self.lock();
        let mut next = current.clone();
        let (out, changed) = change(&mut next)?;
        if changed {
            if let Some(path) = &self.path {
                snapshot::save(path, &next).map_err(|err| {
                    RegistryError::Storage(format!("cannot write {}: {err}", path.display()))
                })?;
            }
            *current = next;
        }
        Ok(out)
    }

    /// Registers `schema` under `subject` and returns its global id.
    pub fn register(&self, subject: &str, schema: &ParsedSchema) -> Result<u32, RegistryError> {
        self.mutate(|state| {
            if let Some(existing) = state.subjects.get(subject) {
                for entry in existing.visible(false) {
                    if state.schemas.get(&entry.id).map(|s| s.identity.as_str())
                        == Some(schema.identity.as_str())
                    {
                        return Ok((entry.id, false));
                    }
                }
                let level = state.level_for(subject);
                let previous = state.live_schemas(existing)?;
                let problems = compatibility::check(level, &schema.schema, &previous);
                if !problems.is_empty() {
                    return Err(RegistryError::Incompatible {
                        subject: subject.to_owned(),
                        details: problems,
                    });
                }
            }
            let id = match state.id_of(&schema.identity) {
                Some(id) => id,
                None => {
                    let id = state.schemas.keys().next_back().map_or(1, |max| max + 1);
                    state.schemas.insert(
                        id,
                        StoredSchema {
                            schema: schema.raw.clone(),
                            identity: schema.identity.clone(),
                        },
                    );
                    id
                }
            };
            let entry = state.subjects.entry(subject.to_owned()).or_default();
            let version = entry.versions.last().map_or(1, |v| v.version + 1);
            entry.versions.push(VersionEntry {
                version,
                id,
                deleted: false,
            });
            tracing::info!(subject, version, id, "registered schema");
            Ok((id, true))
        })
    }

    /// Finds the version of `subject` holding `schema` (the latest one if several do).
    pub fn lookup(
        &self,
        subject: &str,
        schema: &ParsedSchema,
        include_deleted: bool,
    ) -> Result<SubjectVersion, RegistryError> {
        let state = self.lock();
        let found = state.subject(subject, include_deleted)?;
        let entry = found
            .visible(include_deleted)
            .filter(|v| {
                state.schemas.get(&v.id).map(|s| s.identity.as_str())
                    == Some(schema.identity.as_str())
            })
            .last()
            .ok_or(RegistryError::SchemaNotFound)?;
        state.subject_version(subject, entry)
    }

    /// The schema text with global id `id`.
    pub fn schema_by_id(&self, id: u32) -> Result<String, RegistryError> {
        self.lock()
            .schemas
            .get(&id)
            .map(|s| s.schema.clone())
            .ok_or(RegistryError::SchemaNotFound)
    }

    /// Every live `(subject, version)` that uses schema `id`; 40403 if the id is unknown.
    pub fn versions_of_id(&self, id: u32) -> Result<Vec<(String, u32)>, RegistryError> {
        let state = self.lock();
        if !state.schemas.contains_key(&id) {
            return Err(RegistryError::SchemaNotFound);
        }
        Ok(state
            .subjects
            .iter()
            .flat_map(|(name, subject)| {
                subject
                    .visible(false)
                    .filter(|v| v.id == id)
                    .map(|v| (name.clone(), v.version))
            })
            .collect())
    }

    /// Subject names with live versions (or any versions, with `include_deleted`), sorted.
    pub fn subjects(&self, include_deleted: bool) -> Vec<String> {
        self.lock()
            .subjects
            .iter()
            .filter(|(_, s)| s.visible(include_deleted).next().is_some())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Version numbers of `subject`, ascending.
    pub fn versions(
        &self,
        subject: &str,
        include_deleted: bool,
    ) -> Result<Vec<u32>, RegistryError> {
        let state = self.lock();
        let found = state.subject(subject, include_deleted)?;
        Ok(found.visible(include_deleted).map(|v| v.version).collect())
    }

    /// One version of `subject`.
    pub fn version(
        &self,
        subject: &str,
        selector: VersionSelector,
        include_deleted: bool,
    ) -> Result<SubjectVersion, RegistryError> {
        let state = self.lock();
        let found = state.subject(subject, include_deleted)?;
        let entry = state.find_version(subject, found, selector, include_deleted)?;
        state.subject_version(subject, entry)
    }

    /// Checks `schema` against `subject` without registering it. With `version`, checks against
    /// that version only; without, against whatever the subject's level requires (nothing if the
    /// subject has no live versions). Returns the incompatibilities; empty means compatible.
    pub fn check_compatibility(
        &self,
        subject: &str,
        schema: &ParsedSchema,
        version: Option<VersionSelector>,
    ) -> Result<Vec<String>, RegistryError> {
        let state = self.lock();
        let level = state.level_for(subject);
        let existing = match version {
            None => match state.subjects.get(subject) {
                Some(found) => state.live_schemas(found)?,
                None => Vec::new(),
            },
            Some(selector) => {
                let found = state.subject(subject, false)?;
                let entry = state.find_version(subject, found, selector, false)?;
                let parsed = ParsedSchema::reparse(state.schema_text(entry.id)?)?;
                vec![(entry.version, parsed.schema)]
            }
        };
        Ok(compatibility::check(level, &schema.schema, &existing))
    }

    /// The global compatibility level.
    pub fn global_level(&self) -> CompatibilityLevel {
        self.lock().compatibility
    }

    /// Sets the global compatibility level.
    pub fn set_global_level(&self, level: CompatibilityLevel) -> Result<(), RegistryError> {
        self.mutate(|state| {
            let changed = state.compatibility != level;
            state.compatibility = level;
            Ok(((), changed))
        })
    }

    /// The subject's own compatibility level, if it has one.
    pub fn subject_level(&self, subject: &str) -> Option<CompatibilityLevel> {
        self.lock()
            .subjects
            .get(subject)
            .and_then(|s| s.compatibility)
    }

    /// The level that applies to `subject`: its own, else the global one.
    pub fn effective_level(&self, subject: &str) -> CompatibilityLevel {
        self.lock().level_for(subject)
    }

    /// Sets the subject's own compatibility level (the subject need not have versions yet).
    pub fn set_subject_level(
        &self,
        subject: &str,
        level: CompatibilityLevel,
    ) -> Result<(), RegistryError> {
        self.mutate(|state| {
            let entry = state.subjects.entry(subject.to_owned()).or_default();
            let changed = entry.compatibility != Some(level);
            entry.compatibility = Some(level);
            Ok(((), changed))
        })
    }

    /// Removes the subject's own level, returning it; 40408 if it had none.
    pub fn delete_subject_level(&self, subject: &str) -> Result<CompatibilityLevel, RegistryError> {
        self.mutate(|state| {
            let entry = state.subjects.get_mut(subject);
            let previous = entry.and_then(|s| s.compatibility.take()).ok_or_else(|| {
                RegistryError::SubjectLevelCompatibilityNotConfigured(subject.to_owned())
            })?;
            state
                .subjects
                .retain(|_, s| !s.versions.is_empty() || s.compatibility.is_some());
            Ok((previous, true))
        })
    }

    /// Deletes a subject. A soft delete hides its versions (their ids stay resolvable, and
    /// version numbers keep counting up if the subject is registered again); a permanent
    /// delete, allowed only after a soft delete, forgets the versions. Returns the versions
    /// deleted.
    pub fn delete_subject(
        &self,
        subject: &str,
        permanent: bool,
    ) -> Result<Vec<u32>, RegistryError> {
        self.mutate(|state| {
            let found = state
                .subjects
                .get_mut(subject)
                .filter(|s| !s.versions.is_empty())
                .ok_or_else(|| RegistryError::SubjectNotFound(subject.to_owned()))?;
            if permanent {
                if found.has_live_versions() {
                    return Err(RegistryError::SubjectNotSoftDeleted(subject.to_owned()));
                }
                let versions: Vec<u32> = found.versions.drain(..).map(|v| v.version).collect();
                state
                    .subjects
                    .retain(|_, s| !s.versions.is_empty() || s.compatibility.is_some());
                tracing::info!(subject, "permanently deleted subject");
                Ok((versions, true))
            } else {
                if !found.has_live_versions() {
                    return Err(RegistryError::SubjectNotFound(subject.to_owned()));
                }
                let mut versions = Vec::new();
                for entry in found.versions.iter_mut().filter(|v| !v.deleted) {
                    entry.deleted = true;
                    versions.push(entry.version);
                }
                tracing::info!(subject, "soft-deleted subject");
                Ok((versions, true))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUBJECT: &str = "blindstrader.organisations-blindstrader.tenancy.OrganisationCreated";

    fn record(extra_fields: &str) -> ParsedSchema {
        ParsedSchema::parse(
            &format!(
                r#"{{"type":"record","name":"OrganisationCreated","namespace":"blindstrader.tenancy","fields":[{{"name":"id","type":"string"}}{extra_fields}]}}"#
            ),
            None,
            0,
        )
        .unwrap()
    }

    fn v1() -> ParsedSchema {
        record("")
    }

    fn v2() -> ParsedSchema {
        record(r#",{"name":"name","type":"string","default":""}"#)
    }

    fn incompatible() -> ParsedSchema {
        record(r#",{"name":"plan","type":"string"}"#)
    }

    #[test]
    fn version_selectors_parse_like_confluent() {
        assert_eq!(
            "latest".parse::<VersionSelector>().unwrap(),
            VersionSelector::Latest
        );
        assert_eq!(
            "-1".parse::<VersionSelector>().unwrap(),
            VersionSelector::Latest
        );
        assert_eq!(
            "3".parse::<VersionSelector>().unwrap(),
            VersionSelector::Number(3)
        );
        for bad in ["0", "-2", "x", "", "4294967295"] {
            let err = bad.parse::<VersionSelector>().unwrap_err();
            assert_eq!(err.error_code(), 42202, "{bad:?}");
        }
    }

    #[test]
    fn registering_same_schema_twice_is_idempotent() {
        let store = Store::in_memory();
        let id = store.register(SUBJECT, &v1()).unwrap();
        assert_eq!(id, 1);
        let reformatted =
            ParsedSchema::parse(&format!("  {}\n", v1().raw.replace(',', ", ")), None, 0).unwrap();
        assert_eq!(store.register(SUBJECT, &reformatted).unwrap(), id);
        assert_eq!(store.versions(SUBJECT, false).unwrap(), vec![1]);
    }

    #[test]
    fn ids_are_global_per_unique_schema() {
        let store = Store::in_memory();
        let a = store.register("a-value", &v1()).unwrap();
        let b = store.register("b-value", &v1()).unwrap();
        assert_eq!(a, b);
        let c = store.register("b-value", &v2()).unwrap();
        assert_ne!(c, a);
        assert_eq!(store.versions("b-value", false).unwrap(), vec![1, 2]);
        assert_eq!(
            store.versions_of_id(a).unwrap(),
            vec![("a-value".to_owned(), 1), ("b-value".to_owned(), 1)]
        );
        assert_eq!(store.subjects(false), vec!["a-value", "b-value"]);
    }

    #[test]
    fn compatible_evolution_adds_a_version_and_incompatible_is_rejected() {
        let store = Store::in_memory();
        let first = store.register(SUBJECT, &v1()).unwrap();
        let second = store.register(SUBJECT, &v2()).unwrap();
        assert_ne!(first, second);
        let err = store.register(SUBJECT, &incompatible()).unwrap_err();
        assert_eq!(err.error_code(), 409);
        assert!(err.to_string().contains(SUBJECT), "{err}");
        assert_eq!(store.versions(SUBJECT, false).unwrap(), vec![1, 2]);
        let latest = store
            .version(SUBJECT, VersionSelector::Latest, false)
            .unwrap();
        assert_eq!((latest.version, latest.id), (2, second));
        assert_eq!(latest.schema, v2().raw);
    }

    #[test]
    fn subject_level_overrides_global_level() {
        let store = Store::in_memory();
        store.register(SUBJECT, &v1()).unwrap();
        store
            .set_subject_level(SUBJECT, CompatibilityLevel::None)
            .unwrap();
        assert_eq!(store.effective_level(SUBJECT), CompatibilityLevel::None);
        assert!(store.register(SUBJECT, &incompatible()).is_ok());
        assert_eq!(
            store.delete_subject_level(SUBJECT).unwrap(),
            CompatibilityLevel::None
        );
        assert_eq!(store.subject_level(SUBJECT), None);
        assert_eq!(
            store
                .delete_subject_level(SUBJECT)
                .unwrap_err()
                .error_code(),
            40408
        );
        store.set_global_level(CompatibilityLevel::Forward).unwrap();
        assert_eq!(store.effective_level(SUBJECT), CompatibilityLevel::Forward);
    }

    #[test]
    fn lookup_distinguishes_unknown_subject_and_unknown_schema() {
        let store = Store::in_memory();
        assert_eq!(
            store
                .lookup(SUBJECT, &v1(), false)
                .unwrap_err()
                .error_code(),
            40401
        );
        store.register(SUBJECT, &v1()).unwrap();
        let found = store.lookup(SUBJECT, &v1(), false).unwrap();
        assert_eq!((found.version, found.id), (1, 1));
        assert_eq!(
            store
                .lookup(SUBJECT, &v2(), false)
                .unwrap_err()
                .error_code(),
            40403
        );
    }

    #[test]
    fn missing_subjects_versions_and_ids_have_distinct_codes() {
        let store = Store::in_memory();
        assert_eq!(
            store.versions(SUBJECT, false).unwrap_err().error_code(),
            40401
        );
        assert_eq!(store.schema_by_id(1).unwrap_err().error_code(), 40403);
        store.register(SUBJECT, &v1()).unwrap();
        let err = store
            .version(SUBJECT, VersionSelector::Number(7), false)
            .unwrap_err();
        assert_eq!(err.error_code(), 40402);
        // A subject that only has config is still "not found" for version queries.
        store
            .set_subject_level("configured-only", CompatibilityLevel::Full)
            .unwrap();
        assert_eq!(
            store
                .versions("configured-only", false)
                .unwrap_err()
                .error_code(),
            40401
        );
        assert!(!store
            .subjects(false)
            .contains(&"configured-only".to_owned()));
    }

    #[test]
    fn compatibility_check_does_not_register() {
        let store = Store::in_memory();
        assert!(store
            .check_compatibility(SUBJECT, &incompatible(), None)
            .unwrap()
            .is_empty());
        assert_eq!(
            store
                .check_compatibility(SUBJECT, &v1(), Some(VersionSelector::Latest))
                .unwrap_err()
                .error_code(),
            40401
        );
        store.register(SUBJECT, &v1()).unwrap();
        assert!(store
            .check_compatibility(SUBJECT, &v2(), None)
            .unwrap()
            .is_empty());
        assert_eq!(
            store
                .check_compatibility(SUBJECT, &incompatible(), Some(VersionSelector::Number(1)))
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            store
                .check_compatibility(SUBJECT, &v2(), Some(VersionSelector::Number(2)))
                .unwrap_err()
                .error_code(),
            40402
        );
        assert_eq!(store.versions(SUBJECT, false).unwrap(), vec![1]);
    }

    #[test]
    fn soft_delete_hides_versions_but_keeps_ids_and_numbering() {
        let store = Store::in_memory();
        let id = store.register(SUBJECT, &v1()).unwrap();
        store.register(SUBJECT, &v2()).unwrap();
        assert_eq!(
            store
                .delete_subject(SUBJECT, true)
                .unwrap_err()
                .error_code(),
            40405
        );
        assert_eq!(store.delete_subject(SUBJECT, false).unwrap(), vec![1, 2]);
        assert!(store.subjects(false).is_empty());
        assert_eq!(store.subjects(true), vec![SUBJECT]);
        assert_eq!(
            store.versions(SUBJECT, false).unwrap_err().error_code(),
            40401
        );
        assert_eq!(store.versions(SUBJECT, true).unwrap(), vec![1, 2]);
        assert_eq!(store.schema_by_id(id).unwrap(), v1().raw);
        // Re-registering after a soft delete is not checked against deleted versions and
        // continues the numbering.
        assert_eq!(store.register(SUBJECT, &incompatible()).unwrap(), 3);
        assert_eq!(store.versions(SUBJECT, false).unwrap(), vec![3]);
        assert_eq!(store.delete_subject(SUBJECT, false).unwrap(), vec![3]);
        assert_eq!(store.delete_subject(SUBJECT, true).unwrap(), vec![1, 2, 3]);
        assert_eq!(
            store.versions(SUBJECT, true).unwrap_err().error_code(),
            40401
        );
        assert_eq!(store.schema_by_id(id).unwrap(), v1().raw);
    }

    #[test]
    fn one_store_per_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap();
        let second = Store::open(dir.path()).unwrap_err().to_string();
        assert!(
            second.contains("another schema registry already serves"),
            "{second}"
        );
        drop(first);
        Store::open(dir.path()).expect("free again once the first is closed");
    }

    #[test]
    fn file_backed_store_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = {
            let store = Store::open(dir.path()).unwrap();
            let a = store.register(SUBJECT, &v1()).unwrap();
            let b = store.register(SUBJECT, &v2()).unwrap();
            store
                .set_global_level(CompatibilityLevel::FullTransitive)
                .unwrap();
            store
                .set_subject_level("other", CompatibilityLevel::None)
                .unwrap();
            (a, b)
        };
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.versions(SUBJECT, false).unwrap(), vec![1, 2]);
        assert_eq!(store.schema_by_id(a).unwrap(), v1().raw);
        assert_eq!(store.schema_by_id(b).unwrap(), v2().raw);
        assert_eq!(store.global_level(), CompatibilityLevel::FullTransitive);
        assert_eq!(store.subject_level("other"), Some(CompatibilityLevel::None));
        // Ids keep counting from where they were.
        assert_eq!(store.register("x", &incompatible()).unwrap(), b + 1);
    }

    #[test]
    fn failed_persist_leaves_state_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.register(SUBJECT, &v1()).unwrap();
        // Make the directory unwritable by replacing it with a file.
        let data_dir = dir.path().to_owned();
        drop(dir);
        std::fs::write(&data_dir, b"not a directory").unwrap();
        let err = store.register(SUBJECT, &v2()).unwrap_err();
        assert_eq!(err.error_code(), 50001);
        assert_eq!(store.versions(SUBJECT, false).unwrap(), vec![1]);
        std::fs::remove_file(&data_dir).unwrap();
    }

    #[test]
    fn refuses_unknown_format() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            snapshot::path_in(dir.path()),
            br#"{"format":99,"compatibility":"BACKWARD","schemas":{},"subjects":{}}"#,
        )
        .unwrap();
        assert_eq!(Store::open(dir.path()).unwrap_err().error_code(), 50001);
    }
}
