//! The cpu.max controller: DOVE's enforcement on kernels without its scheduler patch.
//!
//! A container's quota group is the nearest cgroup at or above it in the `cpu` hierarchy
//! that has a CFS quota (`cpu.max` on cgroup v2, `cpu.cfs_quota_us` on a v1 `cpu`
//! hierarchy; Kubernetes sets one on the pod and one on each container, so the nearest is
//! the container's own). Every control period (the observer's tick) the controller takes
//! the softirq cost attributed to the group since the last period (its pending counter,
//! exchanged to zero), adds it to the group's debt, and writes the quota for the periods
//! ahead lowered by what the debt asks: at most `base - floor` per CFS period, where the
//! floor (`enforcement.cpumax_floor_percent` of the base, never under the kernel's 1 ms
//! minimum) keeps a container from being frozen. As the debt is paid the quota returns to
//! the base. Debt beyond [`CARRY_PERIODS`] periods of deductions is forgiven and counted:
//! that is cost the quota cannot absorb, which early drop is for.
//!
//! The base (the quota the runtime or orchestrator set) is written to a durable ledger
//! before anything is lowered, and restored when the last container of the group goes, when
//! doved stops, and at the next start after a crash ([`restore_ledger`], also run by
//! `doved --restore-quotas` from the unit's `ExecStopPost`). A quota found changed by
//! someone else (`docker update --cpus`, an in-place resize) becomes the new base: the
//! controller adopts it rather than fight it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The kernel's smallest CFS quota, in µs.
pub const MIN_QUOTA_US: u64 = 1000;
/// Debt beyond this many CFS periods of full deductions is forgiven.
pub const CARRY_PERIODS: u64 = 10;
/// The ledger's file name in the state directory.
pub const LEDGER_FILE: &str = "quota-bases.json";

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot parse {text:?} as a CFS bandwidth limit")]
    Parse { path: PathBuf, text: String },
    #[error(
        "{0}: neither cpu.max nor cpu.cfs_quota_us is there: not a cgroup of the cpu controller"
    )]
    NoCpuController(PathBuf),
    #[error(
        "the quota ledger {path}: {detail}; fix or remove it (quotas it held are not restored)"
    )]
    Ledger { path: PathBuf, detail: String },
}

/// A CFS bandwidth limit: `quota_us` per `period_us`, `None` for no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bandwidth {
    pub quota_us: Option<u64>,
    pub period_us: u64,
}

impl Bandwidth {
    /// `cpu.max`: `"max 100000"`, `"20000 100000"`, or a quota alone.
    pub fn parse_v2(text: &str) -> Option<Self> {
        let mut fields = text.split_whitespace();
        let quota = fields.next()?;
        let period_us = match fields.next() {
            Some(p) => p.parse().ok().filter(|p| *p > 0)?,
            None => 100_000,
        };
        if fields.next().is_some() {
            return None;
        }
        let quota_us = match quota {
            "max" => None,
            q => Some(q.parse().ok()?),
        };
        Some(Self {
            quota_us,
            period_us,
        })
    }

    /// `cpu.cfs_quota_us` (`-1` for none) and `cpu.cfs_period_us`.
    pub fn parse_v1(quota: &str, period: &str) -> Option<Self> {
        let period_us = period.trim().parse().ok().filter(|p| *p > 0)?;
        let quota: i64 = quota.trim().parse().ok()?;
        Some(Self {
            quota_us: (quota >= 0).then_some(quota as u64),
            period_us,
        })
    }
}

/// How much of `base` the controller may take away per CFS period.
pub fn floor_us(base_quota_us: u64, floor_percent: u32) -> u64 {
    let floor = (base_quota_us as u128 * floor_percent.min(100) as u128 / 100) as u64;
    floor.max(MIN_QUOTA_US).min(base_quota_us)
}

/// One control period's decision for a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The quota to write for the periods ahead.
    pub quota_us: u64,
    /// Debt left after this period's deduction.
    pub debt_ns: u64,
    /// Debt forgiven because it exceeded what the quota can absorb.
    pub forgiven_ns: u64,
}

/// Lower `base_quota_us` (per `period_us`) for the `interval` ahead by what `debt_ns` asks,
/// never under the floor. The debt falls by what the lowered quota takes over `interval`.
pub fn plan(
    base_quota_us: u64,
    period_us: u64,
    floor_percent: u32,
    debt_ns: u64,
    interval: Duration,
) -> Plan {
    let room_us = base_quota_us - floor_us(base_quota_us, floor_percent);
    let period_ns = (period_us as u128 * 1000).max(1);
    let interval_ns = interval.as_nanos().max(1);
    // The most the interval's periods can take, and what the carry may hold beyond it.
    // u128 and saturation: inputs come from files anyone with write access can fill.
    let room_total_ns = (room_us as u128 * 1000).saturating_mul(interval_ns) / period_ns;
    let carry_ns = room_us as u128 * 1000 * CARRY_PERIODS as u128;
    let debt = debt_ns as u128;
    let forgiven = debt.saturating_sub(room_total_ns.saturating_add(carry_ns));
    let debt = debt - forgiven;
    let take_ns = debt.min(room_total_ns);
    // Spread over the interval's periods, rounded up so that small debts are paid.
    let per_period_us = take_ns
        .saturating_mul(period_ns)
        .div_ceil(interval_ns.saturating_mul(1000))
        .min(room_us as u128) as u64;
    Plan {
        quota_us: base_quota_us - per_period_us,
        debt_ns: (debt - take_ns) as u64,
        forgiven_ns: forgiven.min(u64::MAX as u128) as u64,
    }
}

/// The bandwidth files of one cgroup of the `cpu` controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaFiles {
    pub dir: PathBuf,
    /// `cpu.cfs_quota_us` and `cpu.cfs_period_us` (a v1 hierarchy) rather than `cpu.max`.
    pub v1: bool,
}

impl QuotaFiles {
    pub fn at(dir: &Path) -> Result<Self, QuotaError> {
        let v1 = if dir.join("cpu.max").exists() {
            false
        } else if dir.join("cpu.cfs_quota_us").exists() {
            true
        } else {
            return Err(QuotaError::NoCpuController(dir.to_owned()));
        };
        Ok(Self {
            dir: dir.to_owned(),
            v1,
        })
    }

    fn read_file(&self, name: &str) -> Result<String, QuotaError> {
        let path = self.dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| QuotaError::Io { path, source })
    }

    pub fn read(&self) -> Result<Bandwidth, QuotaError> {
        let parsed = if self.v1 {
            let quota = self.read_file("cpu.cfs_quota_us")?;
            let period = self.read_file("cpu.cfs_period_us")?;
            Bandwidth::parse_v1(&quota, &period).ok_or(format!(
                "{} {}",
                quota.trim(),
                period.trim()
            ))
        } else {
            let text = self.read_file("cpu.max")?;
            Bandwidth::parse_v2(&text).ok_or(text)
        };
        parsed.map_err(|text| QuotaError::Parse {
            path: self.dir.clone(),
            text,
        })
    }

    /// Write `bandwidth`'s quota (the period too, on v2, where one write sets both).
    pub fn write(&self, bandwidth: Bandwidth) -> Result<(), QuotaError> {
        let (name, text) = match (self.v1, bandwidth.quota_us) {
            (true, Some(q)) => ("cpu.cfs_quota_us", q.to_string()),
            (true, None) => ("cpu.cfs_quota_us", "-1".to_owned()),
            (false, Some(q)) => ("cpu.max", format!("{q} {}", bandwidth.period_us)),
            (false, None) => ("cpu.max", format!("max {}", bandwidth.period_us)),
        };
        let path = self.dir.join(name);
        std::fs::write(&path, text).map_err(|source| QuotaError::Io { path, source })
    }
}

/// The bases of the quotas the controller may have lowered, kept durably: a restore must
/// survive a `kill -9` at any moment.
#[derive(Debug, Default, Serialize, Deserialize)]
struct LedgerFile {
    bases: BTreeMap<PathBuf, LedgerEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LedgerEntry {
    files: QuotaFiles,
    base: Bandwidth,
}

struct QuotaLedger {
    path: PathBuf,
    file: LedgerFile,
}

impl QuotaLedger {
    fn load(state_dir: &Path) -> Result<Self, QuotaError> {
        let path = state_dir.join(LEDGER_FILE);
        let file = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| QuotaError::Ledger {
                path: path.clone(),
                detail: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => LedgerFile::default(),
            Err(source) => return Err(QuotaError::Io { path, source }),
        };
        Ok(Self { path, file })
    }

    /// Replace the file atomically and durably: written, synced, renamed, directory synced.
    fn save(&self) -> Result<(), QuotaError> {
        let io = |source| QuotaError::Io {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(&self.file).expect("the ledger serialises");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_data().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(())
    }
}

/// Put back every base the ledger holds and empty it; returns how many were restored. For a
/// start after a crash and for `doved --restore-quotas`. A cgroup that is gone has nothing to
/// restore.
pub fn restore_ledger(state_dir: &Path) -> Result<usize, QuotaError> {
    let mut ledger = QuotaLedger::load(state_dir)?;
    if ledger.file.bases.is_empty() {
        return Ok(0);
    }
    let mut restored = 0;
    for (dir, entry) in std::mem::take(&mut ledger.file.bases) {
        if !dir.exists() {
            continue;
        }
        match entry.files.write(entry.base) {
            Ok(()) => {
                restored += 1;
                tracing::info!(cgroup = %dir.display(), base = ?entry.base, "CFS quota restored to its base");
            }
            Err(e) => {
                tracing::error!("restoring a CFS quota: {e}");
                ledger.file.bases.insert(dir, entry);
            }
        }
    }
    ledger.save()?;
    Ok(restored)
}

/// What `dovectl status` and the metrics say about a quota group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    pub dir: PathBuf,
    pub base: Bandwidth,
    /// The quota as last written (the base while nothing is deducted).
    pub effective_quota_us: u64,
    /// Softirq cost attributed in the last control period, scaled to one CFS period.
    pub softirq_per_period_us: u64,
    pub debt_ns: u64,
    pub forgiven_ns: u64,
}

struct Group {
    files: QuotaFiles,
    base: Bandwidth,
    /// What the controller last wrote, to tell its own writes from someone else's.
    written: Option<Bandwidth>,
    debt_ns: u64,
    forgiven_ns: u64,
    softirq_per_period_us: u64,
    members: BTreeSet<String>,
}

/// The controller. Owned by the accounting thread, which feeds it the registry's events
/// and the observer's pending cost.
pub struct CpuMax {
    ledger: QuotaLedger,
    floor_percent: u32,
    /// How long a written quota stays in force: the time until the next control.
    control_period: Duration,
    /// Quota group ID (the inode of its directory in the `cpu` hierarchy) → group.
    groups: HashMap<u64, Group>,
}

impl CpuMax {
    /// Restore what a previous doved left lowered, then start with no group.
    pub fn start(
        state_dir: &Path,
        floor_percent: u32,
        control_period: Duration,
    ) -> Result<Self, QuotaError> {
        let restored = restore_ledger(state_dir)?;
        if restored > 0 {
            tracing::warn!(
                restored,
                "CFS quotas a previous doved had lowered were restored to their bases"
            );
        }
        Ok(Self {
            ledger: QuotaLedger::load(state_dir)?,
            floor_percent,
            control_period,
            groups: HashMap::new(),
        })
    }

    /// Enforce on container `id`, whose quota group (the nearest cgroup with a quota) is
    /// `group` at `dir`; `None` when nothing above the container has a quota.
    pub fn join(&mut self, id: &str, quota_group: Option<(u64, PathBuf)>) {
        let Some((group_id, dir)) = quota_group else {
            tracing::info!(
                id,
                "no CFS quota on the container's cgroup or above: cpumax leaves it alone (its softirq cost is measured, not deducted)"
            );
            return;
        };
        if let Some(group) = self.groups.get_mut(&group_id) {
            group.members.insert(id.to_owned());
            return;
        }
        let files = match QuotaFiles::at(&dir) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(id, "not enforced: {e}");
                return;
            }
        };
        let base = match files.read() {
            Ok(b) if b.quota_us.is_some() => b,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(id, "not enforced: {e}");
                return;
            }
        };
        tracing::info!(id, quota_cgroup = %dir.display(), quota_us = base.quota_us, period_us = base.period_us, "cpumax enforces on the nearest CFS quota");
        self.groups.insert(
            group_id,
            Group {
                files,
                base,
                written: None,
                debt_ns: 0,
                forgiven_ns: 0,
                softirq_per_period_us: 0,
                members: BTreeSet::from([id.to_owned()]),
            },
        );
    }

    /// Container `id` is gone; the last of a group restores its base.
    pub fn leave(&mut self, id: &str) {
        let emptied: Vec<u64> = self
            .groups
            .iter_mut()
            .filter_map(|(key, g)| (g.members.remove(id) && g.members.is_empty()).then_some(*key))
            .collect();
        for key in emptied {
            if let Some(group) = self.groups.remove(&key) {
                self.restore(group);
            }
        }
    }

    /// Restore every group's base (doved stops).
    pub fn restore_all(&mut self) {
        let groups: Vec<Group> = self.groups.drain().map(|(_, g)| g).collect();
        for group in groups {
            self.restore(group);
        }
    }

    fn restore(&mut self, group: Group) {
        if group.written.is_some_and(|w| w != group.base) {
            match group.files.write(group.base) {
                Ok(()) => {
                    tracing::info!(cgroup = %group.files.dir.display(), "CFS quota restored to its base")
                }
                // The cgroup is gone with its container: nothing to restore.
                Err(e) if !group.files.dir.exists() => tracing::debug!("{e}"),
                Err(e) => {
                    tracing::error!(
                        "restoring a CFS quota: {e}; the ledger keeps it for the next start"
                    );
                    return;
                }
            }
        }
        if self.ledger.file.bases.remove(&group.files.dir).is_some() {
            if let Err(e) = self.ledger.save() {
                tracing::error!("{e}");
            }
        }
    }

    /// One control period: `take_pending(group)` exchanges the group's attributed cost
    /// (ns) to zero; `elapsed` is the time since the last control, over which it accrued.
    pub fn control(&mut self, mut take_pending: impl FnMut(u64) -> u64, elapsed: Duration) {
        let mut ledger_changed = false;
        for (&key, group) in self.groups.iter_mut() {
            let pending = take_pending(key);
            let current = match group.files.read() {
                Ok(c) => c,
                // Gone with its container; the registry reports the removal.
                Err(_) => continue,
            };
            if current != group.written.unwrap_or(group.base) {
                tracing::info!(cgroup = %group.files.dir.display(), was = ?group.base, now = ?current, "the CFS quota was changed by someone else: adopted as the new base");
                group.base = current;
                group.written = None;
                if let Some(entry) = self.ledger.file.bases.get_mut(&group.files.dir) {
                    entry.base = current;
                    ledger_changed = true;
                }
            }
            let Some(base_quota) = group.base.quota_us else {
                // The quota was lifted: nothing to lower until one is set again.
                group.debt_ns = 0;
                continue;
            };
            group.softirq_per_period_us =
                (pending as u128 * group.base.period_us as u128 / elapsed.as_nanos().max(1)) as u64;
            // The quota written now holds until the next control: the deduction is spread
            // over that time, however long this interval took.
            let p = plan(
                base_quota,
                group.base.period_us,
                self.floor_percent,
                group.debt_ns.saturating_add(pending),
                self.control_period,
            );
            group.debt_ns = p.debt_ns;
            group.forgiven_ns = group.forgiven_ns.saturating_add(p.forgiven_ns);
            let next = Bandwidth {
                quota_us: Some(p.quota_us),
                period_us: group.base.period_us,
            };
            if next == current {
                group.written = Some(current);
                continue;
            }
            if next != group.base && !self.ledger.file.bases.contains_key(&group.files.dir) {
                // The base is durable before anything is lowered.
                self.ledger.file.bases.insert(
                    group.files.dir.clone(),
                    LedgerEntry {
                        files: group.files.clone(),
                        base: group.base,
                    },
                );
                if let Err(e) = self.ledger.save() {
                    tracing::error!("{e}; not lowering {}", group.files.dir.display());
                    self.ledger.file.bases.remove(&group.files.dir);
                    continue;
                }
            }
            match group.files.write(next) {
                Ok(()) => group.written = Some(next),
                Err(e) => tracing::warn!("lowering a CFS quota: {e}"),
            }
        }
        if ledger_changed {
            if let Err(e) = self.ledger.save() {
                tracing::error!("{e}");
            }
        }
    }

    /// The group container `id` belongs to, if enforced.
    pub fn status_of(&self, id: &str) -> Option<GroupStatus> {
        self.groups
            .values()
            .find(|g| g.members.contains(id))
            .map(|g| GroupStatus {
                dir: g.files.dir.clone(),
                base: g.base,
                effective_quota_us: g
                    .written
                    .and_then(|w| w.quota_us)
                    .or(g.base.quota_us)
                    .unwrap_or(0),
                softirq_per_period_us: g.softirq_per_period_us,
                debt_ns: g.debt_ns,
                forgiven_ns: g.forgiven_ns,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_layouts() {
        assert_eq!(
            Bandwidth::parse_v2("max 100000\n"),
            Some(Bandwidth {
                quota_us: None,
                period_us: 100_000
            })
        );
        assert_eq!(
            Bandwidth::parse_v2("20000 50000"),
            Some(Bandwidth {
                quota_us: Some(20_000),
                period_us: 50_000
            })
        );
        assert_eq!(
            Bandwidth::parse_v2("max"),
            Some(Bandwidth {
                quota_us: None,
                period_us: 100_000
            })
        );
        assert_eq!(Bandwidth::parse_v2("20000 0"), None);
        assert_eq!(Bandwidth::parse_v2("-5 100000"), None);
        assert_eq!(Bandwidth::parse_v2("1 2 3"), None);
        assert_eq!(Bandwidth::parse_v2(""), None);
        assert_eq!(
            Bandwidth::parse_v1("-1\n", "100000\n"),
            Some(Bandwidth {
                quota_us: None,
                period_us: 100_000
            })
        );
        assert_eq!(
            Bandwidth::parse_v1("50000", "100000"),
            Some(Bandwidth {
                quota_us: Some(50_000),
                period_us: 100_000
            })
        );
        assert_eq!(Bandwidth::parse_v1("x", "100000"), None);
    }

    #[test]
    fn floor_holds_and_debt_is_paid_then_quota_returns() {
        let tick = Duration::from_millis(100);
        // 50 ms per 100 ms period, 10% floor: at most 45 ms per period can go.
        assert_eq!(floor_us(50_000, 10), 5_000);
        let p = plan(50_000, 100_000, 10, 20_000_000, tick);
        assert_eq!(
            p,
            Plan {
                quota_us: 30_000,
                debt_ns: 0,
                forgiven_ns: 0
            }
        );
        // More than a period can take: the floor holds, the rest carries.
        let p = plan(50_000, 100_000, 10, 100_000_000, tick);
        assert_eq!(p.quota_us, 5_000);
        assert_eq!(p.debt_ns, 55_000_000);
        // No debt: the base.
        assert_eq!(plan(50_000, 100_000, 10, 0, tick).quota_us, 50_000);
        // A 1 ns debt still lowers by 1 µs: rounding never hides cost.
        assert_eq!(plan(50_000, 100_000, 10, 1, tick).quota_us, 49_999);
    }

    #[test]
    fn carry_is_bounded_and_the_excess_forgiven() {
        let tick = Duration::from_millis(100);
        let room = 45_000_000u64; // ns per period
        let p = plan(50_000, 100_000, 10, room * 100, tick);
        assert_eq!(p.quota_us, 5_000);
        assert_eq!(p.debt_ns, room * CARRY_PERIODS);
        assert_eq!(p.forgiven_ns, room * 100 - room - room * CARRY_PERIODS);
        // Overflow-proof at the extremes.
        let p = plan(u64::MAX / 2, 1, 100, u64::MAX, Duration::from_nanos(1));
        assert_eq!(p.quota_us, u64::MAX / 2);
        let p = plan(u64::MAX / 2, u64::MAX, 0, u64::MAX, Duration::MAX);
        assert!(p.quota_us >= MIN_QUOTA_US);
    }

    #[test]
    fn period_and_interval_scale_the_deduction() {
        // A 20 ms period and a 100 ms control interval: five periods share the debt.
        let p = plan(10_000, 20_000, 0, 10_000_000, Duration::from_millis(100));
        assert_eq!(p.quota_us, 8_000);
        assert_eq!(p.debt_ns, 0);
        // The floor never goes under the kernel's minimum, nor over the base.
        assert_eq!(floor_us(2_000, 1), MIN_QUOTA_US);
        assert_eq!(floor_us(500, 1), 500);
        assert_eq!(
            plan(500, 100_000, 10, 1_000_000, Duration::from_millis(100)).quota_us,
            500
        );
    }
}
