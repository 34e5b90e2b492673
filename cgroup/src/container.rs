//! Where a container's processes are accounted, from what a runtime tells us: its init
//! pid when it has one (`/proc/<pid>/cgroup`, exact even when the runtime nests the
//! processes below the cgroup it was given), else its `linux.cgroupsPath` (or the
//! runtime's default, `/<id>`). The OCI hook uses it, and so will the NRI plugin.

use std::path::Path;

use crate::{cgroups_path_to_hierarchy_path, CgroupError, Mounts, Resolved};

/// Neither the pid nor the configured path led to an existing cgroup.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot find the container's cgroup: from its pid: {from_pid}; from its cgroupsPath: {from_config}")]
    Both {
        from_pid: Box<CgroupError>,
        from_config: Box<CgroupError>,
    },
    #[error("cannot find the container's cgroup (no pid given): {0}")]
    Config(Box<CgroupError>),
}

impl Mounts {
    /// Resolve a container from its `pid` (read under `proc_root`, normally `/proc`) or,
    /// failing that, its configured cgroups path (None: the runtime's default), which
    /// `cgroups_path` is asked for only then: reading a bundle is the slow part.
    pub fn resolve_container(
        &self,
        proc_root: &Path,
        pid: Option<u32>,
        cgroups_path: impl FnOnce() -> Option<String>,
        id: &str,
    ) -> Result<Resolved, ResolveError> {
        let from_pid = match pid {
            Some(pid) => match self.resolve_pid_in(proc_root, pid) {
                Ok(r) => return Ok(r),
                Err(e) => Some(e),
            },
            None => None,
        };
        let from_config = cgroups_path_to_hierarchy_path(cgroups_path().as_deref(), id)
            .and_then(|path| self.resolve_paths(&path, Some(&path)));
        match (from_config, from_pid) {
            (Ok(r), _) => Ok(r),
            (Err(from_config), Some(from_pid)) => Err(ResolveError::Both {
                from_pid: Box::new(from_pid),
                from_config: Box::new(from_config),
            }),
            (Err(e), None) => Err(ResolveError::Config(Box::new(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_mountinfo;
    use std::os::unix::fs::MetadataExt;

    /// A fake host: cgroup hierarchies and /proc under a temp directory.
    struct Host {
        dir: tempfile::TempDir,
        mounts: Mounts,
    }

    impl Host {
        fn new(hybrid: bool) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let mut mountinfo =
                "31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n".to_owned();
            if hybrid {
                mountinfo.push_str("34 30 0:30 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n");
            }
            let mounts = parse_mountinfo(&mountinfo, dir.path()).unwrap();
            std::fs::create_dir_all(&mounts.unified.mount_point).unwrap();
            if let Some(cpu) = &mounts.cpu {
                std::fs::create_dir_all(&cpu.mount_point).unwrap();
            }
            Self { dir, mounts }
        }

        fn cgroup(&self, path: &str) -> u64 {
            let d = self.mounts.unified.dir(path).unwrap();
            std::fs::create_dir_all(&d).unwrap();
            std::fs::metadata(d).unwrap().ino()
        }

        fn cpu_cgroup(&self, path: &str) -> u64 {
            let d = self.mounts.cpu.as_ref().unwrap().dir(path).unwrap();
            std::fs::create_dir_all(&d).unwrap();
            std::fs::metadata(d).unwrap().ino()
        }

        fn process(&self, pid: u32, proc_cgroup: &str) {
            let d = self.proc().join(pid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("cgroup"), proc_cgroup).unwrap();
        }

        fn proc(&self) -> std::path::PathBuf {
            self.dir.path().join("proc")
        }
    }

    #[test]
    fn resolution_table() {
        struct Case {
            name: &'static str,
            hybrid: bool,
            pid: Option<(u32, &'static str)>,
            cgroups_path: Option<&'static str>,
            want: Result<(&'static str, Option<&'static str>), &'static str>,
        }
        let cases = [
            Case {
                name: "live pid on a unified host",
                hybrid: false,
                pid: Some((10, "0::/kubepods/pod1/ctr\n")),
                cgroups_path: Some("/ignored"),
                want: Ok(("/kubepods/pod1/ctr", Some("/kubepods/pod1/ctr"))),
            },
            Case {
                name: "live pid on a hybrid host: cpu from the v1 line",
                hybrid: true,
                pid: Some((11, "4:cpu,cpuacct:/v1/ctr\n0::/v2/ctr\n")),
                cgroups_path: None,
                want: Ok(("/v2/ctr", Some("/v1/ctr"))),
            },
            Case {
                name: "pid already gone: the configured path",
                hybrid: false,
                pid: Some((12, "")),
                cgroups_path: Some("system.slice:libpod:abc"),
                want: Ok((
                    "/system.slice/libpod-abc.scope",
                    Some("/system.slice/libpod-abc.scope"),
                )),
            },
            Case {
                name: "no pid, no cgroupsPath: the runtime default /<id>",
                hybrid: false,
                pid: None,
                cgroups_path: None,
                want: Ok(("/ctr", Some("/ctr"))),
            },
            Case {
                name: "neither leads anywhere: both reasons",
                hybrid: false,
                pid: Some((13, "")),
                cgroups_path: Some("/missing"),
                want: Err("from its pid"),
            },
            Case {
                name: "a bad cgroupsPath is named",
                hybrid: false,
                pid: None,
                cgroups_path: Some("a:b"),
                want: Err("a:b"),
            },
        ];
        for case in cases {
            let host = Host::new(case.hybrid);
            // Every cgroup a case may name exists, except /missing.
            for path in [
                "/kubepods/pod1/ctr",
                "/v2/ctr",
                "/system.slice/libpod-abc.scope",
                "/ctr",
            ] {
                host.cgroup(path);
            }
            if case.hybrid {
                host.cpu_cgroup("/v1/ctr");
            }
            if let Some((pid, text)) = case.pid {
                if !text.is_empty() {
                    host.process(pid, text);
                }
            }
            let got = host.mounts.resolve_container(
                &host.proc(),
                case.pid.map(|(p, _)| p),
                || case.cgroups_path.map(String::from),
                "ctr",
            );
            match (got, case.want) {
                (Ok(r), Ok((path, cpu))) => {
                    assert_eq!(r.cgroup_path, path, "{}", case.name);
                    assert_eq!(r.cgroup_id, host.cgroup(path), "{}", case.name);
                    assert_eq!(r.cpu_cgroup_path.as_deref(), cpu, "{}", case.name);
                    assert!(r.cpu_cgroup_id.is_some(), "{}", case.name);
                }
                (Err(e), Err(needle)) => {
                    assert!(e.to_string().contains(needle), "{}: {e}", case.name)
                }
                (got, want) => panic!("{}: got {got:?}, want {want:?}", case.name),
            }
        }
    }
}
