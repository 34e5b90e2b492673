//! The DaemonSet manifest against the Kubernetes API's own OpenAPI schemas
//! (kubernetes-validate from PyPI, installed by scripts/kubeval.sh), strictly: a field
//! Kubernetes does not know (a typo the API server would drop) fails, not only a wrong
//! type. Checked against the oldest release the manifest supports and the newest the
//! validator knows.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

const MANIFEST: &str = "packaging/kubernetes/doved-daemonset.yaml";
/// Kubernetes 1.27 (NRI needs containerd 1.7 or CRI-O 1.26+ anyway) and the newest.
const VERSIONS: [&str; 2] = ["1.27.0", "1.37.0"];

fn validator() -> String {
    let out = Command::new("bash")
        .arg(repo().join("scripts/kubeval.sh"))
        .output()
        .expect("running scripts/kubeval.sh");
    assert!(
        out.status.success(),
        "scripts/kubeval.sh failed (it installs kubernetes-validate from PyPI): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn validate(validator: &str, manifest: &Path, version: &str) -> (bool, String) {
    let out = Command::new(validator)
        .args(["--strict", "-k", version])
        .arg(manifest)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_daemonset_validates_against_the_kubernetes_schema() {
    let validator = validator();
    let manifest = repo().join(MANIFEST);
    for version in VERSIONS {
        let (ok, report) = validate(&validator, &manifest, version);
        assert!(ok, "{MANIFEST} against Kubernetes {version}:\n{report}");
        // Every document was checked, not skipped.
        assert_eq!(report.matches("passed for resource").count(), 4, "{report}");
    }
    // The check can fail: a misspelt field is refused.
    let text = std::fs::read_to_string(&manifest).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        text.replacen("mountPropagation:", "mountPropogation:", 1),
    )
    .unwrap();
    let (ok, report) = validate(&validator, &broken, VERSIONS[1]);
    assert!(!ok && report.contains("mountPropogation"), "{report}");
}
