//! Durable storage of the registry state as one JSON file.
//!
//! The state is tiny (a few hundred schemas at most) and changes rarely (deploys), so the whole
//! thing is rewritten after every mutation instead of keeping a log. To make a crash at any point
//! leave either the old or the new state on disk — never a truncated file — each write goes to a
//! temporary file in the same directory, is fsynced, and is then renamed over the real file
//! (rename is atomic within a filesystem); finally the directory is fsynced so the rename itself
//! survives a power loss.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Name of the state file inside the data directory.
pub const FILE_NAME: &str = "registry.json";
const TEMP_NAME: &str = "registry.json.tmp";

/// Where the registry keeps its state inside `data_dir`.
pub fn path_in(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// Reads the state file, or `None` if it does not exist yet (a fresh data directory).
pub fn load<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|err| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a valid registry state: {err}", path.display()),
        )
    })
}

/// Atomically replaces the state file with `state`.
pub fn save<T: Serialize>(path: &Path, state: &T) -> io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let temp = dir.join(TEMP_NAME);
    let bytes = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
    {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
    }
    fs::rename(&temp, path)?;
    // Persist the directory entry change; opening a directory read-only and fsyncing it is the
    // portable-on-Unix way to do that.
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn missing_file_loads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let loaded: Option<BTreeMap<String, u32>> = load(&path_in(dir.path())).unwrap();
        assert!(loaded.is_none());
    }

    #[test]
    fn save_then_load_round_trips_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_in(dir.path());
        let mut state = BTreeMap::new();
        state.insert("a".to_owned(), 1u32);
        save(&path, &state).unwrap();
        state.insert("b".to_owned(), 2u32);
        save(&path, &state).unwrap();
        let loaded: BTreeMap<String, u32> = load(&path).unwrap().unwrap();
        assert_eq!(loaded, state);
        assert!(!dir.path().join(TEMP_NAME).exists());
    }

    #[test]
    fn corrupt_file_is_an_error_not_an_empty_registry() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_in(dir.path());
        fs::write(&path, b"{ truncated").unwrap();
        let err = load::<BTreeMap<String, u32>>(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
