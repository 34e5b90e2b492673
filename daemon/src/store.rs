//! The registry's on-disk copy: one JSON file replaced atomically, so a crash at any
//! moment leaves either the old or the new registry, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use dove_proto::Container;
use serde::{Deserialize, Serialize};

const FILE: &str = "registry.json";
const TEMP: &str = "registry.json.tmp";
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state directory {path}: {source} (set daemon.state_dir or --state-dir to a writable directory)")]
    Dir { path: PathBuf, source: io::Error },
    #[error("writing {path}: {source} (is the disk full or read-only?)")]
    Write { path: PathBuf, source: io::Error },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not a DOVE registry ({detail}); it was moved to {moved} and the registry starts empty")]
    Corrupt {
        path: PathBuf,
        detail: String,
        moved: PathBuf,
    },
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    format: u32,
    containers: Vec<Container>,
}

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Open (creating, mode 0700) the state directory.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StoreError::Dir {
                path: dir.to_owned(),
                source,
            })?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// Load the registry. A missing file is an empty registry. An unreadable one is moved
    /// aside (never silently overwritten) and reported through `Err(Corrupt)` after which
    /// the caller starts empty.
    pub fn load(&self) -> Result<Vec<Container>, StoreError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let detail = match serde_json::from_slice::<OnDisk>(&bytes) {
            Ok(d) if d.format == FORMAT => return Ok(d.containers),
            Ok(d) => format!("format {} where {FORMAT} was expected", d.format),
            Err(e) => e.to_string(),
        };
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let moved = self.dir.join(format!("{FILE}.corrupt-{stamp}"));
        fs::rename(&path, &moved).map_err(|source| StoreError::Write {
            path: moved.clone(),
            source,
        })?;
        Err(StoreError::Corrupt {
            path,
            detail,
            moved,
        })
    }

    /// Serialise outside any lock; `save_bytes` does the I/O.
    pub fn encode(containers: Vec<Container>) -> Vec<u8> {
        serde_json::to_vec(&OnDisk {
            format: FORMAT,
            containers,
        })
        .expect("registry entries are plain data and always serialise")
    }

    /// Replace the registry file: write a temp file, fsync it, rename it over the old one,
    /// fsync the directory so the rename itself is durable.
    pub fn save_bytes(&self, bytes: &[u8]) -> Result<(), StoreError> {
        let temp = self.dir.join(TEMP);
        let write_err = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Write { path, source }
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .map_err(write_err(&temp))?;
        file.write_all(bytes).map_err(write_err(&temp))?;
        file.sync_all().map_err(write_err(&temp))?;
        drop(file);
        let path = self.path();
        fs::rename(&temp, &path).map_err(write_err(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(write_err(&self.dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dove_proto::Registration;

    fn container(id: &str) -> Container {
        Container {
            registration: Registration {
                id: id.into(),
                cgroup_path: format!("/{id}"),
                cgroup_id: 7,
                cpu_cgroup_path: None,
                cpu_cgroup_id: None,
                pid: None,
                annotations: Default::default(),
                runtime: None,
                stage: None,
                bundle: None,
            },
            registered_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state")).unwrap();
        assert!(store.load().unwrap().is_empty());
        store
            .save_bytes(&Store::encode(vec![container("a"), container("b")]))
            .unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded, vec![container("a"), container("b")]);
    }

    #[test]
    fn corrupt_file_is_moved_aside_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        fs::write(store.path(), b"{\"format\":1,\"contain").unwrap();
        match store.load() {
            Err(StoreError::Corrupt { moved, .. }) => {
                assert_eq!(fs::read(&moved).unwrap(), b"{\"format\":1,\"contain");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(store.load().unwrap().is_empty());
    }
}
