//! The bill ledger: every removed container's final cost, durable and bounded.
//!
//! One JSON object per line in `bills.jsonl` under the state directory, appended and
//! `fdatasync`ed before the registry forgets the container, so a bill survives `kill -9`
//! and power loss. Appends happen on the observer's thread, never on the registration
//! path. Bills older than the retention period are dropped at start and once an hour by
//! rewriting the file (temp file, fsync, rename). A bill is keyed by container ID, cgroup
//! ID and registration time: recording the same departure twice (a restart between the
//! append and the registry forgetting it) keeps one.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use dove_proto::Bill;

const FILE: &str = "bills.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("bill ledger {path}: {source} (is the disk full or read-only?)")]
    Io { path: PathBuf, source: io::Error },
}

type Key = (String, u64, String);

fn key(bill: &Bill) -> Key {
    (bill.id.clone(), bill.cgroup_id, bill.registered_at.clone())
}

struct Inner {
    file: File,
    bills: Vec<Bill>,
    keys: HashSet<Key>,
}

pub struct Ledger {
    path: PathBuf,
    retention: Duration,
    inner: Mutex<Inner>,
}

fn removed_at(bill: &Bill) -> Option<SystemTime> {
    humantime::parse_rfc3339(&bill.removed_at).ok()
}

impl Ledger {
    /// Open (or create) the ledger in `dir`, dropping bills past `retention`.
    pub fn open(dir: &Path, retention: Duration) -> Result<Self, LedgerError> {
        let path = dir.join(FILE);
        let io_err = |source| LedgerError::Io {
            path: path.clone(),
            source,
        };
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io_err(e)),
        };
        let mut bills = Vec::new();
        let mut unreadable = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<Bill>(line) {
                Ok(b) => bills.push(b),
                // A torn last line from a crash mid-append: the bill it held was never
                // acknowledged as recorded, so the registry still has its departure.
                Err(_) => unreadable += 1,
            }
        }
        if unreadable > 0 {
            tracing::warn!(path = %path.display(), unreadable, "skipped unreadable lines in the bill ledger");
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err)?;
        let keys = bills.iter().map(key).collect();
        let ledger = Self {
            path,
            retention,
            inner: Mutex::new(Inner { file, bills, keys }),
        };
        // Rewrite when lines were unreadable too, so that the next append starts on a
        // line of its own.
        ledger.prune(unreadable > 0)?;
        Ok(ledger)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Append `bill` durably. Returns false when it was already recorded.
    pub fn record(&self, bill: &Bill) -> Result<bool, LedgerError> {
        let mut inner = self.lock();
        if inner.keys.contains(&key(bill)) {
            return Ok(false);
        }
        let mut line = serde_json::to_vec(bill).expect("a bill is plain data");
        line.push(b'\n');
        let io_err = |source| LedgerError::Io {
            path: self.path.clone(),
            source,
        };
        inner.file.write_all(&line).map_err(io_err)?;
        inner.file.sync_data().map_err(io_err)?;
        inner.keys.insert(key(bill));
        inner.bills.push(bill.clone());
        Ok(true)
    }

    /// Every bill within the retention period, oldest first.
    pub fn list(&self) -> Vec<Bill> {
        self.lock().bills.clone()
    }

    /// Bills of containers removed at or after `since`.
    pub fn removed_since(&self, since: SystemTime) -> Vec<Bill> {
        self.lock()
            .bills
            .iter()
            .rev()
            .take_while(|b| removed_at(b).is_none_or(|t| t >= since))
            .cloned()
            .collect()
    }

    /// Drop bills past the retention period, rewriting the file when any went (or when
    /// `force`).
    pub fn prune(&self, force: bool) -> Result<(), LedgerError> {
        let cutoff = SystemTime::now()
            .checked_sub(self.retention)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut inner = self.lock();
        let before = inner.bills.len();
        inner
            .bills
            .retain(|b| removed_at(b).is_none_or(|t| t >= cutoff));
        if inner.bills.len() == before && !force {
            return Ok(());
        }
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| LedgerError::Io { path, source }
        };
        let temp = tempfile::NamedTempFile::new_in(self.path.parent().unwrap_or(Path::new("/")))
            .map_err(io_err(&self.path))?;
        let mut out = io::BufWriter::new(temp);
        for bill in &inner.bills {
            serde_json::to_writer(&mut out, bill).map_err(|e| io_err(&self.path)(e.into()))?;
            out.write_all(b"\n").map_err(io_err(&self.path))?;
        }
        let temp = out
            .into_inner()
            .map_err(|e| io_err(&self.path)(e.into_error()))?;
        temp.as_file().sync_all().map_err(io_err(&self.path))?;
        temp.persist(&self.path)
            .map_err(|e| io_err(&self.path)(e.error))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(dir))?;
        }
        inner.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io_err(&self.path))?;
        let keys = inner.bills.iter().map(key).collect();
        inner.keys = keys;
        tracing::info!(
            dropped = before - inner.bills.len(),
            kept = inner.bills.len(),
            "bill ledger pruned to the retention period"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dove_proto::RemovalReason;

    fn bill(id: &str, removed_at: SystemTime, total_ns: u64) -> Bill {
        Bill {
            id: id.into(),
            cgroup_path: format!("/{id}"),
            cgroup_id: 42,
            registered_at: "2026-01-01T00:00:00.000Z".into(),
            removed_at: humantime::format_rfc3339_millis(removed_at).to_string(),
            reason: RemovalReason::Unregistered,
            rx_ns: total_ns,
            tx_ns: 0,
            total_ns,
            rx_packets: 3,
            tx_packets: 0,
            kubernetes: None,
        }
    }

    #[test]
    fn bills_survive_reopen_once_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let week = Duration::from_secs(7 * 86400);
        let now = SystemTime::now();
        let ledger = Ledger::open(dir.path(), week).unwrap();
        let old = bill("old", now - Duration::from_secs(8 * 86400), 1);
        let fresh = bill("fresh", now, 2);
        assert!(ledger.record(&old).unwrap());
        assert!(ledger.record(&fresh).unwrap());
        assert!(!ledger.record(&fresh).unwrap(), "recorded twice");
        drop(ledger);
        let ledger = Ledger::open(dir.path(), week).unwrap();
        assert_eq!(ledger.list(), vec![fresh.clone()]);
        assert!(
            !ledger.record(&fresh).unwrap(),
            "recorded twice across a reopen"
        );
        let text = fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_appends_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let week = Duration::from_secs(7 * 86400);
        let first = bill("first", SystemTime::now(), 5);
        let mut text = serde_json::to_string(&first).unwrap();
        text.push_str("\n{\"id\":\"torn\",\"cgr");
        fs::write(dir.path().join(FILE), text).unwrap();
        let ledger = Ledger::open(dir.path(), week).unwrap();
        let second = bill("second", SystemTime::now(), 6);
        ledger.record(&second).unwrap();
        drop(ledger);
        let ledger = Ledger::open(dir.path(), week).unwrap();
        assert_eq!(ledger.list(), vec![first, second]);
    }
}
