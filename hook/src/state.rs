//! Parsing the OCI runtime state a runtime writes to a hook's stdin.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// Largest state document accepted. Real ones are well under a few KiB plus annotations.
pub const MAX_STATE_BYTES: usize = 1024 * 1024;

/// The parts of the OCI state the hook uses, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookState {
    pub id: String,
    /// `None` when the runtime sent no pid or `0` (crun at poststop).
    pub pid: Option<u32>,
    pub bundle: PathBuf,
    pub annotations: BTreeMap<String, String>,
    /// The runtime's `status`, when it is one the OCI spec defines.
    pub status: Option<String>,
}

/// Statuses `oci_spec` knows. The hook's stage comes from argv, so an unknown status
/// (e.g. `paused`, or a future one) is dropped rather than failing the parse.
const KNOWN_STATUSES: [&str; 4] = ["creating", "created", "running", "stopped"];

pub fn read_state(input: &[u8]) -> Result<HookState> {
    if input.len() > MAX_STATE_BYTES {
        bail!(
            "the state on stdin is larger than {MAX_STATE_BYTES} bytes: this is not OCI runtime state; check that the hook is configured as an OCI hook"
        );
    }
    if input.iter().all(u8::is_ascii_whitespace) {
        bail!("stdin is empty: an OCI runtime passes the container state JSON on stdin; was the hook run by hand?");
    }
    let mut value: serde_json::Value = serde_json::from_slice(input).context(
        "stdin is not valid JSON: expected the OCI runtime state (ociVersion, id, pid, bundle)",
    )?;
    let Some(object) = value.as_object_mut() else {
        bail!("the state on stdin is JSON but not an object: expected the OCI runtime state");
    };
    let status = match object.get("status").and_then(|s| s.as_str()) {
        Some(s) if KNOWN_STATUSES.contains(&s) => Some(s.to_owned()),
        _ => {
            object.remove("status");
            None
        }
    };
    let state: oci_spec::runtime::State = serde_json::from_value(value)
        .context("stdin is not OCI runtime state (ociVersion, id, status, pid, bundle)")?;
    let id = state.id().clone();
    dove_proto::validate_id(&id).context("the state's `id` is not a valid container ID")?;
    let pid = match state.pid() {
        Some(p) if *p > 0 => Some(*p as u32),
        Some(p) if *p < 0 => bail!("the state's pid is {p}: expected a process ID or 0"),
        _ => None,
    };
    Ok(HookState {
        id,
        pid,
        bundle: state.bundle().clone(),
        annotations: state
            .annotations()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn runc_create_runtime() {
        let s = read_state(br#"{"ociVersion":"1.0.2-dev","id":"c1","status":"creating","pid":1234,"bundle":"/b","annotations":{"a":"b"}}"#).unwrap();
        assert_eq!(s.id, "c1");
        assert_eq!(s.pid, Some(1234));
        assert_eq!(s.bundle, PathBuf::from("/b"));
        assert_eq!(s.annotations.get("a").map(String::as_str), Some("b"));
    }

    #[test]
    fn crun_poststop_pid_zero_and_paused() {
        let s = read_state(
            br#"{"ociVersion":"1.0.0","id":"c1","status":"stopped","pid":0,"bundle":"/b"}"#,
        )
        .unwrap();
        assert_eq!(s.pid, None);
        let s = read_state(br#"{"id":"c1","status":"paused","bundle":"/b"}"#).unwrap();
        assert_eq!(s.pid, None);
    }

    #[test]
    fn bad_inputs_have_clear_errors() {
        let cases: [(&[u8], &str); 7] = [
            (b"", "stdin is empty"),
            (b"{\"id\":", "not valid JSON"),
            (b"[1,2]", "not an object"),
            (b"{}", "not a valid container ID"),
            (
                br#"{"id":"../etc","bundle":"/b"}"#,
                "not a valid container ID",
            ),
            (br#"{"id":"c","pid":"x"}"#, "not OCI runtime state"),
            (br#"{"id":"c","pid":-5}"#, "pid is -5"),
        ];
        for (input, want) in cases {
            let err = format!("{:#}", read_state(input).unwrap_err());
            assert!(err.contains(want), "{input:?}: {err}");
        }
        let big = vec![b' '; MAX_STATE_BYTES + 1];
        assert!(format!("{:#}", read_state(&big).unwrap_err()).contains("larger than"));
    }

    proptest! {
        #[test]
        fn never_panics(input in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = read_state(&input);
        }

        #[test]
        fn never_panics_on_json_shaped_input(id in ".{0,20}", pid in any::<i64>(), status in "[a-z]{0,8}") {
            let doc = serde_json::json!({"id": id, "pid": pid, "status": status, "bundle": "/b"});
            let _ = read_state(doc.to_string().as_bytes());
        }
    }
}
