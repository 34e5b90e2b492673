//! `dovectl docker`: registering `dove-runtime` in dockerd's `daemon.json`, and taking it
//! out again (the packages' removal scripts run `remove-runtime`, so neither a
//! `default-runtime` nor a container's runtime names a binary that is gone).
//!
//! The file is edited, never regenerated: every other key keeps its value and its place,
//! the indentation is the file's own, the mode and owner stay, and the new text replaces
//! the old with one rename (a dockerd reading it meanwhile sees one or the other).

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

/// dockerd's configuration file when `--config-file` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/docker/daemon.json";
/// The runtime name DOVE registers.
pub const RUNTIME_NAME: &str = "dove";
/// Where the packages install the wrapper.
pub const PACKAGED_RUNTIME: &str = "/usr/bin/dove-runtime";
/// dove-runtime's default hook path (it passes no `--dove-hook` for this one).
pub const PACKAGED_HOOK: &str = "/usr/bin/dove-hook";
/// Where `install-runtime --default` writes down the `default-runtime` it replaced (per
/// daemon.json), so that `remove-runtime` gives that one back: under DOVE's state
/// directory, because dockerd refuses to start on a key of daemon.json it does not know.
pub const DEFAULT_MEMO: &str = "/var/lib/dove/docker-default-runtime.json";

/// A JSON value whose objects keep their keys in the file's order (serde_json's own
/// `Value` sorts them unless a crate-wide feature is on).
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "a boolean",
            Json::Number(_) => "a number",
            Json::String(_) => "a string",
            Json::Array(_) => "an array",
            Json::Object(_) => "an object",
        }
    }
}

impl From<&str> for Json {
    fn from(s: &str) -> Self {
        Json::String(s.to_owned())
    }
}

/// An object's value for `key` (the last one, as Go's decoder keeps, if it repeats).
fn get<'a>(object: &'a [(String, Json)], key: &str) -> Option<&'a Json> {
    object.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
}

fn get_mut<'a>(object: &'a mut [(String, Json)], key: &str) -> Option<&'a mut Json> {
    object
        .iter_mut()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// Set `key` to `value` where it first stood (or at the end), dropping repeats.
fn set(object: &mut Vec<(String, Json)>, key: &str, value: Json) {
    match object.iter().position(|(k, _)| k == key) {
        Some(first) => {
            object[first].1 = value;
            let mut i = 0;
            object.retain(|(k, _)| {
                i += 1;
                i - 1 == first || k != key
            });
        }
        None => object.push((key.to_owned(), value)),
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Json;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_none<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Json, D::Error> {
                Json::deserialize(d)
            }
            fn visit_bool<E>(self, b: bool) -> Result<Json, E> {
                Ok(Json::Bool(b))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Json, E> {
                Ok(Json::Number(n.into()))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Json, E> {
                Ok(Json::Number(n.into()))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Json, E> {
                serde_json::Number::from_f64(n)
                    .map(Json::Number)
                    .ok_or_else(|| E::custom("a number JSON cannot hold"))
            }
            fn visit_str<E>(self, s: &str) -> Result<Json, E> {
                Ok(Json::String(s.to_owned()))
            }
            fn visit_string<E>(self, s: String) -> Result<Json, E> {
                Ok(Json::String(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Json::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Json>()? {
                    entries.push((k, v));
                }
                Ok(Json::Object(entries))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => s.serialize_unit(),
            Json::Bool(b) => s.serialize_bool(*b),
            Json::Number(n) => n.serialize(s),
            Json::String(v) => s.serialize_str(v),
            Json::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Json::Object(entries) => {
                let mut map = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

/// `daemon.json` as read: its top-level object and how to write it back.
struct DaemonJson {
    path: PathBuf,
    top: Vec<(String, Json)>,
    indent: String,
    /// Mode, owner and group of the file, when it exists.
    meta: Option<(u32, u32, u32)>,
}

fn invalid(path: &Path, what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: {what}; dockerd cannot start with it either. Fix the file by hand (or move it away), then run this command again",
        path.display()
    )
}

impl DaemonJson {
    fn load(path: &Path) -> Result<Self> {
        // A symlinked daemon.json is edited where it points, and stays a symlink.
        let path = match std::fs::canonicalize(path) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => path.to_owned(),
            Err(e) => return Err(e).with_context(|| format!("resolving {}", path.display())),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let meta = match std::fs::metadata(&path) {
            Ok(m) => Some((m.permissions().mode() & 0o7777, m.uid(), m.gid())),
            Err(_) => None,
        };
        let Some(text) = text else {
            return Ok(Self {
                path,
                top: Vec::new(),
                indent: "    ".into(),
                meta: None,
            });
        };
        // dockerd treats an empty file as no settings.
        let top = if text.trim().is_empty() {
            Vec::new()
        } else {
            match serde_json::from_str::<Json>(&text) {
                Ok(Json::Object(top)) => top,
                Ok(other) => {
                    return Err(invalid(
                        &path,
                        &format!("the top level is {}, not a JSON object", other.kind()),
                    ))
                }
                Err(e) => return Err(invalid(&path, &format!("not valid JSON ({e})"))),
            }
        };
        Ok(Self {
            indent: indent_of(&text),
            path,
            top,
            meta,
        })
    }

    /// The `runtimes` object, if there is one (an error if it is something else).
    fn runtimes_mut(&mut self) -> Result<Option<&mut Vec<(String, Json)>>> {
        let path = self.path.clone();
        match get_mut(&mut self.top, "runtimes") {
            None => Ok(None),
            Some(Json::Object(r)) => Ok(Some(r)),
            Some(other) => Err(invalid(
                &path,
                &format!("\"runtimes\" is {}, not an object", other.kind()),
            )),
        }
    }

    fn render(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let formatter = serde_json::ser::PrettyFormatter::with_indent(self.indent.as_bytes());
        let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
        Json::Object(self.top.clone()).serialize(&mut ser)?;
        out.push(b'\n');
        Ok(out)
    }

    /// Replace the file in one rename, keeping its mode and owner (0644 root for a new one).
    fn save(&self) -> Result<()> {
        let text = self.render()?;
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.is_dir() {
            bail!(
                "{} does not exist: is Docker installed? (or name the file with --config)",
                dir.display()
            );
        }
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "daemon.json".into());
        let temp = dir.join(format!(".{name}.dove-{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temp)?;
            file.write_all(&text)?;
            let (mode, uid, gid) = self.meta.unwrap_or((0o644, 0, 0));
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
            if self.meta.is_some() {
                std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
            }
            file.sync_all()?;
            std::fs::rename(&temp, &self.path)?;
            // The rename itself, durably: a package removal must not come back after a
            // crash with the old default-runtime.
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&temp);
            anyhow::Error::new(e).context(format!("writing {}", self.path.display()))
        })
    }
}

/// The indentation unit of a pretty-printed file (its first indented line's), else 4
/// spaces as Docker's documentation writes it.
fn indent_of(text: &str) -> String {
    text.lines()
        .map(|l| &l[..l.len() - l.trim_start_matches([' ', '\t']).len()])
        .find(|ws| !ws.is_empty())
        .unwrap_or("    ")
        .to_owned()
}

/// What `install-runtime` writes for the runtime.
#[derive(Debug, Clone)]
pub struct RuntimeEntry {
    pub name: String,
    /// dove-runtime's path.
    pub path: PathBuf,
    /// The runtime it wraps.
    pub inner: PathBuf,
    /// dove-hook's path.
    pub hook: PathBuf,
    /// doved's socket, when not the default.
    pub socket: Option<PathBuf>,
}

impl RuntimeEntry {
    fn json(&self) -> Json {
        let mut args = vec![Json::String(format!(
            "--dove-runtime={}",
            self.inner.display()
        ))];
        if self.hook != Path::new(PACKAGED_HOOK) {
            args.push(Json::String(format!("--dove-hook={}", self.hook.display())));
        }
        if let Some(socket) = &self.socket {
            args.push(Json::String(format!("--dove-socket={}", socket.display())));
        }
        Json::Object(vec![
            ("path".into(), Json::String(self.path.display().to_string())),
            ("runtimeArgs".into(), Json::Array(args)),
        ])
    }
}

/// What a command did to the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the file was rewritten.
    pub changed: bool,
    /// One line per change (or why nothing changed), for the operator.
    pub notes: Vec<String>,
}

/// Register `entry` under `runtimes`, and make it `default-runtime` when `make_default`.
/// A `default-runtime` already naming it is kept either way; one naming another runtime
/// is written down in `memo` (see [`DEFAULT_MEMO`]) before the file changes.
pub fn install_runtime(
    config: &Path,
    entry: &RuntimeEntry,
    make_default: bool,
    memo: &Path,
) -> Result<Outcome> {
    let mut file = DaemonJson::load(config)?;
    let mut notes = Vec::new();
    let wanted = entry.json();
    let runtimes = match file.runtimes_mut()? {
        Some(r) => r,
        None => {
            set(&mut file.top, "runtimes", Json::Object(Vec::new()));
            file.runtimes_mut()?.expect("just set")
        }
    };
    let mut changed = false;
    match get(runtimes, &entry.name) {
        Some(current) if *current == wanted => notes.push(format!(
            "runtime \"{}\" is already registered as wanted",
            entry.name
        )),
        current => {
            notes.push(format!(
                "{} runtime \"{}\": {}",
                if current.is_some() {
                    "updated"
                } else {
                    "registered"
                },
                entry.name,
                serde_json::to_string(&wanted)?
            ));
            set(runtimes, &entry.name, wanted);
            changed = true;
        }
    }
    if make_default {
        let path = file.path.clone();
        match get(&file.top, "default-runtime").cloned() {
            Some(Json::String(d)) if d == entry.name => {
                notes.push(format!("default-runtime is already \"{}\"", entry.name))
            }
            current => {
                match current {
                    None => {}
                    // A default that is itself a dove-runtime (an older install under
                    // another name) is not one to go back to: what was written down
                    // before it stays.
                    Some(Json::String(p)) if runtime_entry(&file, &p).is_some_and(wraps_dove) => {
                        notes.push(format!(
                            "default-runtime was \"{p}\", which runs dove-runtime too"
                        ))
                    }
                    Some(Json::String(p)) => {
                        let mut memos = Memo::load(memo)?;
                        memos.remember(&path, &p);
                        memos.save()?;
                        notes.push(format!(
                            "default-runtime was \"{p}\" (written down in {}): `dovectl docker remove-runtime` gives it back",
                            memo.display()
                        ));
                    }
                    Some(other) => {
                        return Err(invalid(
                            &path,
                            &format!("\"default-runtime\" is {}, not a string", other.kind()),
                        ))
                    }
                }
                set(&mut file.top, "default-runtime", entry.name.as_str().into());
                notes.push(format!("default-runtime set to \"{}\"", entry.name));
                changed = true;
            }
        }
    }
    if changed {
        file.save()?;
    }
    Ok(Outcome { changed, notes })
}

/// The `runtimes` entry named `name`, if the file has one.
fn runtime_entry<'a>(file: &'a DaemonJson, name: &str) -> Option<&'a Json> {
    match get(&file.top, "runtimes") {
        Some(Json::Object(r)) => get(r, name),
        _ => None,
    }
}

/// Whether an entry runs some dove-runtime, wherever it is installed: its `path` is a
/// file called dove-runtime, or it passes dove-runtime's own `--dove-*` options.
fn wraps_dove(value: &Json) -> bool {
    let Json::Object(o) = value else {
        return false;
    };
    let named = get(o, "path")
        .and_then(Json::as_str)
        .map(Path::new)
        .and_then(Path::file_name)
        == Some(std::ffi::OsStr::new("dove-runtime"));
    let dove_args = matches!(get(o, "runtimeArgs"), Some(Json::Array(a))
        if a.iter().filter_map(Json::as_str).any(|a| a.starts_with("--dove-")));
    named || dove_args
}

/// Whether a runtime entry runs dove-runtime: its `path` is `runtime_path`, or it is
/// named `name` and its path is a file called dove-runtime (install.sh's, a build's).
fn runs_dove(key: &str, value: &Json, name: &str, runtime_path: &Path) -> bool {
    let Json::Object(o) = value else {
        return false;
    };
    let Some(path) = get(o, "path").and_then(Json::as_str).map(Path::new) else {
        return false;
    };
    path == runtime_path
        || (key == name && path.file_name() == Some(std::ffi::OsStr::new("dove-runtime")))
}

/// What a dove-runtime entry becomes when DOVE is taken out: the runtime it wrapped
/// (its `--dove-runtime=`, else runc) with the arguments meant for that runtime (all but
/// the wrapper's `--dove-*` options).
///
/// The arguments are never left empty: dockerd runs a runtime that has arguments through
/// a script, `<data-root>/runtimes/<name>`, and the shims of containers already running
/// under the entry execute that script for every later command (kill, delete). A
/// runtime without arguments gets no script, the old one is deleted at the reload, and
/// such a container can then be stopped only by dockerd's direct SIGKILL after a 10 s
/// timeout, leaving its shim behind (measured with dockerd 20.10.24). So an entry with
/// nothing else gets `--log-format=json`, which changes nothing: containerd's runc shim
/// passes `--log-format json` itself to every runtime it drives.
fn alias_of(value: &Json) -> Json {
    let args = match value {
        Json::Object(o) => match get(o, "runtimeArgs") {
            Some(Json::Array(a)) => a.as_slice(),
            _ => &[],
        },
        _ => &[],
    };
    let inner = args
        .iter()
        .filter_map(Json::as_str)
        .find_map(|a| a.strip_prefix("--dove-runtime="))
        .unwrap_or("runc")
        .to_owned();
    let mut kept: Vec<Json> = args
        .iter()
        .filter(|a| !a.as_str().is_some_and(|a| a.starts_with("--dove-")))
        .cloned()
        .collect();
    if kept.is_empty() {
        kept.push(ALIAS_ARG.into());
    }
    Json::Object(vec![
        ("path".into(), Json::String(inner)),
        ("runtimeArgs".into(), Json::Array(kept)),
    ])
}

/// The argument an alias carries when it has no other (see [`alias_of`]).
pub const ALIAS_ARG: &str = "--log-format=json";

/// Take DOVE out of the file. Each runtime that runs dove-runtime (see [`runs_dove`])
/// becomes an alias of the runtime it wrapped ([`alias_of`]), so containers created
/// with it can still be started (dockerd refuses to start a container whose runtime name
/// is unknown) and those running can still be stopped; with `delete` such entries, and
/// one named `name`, are deleted instead (a `runtimes` emptied so stays, as `{}`). A `default-runtime`
/// naming one of them becomes the one `install-runtime` replaced (from `memo`) when the
/// file still has it, else `"runc"`: written out, not deleted, because dockerd 20.10's
/// reload keeps the old value of a key that is gone (it would go on starting containers
/// with DOVE), and a default naming a runtime that a reload removed crashes it.
/// A missing file, or one without DOVE, is left untouched.
pub fn remove_runtime(
    config: &Path,
    name: &str,
    runtime_path: &Path,
    delete: bool,
    memo: &Path,
) -> Result<Outcome> {
    let mut file = DaemonJson::load(config)?;
    if file.meta.is_none() {
        return Ok(Outcome {
            changed: false,
            notes: vec![format!(
                "{} does not exist: nothing to remove",
                file.path.display()
            )],
        });
    }
    let mut notes = Vec::new();
    // Runtimes that ran DOVE, or (with --delete) bore its name.
    let mut taken = Vec::new();
    if let Some(runtimes) = file.runtimes_mut()? {
        for (key, value) in runtimes.iter_mut() {
            if !runs_dove(key, value, name, runtime_path) {
                continue;
            }
            if !delete {
                *value = alias_of(value);
                notes.push(format!(
                    "runtime \"{key}\" now runs the runtime DOVE wrapped, without DOVE (containers created with it still start and stop): {}",
                    serde_json::to_string(value)?
                ));
            }
            taken.push(key.clone());
        }
        if delete {
            runtimes.retain(|(key, value)| {
                let ours = key == name || runs_dove(key, value, name, runtime_path);
                if ours {
                    if !taken.contains(key) {
                        taken.push(key.clone());
                    }
                    notes.push(format!("deleted runtime \"{key}\""));
                }
                !ours
            });
        }
    }
    let remaining = |file: &mut DaemonJson, d: &str| -> bool {
        matches!(file.runtimes_mut(), Ok(Some(r)) if get(r, d).is_some())
    };
    let default_ours = match get(&file.top, "default-runtime") {
        Some(Json::String(d)) => {
            let d = d.clone();
            taken.contains(&d) || (d == name && !remaining(&mut file, &d))
        }
        _ => false,
    };
    // A memo that cannot be read costs only the old default, never the removal.
    let mut memos = Memo::load(memo).unwrap_or_else(|e| {
        notes.push(format!(
            "{}: unreadable ({e:#}), so the default-runtime before DOVE is not known; remove the file",
            memo.display()
        ));
        Memo::empty(memo)
    });
    let before_dove = memos.take(&file.path);
    if default_ours {
        let gone_because = |file: &DaemonJson, d: &str| -> Option<&'static str> {
            if taken.iter().any(|t| t == d) {
                Some("was DOVE's own runtime")
            } else if is_builtin_runtime(d) {
                None
            } else {
                match runtime_entry(file, d) {
                    None => Some("is no longer in the file"),
                    Some(entry) if wraps_dove(entry) => Some("runs dove-runtime too"),
                    Some(_) => None,
                }
            }
        };
        let (back, note) = match &before_dove {
            Some(d) => match gone_because(&file, d) {
                None => (
                    d.clone(),
                    format!("default-runtime set back to \"{d}\", the default before DOVE"),
                ),
                Some(why) => (
                    "runc".to_owned(),
                    format!(
                        "default-runtime set to \"runc\", dockerd's own default: \"{d}\", the default before DOVE, {why}"
                    ),
                ),
            },
            None => (
                "runc".to_owned(),
                "default-runtime set to \"runc\", dockerd's own default".to_owned(),
            ),
        };
        set(&mut file.top, "default-runtime", Json::String(back));
        notes.push(note);
    }
    let changed = !taken.is_empty() || default_ours;
    if changed {
        file.save()?;
        if let Err(e) = memos.save() {
            notes.push(format!("{e:#}"));
        }
    } else {
        notes.push(format!(
            "{} does not run DOVE: nothing to remove",
            file.path.display()
        ));
    }
    Ok(Outcome { changed, notes })
}

/// Runtimes dockerd knows without a `runtimes` entry.
fn is_builtin_runtime(name: &str) -> bool {
    name == "runc" || name.starts_with("io.containerd.")
}

/// The `default-runtime`s `install-runtime --default` replaced, by daemon.json path: a
/// JSON object in [`DEFAULT_MEMO`].
struct Memo {
    path: PathBuf,
    entries: std::collections::BTreeMap<String, String>,
    changed: bool,
}

impl Memo {
    fn empty(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            entries: Default::default(),
            changed: false,
        }
    }

    fn load(path: &Path) -> Result<Self> {
        let mut memo = Self::empty(path);
        let unreadable = || {
            format!(
                "{} is not a JSON object of strings: move it away and run this command again",
                path.display()
            )
        };
        match std::fs::read_to_string(path) {
            Ok(text) => memo.entries = serde_json::from_str(&text).with_context(unreadable)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        Ok(memo)
    }

    fn key(config: &Path) -> String {
        config.display().to_string()
    }

    /// The default DOVE replaces now: whatever an earlier install wrote down is stale
    /// (a removal that never ran, an admin's edit since).
    fn remember(&mut self, config: &Path, default: &str) {
        let key = Self::key(config);
        if self.entries.get(&key).map(String::as_str) != Some(default) {
            self.entries.insert(key, default.to_owned());
            self.changed = true;
        }
    }

    fn take(&mut self, config: &Path) -> Option<String> {
        let taken = self.entries.remove(&Self::key(config))?;
        self.changed = true;
        Some(taken)
    }

    /// Write the memo (in one rename), or remove it when it holds nothing.
    fn save(&self) -> Result<()> {
        if !self.changed {
            return Ok(());
        }
        let context = || format!("writing {}", self.path.display());
        if self.entries.is_empty() {
            return match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).with_context(context),
                _ => Ok(()),
            };
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(context)?;
        let mut temp = tempfile::NamedTempFile::new_in(dir).with_context(context)?;
        serde_json::to_writer_pretty(&mut temp, &self.entries)?;
        temp.as_file().sync_all().with_context(context)?;
        temp.persist(&self.path)
            .map_err(|e| e.error)
            .with_context(context)?;
        // The rename itself, durably, as for daemon.json.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(context)
    }
}

/// Ask a running dockerd to re-read its configuration (it reloads `runtimes` and
/// `default-runtime` live): SIGHUP to the pid in `pidfile`, else `systemctl reload
/// docker.service` where systemd runs it, else SIGHUP to the pid in dockerd's default
/// pid file. Says what it did; a dockerd that is not running is not an error.
pub fn reload_dockerd(pidfile: Option<&Path>) -> Result<String> {
    if pidfile.is_none()
        && Path::new("/run/systemd/system").is_dir()
        && std::process::Command::new("systemctl")
            .args(["--quiet", "is-active", "docker.service"])
            .status()
            .is_ok_and(|s| s.success())
    {
        let status = std::process::Command::new("systemctl")
            .args(["reload", "docker.service"])
            .status()
            .context("running systemctl reload docker.service")?;
        if !status.success() {
            bail!(
                "`systemctl reload docker.service` failed ({status}); see `journalctl -u docker`"
            );
        }
        return Ok("reloaded docker.service".into());
    }
    let pidfile = pidfile.unwrap_or(Path::new("/var/run/docker.pid"));
    let pid = match std::fs::read_to_string(pidfile) {
        Ok(text) => text.trim().parse::<u32>().ok(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", pidfile.display())),
    };
    let Some(pid) = pid else {
        return Ok(format!(
            "dockerd is not running ({} names no pid): nothing to reload",
            pidfile.display()
        ));
    };
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "dockerd" {
        return Ok(format!(
            "dockerd is not running (pid {pid} from {} is gone or not dockerd): nothing to reload",
            pidfile.display()
        ));
    }
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .context("running kill -HUP")?;
    if !status.success() {
        bail!("kill -HUP {pid} (dockerd) failed ({status})");
    }
    Ok(format!(
        "sent SIGHUP to dockerd (pid {pid}) to reload its configuration"
    ))
}

/// `name` beside this executable if it is there (a package's /usr/bin, install.sh's
/// /usr/local/bin, a build's target directory), else `packaged`.
pub fn beside_self(name: &str, packaged: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(packaged))
}

/// The first `runc` on PATH, else where Debian and Docker's packages put it.
pub fn find_runc() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"].map(PathBuf::from))
        .map(|d| d.join("runc"))
        .find(|p| p.is_file())
        .context("no runc found on PATH or in /usr/sbin, /usr/bin: install runc, or name the runtime dove-runtime wraps with --inner-runtime PATH")
}

/// Check the paths an entry names before dockerd is told about them.
pub fn check_entry(entry: &RuntimeEntry) -> Result<()> {
    let executable = |p: &Path, what: &str, fix: &str| -> Result<()> {
        let meta = std::fs::metadata(p)
            .map_err(|e| anyhow::anyhow!("{what} {}: {e}; {fix}", p.display()))?;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            bail!("{what} {} is not an executable file; {fix}", p.display());
        }
        Ok(())
    };
    executable(&entry.path, "dove-runtime", "name it with --path")?;
    executable(&entry.hook, "dove-hook", "name it with --hook")?;
    executable(
        &entry.inner,
        "the inner runtime",
        "name it with --inner-runtime",
    )?;
    let same = |a: &Path, b: &Path| matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y);
    if same(&entry.path, &entry.inner) {
        bail!(
            "--inner-runtime {} is dove-runtime itself: name the real runtime (runc)",
            entry.inner.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> RuntimeEntry {
        RuntimeEntry {
            name: "dove".into(),
            path: PACKAGED_RUNTIME.into(),
            inner: "/usr/sbin/runc".into(),
            hook: PACKAGED_HOOK.into(),
            socket: None,
        }
    }

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("daemon.json");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The memo of the defaults replaced, beside the test's daemon.json.
    fn memo_of(config: &Path) -> PathBuf {
        config.with_extension("memo")
    }

    fn read(path: &Path) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    const OTHERS: &str = r#"{
  "log-driver": "json-file",
  "log-opts": {"max-size": "10m", "max-file": "3"},
  "runtimes": {
    "nvidia": {"path": "/usr/bin/nvidia-container-runtime", "runtimeArgs": []}
  },
  "storage-driver": "overlay2",
  "insecure-registries": ["10.0.0.1:5000"],
  "mtu": 1450,
  "ipv6": false,
  "x-null": null
}"#;

    #[test]
    fn install_keeps_every_other_key_in_place_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), OTHERS);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let out = install_runtime(&path, &entry(), true, &memo_of(&path)).unwrap();
        assert!(out.changed, "{out:?}");
        let v = read(&path);
        let before: serde_json::Value = serde_json::from_str(OTHERS).unwrap();
        for (k, want) in before.as_object().unwrap() {
            if k != "runtimes" {
                assert_eq!(&v[k], want, "{k}");
            }
        }
        assert_eq!(v["runtimes"]["nvidia"], before["runtimes"]["nvidia"]);
        assert_eq!(v["runtimes"]["dove"]["path"], PACKAGED_RUNTIME);
        assert_eq!(
            v["runtimes"]["dove"]["runtimeArgs"],
            serde_json::json!(["--dove-runtime=/usr/sbin/runc"])
        );
        assert_eq!(v["default-runtime"], "dove");
        // The file's order and indentation, and its mode.
        let text = std::fs::read_to_string(&path).unwrap();
        let at = |k: &str| text.find(&format!("\"{k}\"")).unwrap();
        assert!(at("log-driver") < at("log-opts") && at("log-opts") < at("runtimes"));
        assert!(at("max-size") < at("max-file"), "nested order kept: {text}");
        assert!(at("nvidia") < at("dove") && at("x-null") < at("default-runtime"));
        assert!(text.contains("\n  \"log-driver\""), "{text}");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
            0o600
        );
        // Again: nothing to do, the file is not rewritten.
        let inode = std::fs::metadata(&path).unwrap().ino();
        let again = install_runtime(&path, &entry(), true, &memo_of(&path)).unwrap();
        assert!(!again.changed, "{again:?}");
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
        // No temp files left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn install_without_default_keeps_the_default_and_updates_changed_args() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "{\"default-runtime\": \"runc\"}");
        install_runtime(&path, &entry(), false, &memo_of(&path)).unwrap();
        assert_eq!(read(&path)["default-runtime"], "runc");
        let mut other = entry();
        other.hook = "/opt/dove/dove-hook".into();
        other.socket = Some("/run/other.sock".into());
        let out = install_runtime(&path, &other, false, &memo_of(&path)).unwrap();
        assert!(
            out.changed && out.notes[0].starts_with("updated"),
            "{out:?}"
        );
        assert_eq!(
            read(&path)["runtimes"]["dove"]["runtimeArgs"],
            serde_json::json!([
                "--dove-runtime=/usr/sbin/runc",
                "--dove-hook=/opt/dove/dove-hook",
                "--dove-socket=/run/other.sock"
            ])
        );
        // Replacing another default says so.
        let out = install_runtime(&path, &other, true, &memo_of(&path)).unwrap();
        assert!(
            out.notes.iter().any(|n| n.contains("was \"runc\"")),
            "{out:?}"
        );
    }

    #[test]
    fn install_creates_a_missing_file_but_not_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.json");
        assert!(
            install_runtime(&path, &entry(), false, &memo_of(&path))
                .unwrap()
                .changed
        );
        assert_eq!(read(&path)["runtimes"]["dove"]["path"], PACKAGED_RUNTIME);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
            0o644
        );
        let err = install_runtime(
            &dir.path().join("no/daemon.json"),
            &entry(),
            false,
            &memo_of(&dir.path().join("no/daemon.json")),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("does not exist"), "{err}");
        // An empty file is no settings, as dockerd reads it.
        let empty = write(dir.path(), " \n");
        assert!(
            install_runtime(&empty, &entry(), true, &memo_of(&empty))
                .unwrap()
                .changed
        );
        assert_eq!(read(&empty)["default-runtime"], "dove");
    }

    fn remove(path: &Path, delete: bool) -> Outcome {
        remove_runtime(
            path,
            "dove",
            Path::new(PACKAGED_RUNTIME),
            delete,
            &memo_of(path),
        )
        .unwrap()
    }

    #[test]
    fn remove_turns_dove_into_an_alias_of_runc_and_keeps_everything_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), OTHERS);
        install_runtime(&path, &entry(), true, &memo_of(&path)).unwrap();
        let out = remove(&path, false);
        assert!(out.changed, "{out:?}");
        let v = read(&path);
        let mut want: serde_json::Value = serde_json::from_str(OTHERS).unwrap();
        want["runtimes"]["dove"] =
            serde_json::json!({"path": "/usr/sbin/runc", "runtimeArgs": [ALIAS_ARG]});
        want["default-runtime"] = "runc".into();
        assert_eq!(v, want);
        // Idempotent: nothing left to do, the file is untouched.
        let inode = std::fs::metadata(&path).unwrap().ino();
        let out = remove(&path, false);
        assert!(
            !out.changed && out.notes[0].contains("nothing to remove"),
            "{out:?}"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
        // Installing again replaces the alias.
        install_runtime(&path, &entry(), false, &memo_of(&path)).unwrap();
        assert_eq!(read(&path)["runtimes"]["dove"]["path"], PACKAGED_RUNTIME);
        assert_eq!(read(&path)["default-runtime"], "runc");
        // A missing file is nothing to do, and is not created.
        let none = dir.path().join("none.json");
        assert!(
            !remove_runtime(&none, "dove", Path::new("/x"), false, &memo_of(&none))
                .unwrap()
                .changed
        );
        assert!(!none.exists());
    }

    #[test]
    fn remove_gives_back_the_default_install_replaced_while_it_still_exists() {
        let dir = tempfile::tempdir().unwrap();
        let with_nvidia = OTHERS.replacen('{', "{\n  \"default-runtime\": \"nvidia\",", 1);
        let path = write(dir.path(), &with_nvidia);
        let memo = memo_of(&path);
        let out = install_runtime(&path, &entry(), true, &memo).unwrap();
        assert!(
            out.notes.iter().any(|n| n.contains("gives it back")),
            "{out:?}"
        );
        assert_eq!(read(&path)["default-runtime"], "dove");
        // Installing again under another name (the default is then a dove-runtime) keeps
        // what was written down.
        let mut again = entry();
        again.name = "dove-next".into();
        let out = install_runtime(&path, &again, true, &memo).unwrap();
        assert!(
            out.notes
                .iter()
                .any(|n| n.contains("runs dove-runtime too")),
            "{out:?}"
        );
        let out = remove(&path, true);
        assert_eq!(read(&path)["default-runtime"], "nvidia", "{out:?}");
        assert!(
            out.notes
                .iter()
                .any(|n| n.contains("set back to \"nvidia\"")),
            "{out:?}"
        );
        assert!(!memo.exists(), "the memo goes once used");

        // The runtime it replaced was taken out of the file since: runc, and said so.
        install_runtime(&path, &entry(), true, &memo).unwrap();
        let mut v = read(&path);
        v["runtimes"].as_object_mut().unwrap().remove("nvidia");
        std::fs::write(&path, v.to_string()).unwrap();
        let out = remove(&path, false);
        assert_eq!(read(&path)["default-runtime"], "runc");
        assert!(
            out.notes
                .iter()
                .any(|n| n.contains("\"nvidia\", the default before DOVE, is no longer")),
            "{out:?}"
        );
    }

    #[test]
    fn the_memo_follows_the_latest_install_and_never_blocks_a_removal() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            r#"{"runtimes": {"crun": {"path": "/usr/bin/crun"}, "kata": {"path": "/usr/bin/kata"}},
                "default-runtime": "crun"}"#,
        );
        let memo = memo_of(&path);
        // A stale entry (a removal that never ran): the next install writes what it
        // replaces now.
        std::fs::write(
            &memo,
            serde_json::json!({path.canonicalize().unwrap().to_str().unwrap(): "kata"}).to_string(),
        )
        .unwrap();
        install_runtime(&path, &entry(), true, &memo).unwrap();
        remove(&path, false);
        assert_eq!(read(&path)["default-runtime"], "crun");

        // A memo that cannot be read: the removal goes on, to runc, and says why.
        install_runtime(&path, &entry(), true, &memo).unwrap();
        std::fs::write(&memo, "not json").unwrap();
        let out = remove(&path, false);
        assert_eq!(read(&path)["default-runtime"], "runc", "{out:?}");
        assert!(
            out.notes.iter().any(|n| n.contains("unreadable")),
            "{out:?}"
        );
        // ... and an install that would write to it says what to do.
        let mut v = read(&path);
        v["default-runtime"] = "crun".into();
        std::fs::write(&path, v.to_string()).unwrap();
        let err = install_runtime(&path, &entry(), true, &memo).unwrap_err();
        assert!(format!("{err:#}").contains("move it away"), "{err:#}");
        assert_eq!(read(&path)["default-runtime"], "crun", "nothing changed");

        // A previous default that runs some dove-runtime is not written down, nor given
        // back.
        std::fs::remove_file(&memo).unwrap();
        v["runtimes"]["old-dove"] = serde_json::json!({"path": "/opt/dove/dove-runtime"});
        v["default-runtime"] = "old-dove".into();
        std::fs::write(&path, v.to_string()).unwrap();
        install_runtime(&path, &entry(), true, &memo).unwrap();
        assert!(!memo.exists());
        remove(&path, false);
        assert_eq!(read(&path)["default-runtime"], "runc");
    }

    #[test]
    fn remove_with_delete_takes_the_entries_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), OTHERS);
        install_runtime(&path, &entry(), true, &memo_of(&path)).unwrap();
        assert!(remove(&path, true).changed);
        let mut want: serde_json::Value = serde_json::from_str(OTHERS).unwrap();
        want["default-runtime"] = "runc".into();
        assert_eq!(read(&path), want);
        assert!(!remove(&path, true).changed);
        // The packaged snippet as an admin would have copied it: `runtimes` stays, empty,
        // so that a reload drops the entry too.
        let path = write(dir.path(), include_str!("../../config/docker/daemon.json"));
        assert!(remove(&path, true).changed);
        assert_eq!(
            read(&path),
            serde_json::json!({"runtimes": {}, "default-runtime": "runc"})
        );
        // --delete also takes an alias a plain removal left.
        let path = write(dir.path(), include_str!("../../config/docker/daemon.json"));
        remove(&path, false);
        assert!(remove(&path, true).changed);
        assert_eq!(read(&path)["runtimes"], serde_json::json!({}));
    }

    #[test]
    fn remove_finds_dove_runtime_under_other_names_and_paths() {
        let dir = tempfile::tempdir().unwrap();
        // Under another name, pointing at the packaged binary, as the default; and one
        // named dove from install.sh's /usr/local/bin with the inner runtime crun.
        let path = write(
            dir.path(),
            r#"{"default-runtime": "dove-runc", "runtimes": {
                "dove-runc": {"path": "/usr/bin/dove-runtime"},
                "dove": {"path": "/usr/local/bin/dove-runtime", "runtimeArgs": ["--dove-runtime=/usr/bin/crun"]},
                "crun": {"path": "/usr/bin/crun"}}}"#,
        );
        assert!(remove(&path, false).changed);
        assert_eq!(
            read(&path),
            serde_json::json!({"default-runtime": "runc", "runtimes": {
                "dove-runc": {"path": "runc", "runtimeArgs": [ALIAS_ARG]},
                "dove": {"path": "/usr/bin/crun", "runtimeArgs": [ALIAS_ARG]},
                "crun": {"path": "/usr/bin/crun"}}})
        );
        // Arguments meant for the wrapped runtime stay with it.
        let path = write(
            dir.path(),
            r#"{"runtimes": {"dove": {"path": "/usr/bin/dove-runtime", "runtimeArgs": ["--dove-runtime=/usr/sbin/runc", "--dove-socket=/s", "--systemd-cgroup"]}}}"#,
        );
        assert!(remove(&path, false).changed);
        assert_eq!(
            read(&path)["runtimes"]["dove"],
            serde_json::json!({"path": "/usr/sbin/runc", "runtimeArgs": ["--systemd-cgroup"]})
        );
        // Nothing of DOVE: left alone, including a runtime that merely has its name.
        let text =
            r#"{"runtimes": {"dove": {"path": "/usr/sbin/runc"}}, "default-runtime": "dove"}"#;
        let path = write(dir.path(), text);
        assert!(!remove(&path, false).changed);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        // default-runtime "dove" with no such runtime (dockerd refuses that) becomes runc.
        let path = write(dir.path(), r#"{"default-runtime": "dove"}"#);
        assert!(remove(&path, false).changed);
        assert_eq!(read(&path), serde_json::json!({"default-runtime": "runc"}));
    }

    #[test]
    fn invalid_files_are_errors_naming_the_file_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        for (text, says) in [
            ("{\"runtimes\": {", "not valid JSON"),
            ("{\"a\": 1,}", "not valid JSON"),
            ("[1, 2]", "top level is an array"),
            ("{\"runtimes\": []}", "\"runtimes\" is an array"),
            (
                "{\"default-runtime\": 3}",
                "\"default-runtime\" is a number",
            ),
        ] {
            let path = write(dir.path(), text);
            let install = install_runtime(&path, &entry(), true, &memo_of(&path))
                .unwrap_err()
                .to_string();
            assert!(install.contains(says), "{text}: {install}");
            assert!(install.contains(&path.display().to_string()), "{install}");
            assert!(install.contains("Fix the file by hand"), "{install}");
            // The broken file is left as it was.
            assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
            if !text.contains("default-runtime") {
                let removal = remove_runtime(
                    &path,
                    "dove",
                    Path::new(PACKAGED_RUNTIME),
                    false,
                    &memo_of(&path),
                )
                .unwrap_err()
                .to_string();
                assert!(removal.contains(says), "{text}: {removal}");
            }
        }
    }

    #[test]
    fn a_symlinked_file_is_edited_where_it_points() {
        let dir = tempfile::tempdir().unwrap();
        let real = write(dir.path(), "{\"debug\": true}");
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        install_runtime(&link, &entry(), false, &memo_of(&link)).unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(read(&real)["debug"], true);
        assert_eq!(read(&real)["runtimes"]["dove"]["path"], PACKAGED_RUNTIME);
    }

    #[test]
    fn ordered_json_round_trips() {
        let text = r#"{"z":1,"a":[true,null,{"y":"s","b":-2.5}],"m":{"q":18446744073709551615}}"#;
        let v: Json = serde_json::from_str(text).unwrap();
        assert_eq!(serde_json::to_string(&v).unwrap(), text);
        assert_eq!(indent_of("{\n\t\"a\": 1\n}"), "\t");
        assert_eq!(indent_of("{\"a\": 1}"), "    ");
    }

    #[test]
    fn reload_without_a_dockerd_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("docker.pid");
        let said = reload_dockerd(Some(&pidfile)).unwrap();
        assert!(said.contains("not running"), "{said}");
        // A stale pid file naming a process that is not dockerd (this test) is not signalled.
        std::fs::write(&pidfile, std::process::id().to_string()).unwrap();
        let said = reload_dockerd(Some(&pidfile)).unwrap();
        assert!(said.contains("not dockerd"), "{said}");
    }
}
