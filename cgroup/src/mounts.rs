use std::path::{Path, PathBuf};

use crate::CgroupError;

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Where it is reachable from this process (may be under `/proc/1/root`).
    pub mount_point: PathBuf,
    /// The mount's root within the hierarchy (`/` unless a sub-tree is bind-mounted).
    pub root: String,
}

impl Hierarchy {
    /// The directory of the cgroup at hierarchy path `path`.
    pub fn dir(&self, path: &str) -> Result<PathBuf, CgroupError> {
        let outside = || CgroupError::OutsideMount {
            path: path.to_owned(),
            mount: self.mount_point.clone(),
            root: self.root.clone(),
        };
        let rel = if self.root == "/" {
            path.trim_start_matches('/')
        } else {
            let rest = path.strip_prefix(self.root.as_str()).ok_or_else(outside)?;
            if !rest.is_empty() && !rest.starts_with('/') {
                return Err(outside());
            }
            rest.trim_start_matches('/')
        };
        if rel.split('/').any(|c| c == "..") {
            return Err(outside());
        }
        Ok(if rel.is_empty() {
            self.mount_point.clone()
        } else {
            self.mount_point.join(rel)
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Pure cgroup v2: one hierarchy holds every controller.
    Unified,
    /// cgroup2 mounted beside v1 hierarchies, with the `cpu` controller on v1.
    Hybrid,
}

impl Layout {
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::Unified => "unified",
            Layout::Hybrid => "hybrid",
        }
    }
}

/// The hierarchies DOVE cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounts {
    /// The cgroup v2 hierarchy, where attribution IDs come from.
    pub unified: Hierarchy,
    /// The hierarchy holding the `cpu` controller: the v1 one on hybrid hosts, else the
    /// unified one. `None` only when no `cpu` controller is mounted anywhere.
    pub cpu: Option<Hierarchy>,
    layout: Layout,
}

impl Mounts {
    /// Find the hierarchies visible to this process. When this mount namespace has no
    /// cgroup2 (crun on a hybrid host is run with it unmounted), look through the mount
    /// namespace of the nearest ancestor that has one, then PID 1's, via `/proc/<pid>/root`.
    pub fn discover() -> Result<Self, CgroupError> {
        let text =
            crate::read_proc("/proc/self/mountinfo").map_err(|source| CgroupError::Read {
                path: "/proc/self/mountinfo".into(),
                source,
            })?;
        if let Some(m) = parse_mountinfo(&text, Path::new("/")) {
            return Ok(m);
        }
        let mut pid = std::os::unix::process::parent_id();
        for _ in 0..64 {
            if pid <= 1 {
                break;
            }
            if let Some(m) = Self::through_pid(pid) {
                return Ok(m);
            }
            match parent_of(pid) {
                Some(ppid) => pid = ppid,
                None => break,
            }
        }
        Self::through_pid(1).ok_or(CgroupError::NoCgroup2)
    }

    fn through_pid(pid: u32) -> Option<Self> {
        let text = crate::read_proc(format!("/proc/{pid}/mountinfo")).ok()?;
        let m = parse_mountinfo(&text, Path::new(&format!("/proc/{pid}/root")))?;
        // /proc/<pid>/root needs ptrace-read access to that process.
        m.unified.mount_point.is_dir().then_some(m)
    }

    /// The hierarchies where systemd and every distribution mount them (`/sys/fs/cgroup`,
    /// or on a hybrid host `unified/` and `cpu/` under it), recognised by their file
    /// system types with a few `statfs` calls, without reading `mountinfo`: its cost grows
    /// with the host's mounts (hundreds on a Kubernetes node), and the hook pays it on
    /// every container start. `None` when the host is laid out otherwise; then use
    /// [`Mounts::discover`].
    ///
    /// Only in the initial cgroup namespace, where `/proc/<pid>/cgroup` paths are
    /// paths from the hierarchy's root, and only for mounts of a hierarchy's root (whose
    /// directory is inode 1): anything else, a sub-tree bind-mounted there or a private
    /// cgroup namespace, is left to mountinfo, which says how the paths relate.
    pub fn at_standard_places() -> Option<Self> {
        use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC, CGROUP_SUPER_MAGIC};
        use std::os::unix::fs::MetadataExt;
        /// `PROC_CGROUP_INIT_INO`: the initial cgroup namespace.
        const INITIAL_CGROUP_NS: u64 = 0xEFFF_FFFB;
        if std::fs::metadata("/proc/self/ns/cgroup").ok()?.ino() != INITIAL_CGROUP_NS {
            return None;
        }
        let fs_type = |path: &Path| statfs(path).ok().map(|s| s.filesystem_type());
        let hierarchy_root = |path: &Path| std::fs::metadata(path).is_ok_and(|m| m.ino() == 1);
        let at = |path: PathBuf| Hierarchy {
            mount_point: path,
            root: "/".to_owned(),
        };
        let top = Path::new("/sys/fs/cgroup");
        if fs_type(top)? == CGROUP2_SUPER_MAGIC {
            return hierarchy_root(top).then(|| Mounts::unified_only(at(top.to_owned())));
        }
        let unified = top.join("unified");
        // Usually a symlink to `cpu,cpuacct`, the mount itself.
        let cpu = match std::fs::read_link(top.join("cpu")) {
            Ok(target) => top.join(target),
            Err(_) => top.join("cpu"),
        };
        let cpu_controller =
            fs_type(&cpu)? == CGROUP_SUPER_MAGIC && cpu.join("cpu.shares").exists();
        (fs_type(&unified)? == CGROUP2_SUPER_MAGIC
            && cpu_controller
            && hierarchy_root(&unified)
            && hierarchy_root(&cpu))
        .then(|| Mounts {
            unified: at(unified),
            cpu: Some(at(cpu)),
            layout: Layout::Hybrid,
        })
    }

    /// A pure v2 host: the `cpu` controller is there unless the hierarchy says otherwise.
    fn unified_only(unified: Hierarchy) -> Self {
        let has_cpu = std::fs::read_to_string(unified.mount_point.join("cgroup.controllers"))
            .map(|c| c.split_whitespace().any(|c| c == "cpu"))
            .unwrap_or(true);
        Mounts {
            cpu: has_cpu.then(|| unified.clone()),
            unified,
            layout: Layout::Unified,
        }
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }
}

/// The parent pid from `/proc/<pid>/stat` (the field after the parenthesised command,
/// which may itself contain spaces and parentheses).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(1)?.parse().ok()
}

/// Parse `/proc/<pid>/mountinfo`; every mount point is placed under `prefix`.
/// Returns `None` when no cgroup2 hierarchy is mounted.
pub fn parse_mountinfo(text: &str, prefix: &Path) -> Option<Mounts> {
    let mut unified = None;
    let mut cpu_v1 = None;
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        let (Some(root), Some(mount_point), Some(fstype)) = (pre.get(3), pre.get(4), post.first())
        else {
            continue;
        };
        let hierarchy = || Hierarchy {
            mount_point: prefix.join(unescape(mount_point).trim_start_matches('/')),
            root: unescape(root),
        };
        match *fstype {
            "cgroup2" if unified.is_none() => unified = Some(hierarchy()),
            "cgroup" if cpu_v1.is_none() => {
                let super_opts = post.get(2).copied().unwrap_or("");
                if super_opts.split(',').any(|o| o == "cpu") {
                    cpu_v1 = Some(hierarchy());
                }
            }
            _ => {}
        }
    }
    let unified = unified?;
    Some(match cpu_v1 {
        Some(cpu) => Mounts {
            unified,
            cpu: Some(cpu),
            layout: Layout::Hybrid,
        },
        None => Mounts::unified_only(unified),
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match octal {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
33 30 0:29 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset
34 30 0:30 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
";

    #[test]
    fn hybrid_layout() {
        let m = parse_mountinfo(HYBRID, Path::new("/")).unwrap();
        assert_eq!(m.layout(), Layout::Hybrid);
        assert_eq!(
            m.unified.mount_point,
            PathBuf::from("/sys/fs/cgroup/unified")
        );
        assert_eq!(
            m.cpu.as_ref().unwrap().mount_point,
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")
        );
    }

    #[test]
    fn cpuset_is_not_cpu() {
        let text = "31 30 0:27 / /u rw - cgroup2 cgroup2 rw\n33 30 0:29 / /cs rw - cgroup cgroup rw,cpuset\n";
        let m = parse_mountinfo(text, Path::new("/")).unwrap();
        assert_eq!(m.layout(), Layout::Unified);
    }

    #[test]
    fn no_cgroup2() {
        let text = "34 30 0:30 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert!(parse_mountinfo(text, Path::new("/")).is_none());
    }

    #[test]
    fn prefix_and_escapes() {
        let text = "31 30 0:27 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n";
        let m = parse_mountinfo(text, Path::new("/proc/1/root")).unwrap();
        assert_eq!(
            m.unified.mount_point,
            PathBuf::from("/proc/1/root/mnt/my cg")
        );
    }

    #[test]
    fn hierarchy_dir_mapping() {
        let h = Hierarchy {
            mount_point: "/sys/fs/cgroup".into(),
            root: "/".into(),
        };
        assert_eq!(h.dir("/a/b").unwrap(), PathBuf::from("/sys/fs/cgroup/a/b"));
        assert_eq!(h.dir("/").unwrap(), PathBuf::from("/sys/fs/cgroup"));
        assert!(h.dir("/a/../../etc").is_err());
        let sub = Hierarchy {
            mount_point: "/cg".into(),
            root: "/kubepods".into(),
        };
        assert_eq!(
            sub.dir("/kubepods/pod1").unwrap(),
            PathBuf::from("/cg/pod1")
        );
        assert!(sub.dir("/kubepodsX/pod1").is_err());
        assert!(sub.dir("/other").is_err());
    }

    /// The statfs shortcut must find what mountinfo says, wherever it finds anything.
    #[test]
    fn standard_places_agree_with_mountinfo_on_this_host() {
        let Ok(discovered) = Mounts::discover() else {
            eprintln!("no cgroup2 on this host: nothing to compare");
            return;
        };
        match Mounts::at_standard_places() {
            Some(fast) => assert_eq!(fast, discovered),
            None => eprintln!("cgroups are not at the standard places here: {discovered:?}"),
        }
    }
}
