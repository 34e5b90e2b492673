//! `doved.toml`: the daemon's configuration, with built-in defaults.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The documented example, which is also the embedded default.
pub const EXAMPLE: &str = include_str!("../../config/doved.toml");

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub observer: ObserverConfig,
    pub metrics: MetricsConfig,
    pub enforcement: EnforcementConfig,
    pub bills: BillsConfig,
    pub nri: NriConfig,
}

/// The containerd/CRI-O NRI plugin inside doved (`ingest::nri`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NriConfig {
    pub enabled: bool,
    pub socket: PathBuf,
    pub plugin_name: String,
    pub plugin_index: String,
}

impl Default for NriConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            socket: PathBuf::from("/var/run/nri/nri.sock"),
            plugin_name: "dove".into(),
            plugin_index: "50".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillsConfig {
    pub retention_days: u64,
}

impl Default for BillsConfig {
    fn default() -> Self {
        Self { retention_days: 7 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EnforcementMode {
    #[default]
    Auto,
    Kernel,
    /// The user-space cpu.max controller (`enforce/cpumax.rs`).
    Cpumax,
    /// Accrue pending cost in the pinned DOVE_COST map for an enforcer outside doved,
    /// which takes it with an atomic exchange (the contract the kernel patch follows).
    External,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnforcementConfig {
    pub mode: EnforcementMode,
    pub cpumax_floor_percent: u32,
    /// Drop traffic into containers whose softirq cost outruns their quota (cpumax);
    /// the annotation `io.dove.early-drop` overrides it per container.
    pub early_drop: bool,
}

impl Default for EnforcementConfig {
    fn default() -> Self {
        Self {
            mode: EnforcementMode::Auto,
            cpumax_floor_percent: 10,
            early_drop: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObserverConfig {
    pub enabled: bool,
    pub pin_dir: PathBuf,
    pub tick_ms: u64,
    pub egress: bool,
    /// Containers the cost maps have slots for; sizes the maps when they are created.
    pub max_containers: u32,
}

impl Default for ObserverConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            pin_dir: PathBuf::from("/sys/fs/bpf/dove"),
            tick_ms: 100,
            egress: true,
            max_containers: dove_ebpf_common::SLOTS - 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub listen: String,
    pub removed_grace_s: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9477".into(),
            removed_grace_s: 600,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub socket_group: String,
    pub rootless: bool,
    pub client_timeout_ms: u64,
    pub max_connections: usize,
    pub sweep_interval_s: u64,
    pub log_level: String,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(dove_proto::DEFAULT_SOCKET),
            state_dir: PathBuf::from("/var/lib/dove"),
            socket_group: String::new(),
            rootless: false,
            client_timeout_ms: 5000,
            max_connections: 1024,
            sweep_interval_s: 60,
            log_level: "info".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: key `{key}`: {message}")]
    Value {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parse TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config.validate(origin)?;
        Ok(config)
    }

    fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        let bad = |key, message: &str| ConfigError::Value {
            path: origin.to_owned(),
            key,
            message: message.to_owned(),
        };
        if !(1..=100).contains(&self.enforcement.cpumax_floor_percent) {
            return Err(bad(
                "enforcement.cpumax_floor_percent",
                "must be 1 to 100: the share of a quota cpumax never takes away",
            ));
        }
        let d = &self.daemon;
        if !d.socket.is_absolute() {
            return Err(bad("daemon.socket", "must be an absolute path"));
        }
        if !d.state_dir.is_absolute() {
            return Err(bad("daemon.state_dir", "must be an absolute path"));
        }
        if !(100..=600_000).contains(&d.client_timeout_ms) {
            return Err(bad(
                "daemon.client_timeout_ms",
                "must be between 100 and 600000",
            ));
        }
        if !(1..=65_536).contains(&d.max_connections) {
            return Err(bad("daemon.max_connections", "must be between 1 and 65536"));
        }
        if !self.observer.pin_dir.is_absolute() {
            return Err(bad("observer.pin_dir", "must be an absolute path"));
        }
        if !(10..=10_000).contains(&self.observer.tick_ms) {
            return Err(bad("observer.tick_ms", "must be between 10 and 10000"));
        }
        if !(1..dove_ebpf_common::MAX_SLOTS).contains(&self.observer.max_containers) {
            return Err(bad(
                "observer.max_containers",
                "must be between 1 and 65535 (the maps hold one slot per container and one for unattributed time)",
            ));
        }
        if !self.nri.socket.is_absolute() {
            return Err(bad("nri.socket", "must be an absolute path"));
        }
        let index = self.nri.plugin_index.as_bytes();
        if index.len() != 2 || !index.iter().all(u8::is_ascii_digit) {
            return Err(bad(
                "nri.plugin_index",
                "must be two digits, such as \"50\" (the runtime calls plugins in this order)",
            ));
        }
        let name = &self.nri.plugin_name;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
        {
            return Err(bad(
                "nri.plugin_name",
                "must be non-empty letters, digits, '.', '_', '+' or '-'",
            ));
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(bad(
                "metrics.listen",
                "must be an address:port such as \"127.0.0.1:9477\", or \"\" to disable",
            ));
        }
        if !(1..=3650).contains(&self.bills.retention_days) {
            return Err(bad("bills.retention_days", "must be between 1 and 3650"));
        }
        if self.metrics.removed_grace_s > 86_400 {
            return Err(bad(
                "metrics.removed_grace_s",
                "must be at most 86400 (a day); the ledger keeps bills longer",
            ));
        }
        if d.log_level.trim().is_empty()
            || tracing_subscriber::EnvFilter::try_new(&d.log_level).is_err()
        {
            return Err(bad(
                "daemon.log_level",
                "is not a valid log filter (e.g. \"info\", \"doved=debug\")",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_is_the_default() {
        let parsed = Config::parse(EXAMPLE, Path::new("doved.toml")).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(
            Config::parse("", Path::new("x")).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::parse("[daemon]\nsockett = \"/x\"\n", Path::new("c.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("sockett") && msg.contains("c.toml"), "{msg}");
        let err = Config::parse("[deamon]\n", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("deamon"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            (
                "[daemon]\nclient_timeout_ms = \"soon\"\n",
                "client_timeout_ms",
            ),
            (
                "[daemon]\nclient_timeout_ms = 1\n",
                "daemon.client_timeout_ms",
            ),
            ("[daemon]\nsocket = \"relative.sock\"\n", "daemon.socket"),
            ("[daemon]\nstate_dir = \"var\"\n", "daemon.state_dir"),
            ("[daemon]\nmax_connections = 0\n", "daemon.max_connections"),
            ("[daemon]\nlog_level = \"\"\n", "daemon.log_level"),
            ("[observer]\ntick_ms = 0\n", "observer.tick_ms"),
            (
                "[observer]\nmax_containers = 0\n",
                "observer.max_containers",
            ),
            (
                "[observer]\nmax_containers = 65536\n",
                "observer.max_containers",
            ),
            ("[observer]\npin_dir = \"dove\"\n", "observer.pin_dir"),
            ("[metrics]\nlisten = \"everywhere\"\n", "metrics.listen"),
            ("[nri]\nplugin_index = \"5\"\n", "nri.plugin_index"),
            ("[nri]\nplugin_name = \"do ve\"\n", "nri.plugin_name"),
            ("[nri]\nsocket = \"nri.sock\"\n", "nri.socket"),
            ("[observer]\nenable = true\n", "enable"),
            ("[enforcement]\nmode = \"cpu\"\n", "cpu"),
            (
                "[enforcement]\ncpumax_floor_percent = 0\n",
                "enforcement.cpumax_floor_percent",
            ),
            ("[bills]\nretention_days = 0\n", "bills.retention_days"),
            (
                "[metrics]\nremoved_grace_s = 100000\n",
                "metrics.removed_grace_s",
            ),
        ];
        for (text, key) in cases {
            let msg = Config::parse(text, Path::new("c.toml"))
                .unwrap_err()
                .to_string();
            assert!(msg.contains(key), "{text}: {msg}");
        }
    }
}
