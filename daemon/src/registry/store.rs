//! The registry's files: a snapshot (`registry.json`, replaced atomically through a
//! unique temp file) and a journal of the changes since (`registry.journal`, one JSON
//! record per line, appended). A registration appends one line, so acknowledging it costs
//! the same with ten containers registered as with ten thousand; once the journal is
//! longer than the registry (and at least 1024 records), the next write is a snapshot and
//! the journal starts again. Replaying the journal over the snapshot is idempotent, so a
//! crash between the two leaves nothing wrong, and a torn last line (a crash mid-append)
//! is a change that was never acknowledged.
//!
//! It lives beside the socket (`/run/dove`, a tmpfs): it describes containers, which do
//! not outlive a reboot, and it must outlive a daemon crash, which the page cache gives
//! without an fsync. What must outlive a reboot (the bills) is fsynced by the ledger.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use dove_proto::{Container, RemovalReason};
use serde::{Deserialize, Serialize};

const FILE: &str = "registry.json";
const JOURNAL: &str = "registry.journal";
const FORMAT: u32 = 2;
/// Format 1 had no departures; it is read as format 2 with none.
const FORMAT_WITHOUT_DEPARTURES: u32 = 1;

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

/// A container that left the registry and whose bill is not recorded yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Departure {
    pub container: Container,
    pub reason: RemovalReason,
    /// RFC 3339.
    pub removed_at: String,
}

/// One change to the registry, as the journal keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum JournalRecord {
    /// Registered, or registered again (replacing the entry with this ID).
    Put {
        container: Container,
    },
    Remove {
        id: String,
    },
    Depart {
        departure: Departure,
    },
    /// The departure's bill is recorded.
    Settle {
        departure: Departure,
    },
}

impl Loaded {
    fn apply(&mut self, record: JournalRecord) {
        match record {
            JournalRecord::Put { container } => {
                let id = container.registration.id.clone();
                self.containers.retain(|c| c.registration.id != id);
                self.containers.push(container);
            }
            JournalRecord::Remove { id } => self.containers.retain(|c| c.registration.id != id),
            JournalRecord::Depart { departure } => {
                if !self.departures.contains(&departure) {
                    self.departures.push(departure);
                }
            }
            JournalRecord::Settle { departure } => self.departures.retain(|d| *d != departure),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    format: u32,
    containers: Vec<Container>,
    #[serde(default)]
    departures: Vec<Departure>,
}

/// What a load found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    pub containers: Vec<Container>,
    pub departures: Vec<Departure>,
}

/// Create `dir` (mode 0700) if it is missing.
pub fn ensure_dir(dir: &Path) -> Result<PathBuf, StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StoreError::Dir {
            path: dir.to_owned(),
            source,
        })?;
    Ok(dir.to_owned())
}

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Open (creating, mode 0700) the directory. A registry that an older doved kept in
    /// `legacy_dir` is moved here.
    pub fn open(dir: &Path, legacy_dir: Option<&Path>) -> Result<Self, StoreError> {
        let store = Self {
            dir: ensure_dir(dir)?,
        };
        if let Some(legacy) = legacy_dir.map(|d| d.join(FILE)) {
            if legacy != store.path() && legacy.exists() && !store.path().exists() {
                match fs::copy(&legacy, store.path()).and_then(|_| fs::remove_file(&legacy)) {
                    Ok(()) => {
                        tracing::info!(from = %legacy.display(), to = %store.path().display(), "registry moved")
                    }
                    Err(e) => {
                        tracing::warn!(from = %legacy.display(), "could not move the old registry: {e}")
                    }
                }
            }
        }
        Ok(store)
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join(JOURNAL)
    }

    /// Append `records` to the journal, in one write.
    pub fn append(&self, records: &[JournalRecord]) -> Result<(), StoreError> {
        let path = self.journal_path();
        let mut lines = Vec::with_capacity(records.len() * 256);
        for record in records {
            serde_json::to_writer(&mut lines, record).expect("journal records are plain data");
            lines.push(b'\n');
        }
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(&lines))
            .map_err(|source| StoreError::Write { path, source })
    }

    /// Replace the snapshot with `bytes` (from [`Store::encode`]) and empty the journal.
    pub fn save_snapshot(&self, bytes: &[u8]) -> Result<(), StoreError> {
        self.save_bytes(bytes)?;
        let path = self.journal_path();
        match fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Write { path, source }),
        }
    }

    /// Load the registry. A missing file is an empty registry. An unreadable one is moved
    /// aside (never silently overwritten) and reported through `Err(Corrupt)` after which
    /// the caller starts empty.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut loaded = Loaded::default();
                self.replay_journal(&mut loaded);
                return Ok(loaded);
            }
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let detail = match serde_json::from_slice::<OnDisk>(&bytes) {
            Ok(d) if d.format == FORMAT || d.format == FORMAT_WITHOUT_DEPARTURES => {
                let mut loaded = Loaded {
                    containers: d.containers,
                    departures: d.departures,
                };
                self.replay_journal(&mut loaded);
                return Ok(loaded);
            }
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

    fn replay_journal(&self, loaded: &mut Loaded) {
        let Ok(text) = fs::read_to_string(self.journal_path()) else {
            return;
        };
        let mut torn = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<JournalRecord>(line) {
                Ok(record) => loaded.apply(record),
                Err(_) => torn += 1,
            }
        }
        if torn > 0 {
            tracing::warn!(torn, path = %self.journal_path().display(), "skipped unreadable journal records (a crash mid-write: never acknowledged)");
        }
    }

    /// Serialise outside any lock; `save_bytes` does the I/O.
    pub fn encode(containers: Vec<Container>, departures: Vec<Departure>) -> Vec<u8> {
        serde_json::to_vec(&OnDisk {
            format: FORMAT,
            containers,
            departures,
        })
        .expect("registry entries are plain data and always serialise")
    }

    /// Replace the registry file: write a temp file of its own (mode 0600) and rename it
    /// over the old one. No fsync: see the module documentation.
    pub fn save_bytes(&self, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.path();
        let write_err = |source| StoreError::Write {
            path: path.clone(),
            source,
        };
        let mut temp = tempfile::Builder::new()
            .prefix(".registry.json.")
            .permissions(fs::Permissions::from_mode(0o600))
            .tempfile_in(&self.dir)
            .map_err(write_err)?;
        temp.write_all(bytes).map_err(write_err)?;
        temp.persist(&path).map_err(|e| write_err(e.error))?;
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
            registered_by: 0,
        }
    }

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state"), None).unwrap();
        assert_eq!(store.load().unwrap(), Loaded::default());
        let gone = Departure {
            container: container("c"),
            reason: RemovalReason::Unregistered,
            removed_at: "2026-01-01T00:00:01Z".into(),
        };
        store
            .save_bytes(&Store::encode(
                vec![container("a"), container("b")],
                vec![gone.clone()],
            ))
            .unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.containers, vec![container("a"), container("b")]);
        assert_eq!(loaded.departures, vec![gone]);
    }

    #[test]
    fn the_journal_replays_over_the_snapshot_idempotently() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        let gone = Departure {
            container: container("a"),
            reason: RemovalReason::Unregistered,
            removed_at: "2026-01-01T00:00:01Z".into(),
        };
        let records = [
            JournalRecord::Put {
                container: container("a"),
            },
            JournalRecord::Put {
                container: container("b"),
            },
            JournalRecord::Remove { id: "a".into() },
            JournalRecord::Depart {
                departure: gone.clone(),
            },
        ];
        store.append(&records[..2]).unwrap();
        store.append(&records[2..]).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.containers, vec![container("b")]);
        assert_eq!(loaded.departures, vec![gone.clone()]);
        // A crash after the snapshot but before the journal was emptied replays the old
        // records over it: same result.
        store
            .save_bytes(&Store::encode(
                loaded.containers.clone(),
                loaded.departures.clone(),
            ))
            .unwrap();
        assert_eq!(store.load().unwrap(), loaded);
        store
            .save_snapshot(&Store::encode(loaded.containers, loaded.departures))
            .unwrap();
        store
            .append(&[JournalRecord::Settle { departure: gone }])
            .unwrap();
        // A torn last line: a record that was never acknowledged.
        let journal = dir.path().join(JOURNAL);
        let mut text = fs::read_to_string(&journal).unwrap();
        text.push_str("{\"op\":\"put\",\"contai");
        fs::write(&journal, text).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.containers, vec![container("b")]);
        assert!(loaded.departures.is_empty());
    }

    #[test]
    fn concurrent_saves_never_tear_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        let writers: Vec<_> = (0..8)
            .map(|n| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let many: Vec<Container> =
                        (0..200).map(|i| container(&format!("c{n}-{i}"))).collect();
                    for _ in 0..20 {
                        store
                            .save_bytes(&Store::encode(many.clone(), vec![]))
                            .unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        assert_eq!(store.load().unwrap().containers.len(), 200);
        let leftovers = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1, "temp files left behind");
    }

    #[test]
    fn format_1_registries_still_load_and_old_locations_move() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("var-lib-dove");
        fs::create_dir(&legacy).unwrap();
        let v1 = serde_json::json!({"format": 1, "containers": [container("a")]});
        fs::write(legacy.join(FILE), v1.to_string()).unwrap();
        let store = Store::open(&dir.path().join("run"), Some(&legacy)).unwrap();
        assert_eq!(store.load().unwrap().containers, vec![container("a")]);
        assert!(!legacy.join(FILE).exists());
    }

    #[test]
    fn corrupt_file_is_moved_aside_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        fs::write(store.path(), b"{\"format\":1,\"contain").unwrap();
        match store.load() {
            Err(StoreError::Corrupt { moved, .. }) => {
                assert_eq!(fs::read(&moved).unwrap(), b"{\"format\":1,\"contain");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert_eq!(store.load().unwrap(), Loaded::default());
    }
}
