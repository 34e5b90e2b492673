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

/// The registration for `container` of `pod`, its cgroup resolved under `proc_root`.
pub fn registration_of(
    mounts: &Mounts,
    proc_root: &Path,
    container: &Container,
    pod: Option<&PodSandbox>,
) -> Result<Registration, ResolveError> {
    let pid = (container.pid != 0).then_some(container.pid);
    let configured = container
        .linux
        .as_ref()
        .map(|l| l.cgroups_path.clone())
        .filter(|p| !p.is_empty());
    let resolved = mounts.resolve_container(proc_root, pid, || configured, &container.id)?;
    let mut annotations = BTreeMap::new();
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
        runtime: Some("containerd (NRI)".to_owned()),
        stage: Some(super::plugin::STAGE.to_owned()),
        bundle: None,
    })
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
        let reg = registration_of(&mounts, Path::new("/proc"), &container, Some(&pod)).unwrap();
        let own = mounts.resolve_pid(std::process::id()).unwrap();
        assert_eq!(
            (reg.cgroup_path, reg.cgroup_id),
            (own.cgroup_path, own.cgroup_id)
        );
        assert_eq!(reg.pid, Some(std::process::id()));
        assert_eq!(reg.annotations[POD_NAMESPACE], "shop");
        assert_eq!(reg.annotations[POD_NAME], "web-0");
        assert_eq!(reg.annotations[CONTAINER_NAME], "app");
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
        let e = registration_of(&mounts, Path::new("/proc"), &container, None).unwrap_err();
        assert!(e.to_string().contains("no-such-cgroup"), "{e}");
    }
}
