//! Cgroup resolution for DOVE.
//!
//! Attribution keys on the container's cgroup v2 ID (what the kernel's socket cgroup data
//! and `bpf_skb_cgroup_id()` report). Enforcement needs the cgroup of whichever hierarchy
//! holds the `cpu` controller: the same directory on a pure v2 host, a separate v1 cgroup
//! on a hybrid host. This crate finds the mounts, parses `/proc/<pid>/cgroup` and OCI
//! `linux.cgroupsPath` (cgroupfs and systemd forms), and turns both into filesystem paths
//! and cgroup IDs. It has no opinion on containers beyond that.

mod container;
mod mounts;
mod paths;

pub use container::ResolveError;
pub use mounts::{parse_mountinfo, Hierarchy, Layout, Mounts};
pub use paths::{
    cgroups_path_to_hierarchy_path, parse_proc_cgroup, systemd_slice_path, ProcCgroup,
};

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 hierarchy is mounted (looked in this process's mount namespace and its ancestors'): DOVE attributes traffic by cgroup v2 ID, so mount cgroup2 (at /sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid host)")]
    NoCgroup2,
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} has no cgroup v2 line (`0::/path`): is the process in a cgroup v2 hierarchy?")]
    NoUnifiedLine { path: PathBuf },
    #[error(
        "cgroupsPath {0:?} is neither an absolute cgroupfs path nor systemd's `slice:prefix:name`"
    )]
    BadCgroupsPath(String),
    #[error(
        "cgroup path {path:?} is outside the hierarchy mounted at {mount} (mount root {root:?})"
    )]
    OutsideMount {
        path: String,
        mount: PathBuf,
        root: String,
    },
    #[error(
        "cgroup directory {path} does not exist (the container may already be gone): {source}"
    )]
    Missing { path: PathBuf, source: io::Error },
}

/// The inode number of a cgroup directory, which is the kernel's cgroup ID on cgroup v2.
pub fn cgroup_id(dir: &Path) -> Result<u64, CgroupError> {
    std::fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|source| CgroupError::Missing {
            path: dir.to_owned(),
            source,
        })
}

/// Read a procfs file in one `read` where it fits: `read_to_string` probes a file that
/// reports size 0 with 32-byte reads, and procfs regenerates its text on each.
fn read_proc(path: impl AsRef<Path>) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::with_capacity(16 * 1024);
    std::fs::File::open(path)?.read_to_string(&mut text)?;
    Ok(text)
}

/// Everything DOVE records about where a container's processes are accounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub cgroup_path: String,
    pub cgroup_id: u64,
    pub cpu_cgroup_path: Option<String>,
    pub cpu_cgroup_id: Option<u64>,
}

impl Mounts {
    /// Resolve from the live process: `/proc/<pid>/cgroup`.
    pub fn resolve_pid(&self, pid: u32) -> Result<Resolved, CgroupError> {
        self.resolve_pid_in(Path::new("/proc"), pid)
    }

    /// As [`Mounts::resolve_pid`], with procfs at `proc_root`.
    pub fn resolve_pid_in(&self, proc_root: &Path, pid: u32) -> Result<Resolved, CgroupError> {
        let path = proc_root.join(pid.to_string()).join("cgroup");
        let text = read_proc(&path).map_err(|source| CgroupError::Read {
            path: path.clone(),
            source,
        })?;
        let parsed = parse_proc_cgroup(&text);
        let unified = parsed.unified.ok_or(CgroupError::NoUnifiedLine { path })?;
        let cpu = match self.layout() {
            Layout::Unified => Some(unified.clone()),
            Layout::Hybrid => parsed.cpu,
        };
        self.resolve_paths(&unified, cpu.as_deref())
    }

    /// Resolve from hierarchy paths (e.g. derived from the bundle's `linux.cgroupsPath`).
    pub fn resolve_paths(
        &self,
        cgroup_path: &str,
        cpu_cgroup_path: Option<&str>,
    ) -> Result<Resolved, CgroupError> {
        let cgroup_id = cgroup_id(&self.unified.dir(cgroup_path)?)?;
        let (cpu_cgroup_path, cpu_cgroup_id) = match (&self.cpu, cpu_cgroup_path) {
            (Some(cpu), Some(p)) => {
                // A missing cpu cgroup only weakens enforcement; attribution still works.
                let id = cpu.dir(p).ok().and_then(|d| crate::cgroup_id(&d).ok());
                (Some(p.to_owned()), id)
            }
            _ => (None, None),
        };
        Ok(Resolved {
            cgroup_path: cgroup_path.to_owned(),
            cgroup_id,
            cpu_cgroup_path,
            cpu_cgroup_id,
        })
    }
}

/// Whether `dir` (a cgroup directory under `mount_point`) lies in a subtree delegated to
/// `uid`: it, or an ancestor below the mount point, is owned by `uid`, as systemd (and a
/// container manager) hands a user the subtree it may manage. A cgroup that does not
/// exist is delegated to no one.
pub fn delegated_to(dir: &Path, mount_point: &Path, uid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let mut at = dir;
    while at != mount_point && at.starts_with(mount_point) {
        match std::fs::symlink_metadata(at) {
            Ok(m) if m.is_dir() && m.uid() == uid => return true,
            Ok(m) if m.is_dir() => {}
            _ => return false,
        }
        let Some(parent) = at.parent() else {
            return false;
        };
        at = parent;
    }
    false
}

#[cfg(test)]
mod delegation_tests {
    use super::delegated_to;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn owned_subtrees_only() {
        let root = tempfile::tempdir().unwrap();
        let me = std::fs::metadata(root.path()).unwrap().uid();
        let inner = root.path().join("user.slice/ctr");
        std::fs::create_dir_all(&inner).unwrap();
        // Everything here belongs to whoever runs the test: delegated to them, to no one
        // else, and never through the mount point itself.
        assert!(delegated_to(&inner, root.path(), me));
        assert!(!delegated_to(&inner, root.path(), me + 1));
        assert!(!delegated_to(root.path(), root.path(), me));
        assert!(!delegated_to(&root.path().join("missing"), root.path(), me));
        assert!(!delegated_to(std::path::Path::new("/etc"), root.path(), 0));
    }
}
