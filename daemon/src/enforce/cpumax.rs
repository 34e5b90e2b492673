//! The cpu.max controller: DOVE's enforcement on kernels without its scheduler patch.
//!
//! A container's quota group is the nearest cgroup at or above it in the `cpu` hierarchy
//! that has a CFS quota (`cpu.max` on cgroup v2, `cpu.cfs_quota_us` on a v1 `cpu`
//! hierarchy; Kubernetes sets one on the pod and one on each container, so the nearest is
//! the container's own). Each control period (the observer's tick) the controller adds the
//! softirq cost attributed to the group since the last one (its pending counter, exchanged
//! to zero) to the group's debt, subtracts what the quota in force took back over the CFS
//! periods that really ran (`cpu.stat nr_periods`), and picks the quota for the time
//! ahead: the debt spread over it, in steps of a tenth of what may be taken, never under
//! the floor (`enforcement.cpumax_floor_percent` of the base, the group's burst, the
//! kernel's 1 ms). Debt beyond [`CARRY_PERIODS`] periods of full deductions is forgiven and
//! counted: cost the quota cannot absorb, which early drop is for.
//!
//! A write to the quota file is not free: the kernel refills the group's runtime and
//! unthrottles it (`tg_set_cfs_bandwidth`). So the controller writes only when the step
//! changes and at most once per [`WRITE_EVERY`] control periods, plans each quota to hold
//! that long, and charges a write that lands while the group was being throttled half
//! the quota it refilled (what a group running at its quota has used, on average, of the
//! period the write cuts short).
//!
//! The base (the quota the runtime or orchestrator set) is written to a durable ledger
//! before anything is lowered, and restored when the last container of the group goes, when
//! doved stops, and at the next start after a crash ([`restore_ledger`], also run by
//! `doved --restore-quotas` from the unit's `ExecStopPost`), but only where the file still
//! holds a value the controller could have written. A quota found changed by someone else
//! (`docker update --cpus`, an in-place resize) becomes the new base.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dove_proto::QuotaState;
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

/// The lowest quota the controller writes for `base_quota_us`: `floor_percent` of it, the
/// group's burst (the kernel refuses a quota under it), the kernel's 1 ms; never over it.
pub fn floor_us(base_quota_us: u64, floor_percent: u32, burst_us: u64) -> u64 {
    let share = (base_quota_us as u128 * floor_percent.min(100) as u128 / 100) as u64;
    share.max(MIN_QUOTA_US).max(burst_us).min(base_quota_us)
}

/// Steps between the floor and the base: a write refills the group's runtime, so the
/// quota moves only between these levels.
pub const STEPS: u64 = 10;
/// A group's quota is written at most once per this many control periods.
pub const WRITE_EVERY: u32 = 5;
/// The debt is spread over at least this much time ahead: a shorter horizon chases the
/// noise in each tick's cost and rewrites the quota more often.
pub const HORIZON: Duration = Duration::from_millis(500);

/// One control period's decision for a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The quota to write for the time ahead.
    pub quota_us: u64,
    /// Debt kept (what the plan will pay, and what waits for a later period).
    pub debt_ns: u64,
    /// Debt forgiven because it exceeded what the quota can absorb.
    pub forgiven_ns: u64,
}

/// Debt after `periods` CFS periods ran with `deducted_us` taken off each one's quota.
pub fn settle(debt_ns: u64, deducted_us: u64, periods: u64) -> u64 {
    debt_ns.saturating_sub(deducted_us.saturating_mul(1000).saturating_mul(periods))
}

/// The quota for the `ahead` of time to come: `base_quota_us` less `debt_ns` spread over
/// its periods, rounded down to a step, never under `floor`.
pub fn plan(base_quota_us: u64, floor: u64, period_us: u64, debt_ns: u64, ahead: Duration) -> Plan {
    let room_us = base_quota_us.saturating_sub(floor) as u128;
    let period_ns = (period_us as u128 * 1000).max(1);
    let ahead_ns = ahead.as_nanos().max(1);
    // u128 and saturation: the inputs come from files anyone with write access can fill.
    let carry_ns = room_us * 1000 * CARRY_PERIODS as u128;
    let payable_ns = (room_us * 1000).saturating_mul(ahead_ns) / period_ns;
    let debt = debt_ns as u128;
    let forgiven = debt.saturating_sub(payable_ns.saturating_add(carry_ns));
    let debt = debt - forgiven;
    let wanted_us = debt.saturating_mul(period_ns) / ahead_ns / 1000;
    let step = (room_us / STEPS as u128).max(1);
    let deduction = if wanted_us >= room_us {
        room_us
    } else {
        wanted_us / step * step
    };
    Plan {
        quota_us: base_quota_us - deduction as u64,
        debt_ns: debt as u64,
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

    /// The burst the group may run beyond its quota (µs; 0 when none or not supported).
    pub fn burst_us(&self) -> u64 {
        let name = if self.v1 {
            "cpu.cfs_burst_us"
        } else {
            "cpu.max.burst"
        };
        std::fs::read_to_string(self.dir.join(name))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }

    /// `nr_periods` and `nr_throttled` from `cpu.stat`: the CFS periods that ran.
    pub fn periods(&self) -> Option<(u64, u64)> {
        let text = std::fs::read_to_string(self.dir.join("cpu.stat")).ok()?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        };
        Some((field("nr_periods ")?, field("nr_throttled ")?))
    }

    /// The inode of the directory: a cgroup made again at the same path is another one.
    pub fn ino(&self) -> Option<u64> {
        dove_cgroup::cgroup_id(&self.dir).ok()
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
    /// The cgroup directory's inode: a cgroup made again at the path is not restored.
    ino: u64,
    /// The lowest quota the controller writes: below it, or at another period, the value
    /// is not the controller's, and is left alone.
    floor_us: u64,
}

impl LedgerEntry {
    /// Whether `current` is a value the controller could have written over this base.
    fn lowered_by_us(&self, current: Bandwidth) -> bool {
        let Some(base) = self.base.quota_us else {
            return false;
        };
        current.period_us == self.base.period_us
            && current
                .quota_us
                .is_some_and(|q| (self.floor_us..base).contains(&q))
    }
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

/// Put back every base the ledger holds and empty it; returns how many were restored. Run at
/// every start, whatever the enforcement mode, and by `doved --restore-quotas`. A quota is
/// put back only where its cgroup is the same one (inode) and the file holds a value the
/// controller could have written: a cgroup made again at the path, or a quota someone
/// changed while doved was down, is left as it is.
pub fn restore_ledger(state_dir: &Path) -> Result<usize, QuotaError> {
    let mut ledger = QuotaLedger::load(state_dir)?;
    if ledger.file.bases.is_empty() {
        return Ok(0);
    }
    let mut restored = 0;
    for (dir, entry) in std::mem::take(&mut ledger.file.bases) {
        if entry.files.ino() != Some(entry.ino) {
            continue;
        }
        let current = match entry.files.read() {
            Ok(current) => current,
            Err(e) => {
                tracing::warn!("not restoring a CFS quota: {e}");
                continue;
            }
        };
        if !entry.lowered_by_us(current) {
            if current != entry.base {
                tracing::info!(cgroup = %dir.display(), now = ?current, base = ?entry.base, "the CFS quota was changed by someone else since doved lowered it: left as it is");
            }
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

/// What a quota can pay for in softirq time, and whether its cost outran that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The last control forgave debt the quota could not absorb.
    pub over: bool,
    /// Softirq time per second the quota absorbs from its base down to its floor (ns/s).
    pub absorbable_ns_per_s: u64,
}

/// A registered container: its ID and cgroup (one ID may name an old and a new cgroup
/// for a moment when a runtime reuses it).
type Member = (String, u64);

struct Group {
    files: QuotaFiles,
    ino: u64,
    base: Bandwidth,
    floor_us: u64,
    /// What the controller last wrote, to tell its own writes from someone else's.
    written: Option<Bandwidth>,
    debt_ns: u64,
    forgiven_ns: u64,
    /// The last control forgave debt: the cost outran what the quota absorbs.
    over_budget: bool,
    softirq_per_period_us: u64,
    /// `cpu.stat` at the last control: (nr_periods, nr_throttled).
    stat: Option<(u64, u64)>,
    writes: u64,
    /// Control periods since the last write.
    since_write: u32,
    members: BTreeSet<Member>,
}

impl Group {
    fn entry(&self) -> LedgerEntry {
        LedgerEntry {
            files: self.files.clone(),
            base: self.base,
            ino: self.ino,
            floor_us: self.floor_us,
        }
    }

    /// Take `current` as the base, as its owner set it.
    fn adopt(&mut self, current: Bandwidth, floor_percent: u32) {
        self.base = current;
        self.floor_us = current
            .quota_us
            .map(|q| floor_us(q, floor_percent, self.files.burst_us()))
            .unwrap_or(0);
        self.written = None;
    }
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
    member_of: HashMap<Member, u64>,
}

impl CpuMax {
    /// Start with no group. [`restore_ledger`] has run (at every start, in every mode).
    pub fn start(
        state_dir: &Path,
        floor_percent: u32,
        control_period: Duration,
    ) -> Result<Self, QuotaError> {
        Ok(Self {
            ledger: QuotaLedger::load(state_dir)?,
            floor_percent,
            control_period,
            groups: HashMap::new(),
            member_of: HashMap::new(),
        })
    }

    /// Enforce on container `id` (cgroup `cgroup_id`), whose quota group, the nearest cgroup
    /// with a quota, is `quota_group`; `None` when nothing above it has one.
    pub fn join(&mut self, id: &str, cgroup_id: u64, quota_group: Option<(u64, PathBuf)>) {
        let Some((group_id, dir)) = quota_group else {
            tracing::info!(
                id,
                "no CFS quota on the container's cgroup or above: cpumax leaves it alone (its softirq cost is measured, not deducted)"
            );
            return;
        };
        let member = (id.to_owned(), cgroup_id);
        if let Some(group) = self.groups.get_mut(&group_id) {
            group.members.insert(member.clone());
            self.member_of.insert(member, group_id);
            return;
        }
        let read = QuotaFiles::at(&dir).and_then(|files| Ok((files.read()?, files)));
        let (base, files) = match read {
            Ok((base, files)) if base.quota_us.is_some() => (base, files),
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(id, "not enforced: {e}");
                return;
            }
        };
        let Some(ino) = files.ino() else { return };
        tracing::info!(id, quota_cgroup = %dir.display(), quota_us = base.quota_us, period_us = base.period_us, "cpumax enforces on the nearest CFS quota");
        let mut group = Group {
            stat: files.periods(),
            files,
            ino,
            base,
            floor_us: 0,
            written: None,
            debt_ns: 0,
            forgiven_ns: 0,
            over_budget: false,
            softirq_per_period_us: 0,
            writes: 0,
            since_write: WRITE_EVERY,
            members: BTreeSet::from([member.clone()]),
        };
        group.adopt(base, self.floor_percent);
        self.groups.insert(group_id, group);
        self.member_of.insert(member, group_id);
    }

    /// Container `id` (cgroup `cgroup_id`) is gone; the last of a group restores its base.
    pub fn leave(&mut self, id: &str, cgroup_id: u64) {
        let member = (id.to_owned(), cgroup_id);
        let Some(key) = self.member_of.remove(&member) else {
            return;
        };
        let emptied = self.groups.get_mut(&key).is_some_and(|g| {
            g.members.remove(&member);
            g.members.is_empty()
        });
        if emptied {
            if let Some(group) = self.groups.remove(&key) {
                self.restore(group);
            }
        }
    }

    /// Restore every group's base (doved stops).
    pub fn restore_all(&mut self) {
        let groups: Vec<Group> = self.groups.drain().map(|(_, g)| g).collect();
        self.member_of.clear();
        for group in groups {
            self.restore(group);
        }
    }

    /// Put the base back if the file still holds what the controller wrote (a change by
    /// someone else since is theirs to keep), and drop the ledger's entry.
    fn restore(&mut self, group: Group) {
        if let (Some(written), Ok(current)) = (group.written, group.files.read()) {
            if current == written && written != group.base {
                match group.files.write(group.base) {
                    Ok(()) => {
                        tracing::info!(cgroup = %group.files.dir.display(), "CFS quota restored to its base")
                    }
                    Err(e) => {
                        tracing::error!(
                            "restoring a CFS quota: {e}; the ledger keeps it for the next start"
                        );
                        return;
                    }
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
        let floor_percent = self.floor_percent;
        let ahead = (self.control_period * WRITE_EVERY).max(HORIZON);
        for (&key, group) in self.groups.iter_mut() {
            // Gone with its container (the registry reports the removal): its pending
            // stays in the map until then.
            group.over_budget = false;
            let Ok(current) = group.files.read() else {
                continue;
            };
            let pending = take_pending(key);
            if current != group.written.unwrap_or(group.base) {
                tracing::info!(cgroup = %group.files.dir.display(), was = ?group.base, now = ?current, "the CFS quota was changed by someone else: adopted as the new base");
                group.adopt(current, floor_percent);
                if self.ledger.file.bases.contains_key(&group.files.dir) {
                    // Durable before anything is lowered from the new base.
                    self.ledger
                        .file
                        .bases
                        .insert(group.files.dir.clone(), group.entry());
                    if let Err(e) = self.ledger.save() {
                        tracing::error!("{e}");
                    }
                }
            }
            let stat = group.files.periods();
            let Some(base_quota) = group.base.quota_us else {
                // The quota was lifted: nothing to lower until one is set again.
                group.debt_ns = 0;
                group.stat = stat;
                continue;
            };
            // What the quota in force took back, over the periods that really ran (under
            // emulation or when idle they are fewer than wall-clock time says).
            let periods = match (stat, group.stat) {
                (Some((now, _)), Some((before, _))) => now.saturating_sub(before),
                _ => (elapsed.as_nanos() / (group.base.period_us as u128 * 1000).max(1)) as u64,
            };
            let deducted = base_quota.saturating_sub(current.quota_us.unwrap_or(base_quota));
            let debt = settle(group.debt_ns, deducted, periods).saturating_add(pending);
            group.softirq_per_period_us = (pending as u128 * group.base.period_us as u128
                / elapsed.max(self.control_period).as_nanos().max(1))
                as u64;
            group.since_write = group.since_write.saturating_add(1);
            let p = plan(
                base_quota,
                group.floor_us,
                group.base.period_us,
                debt,
                ahead,
            );
            group.debt_ns = p.debt_ns;
            group.forgiven_ns = group.forgiven_ns.saturating_add(p.forgiven_ns);
            group.over_budget = p.forgiven_ns > 0;
            let throttled =
                matches!((stat, group.stat), (Some((_, t)), Some((_, before))) if t > before);
            group.stat = stat;
            let next = Bandwidth {
                quota_us: Some(p.quota_us),
                period_us: group.base.period_us,
            };
            // One step either way is noise in the estimate, not worth a refill; the base
            // and the floor are always worth reaching.
            let step = (base_quota.saturating_sub(group.floor_us) / STEPS).max(1);
            let now_us = current.quota_us.unwrap_or(base_quota);
            let small = p.quota_us.abs_diff(now_us) <= step
                && p.quota_us != base_quota
                && p.quota_us != group.floor_us;
            if next == current || small || group.since_write < WRITE_EVERY {
                continue;
            }
            if next != group.base && !self.ledger.file.bases.contains_key(&group.files.dir) {
                // The base is durable before anything is lowered.
                self.ledger
                    .file
                    .bases
                    .insert(group.files.dir.clone(), group.entry());
                if let Err(e) = self.ledger.save() {
                    tracing::error!("{e}; not lowering {}", group.files.dir.display());
                    self.ledger.file.bases.remove(&group.files.dir);
                    continue;
                }
            }
            // Someone else may have written since the read at the top (the plan took the
            // ledger's fsync, perhaps): leave their value for the next control to adopt
            // rather than overwrite it. This narrows the race to the two syscalls; cgroup
            // files have no compare-and-swap to close it.
            if group.files.read().ok() != Some(current) {
                continue;
            }
            match group.files.write(next) {
                Ok(()) => {
                    group.written = Some(next);
                    group.writes += 1;
                    group.since_write = 0;
                    // The write refilled the group's runtime and unthrottled it: a group
                    // that was being held back got runtime it did not pay for.
                    if throttled {
                        group.debt_ns = group.debt_ns.saturating_add(p.quota_us * 500);
                    }
                }
                Err(e) => tracing::warn!("lowering a CFS quota: {e}"),
            }
        }
    }

    /// What the quota of container `id` (cgroup `cgroup_id`) can pay for, if enforced.
    pub fn budget_of(&self, id: &str, cgroup_id: u64) -> Option<Budget> {
        let key = self.member_of.get(&(id.to_owned(), cgroup_id))?;
        let g = self.groups.get(key)?;
        let room_us = g.base.quota_us?.saturating_sub(g.floor_us);
        Some(Budget {
            over: g.over_budget,
            absorbable_ns_per_s: (room_us as u128 * 1_000_000_000 / g.base.period_us.max(1) as u128)
                as u64,
        })
    }

    /// The group container `id` (cgroup `cgroup_id`) belongs to, if enforced.
    pub fn status_of(&self, id: &str, cgroup_id: u64) -> Option<QuotaState> {
        let key = self.member_of.get(&(id.to_owned(), cgroup_id))?;
        self.groups.get(key).map(|g| QuotaState {
            cgroup: g.files.dir.display().to_string(),
            period_us: g.base.period_us,
            base_quota_us: g.base.quota_us.unwrap_or(0),
            effective_quota_us: g
                .written
                .and_then(|w| w.quota_us)
                .or(g.base.quota_us)
                .unwrap_or(0),
            softirq_per_period_us: g.softirq_per_period_us,
            debt_ns: g.debt_ns,
            forgiven_ns: g.forgiven_ns,
            writes: g.writes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bw(quota_us: Option<u64>, period_us: u64) -> Bandwidth {
        Bandwidth {
            quota_us,
            period_us,
        }
    }

    #[test]
    fn parses_both_layouts() {
        assert_eq!(Bandwidth::parse_v2("max 100000\n"), Some(bw(None, 100_000)));
        assert_eq!(
            Bandwidth::parse_v2("20000 50000"),
            Some(bw(Some(20_000), 50_000))
        );
        assert_eq!(Bandwidth::parse_v2("max"), Some(bw(None, 100_000)));
        assert_eq!(Bandwidth::parse_v2("20000 0"), None);
        assert_eq!(Bandwidth::parse_v2("-5 100000"), None);
        assert_eq!(Bandwidth::parse_v2("1 2 3"), None);
        assert_eq!(Bandwidth::parse_v2(""), None);
        assert_eq!(
            Bandwidth::parse_v1("-1\n", "100000\n"),
            Some(bw(None, 100_000))
        );
        assert_eq!(
            Bandwidth::parse_v1("50000", "100000"),
            Some(bw(Some(50_000), 100_000))
        );
        assert_eq!(Bandwidth::parse_v1("x", "100000"), None);
    }

    #[test]
    fn the_floor_holds_burst_and_kernel_minimum_included() {
        assert_eq!(floor_us(50_000, 10, 0), 5_000);
        assert_eq!(
            floor_us(50_000, 10, 20_000),
            20_000,
            "under the burst: EINVAL"
        );
        assert_eq!(floor_us(2_000, 1, 0), MIN_QUOTA_US);
        assert_eq!(floor_us(500, 1, 0), 500, "never over the base");
    }

    #[test]
    fn debt_is_spread_in_steps_and_the_quota_returns() {
        let tick = Duration::from_millis(100);
        // 50 ms per 100 ms, floor 5 ms: 45 ms may go, in steps of 4.5 ms.
        let p = plan(50_000, 5_000, 100_000, 20_000_000, tick);
        assert_eq!(
            p.quota_us,
            50_000 - 18_000,
            "20 ms of debt: four whole steps"
        );
        assert_eq!(
            p.debt_ns, 20_000_000,
            "paid as the periods run, settled next time"
        );
        // More than a period can take: the floor.
        assert_eq!(
            plan(50_000, 5_000, 100_000, 100_000_000, tick).quota_us,
            5_000
        );
        // Less than a step waits for more (a write refills the group's runtime).
        assert_eq!(
            plan(50_000, 5_000, 100_000, 4_000_000, tick).quota_us,
            50_000
        );
        assert_eq!(plan(50_000, 5_000, 100_000, 0, tick).quota_us, 50_000);
        // What the periods that ran took back.
        assert_eq!(settle(20_000_000, 18_000, 1), 2_000_000);
        assert_eq!(settle(20_000_000, 18_000, 3), 0);
        assert_eq!(
            settle(20_000_000, 18_000, 0),
            20_000_000,
            "no period ran: nothing paid"
        );
    }

    #[test]
    fn carry_is_bounded_and_the_excess_forgiven() {
        let tick = Duration::from_millis(100);
        let room = 45_000_000u64; // ns per period
        let p = plan(50_000, 5_000, 100_000, room * 100, tick);
        assert_eq!(p.quota_us, 5_000);
        assert_eq!(p.debt_ns, room + room * CARRY_PERIODS);
        assert_eq!(p.forgiven_ns, room * 100 - room - room * CARRY_PERIODS);
        // Overflow-proof at the extremes.
        let p = plan(u64::MAX / 2, 0, 1, u64::MAX, Duration::from_nanos(1));
        assert_eq!(p.quota_us, 0);
        let p = plan(
            u64::MAX / 2,
            MIN_QUOTA_US,
            u64::MAX,
            u64::MAX,
            Duration::MAX,
        );
        assert!(p.quota_us >= MIN_QUOTA_US);
        assert_eq!(settle(u64::MAX, u64::MAX, u64::MAX), 0);
    }

    #[test]
    fn period_and_control_interval_scale_the_deduction() {
        // A 20 ms period and a 100 ms control interval: five periods share the debt.
        let p = plan(
            10_000,
            1_000,
            20_000,
            10_000_000,
            Duration::from_millis(100),
        );
        assert_eq!(
            p.quota_us,
            10_000 - 1_800,
            "2 ms per period, rounded down to a step"
        );
    }

    /// The controller on plain files shaped like a v2 cgroup: lowering writes the ledger
    /// first; an outside change is adopted; a restore puts back only what it wrote.
    #[test]
    fn controller_ledger_adoption_and_restore() {
        let state = tempfile::tempdir().unwrap();
        let cg = tempfile::tempdir().unwrap();
        let write = |text: &str| std::fs::write(cg.path().join("cpu.max"), text).unwrap();
        let read = || std::fs::read_to_string(cg.path().join("cpu.max")).unwrap();
        write("50000 100000");
        let stat = |periods: u64| {
            std::fs::write(
                cg.path().join("cpu.stat"),
                format!("usage_usec 1\nnr_periods {periods}\nnr_throttled 0\n"),
            )
            .unwrap()
        };
        stat(0);
        let tick = Duration::from_millis(100);
        let mut c = CpuMax::start(state.path(), 10, tick).unwrap();
        c.join("a", 7, Some((1, cg.path().to_owned())));
        let ledger = || std::fs::read_to_string(state.path().join(LEDGER_FILE)).unwrap_or_default();

        // Planned over WRITE_EVERY ticks (5 periods): 100 ms of debt is 20 ms a period.
        c.control(|_| 100_000_000, tick);
        assert_eq!(read(), "32000 100000");
        assert!(
            ledger().contains("50000"),
            "the base is durable before lowering: {}",
            ledger()
        );
        // Five periods ran at 32 ms: 90 ms paid, 10 ms left, under a step (22.5 ms over
        // five periods): the base returns, but only once WRITE_EVERY controls passed.
        stat(5);
        for _ in 1..WRITE_EVERY {
            c.control(|_| 0, tick);
            assert_eq!(read(), "32000 100000", "written again too soon");
        }
        c.control(|_| 0, tick);
        assert_eq!(read(), "50000 100000");
        assert_eq!(c.status_of("a", 7).unwrap().debt_ns, 10_000_000);

        // `pending` now, then controls until a write was allowed.
        let run = |c: &mut CpuMax, pending: u64| {
            c.control(|_| pending, tick);
            for _ in 1..WRITE_EVERY {
                c.control(|_| 0, tick);
            }
        };

        // Someone else sets 80 ms while it is lowered: adopted, and the ledger follows.
        run(&mut c, 200_000_000);
        assert_ne!(read(), "50000 100000");
        write("80000 100000");
        c.control(|_| 0, tick);
        assert_eq!(c.status_of("a", 7).unwrap().base_quota_us, 80_000);
        assert!(ledger().contains("80000"), "{}", ledger());

        // A crash while lowered: the next start's restore puts the base back.
        run(&mut c, 200_000_000);
        assert_ne!(read(), "80000 100000");
        drop(c);
        assert_eq!(restore_ledger(state.path()).unwrap(), 1);
        assert_eq!(read(), "80000 100000");

        // A value the controller could not have written is left alone.
        let mut c = CpuMax::start(state.path(), 10, tick).unwrap();
        c.join("a", 7, Some((1, cg.path().to_owned())));
        run(&mut c, 200_000_000);
        assert_ne!(read(), "80000 100000");
        write("300 100000");
        drop(c);
        assert_eq!(restore_ledger(state.path()).unwrap(), 0);
        assert_eq!(read(), "300 100000");

        // Leaving restores at once, unless someone else changed it meanwhile.
        write("80000 100000");
        let mut c = CpuMax::start(state.path(), 10, tick).unwrap();
        c.join("a", 7, Some((1, cg.path().to_owned())));
        run(&mut c, 200_000_000);
        assert_ne!(read(), "80000 100000");
        c.leave("a", 7);
        assert_eq!(read(), "80000 100000");
        assert!(!ledger().contains("80000"), "{}", ledger());
        // Another ID of the same name in another cgroup leaving changes nothing.
        c.join("a", 7, Some((1, cg.path().to_owned())));
        run(&mut c, 200_000_000);
        c.leave("a", 8);
        assert!(c.status_of("a", 7).is_some());
        c.restore_all();
        assert_eq!(read(), "80000 100000");
    }
}
