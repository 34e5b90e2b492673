use crate::CgroupError;

/// What `/proc/<pid>/cgroup` says about the two hierarchies DOVE uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcCgroup {
    /// The `0::/path` line: the cgroup v2 path.
    pub unified: Option<String>,
    /// The path in the v1 hierarchy whose controller list includes `cpu`.
    pub cpu: Option<String>,
}

pub fn parse_proc_cgroup(text: &str) -> ProcCgroup {
    let mut out = ProcCgroup::default();
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            out.unified = Some(path.to_owned());
        } else if controllers.split(',').any(|c| c == "cpu") {
            out.cpu = Some(path.to_owned());
        }
    }
    out
}

/// Expand a systemd slice name into its path: `a-b.slice` → `/a.slice/a-b.slice`.
pub fn systemd_slice_path(slice: &str) -> Result<String, CgroupError> {
    let bad = || CgroupError::BadCgroupsPath(slice.to_owned());
    if slice == "-.slice" {
        return Ok("/".into());
    }
    let stem = slice.strip_suffix(".slice").ok_or_else(bad)?;
    if stem.is_empty()
        || stem.contains('/')
        || stem.starts_with('-')
        || stem.ends_with('-')
        || stem.contains("--")
    {
        return Err(bad());
    }
    let mut path = String::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push('/');
        path.push_str(&prefix);
        path.push_str(".slice");
    }
    Ok(path)
}

/// Turn an OCI `linux.cgroupsPath` into a hierarchy path.
///
/// - systemd form `slice:prefix:name` → `/<slice path>/<prefix>-<name>.scope`, with an
///   empty slice meaning `system.slice` and a name ending in `.slice` naming a slice
///   (runc's rules);
/// - cgroupfs form `/a/b` (or relative `a/b`, taken from the hierarchy root) → `/a/b`;
/// - absent → `/<container id>`, where runc and crun put a container by default.
pub fn cgroups_path_to_hierarchy_path(
    cgroups_path: Option<&str>,
    container_id: &str,
) -> Result<String, CgroupError> {
    let Some(raw) = cgroups_path.filter(|p| !p.is_empty()) else {
        return Ok(format!("/{container_id}"));
    };
    let bad = || CgroupError::BadCgroupsPath(raw.to_owned());
    let parts: Vec<&str> = raw.split(':').collect();
    let path = match parts.as_slice() {
        [slice, prefix, name] => {
            if name.is_empty() || name.contains('/') || prefix.contains('/') {
                return Err(bad());
            }
            let slice_path = systemd_slice_path(if slice.is_empty() {
                "system.slice"
            } else {
                slice
            })?;
            let unit = if name.ends_with(".slice") {
                // A slice under a slice: systemd nests it by name, not under its parent.
                return systemd_slice_path(name);
            } else if prefix.is_empty() {
                format!("{name}.scope")
            } else {
                format!("{prefix}-{name}.scope")
            };
            if slice_path == "/" {
                format!("/{unit}")
            } else {
                format!("{slice_path}/{unit}")
            }
        }
        [_] => format!("/{}", raw.trim_start_matches('/')),
        _ => return Err(bad()),
    };
    if path
        .split('/')
        .skip(1)
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad());
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_cgroup_hybrid_and_unified() {
        let hybrid =
            "12:pids:/abc\n4:cpu,cpuacct:/abc\n3:cpuset:/abc\n1:name=systemd:/abc\n0::/abc\n";
        assert_eq!(
            parse_proc_cgroup(hybrid),
            ProcCgroup {
                unified: Some("/abc".into()),
                cpu: Some("/abc".into())
            }
        );
        assert_eq!(
            parse_proc_cgroup("0::/system.slice/x.scope\n"),
            ProcCgroup {
                unified: Some("/system.slice/x.scope".into()),
                cpu: None
            }
        );
        // A path may itself contain ':'.
        assert_eq!(
            parse_proc_cgroup("0::/a:b\n").unified.as_deref(),
            Some("/a:b")
        );
        assert_eq!(parse_proc_cgroup("garbage\n"), ProcCgroup::default());
    }

    #[test]
    fn slices() {
        let table = [
            ("system.slice", "/system.slice"),
            ("-.slice", "/"),
            (
                "kubepods-burstable.slice",
                "/kubepods.slice/kubepods-burstable.slice",
            ),
            (
                "kubepods-burstable-pod1.slice",
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice",
            ),
        ];
        for (slice, path) in table {
            assert_eq!(systemd_slice_path(slice).unwrap(), path, "{slice}");
        }
        for bad in ["system", "a--b.slice", "-a.slice", ".slice", "a/b.slice"] {
            assert!(systemd_slice_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cgroups_paths() {
        let table: [(Option<&str>, &str); 8] = [
            (None, "/ctr"),
            (Some(""), "/ctr"),
            (Some("/mygroup/ctr"), "/mygroup/ctr"),
            (Some("relative/ctr"), "/relative/ctr"),
            (Some("system.slice:libpod:abc"), "/system.slice/libpod-abc.scope"),
            (Some(":crio:abc"), "/system.slice/crio-abc.scope"),
            (
                Some("kubepods-besteffort-pod9.slice:cri-containerd:abc"),
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod9.slice/cri-containerd-abc.scope",
            ),
            (Some("user.slice::abc"), "/user.slice/abc.scope"),
        ];
        for (input, want) in table {
            assert_eq!(
                cgroups_path_to_hierarchy_path(input, "ctr").unwrap(),
                want,
                "{input:?}"
            );
        }
        for bad in [
            "a:b",
            "a:b:c:d",
            "system.slice:x:",
            "/a/../b",
            "nosuffix:p:n",
        ] {
            assert!(
                cgroups_path_to_hierarchy_path(Some(bad), "ctr").is_err(),
                "{bad}"
            );
        }
    }
}
