//! Finding the bundle in a runtime command line and adding DOVE's hooks to it.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

/// runc's global options that take a value (the rest are flags).
const GLOBAL_WITH_VALUE: [&str; 5] = ["--root", "--log", "--log-format", "--criu", "--rootless"];

/// The bundle directory of a `create` or `run` command line, or `None` for any other
/// command. runc's default bundle is the current directory.
pub fn bundle_of(args: &[String]) -> Option<PathBuf> {
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        if GLOBAL_WITH_VALUE.contains(&arg) {
            i += 2;
            continue;
        }
        if arg.starts_with('-') {
            i += 1;
            continue;
        }
        if arg != "create" && arg != "run" {
            return None;
        }
        let mut j = i + 1;
        while j < args.len() {
            let a = args[j].as_str();
            if a == "--bundle" || a == "-b" {
                return args.get(j + 1).map(PathBuf::from);
            }
            if let Some(v) = a
                .strip_prefix("--bundle=")
                .or_else(|| a.strip_prefix("-b="))
            {
                return Some(PathBuf::from(v));
            }
            j += 1;
        }
        return std::env::current_dir().ok();
    }
    None
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a JSON object: {detail}")]
    NotSpec { path: PathBuf, detail: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn hook_entry(hook: &Path, socket: Option<&str>, stage: &str) -> Value {
    let mut args = vec![json!("dove-hook")];
    if let Some(s) = socket {
        args.push(json!("--socket"));
        args.push(json!(s));
    }
    args.push(json!(stage));
    json!({"path": hook.display().to_string(), "args": args, "timeout": 10})
}

/// Add createRuntime and poststop hooks to `bundle/config.json`, keeping every other
/// field as it was. Returns false when the hooks were already there.
pub fn add_hooks(bundle: &Path, hook: &Path, socket: Option<&str>) -> Result<bool, BundleError> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|source| BundleError::Read {
        path: path.clone(),
        source,
    })?;
    let mut spec: Value = serde_json::from_slice(&text).map_err(|e| BundleError::NotSpec {
        path: path.clone(),
        detail: e.to_string(),
    })?;
    let not_spec = |detail: &str| BundleError::NotSpec {
        path: path.clone(),
        detail: detail.into(),
    };
    let root = spec
        .as_object_mut()
        .ok_or_else(|| not_spec("top level is not an object"))?;
    let hooks = root
        .entry("hooks")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| not_spec("`hooks` is not an object"))?;
    let mut changed = false;
    for stage in ["createRuntime", "poststop"] {
        let list = hooks
            .entry(stage)
            .or_insert_with(|| Value::Array(Vec::new()))
            .as_array_mut()
            .ok_or_else(|| not_spec("a hook stage is not an array"))?;
        let present = list
            .iter()
            .any(|h| h.get("path").and_then(Value::as_str) == Some(&hook.display().to_string()));
        if !present {
            list.push(hook_entry(hook, socket, stage));
            changed = true;
        }
    }
    if !changed {
        return Ok(false);
    }
    let write_err = |source| BundleError::Write {
        path: path.clone(),
        source,
    };
    let mode = std::fs::metadata(&path)
        .map(|m| m.permissions().mode())
        .unwrap_or(0o644);
    let temp = bundle.join(".config.json.dove-tmp");
    let mut file = std::fs::File::create(&temp).map_err(write_err)?;
    file.write_all(&serde_json::to_vec(&spec).expect("a JSON value serialises"))
        .map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode)).map_err(write_err)?;
    std::fs::rename(&temp, &path).map_err(write_err)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn bundle_from_containerd_style_command_lines() {
        let cases: [(&[&str], Option<&str>); 6] = [
            (
                &[
                    "--root",
                    "/run/containerd/runc/moby",
                    "--log",
                    "/l.json",
                    "--log-format",
                    "json",
                    "create",
                    "--bundle",
                    "/b",
                    "--pid-file",
                    "/p",
                    "id",
                ],
                Some("/b"),
            ),
            (&["create", "-b", "/b2", "id"], Some("/b2")),
            (
                &["--systemd-cgroup", "run", "--bundle=/b3", "id"],
                Some("/b3"),
            ),
            (&["--root", "/r", "start", "id"], None),
            (&["delete", "--force", "id"], None),
            (&["--log", "create", "state", "id"], None),
        ];
        for (argv, want) in cases {
            assert_eq!(bundle_of(&args(argv)), want.map(PathBuf::from), "{argv:?}");
        }
    }

    #[test]
    fn hooks_are_added_once_and_other_fields_kept() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.json");
        std::fs::write(
            &config,
            r#"{"ociVersion":"1.0.2","x-unknown":{"keep":true},"hooks":{"poststop":[{"path":"/other"}]}}"#,
        )
        .unwrap();
        assert!(add_hooks(dir.path(), Path::new("/usr/bin/dove-hook"), Some("/s")).unwrap());
        assert!(!add_hooks(dir.path(), Path::new("/usr/bin/dove-hook"), Some("/s")).unwrap());
        let spec: Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
        assert_eq!(spec["x-unknown"]["keep"], true);
        assert_eq!(spec["hooks"]["poststop"][0]["path"], "/other");
        assert_eq!(
            spec["hooks"]["poststop"][1]["args"],
            json!(["dove-hook", "--socket", "/s", "poststop"])
        );
        assert_eq!(
            spec["hooks"]["createRuntime"][0]["args"][3],
            "createRuntime"
        );
    }

    #[test]
    fn bad_bundles_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            add_hooks(dir.path(), Path::new("/h"), None),
            Err(BundleError::Read { .. })
        ));
        std::fs::write(dir.path().join("config.json"), "[]").unwrap();
        assert!(matches!(
            add_hooks(dir.path(), Path::new("/h"), None),
            Err(BundleError::NotSpec { .. })
        ));
        std::fs::write(dir.path().join("config.json"), r#"{"hooks":[]}"#).unwrap();
        assert!(matches!(
            add_hooks(dir.path(), Path::new("/h"), None),
            Err(BundleError::NotSpec { .. })
        ));
    }
}
