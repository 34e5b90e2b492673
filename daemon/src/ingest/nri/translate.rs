//! From what NRI says about a container to a registration: its cgroup found from its pid
//! (exact even when the runtime nests the processes) or its `linux.cgroupsPath`, as the
//! OCI hook does; the pod's name and namespace and the container's name as labels, for
//! bills a Kubernetes operator can read.

use std::collections::BTreeMap;
use std::path::Path;

use dove_cgroup::{Mounts, ResolveError};
use dove_proto::Registration;

use super::api::{Container, PodSandbox};

pub use dove_proto::{
    NRI_CONTAINER_NAME as CONTAINER_NAME, NRI_POD_NAME as POD_NAME,
    NRI_POD_NAMESPACE as POD_NAMESPACE,
};

/// The registration for `container` of `pod`, its cgroup resolved under `proc_root`;
/// `runtime` is what the runtime called itself in `Configure` (see [`runtime_label`]).
pub fn registration_of(
    mounts: &Mounts,
    proc_root: &Path,
    container: &Container,
    pod: Option<&PodSandbox>,
    runtime: &str,
) -> Result<Registration, ResolveError> {
    let pid = (container.pid != 0).then_some(container.pid);
    let configured = container
        .linux
        .as_ref()
        .map(|l| l.cgroups_path.clone())
        .filter(|p| !p.is_empty());
    let by_config = configured.as_ref().and_then(|path| {
        mounts
            .resolve_container(proc_root, None, || Some(path.clone()), &container.id)
            .ok()
    });
    let resolved = match (pid, by_config) {
        // The pid is the runtime's word, and a sandboxed runtime's pid (a VMM's) or a pid
        // reused since lies elsewhere: trusted only inside the container's own cgroup.
        (Some(_), Some(by_config)) => {
            match mounts.resolve_container(proc_root, pid, || None, &container.id) {
                Ok(by_pid) if within(&by_pid, &by_config) => by_pid,
                Ok(by_pid) => {
                    tracing::warn!(
                        id = %container.id,
                        pid = ?pid,
                        pid_cgroup = %by_pid.cgroup_path,
                        configured = %by_config.cgroup_path,
                        "NRI: the container's pid is not in its configured cgroup: the configured one is registered"
                    );
                    by_config
                }
                Err(_) => by_config,
            }
        }
        _ => mounts.resolve_container(proc_root, pid, || configured, &container.id)?,
    };
    // The runtime's annotations for DOVE (`io.dove.early-drop`), as the hook passes them.
    let mut annotations: BTreeMap<String, String> = container
        .annotations
        .iter()
        .filter(|(key, _)| key.starts_with("io.dove.") && !key.starts_with("io.dove.nri."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(pod) = pod {
        annotations.insert(POD_NAME.to_owned(), pod.name.clone());
        annotations.insert(POD_NAMESPACE.to_owned(), pod.namespace.clone());
    }
    annotations.insert(CONTAINER_NAME.to_owned(), container.name.clone());
    Ok(Registration {
        id: container.id.clone(),
        cgroup_path: resolved.cgroup_path,
        cgroup_id: resolved.cgroup_id,
        cpu_cgroup_path: resolved.cpu_cgroup_path,
        cpu_cgroup_id: resolved.cpu_cgroup_id,
        pid,
        annotations,
        runtime: Some(runtime.to_owned()),
        stage: Some(super::plugin::STAGE.to_owned()),
        bundle: None,
    })
}

/// The `runtime` a registration names: the name and version the runtime gave in
/// `Configure` (`containerd 2.1.9`, `cri-o 1.30.4`), marked as coming through NRI. What
/// the runtime sent is shown to operators: control characters are dropped and the
/// length bounded.
pub fn runtime_label(name: &str, version: &str) -> String {
    let said: String = [name.trim(), version.trim()]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .filter(|c| !c.is_control())
        .take(RUNTIME_LABEL_MAX)
        .collect();
    if said.is_empty() {
        "unknown runtime (NRI)".to_owned()
    } else {
        format!("{said} (NRI)")
    }
}

/// The most characters of a runtime's name and version a registration keeps.
const RUNTIME_LABEL_MAX: usize = 64;

/// Whether `by_pid` is `by_config`'s cgroup or below it, in the hierarchy the configured
/// path names (the `cpu` one on a hybrid host, where a runtime may leave the process
/// elsewhere in cgroup v2).
fn within(by_pid: &dove_cgroup::Resolved, by_config: &dove_cgroup::Resolved) -> bool {
    let (inner, outer) = match (&by_pid.cpu_cgroup_path, &by_config.cpu_cgroup_path) {
        (Some(inner), Some(outer)) => (inner.as_str(), outer.as_str()),
        _ => (by_pid.cgroup_path.as_str(), by_config.cgroup_path.as_str()),
    };
    inner == outer
        || outer == "/"
        || inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::nri::api::LinuxContainer;

    /// This process stands in for the container: NRI gives its pid, and its cgroup is
    /// what the registration must name; the configured path (wrong on purpose) is not
    /// read when the pid resolves.
    #[test]
    fn the_pid_names_the_cgroup_and_the_pod_becomes_labels() {
        let Ok(mounts) = Mounts::discover() else {
            eprintln!("SKIPPED: no cgroup mounts here");
            return;
        };
        let container = Container {
            id: "ctr1".into(),
            name: "app".into(),
            pid: std::process::id(),
            linux: Some(LinuxContainer {
                cgroups_path: "/nowhere/at/all".into(),
            }),
            ..Default::default()
        };
        let pod = PodSandbox {
            name: "web-0".into(),
            namespace: "shop".into(),
            ..Default::default()
        };
        let reg = registration_of(
            &mounts,
            Path::new("/proc"),
            &container,
            Some(&pod),
            "containerd v2.1.9 (NRI)",
        )
        .unwrap();
        let own = mounts.resolve_pid(std::process::id()).unwrap();
        assert_eq!(
            (reg.cgroup_path, reg.cgroup_id),
            (own.cgroup_path, own.cgroup_id)
        );
        assert_eq!(reg.pid, Some(std::process::id()));
        assert_eq!(reg.annotations[POD_NAMESPACE], "shop");
        assert_eq!(reg.annotations[POD_NAME], "web-0");
        assert_eq!(reg.annotations[CONTAINER_NAME], "app");
        assert_eq!(reg.runtime.as_deref(), Some("containerd v2.1.9 (NRI)"));
    }

    #[test]
    fn the_runtime_is_named_as_it_configured_the_plugin() {
        assert_eq!(
            runtime_label("containerd", "v1.7.24"),
            "containerd v1.7.24 (NRI)"
        );
        assert_eq!(runtime_label("cri-o", " "), "cri-o (NRI)");
        assert_eq!(runtime_label("", ""), "unknown runtime (NRI)");
        assert_eq!(runtime_label("run\ntime", "1"), "runtime 1 (NRI)");
        assert_eq!(
            runtime_label(&"x".repeat(500), "1").len(),
            64 + " (NRI)".len()
        );
    }

    #[test]
    fn without_a_pid_a_missing_configured_cgroup_is_an_error_that_names_it() {
        let Ok(mounts) = Mounts::discover() else {
            eprintln!("SKIPPED: no cgroup mounts here");
            return;
        };
        let container = Container {
            id: "ctr2".into(),
            linux: Some(LinuxContainer {
                cgroups_path: "/dove-nri-test/no-such-cgroup".into(),
            }),
            ..Default::default()
        };
        let e = registration_of(&mounts, Path::new("/proc"), &container, None, "test (NRI)")
            .unwrap_err();
        assert!(e.to_string().contains("no-such-cgroup"), "{e}");
    }
}
