//! The spool: requests a hook could not deliver because doved was unreachable.
//!
//! A hook that fails open leaves its registration (or unregistration) as one file in
//! `spool/` beside the socket, so that a hook told `--socket P` and a daemon serving `P`
//! agree on where it is. doved replays the files in the order they were written when it
//! starts (and at every sweep), then deletes them. The directory is root-only (0700):
//! doved ignores files it did not get from root.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{Request, MAX_REQUEST_BYTES, PROTOCOL_VERSION};

/// One spooled request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolEntry {
    pub version: u32,
    /// When the hook gave up on doved, in nanoseconds since the epoch: a replayed request
    /// never overrides a registration doved received after it.
    pub spooled_at_ns: u64,
    pub request: Request,
}

impl SpoolEntry {
    pub fn spooled_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.spooled_at_ns)
    }
}

/// The spool directory for the daemon serving `socket`.
pub fn spool_dir(socket: &Path) -> PathBuf {
    socket.parent().unwrap_or(Path::new("/")).join("spool")
}

/// Create the spool directory (root-only) if it is missing. The directories above it
/// are created with the usual mode: they hold the socket, which others may need to reach.
pub fn ensure_spool_dir(dir: &Path) -> io::Result<()> {
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent)?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// Write `request` to the spool; returns the file written. The name starts with the time
/// (zero-padded), so names sort in the order requests were spooled.
pub fn spool(dir: &Path, request: &Request) -> io::Result<PathBuf> {
    ensure_spool_dir(dir)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let entry = SpoolEntry {
        version: PROTOCOL_VERSION,
        spooled_at_ns: now,
        request: request.clone(),
    };
    let bytes = serde_json::to_vec(&entry).map_err(io::Error::other)?;
    let name = format!("{now:020}-{}.json", std::process::id());
    let temp = dir.join(format!(".{name}"));
    let path = dir.join(name);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)?;
    file.write_all(&bytes)?;
    drop(file);
    // A reader sees the whole file or none of it.
    fs::rename(&temp, &path)?;
    Ok(path)
}

/// Why a spooled file was not replayed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not owned by root or is writable by others: ignored (only root's hooks may spool)")]
    Untrusted { path: PathBuf },
    #[error("{path} is {len} bytes, more than a request may be: ignored")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("{path} is not a spooled DOVE request ({detail}): ignored")]
    Malformed { path: PathBuf, detail: String },
}

/// Every spooled file in `dir`, oldest first, each read or refused. A missing directory
/// is an empty spool. The caller deletes each file once it is dealt with.
pub fn read_spool(dir: &Path) -> Vec<(PathBuf, Result<SpoolEntry, SpoolError>)> {
    let mut names: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|e| e == "json")
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect(),
        Err(_) => return Vec::new(),
    };
    names.sort();
    let trusted = |meta: &fs::Metadata| meta.uid() == 0 && meta.mode() & 0o022 == 0;
    let dir_trusted = fs::metadata(dir).is_ok_and(|m| trusted(&m));
    names
        .into_iter()
        .map(|path| {
            let entry = (|| {
                let meta = fs::symlink_metadata(&path).map_err(|source| SpoolError::Io {
                    path: path.clone(),
                    source,
                })?;
                if !dir_trusted || !meta.is_file() || !trusted(&meta) {
                    return Err(SpoolError::Untrusted { path: path.clone() });
                }
                if meta.len() > MAX_REQUEST_BYTES as u64 {
                    return Err(SpoolError::TooLarge {
                        path: path.clone(),
                        len: meta.len(),
                    });
                }
                let bytes = fs::read(&path).map_err(|source| SpoolError::Io {
                    path: path.clone(),
                    source,
                })?;
                let entry: SpoolEntry =
                    serde_json::from_slice(&bytes).map_err(|e| SpoolError::Malformed {
                        path: path.clone(),
                        detail: e.to_string(),
                    })?;
                if entry.version != PROTOCOL_VERSION {
                    return Err(SpoolError::Malformed {
                        path: path.clone(),
                        detail: format!("protocol version {}", entry.version),
                    });
                }
                Ok(entry)
            })();
            (path, entry)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spooled_requests_come_back_in_order_and_junk_is_refused() {
        let dir = tempfile_dir();
        let spool = dir.join("spool");
        let first = Request::Unregister {
            id: "a".into(),
            cgroup_path: None,
            bundle: None,
        };
        let second = Request::Unregister {
            id: "b".into(),
            cgroup_path: Some("/b".into()),
            bundle: None,
        };
        spool_write(&spool, &first);
        spool_write(&spool, &second);
        fs::write(spool.join("junk.json"), b"{\"version\": 1").unwrap();
        let read = read_spool(&spool);
        assert_eq!(read.len(), 3, "{read:?}");
        if !nix::unistd::geteuid().is_root() {
            // Files not written by root are never trusted.
            assert!(read
                .iter()
                .all(|(_, r)| matches!(r, Err(SpoolError::Untrusted { .. }))));
            fs::remove_dir_all(&dir).unwrap();
            return;
        }
        // "0…" names sort before "junk".
        assert_eq!(read[0].1.as_ref().unwrap().request, first);
        assert_eq!(read[1].1.as_ref().unwrap().request, second);
        assert!(matches!(read[2].1, Err(SpoolError::Malformed { .. })));
        assert!(read_spool(&dir.join("missing")).is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    fn spool_write(dir: &Path, request: &Request) {
        spool(dir, request).unwrap();
        // Distinct timestamps even on a coarse clock.
        std::thread::sleep(Duration::from_millis(2));
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "dove-spool-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }
}
