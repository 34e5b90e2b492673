//! The eBPF observer: loads DOVE's programs into the running kernel, keeps the map of
//! registered cgroups in step with the registry, and turns the per-CPU cost entries into
//! the global cost map each tick.
//!
//! Maps are pinned under `pin_dir` (default `/sys/fs/bpf/dove`), so a restarted daemon
//! continues the same counters. Links are owned by the daemon process, not pinned: when
//! it dies they detach, so a restart never leaves the programs attached twice, and an
//! exclusive lock on `pin_dir` keeps two daemons from sharing one set of maps.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray};
use aya::programs::cgroup_skb::CgroupSkbLinkId;
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, RawTracePoint};
use aya::{Ebpf, EbpfLoader};

use super::ingress_limit::IngressLimiter;
use dove_ebpf_common::{
    CpuCost, GlobalCost, KernelOffsets, Settings, WindowState, BASE_MAP, COST_MAP, ENFORCE_MAP,
    KERNEL_OFFSETS_MAP, MAX_SLOTS, NO_PACKET, PERCPU_COST_MAP, SETTINGS_MAP,
    SETTINGS_PENDING_FOR_ENFORCER, SLOTS_MAP, SLOT_CAPACITY_GLOBAL, UNATTRIBUTED_SLOT, WINDOW_MAP,
};

/// The compiled programs (built by build.rs from `ebpf/programs`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dove.bpf.o"));

/// Oldest kernel with everything used here: cgroup bpf_link (5.7), mmapable arrays (5.5),
/// raw tracepoints (4.17), `bpf_skb_ancestor_cgroup_id` (4.19).
pub const MIN_KERNEL: (u32, u32) = (5, 8);

#[derive(Debug, thiserror::Error)]
pub enum ObserverError {
    #[error("kernel {found} is older than {}.{}, the oldest DOVE's observer supports (cgroup bpf links, mmapable BPF arrays)", MIN_KERNEL.0, MIN_KERNEL.1)]
    KernelTooOld { found: String },
    #[error("the kernel has no BTF (/sys/kernel/btf/vmlinux is missing): build it with CONFIG_DEBUG_INFO_BTF=y")]
    NoBtf,
    #[error("missing capabilities {missing}: doved needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (or CAP_SYS_ADMIN) to load and attach its programs; run it as root or grant them (AmbientCapabilities= in the unit)")]
    Capabilities { missing: String },
    #[error("bpffs is not mounted at {path} and mounting it failed: {source}; mount it (`mount -t bpf bpf /sys/fs/bpf`) or set observer.pin_dir under a bpffs mount")]
    Bpffs { path: PathBuf, source: nix::Error },
    #[error("{path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another doved is using the maps pinned at {0}: stop it, or set observer.pin_dir to another directory")]
    PinDirBusy(PathBuf),
    #[error("loading the eBPF programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("{what}: {source}")]
    Program {
        what: String,
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {detail}")]
    Map { name: &'static str, detail: String },
    #[error("all {0} cost slots are in use: raise observer.max_containers (takes effect once the pinned maps are gone: next boot, or stop doved and remove observer.pin_dir) or unregister containers")]
    SlotsFull(u32),
    #[error("enforcement.mode = \"kernel\" but this kernel has no DOVE scheduler patch ({SLOT_SYSCTL} is missing): boot a kernel built with kernel-patch/ and CONFIG_SCHED_DOVE=y, or set enforcement.mode = \"auto\" or \"none\"")]
    KernelUnpatched,
    #[error("handing the cost maps to the scheduler through {path}: {source}")]
    KernelHandoff {
        path: &'static str,
        source: std::io::Error,
    },
}

/// The sysctls of the DOVE scheduler patch (kernel-patch/).
pub const SLOT_SYSCTL: &str = "/proc/sys/kernel/sched_dove_slot_map";
pub const COST_SYSCTL: &str = "/proc/sys/kernel/sched_dove_cost_map";

/// Whether the running kernel carries the DOVE scheduler patch.
pub fn kernel_patched() -> bool {
    Path::new(SLOT_SYSCTL).exists() && Path::new(COST_SYSCTL).exists()
}

/// The nearest cgroup at or above `path` in the `cpu` hierarchy that has a CFS quota,
/// by its ID: the task group whose runtime the scheduler refills.
pub fn quota_group(cpu: &dove_cgroup::Hierarchy, path: &str) -> Option<u64> {
    quota_dir(cpu, path).map(|(id, _)| id)
}

/// [`quota_group`], with the group's directory.
pub fn quota_dir(cpu: &dove_cgroup::Hierarchy, path: &str) -> Option<(u64, PathBuf)> {
    use std::os::unix::fs::MetadataExt;
    let mut dir = cpu.dir(path).ok()?;
    // From the container's own cgroup only: a missing one would hand its search to
    // whatever ancestor of that path has a quota.
    if !dir.is_dir() {
        return None;
    }
    loop {
        let v2 = std::fs::read_to_string(dir.join("cpu.max"))
            .ok()
            .map(|s| s.split_whitespace().next() != Some("max"));
        let v1 = || {
            std::fs::read_to_string(dir.join("cpu.cfs_quota_us"))
                .ok()
                .map(|s| s.trim() != "-1")
        };
        if v2.or_else(v1) == Some(true) {
            let id = std::fs::metadata(&dir).ok()?.ino();
            return Some((id, dir));
        }
        if dir == cpu.mount_point || !dir.pop() {
            return None;
        }
    }
}

/// A shared mapping of a `BPF_F_MMAPABLE` array.
struct Mapped<T> {
    ptr: NonNull<T>,
    len: usize,
    bytes: NonZeroUsize,
}

// SAFETY: the mapping is plain memory shared with the kernel; all access goes through
// volatile reads/writes or atomics.
unsafe impl<T> Send for Mapped<T> {}

impl<T> Mapped<T> {
    fn new(fd: &impl AsFd, len: usize, name: &'static str) -> Result<Self, ObserverError> {
        let page = 4096usize;
        let bytes = (len * std::mem::size_of::<T>()).div_ceil(page) * page;
        let bytes = NonZeroUsize::new(bytes).expect("maps are never empty");
        // SAFETY: mapping a BPF array fd; the kernel checks size and flags.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                bytes,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }
        .map_err(|e| ObserverError::Map {
            name,
            detail: format!("mmap failed: {e} (the map must be created with BPF_F_MMAPABLE; remove stale pins from an older DOVE)"),
        })?;
        Ok(Self {
            ptr: ptr.cast(),
            len,
            bytes,
        })
    }

    fn at(&self, index: usize) -> *mut T {
        assert!(
            index < self.len,
            "index {index} past the mapped {} entries",
            self.len
        );
        // SAFETY: in bounds of the mapping.
        unsafe { self.ptr.as_ptr().add(index) }
    }

    fn read(&self, index: usize) -> T {
        // SAFETY: in bounds; T is plain data; the kernel writes concurrently, hence volatile.
        unsafe { std::ptr::read_volatile(self.at(index)) }
    }
}

impl<T> Drop for Mapped<T> {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped.
        unsafe {
            let _ = nix::sys::mman::munmap(self.ptr.cast(), self.bytes.get());
        }
    }
}

/// A u64 field of a mapped value, for atomic access shared with an enforcer.
fn atomic_field(ptr: *mut u64) -> &'static AtomicU64 {
    // SAFETY: u64 fields of a page-aligned mapping are 8-byte aligned; the mapping lives
    // as long as the observer, and callers do not keep the reference beyond a call.
    unsafe { AtomicU64::from_ptr(ptr) }
}

/// One slot's cost, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    pub rx_ns: u64,
    pub tx_ns: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub total_ns: u64,
    pub pending_ns: u64,
}

/// The programs' own counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Health {
    pub windows: u64,
    pub packets_in_window: u64,
    pub packets_outside_window: u64,
    pub unowned_windows: u64,
    pub owner_lookups: u64,
    pub packets_started: u64,
    pub packets_without_socket: u64,
    pub stale_windows: u64,
    pub dropped_stretches: u64,
    pub xmits_started: u64,
    pub transmit_callbacks: u64,
}

/// What the last tick saw.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// cgroup v2 ID → cost.
    pub by_cgroup: HashMap<u64, Cost>,
    pub unattributed: Cost,
    pub health: Health,
    /// Tracepoint attachments plus cgroup_skb links.
    pub programs_attached: usize,
    /// Cgroups the cgroup_skb programs are attached at (the outermost registered ones).
    pub hooked_cgroups: usize,
    pub slots_used: usize,
    pub slots_capacity: u32,
    pub tick_duration_ns: u64,
    pub ticks: u64,
}

pub struct Observer {
    _ebpf: Ebpf,
    _lock: nix::fcntl::Flock<std::fs::File>,
    slots: BpfHashMap<MapData, u64, u32>,
    /// attribution cgroup ID → the quota group it is charged to.
    enforce_key: HashMap<u64, u64>,
    /// quota group → the slot the scheduler reads for it. Containers sharing a quota
    /// group fold their cost into that one slot's pending counter.
    enforce_slot: HashMap<u64, u32>,
    settings: Array<MapData, Settings>,
    windows: PerCpuArray<MapData, WindowState>,
    percpu: Mapped<CpuCost>,
    cost: Mapped<GlobalCost>,
    /// Per slot: what it had before the per-CPU map was last created afresh.
    base: Mapped<CpuCost>,
    nr_cpus: usize,
    /// Slots per CPU row (registered containers + the unattributed slot).
    capacity: u32,
    /// cgroup ID → (slot, level).
    owned: HashMap<u64, (u32, u32)>,
    /// `owned` as (cgroup ID, slot) in slot order, and the generation it was built at:
    /// the tick walks the maps in address order, which the prefetcher follows (at 10,000
    /// containers, hash order made the tick a third slower).
    tick_order: (Option<u32>, Vec<(u64, u32)>),
    free: BTreeSet<u32>,
    /// Slots released recently, with the tick at which they may be reused: programs on
    /// other CPUs may still be adding to them for a moment after the release.
    quarantine: Vec<(u32, u64)>,
    tracepoints_attached: usize,
    socket_hooks: SocketHooks,
    ticks: u64,
    /// Last [`Settings::generation`] published.
    generation: u32,
    /// Levels a previous doved published, kept until the registry has reported every
    /// container again ([`Observer::retain`]): adopted slots do not know their level.
    inherited_levels: u64,
    /// [`Settings::flags`] as published.
    flags: u32,
    /// [`Settings::level_mask`] as published.
    published_mask: u64,
    /// Whether new cost is added to the pending counters (an enforcer consumes them).
    accrue_pending: bool,
    /// Early drop's program and buckets; `None` when the kernel refused the program.
    ingress: Option<IngressLimiter>,
}

/// Where the cgroup_skb programs are attached: at every registered cgroup that has no
/// registered ancestor. A program attached at a cgroup runs for its descendants' sockets
/// too, so attaching below an attached cgroup would run it twice per packet.
struct SocketHooks {
    /// The cgroup v2 hierarchy the registered paths are in.
    cgroups: dove_cgroup::Hierarchy,
    programs: Vec<(&'static str, CgroupSkbAttachType)>,
    /// Registered cgroups, by path in the v2 hierarchy, with how many registered cgroup
    /// IDs have that path (two for a moment when a cgroup is made again at a path and
    /// registered before the old one's removal is seen).
    registered: BTreeMap<String, u32>,
    /// Outermost registered cgroup → the inode of the directory its links hold, and the
    /// links, one per program.
    attached: BTreeMap<String, (u64, Links)>,
}

/// A cgroup's socket program links, by program name.
type Links = Vec<(&'static str, CgroupSkbLinkId)>;

impl SocketHooks {
    fn new(
        cgroups: &dove_cgroup::Hierarchy,
        programs: Vec<(&'static str, CgroupSkbAttachType)>,
    ) -> Self {
        Self {
            cgroups: cgroups.clone(),
            programs,
            registered: BTreeMap::new(),
            attached: BTreeMap::new(),
        }
    }

    fn links(&self) -> usize {
        self.attached.values().map(|(_, links)| links.len()).sum()
    }

    fn add(&mut self, ebpf: &mut Ebpf, path: &str) {
        let count = self.registered.entry(path.to_owned()).or_insert(0);
        *count += 1;
        if *count > 1 {
            // The path again: if its cgroup was made anew, the links held the old one,
            // which the kernel detached when it died.
            let now = self
                .cgroups
                .dir(path)
                .ok()
                .and_then(|d| dove_cgroup::cgroup_id(&d).ok());
            if self
                .attached
                .get(path)
                .is_some_and(|(held, _)| Some(*held) != now)
            {
                self.detach(ebpf, path);
                self.attach(ebpf, path);
            }
            return;
        }
        if has_ancestor(path, |a| self.attached.contains_key(a)) {
            return;
        }
        // Attach here before detaching below: for a moment a packet may run the programs
        // twice (its packet counted twice, its time once), never none. If this attach
        // fails, the descendants keep theirs.
        if !self.attach(ebpf, path) {
            return;
        }
        let from = below_prefix(path);
        let below = descendants(self.attached.range(from..).map(|(p, _)| p), path);
        for inner in below {
            self.detach(ebpf, &inner);
        }
    }

    fn remove(&mut self, ebpf: &mut Ebpf, path: &str) {
        // Not attached: covered by an attached ancestor, or its attach failed and its
        // registered descendants attached on their own.
        match self.registered.get_mut(path) {
            Some(count) if *count > 1 => {
                *count -= 1;
                return;
            }
            Some(_) => {
                self.registered.remove(path);
            }
            None => return,
        }
        if !self.attached.contains_key(path) {
            return;
        }
        // Nothing above `path` is attached, or it would not be: its outermost registered
        // descendants are uncovered once it goes.
        let from = below_prefix(path);
        let below = descendants(self.registered.range(from..).map(|(p, _)| p), path);
        for inner in outermost(below) {
            self.attach(ebpf, &inner);
        }
        self.detach(ebpf, path);
    }

    /// Attach every socket program at `path`, or none; whether it did.
    fn attach(&mut self, ebpf: &mut Ebpf, path: &str) -> bool {
        let opened = self
            .cgroups
            .dir(path)
            .map_err(|e| e.to_string())
            .and_then(|dir| {
                std::fs::File::open(&dir)
                    .map(|f| (dir.clone(), f))
                    .map_err(|e| format!("{}: {e}", dir.display()))
            });
        let (dir, cgroup) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                // Removed meanwhile: the registry forgets it on its own.
                tracing::warn!(
                    cgroup = path,
                    "cannot attach DOVE's socket programs: {e}; its packets go unattributed"
                );
                return false;
            }
        };
        let mut links = Vec::with_capacity(self.programs.len());
        for &(name, kind) in &self.programs {
            let attached = program::<CgroupSkb>(ebpf, name).and_then(|p| {
                // `Single` makes a bpf_link, which stacks with other programs here;
                // AllowMultiple through a link is refused with EINVAL on some kernels.
                p.attach(&cgroup, kind, CgroupAttachMode::Single)
                    .map_err(|source| ObserverError::Program {
                        what: format!("attaching {name} at {}", dir.display()),
                        source,
                    })
            });
            match attached {
                Ok(link) => links.push((name, link)),
                Err(e) => {
                    tracing::error!(
                        cgroup = path,
                        "{e}; its packets go unattributed (EMFILE: raise doved's open-file limit; EPERM: CAP_NET_ADMIN is missing)"
                    );
                    release(ebpf, links);
                    return false;
                }
            }
        }
        let held = dove_cgroup::cgroup_id(&dir).unwrap_or(0);
        self.attached.insert(path.to_owned(), (held, links));
        true
    }

    fn detach(&mut self, ebpf: &mut Ebpf, path: &str) {
        if let Some((_, links)) = self.attached.remove(path) {
            release(ebpf, links);
        }
    }
}

fn release(ebpf: &mut Ebpf, links: Links) {
    for (name, link) in links {
        // A link whose cgroup is gone detached itself; closing it cannot fail.
        if let Ok(p) = program::<CgroupSkb>(ebpf, name) {
            let _ = p.detach(link);
        }
    }
}

/// Whether `path` lies strictly below `ancestor` in the cgroup tree.
fn is_below(path: &str, ancestor: &str) -> bool {
    let ancestor = ancestor.trim_end_matches('/');
    path.strip_prefix(ancestor)
        .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1)
}

/// Whether `is_there` holds for a strict ancestor of `path`.
fn has_ancestor(path: &str, is_there: impl Fn(&str) -> bool) -> bool {
    let mut at = path.trim_end_matches('/');
    while let Some(cut) = at.rfind('/') {
        at = &at[..cut];
        if is_there(if at.is_empty() { "/" } else { at }) {
            return true;
        }
    }
    false
}

/// The paths, in sorted order, that lie below none of the others.
fn outermost(sorted: Vec<String>) -> Vec<String> {
    let mut kept: Vec<String> = Vec::new();
    for path in sorted {
        // Against all kept, not the last: `/k/a-b` sorts between `/k/a` and `/k/a/x`.
        if !kept.iter().any(|o| is_below(&path, o)) {
            kept.push(path);
        }
    }
    kept
}

/// The first of the paths strictly below `path`: they all start with it, and sort
/// together from there.
fn below_prefix(path: &str) -> String {
    format!("{}/", path.trim_end_matches('/'))
}

/// The paths of `sorted` (starting at [`below_prefix`]) that are below `path`.
fn descendants<'a>(sorted: impl Iterator<Item = &'a String>, path: &str) -> Vec<String> {
    let prefix = below_prefix(path);
    sorted
        .take_while(|p| p.starts_with(&prefix))
        .cloned()
        .collect()
}

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn parse_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Checks that name the problem before anything is loaded.
pub fn preflight() -> Result<(), ObserverError> {
    let release = kernel_release();
    match parse_version(&release) {
        Some(v) if v >= MIN_KERNEL => {}
        _ => return Err(ObserverError::KernelTooOld { found: release }),
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(ObserverError::NoBtf);
    }
    if std::fs::read_to_string("/sys/kernel/realtime").is_ok_and(|s| s.trim() == "1") {
        tracing::warn!(
            "this is a PREEMPT_RT kernel: softirqs run in preemptible threads there, so a stretch can include a task that preempted it, and bills are overstated by that time"
        );
    }
    use caps::Capability::*;
    let effective = caps::read(None, caps::CapSet::Effective).unwrap_or_default();
    let has = |c| effective.contains(&c);
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !missing.is_empty() {
        return Err(ObserverError::Capabilities {
            missing: missing.join(", "),
        });
    }
    Ok(())
}

/// Mount bpffs at `/sys/fs/bpf` if `dir` is not already on one.
fn ensure_bpffs(dir: &Path) -> Result<(), ObserverError> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let on_bpffs = |p: &Path| {
        nix::sys::statfs::statfs(p)
            .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
            .unwrap_or(false)
    };
    let mut probe = dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if on_bpffs(&probe) {
        return Ok(());
    }
    let mount_point = Path::new("/sys/fs/bpf");
    if !dir.starts_with(mount_point) {
        return Err(ObserverError::Bpffs {
            path: dir.to_owned(),
            source: nix::Error::ENOTSUP,
        });
    }
    tracing::info!("bpffs is not mounted; mounting it at /sys/fs/bpf");
    nix::mount::mount(
        Some("bpf"),
        mount_point,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(|source| ObserverError::Bpffs {
        path: mount_point.to_owned(),
        source,
    })
}

impl Observer {
    /// Load and attach the tracepoint programs. `cgroups` is the cgroup v2 hierarchy in
    /// which [`Observer::hook_sockets`] attaches the cgroup_skb programs, one pair per
    /// outermost registered cgroup: sockets of unregistered cgroups run no DOVE program.
    /// `max_containers` sizes the slot maps when this start creates them; maps pinned by
    /// an earlier start keep their size, so no counter is lost to a changed setting.
    pub fn start(
        pin_dir: &Path,
        cgroups: &dove_cgroup::Hierarchy,
        egress: bool,
        max_containers: u32,
    ) -> Result<Self, ObserverError> {
        preflight()?;
        // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (64 KiB by default).
        use nix::sys::resource::{setrlimit, Resource, RLIM_INFINITY};
        if let Err(e) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
            tracing::warn!(
                "raising RLIMIT_MEMLOCK failed ({e}); a kernel before 5.11 may refuse the maps"
            );
        }
        ensure_bpffs(pin_dir)?;
        std::fs::create_dir_all(pin_dir).map_err(|source| ObserverError::PinDir {
            path: pin_dir.to_owned(),
            source,
        })?;
        let lock = lock_dir(pin_dir)?;
        let nr_cpus = aya::util::nr_cpus().map_err(|(what, e)| ObserverError::Map {
            name: PERCPU_COST_MAP,
            detail: format!("{what}: {e}"),
        })?;
        let mut capacity = slot_capacity(pin_dir, max_containers, nr_cpus);
        let mut percpu_entries = nr_cpus as u32 * capacity;
        remove_mismatched_pins(pin_dir, capacity, percpu_entries);
        // Which cost maps this start creates afresh (first start, or an upgrade that
        // changed one's layout): the other is rebased on it below, so bills continue.
        let mut fresh_percpu = !pin_dir.join(PERCPU_COST_MAP).exists();
        let mut fresh_cost = !pin_dir.join(COST_MAP).exists();
        let mut ebpf = match load(pin_dir, capacity, percpu_entries) {
            Ok(ebpf) => ebpf,
            Err(e) => {
                // Pins from an incompatible build (other map sizes or flags): start over
                // rather than refuse to run. Billing counters restart from zero.
                tracing::warn!(
                    "could not reuse the maps pinned at {}: {e}; removing them and starting fresh",
                    pin_dir.display()
                );
                for name in [
                    SLOTS_MAP,
                    ENFORCE_MAP,
                    PERCPU_COST_MAP,
                    COST_MAP,
                    SETTINGS_MAP,
                    WINDOW_MAP,
                    BASE_MAP,
                ] {
                    let _ = std::fs::remove_file(pin_dir.join(name));
                }
                (fresh_percpu, fresh_cost) = (true, true);
                // Nothing is kept, so the configured size applies now.
                capacity = configured_capacity(max_containers);
                percpu_entries = nr_cpus as u32 * capacity;
                load(pin_dir, capacity, percpu_entries)?
            }
        };
        // No window a previous doved saw open may be closed by these programs: its
        // mark could be seconds old. Nothing runs the programs until they attach below.
        reset_windows(&mut ebpf)?;
        publish_offsets(&mut ebpf)?;
        let mut attached = 0;
        attached += attach_raw_tracepoints(&mut ebpf, "dove_softirq_exit", &["softirq_exit"])?;
        attached += attach_raw_tracepoints(
            &mut ebpf,
            "dove_callback_exit",
            &[
                "timer_expire_exit",
                "hrtimer_expire_exit",
                "tasklet_exit",
                "workqueue_execute_end",
            ],
        )?;
        attached += attach_raw_tracepoints(&mut ebpf, "dove_packet_start", &["netif_receive_skb"])?;
        attached += attach_raw_tracepoints(&mut ebpf, "dove_xmit_start", &["net_dev_start_xmit"])?;
        attached += attach_raw_tracepoints(
            &mut ebpf,
            "dove_callback_entry",
            &[
                "timer_expire_entry",
                "hrtimer_expire_entry",
                "tasklet_entry",
                "workqueue_execute_start",
            ],
        )?;
        let mut socket_programs = vec![("dove_ingress", CgroupSkbAttachType::Ingress)];
        if egress {
            socket_programs.push(("dove_egress", CgroupSkbAttachType::Egress));
        }
        for (name, _) in &socket_programs {
            let program: &mut CgroupSkb = program(&mut ebpf, name)?;
            program.load().map_err(|source| ObserverError::Program {
                what: format!("loading {name}"),
                source,
            })?;
        }
        let ingress = match IngressLimiter::load(&mut ebpf) {
            Ok(limiter) => Some(limiter),
            Err(e) => {
                tracing::warn!("early drop is unavailable: {e}");
                None
            }
        };
        attached += attach_raw_tracepoints(&mut ebpf, "dove_softirq_entry", &["softirq_entry"])?;

        let percpu = Mapped::new(
            map_fd(&ebpf, PERCPU_COST_MAP)?,
            percpu_entries as usize,
            PERCPU_COST_MAP,
        )?;
        let cost = Mapped::new(map_fd(&ebpf, COST_MAP)?, capacity as usize, COST_MAP)?;
        let base = Mapped::new(map_fd(&ebpf, BASE_MAP)?, capacity as usize, BASE_MAP)?;
        let slots = take(&mut ebpf, SLOTS_MAP, BpfHashMap::try_from)?;
        {
            // Rebuilt from the registry as it reloads.
            let mut enforce = enforce_map(&mut ebpf)?;
            let stale: Vec<u64> = enforce.keys().filter_map(Result::ok).collect();
            for key in stale {
                let _ = enforce.remove(&key);
            }
        }
        let settings: Array<MapData, Settings> = take(&mut ebpf, SETTINGS_MAP, Array::try_from)?;
        // Continue from the pinned generation: restarting at a value some CPU's owner
        // cache still holds would let it serve a stale answer.
        let pinned = settings.get(&0, 0).unwrap_or_default();
        let windows = take(&mut ebpf, WINDOW_MAP, PerCpuArray::try_from)?;

        let mut observer = Self {
            _ebpf: ebpf,
            _lock: lock,
            slots,
            enforce_key: HashMap::new(),
            enforce_slot: HashMap::new(),
            settings,
            windows,
            percpu,
            cost,
            base,
            nr_cpus,
            owned: HashMap::new(),
            tick_order: (None, Vec::new()),
            capacity,
            free: (1..capacity).collect(),
            quarantine: Vec::new(),
            tracepoints_attached: attached,
            socket_hooks: SocketHooks::new(cgroups, socket_programs),
            ticks: 0,
            generation: pinned.generation,
            inherited_levels: pinned.level_mask,
            flags: pinned.flags,
            published_mask: pinned.level_mask,
            accrue_pending: false,
            ingress,
        };
        observer.adopt_pinned_slots();
        observer.rebase(fresh_percpu, fresh_cost);
        observer.publish_settings();
        tracing::info!(
            programs = attached,
            cpus = nr_cpus,
            slots_in_use = observer.owned.len(),
            pin_dir = %pin_dir.display(),
            "eBPF observer attached (softirq raw tracepoints; cgroup_skb programs attach at each registered cgroup under {})",
            cgroups.mount_point.display()
        );
        Ok(observer)
    }

    /// Slots that survived a restart in the pinned map keep their counters.
    /// Keep `DOVE_COST = DOVE_BASE + Σ DOVE_PERCPU_COST` across a start that created one
    /// of the cost maps afresh. A fresh per-CPU map: what the kept cost map holds becomes
    /// each slot's base (otherwise billing would stall until the new rows caught up). A
    /// fresh cost map: it is filled from the kept rows, with nothing pending (otherwise a
    /// container's whole history would land on its enforcer at once).
    fn rebase(&mut self, fresh_percpu: bool, fresh_cost: bool) {
        match (fresh_percpu, fresh_cost) {
            (true, false) => {
                for slot in 0..self.capacity as usize {
                    let c = self.cost.read(slot);
                    // SAFETY: in-bounds entry of doved's own map.
                    unsafe {
                        std::ptr::write_volatile(
                            self.base.at(slot),
                            CpuCost {
                                rx_ns: c.rx_ns,
                                tx_ns: c.tx_ns,
                                rx_packets: c.rx_packets,
                                tx_packets: c.tx_packets,
                            },
                        )
                    };
                }
                tracing::warn!(
                    "{PERCPU_COST_MAP} was created afresh; bills continue from {COST_MAP}"
                );
            }
            (false, true) => {
                let owner_of: HashMap<u32, u64> = self
                    .owned
                    .iter()
                    .map(|(id, (slot, _))| (*slot, *id))
                    .collect();
                for slot in 0..self.capacity {
                    let mut sum = self.base.read(slot as usize);
                    for cpu in 0..self.nr_cpus {
                        let c = self
                            .percpu
                            .read(cpu * self.capacity as usize + slot as usize);
                        sum.rx_ns += c.rx_ns;
                        sum.tx_ns += c.tx_ns;
                        sum.rx_packets += c.rx_packets;
                        sum.tx_packets += c.tx_packets;
                    }
                    // SAFETY: in-bounds entry; no enforcer has this fresh map yet.
                    unsafe {
                        std::ptr::write_volatile(
                            self.cost.at(slot as usize),
                            GlobalCost {
                                total_ns: sum.rx_ns + sum.tx_ns,
                                rx_ns: sum.rx_ns,
                                tx_ns: sum.tx_ns,
                                rx_packets: sum.rx_packets,
                                tx_packets: sum.tx_packets,
                                cgroup_id: owner_of.get(&slot).copied().unwrap_or(0),
                                ..Default::default()
                            },
                        )
                    };
                }
                tracing::warn!(
                    "{COST_MAP} was created afresh; bills continue from {PERCPU_COST_MAP}, nothing pending"
                );
            }
            (true, true) => {
                // Everything starts over: no base may linger from a previous layout.
                for slot in 0..self.capacity as usize {
                    // SAFETY: in-bounds entry of doved's own map.
                    unsafe { std::ptr::write_volatile(self.base.at(slot), CpuCost::default()) };
                }
            }
            (false, false) => {}
        }
    }

    fn adopt_pinned_slots(&mut self) {
        let entries: Vec<(u64, u32)> = self.slots.iter().filter_map(Result::ok).collect();
        for (cgroup_id, slot) in entries {
            if slot == UNATTRIBUTED_SLOT || slot >= self.capacity || !self.free.remove(&slot) {
                let _ = self.slots.remove(&cgroup_id);
                continue;
            }
            // The level is unknown until the registry reports the container again.
            self.owned.insert(cgroup_id, (slot, 0));
        }
    }

    /// Run the socket programs for `cgroup_path` (in the v2 hierarchy) and its
    /// descendants, unless a registered ancestor's attachment already covers it.
    pub fn hook_sockets(&mut self, cgroup_path: &str) {
        self.socket_hooks.add(&mut self._ebpf, cgroup_path);
    }

    /// Stop running the socket programs for `cgroup_path`; its registered descendants
    /// get attachments of their own.
    pub fn unhook_sockets(&mut self, cgroup_path: &str) {
        self.socket_hooks.remove(&mut self._ebpf, cgroup_path);
    }

    /// Early drop's limiter, when the kernel took its program.
    pub fn ingress_limiter(&mut self) -> Option<(&mut IngressLimiter, &mut Ebpf)> {
        self.ingress.as_mut().map(|l| (l, &mut self._ebpf))
    }

    /// Start charging `cgroup_id` (at cgroup level `level`) to its own slot, and, when
    /// `quota_group` is given, make its cost deductible from that group's quota.
    pub fn add(
        &mut self,
        cgroup_id: u64,
        level: u32,
        quota_group: Option<u64>,
    ) -> Result<(), ObserverError> {
        if let Some(entry) = self.owned.get_mut(&cgroup_id) {
            entry.1 = level;
            let slot = entry.0;
            self.publish_settings();
            self.set_quota_group(cgroup_id, slot, quota_group);
            return Ok(());
        }
        let slot = self.take_free_slot()?;
        // Fresh counters for the new owner before the programs can find the slot.
        for cpu in 0..self.nr_cpus {
            // SAFETY: in bounds; no program writes this slot while it is not in the map.
            unsafe {
                std::ptr::write_volatile(
                    self.percpu.at(cpu * self.capacity as usize + slot as usize),
                    CpuCost::default(),
                )
            };
        }
        // SAFETY: as above; enforcers key on cgroup_id and see the new owner from here.
        unsafe {
            std::ptr::write_volatile(self.base.at(slot as usize), CpuCost::default());
            std::ptr::write_volatile(
                self.cost.at(slot as usize),
                GlobalCost {
                    cgroup_id,
                    ..Default::default()
                },
            )
        };
        self.slots
            .insert(cgroup_id, slot, 0)
            .map_err(|e| ObserverError::Map {
                name: SLOTS_MAP,
                detail: e.to_string(),
            })?;
        self.owned.insert(cgroup_id, (slot, level));
        self.publish_settings();
        self.set_quota_group(cgroup_id, slot, quota_group);
        Ok(())
    }

    fn set_quota_group(&mut self, cgroup_id: u64, slot: u32, quota_group: Option<u64>) {
        if self.enforce_key.get(&cgroup_id).copied() == quota_group {
            return;
        }
        self.clear_quota_group(cgroup_id);
        let Some(key) = quota_group else {
            return;
        };
        self.enforce_key.insert(cgroup_id, key);
        if let std::collections::hash_map::Entry::Vacant(e) = self.enforce_slot.entry(key) {
            e.insert(slot);
            let inserted = enforce_map(&mut self._ebpf).and_then(|mut m| {
                m.insert(key, slot, 0).map_err(|e| ObserverError::Map {
                    name: ENFORCE_MAP,
                    detail: e.to_string(),
                })
            });
            if let Err(e) = inserted {
                tracing::error!(cgroup_id, "cost will not be enforced: {e}");
            }
        }
    }

    /// Stop deducting `cgroup_id`'s cost; if its slot was the one the scheduler reads
    /// for a shared quota group, hand that role to another member.
    fn clear_quota_group(&mut self, cgroup_id: u64) {
        let Some(key) = self.enforce_key.remove(&cgroup_id) else {
            return;
        };
        let own_slot = self.owned.get(&cgroup_id).map(|(s, _)| *s);
        if self.enforce_slot.get(&key).copied() != own_slot {
            return;
        }
        let heir = self
            .enforce_key
            .iter()
            .find(|(_, k)| **k == key)
            .and_then(|(id, _)| self.owned.get(id).map(|(s, _)| *s));
        match heir {
            Some(slot) => {
                self.enforce_slot.insert(key, slot);
                if let Ok(mut m) = enforce_map(&mut self._ebpf) {
                    let _ = m.insert(key, slot, 0);
                }
                // The group's unconsumed cost goes with its role, after the scheduler
                // reads the heir: what it took from the old slot meanwhile is consumed.
                if let Some(old) = own_slot {
                    self.move_pending(old, slot);
                }
            }
            None => {
                self.enforce_slot.remove(&key);
                if let Ok(mut m) = enforce_map(&mut self._ebpf) {
                    let _ = m.remove(&key);
                }
            }
        }
    }

    /// Take the cost that accrued for `quota_group` since the last call (ns), leaving zero:
    /// the exchange the patched scheduler does, for the cpu.max controller.
    pub fn take_pending(&self, quota_group: u64) -> u64 {
        let Some(&slot) = self.enforce_slot.get(&quota_group) else {
            return 0;
        };
        // SAFETY: in-bounds entry; pending_ns is shared through atomics.
        unsafe { atomic_field(&raw mut (*self.cost.at(slot as usize)).pending_ns) }
            .swap(0, Ordering::SeqCst)
    }

    /// Move `from`'s pending cost onto `to`'s.
    fn move_pending(&self, from: u32, to: u32) {
        // SAFETY: in-bounds entries; pending_ns is shared through atomics.
        let (from, to) = unsafe {
            (
                atomic_field(&raw mut (*self.cost.at(from as usize)).pending_ns),
                atomic_field(&raw mut (*self.cost.at(to as usize)).pending_ns),
            )
        };
        to.fetch_add(from.swap(0, Ordering::SeqCst), Ordering::SeqCst);
    }

    /// The slot whose pending counter `cgroup_id`'s cost is added to.
    fn pending_slot(&self, cgroup_id: u64, slot: u32) -> u32 {
        self.enforce_key
            .get(&cgroup_id)
            .and_then(|key| self.enforce_slot.get(key))
            .copied()
            .unwrap_or(slot)
    }

    /// Start or stop adding new cost to the pending counters. Starting over pending that
    /// did not accrue for an enforcer (a doved that was only measuring, or an older
    /// build) zeroes it first; stopping zeroes it, since nobody will consume it.
    pub fn accrue_pending(&mut self, on: bool) {
        let inherited_for_enforcer = self.flags & SETTINGS_PENDING_FOR_ENFORCER != 0;
        if !(on && inherited_for_enforcer) {
            let mut dropped = 0u64;
            for slot in 0..self.capacity as usize {
                let entry = self.cost.at(slot);
                // SAFETY: in-bounds entry; pending_ns is shared through atomics.
                dropped +=
                    unsafe { atomic_field(&raw mut (*entry).pending_ns) }.swap(0, Ordering::SeqCst);
            }
            if dropped > 0 {
                tracing::info!(
                    dropped_ms = dropped / 1_000_000,
                    "pending cost that no enforcer was consuming set to zero"
                );
            }
        }
        self.accrue_pending = on;
        if on {
            self.flags |= SETTINGS_PENDING_FOR_ENFORCER;
        } else {
            self.flags &= !SETTINGS_PENDING_FOR_ENFORCER;
        }
        self.publish_settings();
    }

    /// Hand the enforcement and cost maps to the patched scheduler.
    pub fn hand_to_kernel(&self) -> Result<(), ObserverError> {
        if !kernel_patched() {
            return Err(ObserverError::KernelUnpatched);
        }
        for (path, name) in [(SLOT_SYSCTL, ENFORCE_MAP), (COST_SYSCTL, COST_MAP)] {
            let fd = map_fd(&self._ebpf, name)?.as_fd().as_raw_fd();
            std::fs::write(path, format!("{fd}\n"))
                .map_err(|source| ObserverError::KernelHandoff { path, source })?;
        }
        Ok(())
    }

    /// What `cgroup_id` has cost so far (its slot folded over CPUs now), or None when it
    /// has no slot. The slot stays: a bill is written before its slot is let go.
    pub fn cost_of(&mut self, cgroup_id: u64) -> Option<Cost> {
        let &(slot, _) = self.owned.get(&cgroup_id)?;
        let pending_slot = self.pending_slot(cgroup_id, slot);
        Some(self.flush_slot(slot, pending_slot))
    }

    /// Stop charging `cgroup_id`; returns what it cost over its life (its final bill),
    /// or None when it had no slot.
    pub fn remove(&mut self, cgroup_id: u64) -> Option<Cost> {
        let &(slot, _) = self.owned.get(&cgroup_id)?;
        let _ = self.slots.remove(&cgroup_id);
        // Invalidate the programs' owner caches before the last flush, so nothing is
        // added to the slot after it.
        self.publish_settings();
        // The last cost still goes to the quota group it was charged to.
        let pending_slot = self.pending_slot(cgroup_id, slot);
        let last = self.flush_slot(slot, pending_slot);
        self.clear_quota_group(cgroup_id);
        self.owned.remove(&cgroup_id);
        self.quarantine.push((slot, self.ticks + 2));
        // And once more for the registered levels, now without this one.
        self.publish_settings();
        Some(last)
    }

    /// Forget every owner not in `keep` (after the registry reloaded).
    pub fn retain(&mut self, keep: &BTreeSet<u64>) {
        // Every kept container has been added again, with its level.
        self.inherited_levels = 0;
        let stale: Vec<u64> = self
            .owned
            .keys()
            .filter(|id| !keep.contains(id))
            .copied()
            .collect();
        for id in stale {
            // Slots a previous run left for cgroups nobody registered now: no container
            // to bill them to.
            self.remove(id);
        }
        self.publish_settings();
    }

    fn take_free_slot(&mut self) -> Result<u32, ObserverError> {
        let ticks = self.ticks;
        let (ready, waiting): (Vec<_>, Vec<_>) =
            self.quarantine.drain(..).partition(|(_, at)| *at <= ticks);
        self.quarantine = waiting;
        self.free.extend(ready.into_iter().map(|(slot, _)| slot));
        self.free
            .pop_first()
            .ok_or(ObserverError::SlotsFull(self.capacity - 1))
    }

    /// Publish the registered levels, and a new generation so that every CPU's owner
    /// cache resolves again; called after every change to the owner map.
    fn publish_settings(&mut self) {
        let mask = self
            .owned
            .values()
            .fold(self.inherited_levels, |m, (_, level)| {
                if *level > 0 && *level <= dove_ebpf_common::MAX_LEVEL {
                    m | (1u64 << level)
                } else {
                    m
                }
            });
        // A program reads the generation, then the mask, from a value the syscall
        // rewrites whole: mark the update in progress (odd generation, the old mask),
        // change the mask, then publish an even generation with it. A program never
        // caches an answer under a generation whose mask it may not have seen.
        let in_progress = self.generation | 1;
        let done = in_progress.wrapping_add(1).max(2);
        for (level_mask, generation) in [
            (self.published_mask, in_progress),
            (mask, in_progress),
            (mask, done),
        ] {
            let settings = Settings {
                level_mask,
                generation,
                flags: self.flags,
            };
            if let Err(e) = self.settings.set(0, settings, 0) {
                tracing::error!(
                    "updating {SETTINGS_MAP}: {e}; packets may be charged to stale owners"
                );
            }
        }
        self.generation = done;
        self.published_mask = mask;
    }

    /// Sum a slot over CPUs and publish it; returns the published cost. New cost is
    /// added to the pending counter of `pending_slot` (the slot itself, or the one the
    /// scheduler reads for a shared quota group).
    fn flush_slot(&mut self, slot: u32, pending_slot: u32) -> Cost {
        let mut sum = self.base.read(slot as usize);
        for cpu in 0..self.nr_cpus {
            let c = self
                .percpu
                .read(cpu * self.capacity as usize + slot as usize);
            sum.rx_ns += c.rx_ns;
            sum.tx_ns += c.tx_ns;
            sum.rx_packets += c.rx_packets;
            sum.tx_packets += c.tx_packets;
        }
        let published = self.cost.read(slot as usize);
        let cost_of = |g: GlobalCost| Cost {
            rx_ns: g.rx_ns,
            tx_ns: g.tx_ns,
            rx_packets: g.rx_packets,
            tx_packets: g.tx_packets,
            total_ns: g.total_ns,
            pending_ns: g.pending_ns,
        };
        if (sum.rx_ns, sum.tx_ns, sum.rx_packets, sum.tx_packets)
            == (
                published.rx_ns,
                published.tx_ns,
                published.rx_packets,
                published.tx_packets,
            )
        {
            // An idle slot (most of them on a crowded host): nothing to write.
            return cost_of(published);
        }
        let total = sum.rx_ns + sum.tx_ns;
        let global = self.cost.at(slot as usize);
        let pending = self.cost.at(pending_slot as usize);
        // SAFETY: fields of in-bounds entries; doved is the only writer of these fields
        // but pending_ns, which is shared with the scheduler through atomics.
        unsafe {
            if total > published.total_ns {
                if self.accrue_pending {
                    atomic_field(&raw mut (*pending).pending_ns)
                        .fetch_add(total - published.total_ns, Ordering::SeqCst);
                }
                std::ptr::write_volatile(&raw mut (*global).total_ns, total);
            }
            std::ptr::write_volatile(&raw mut (*global).rx_ns, sum.rx_ns);
            std::ptr::write_volatile(&raw mut (*global).tx_ns, sum.tx_ns);
            std::ptr::write_volatile(&raw mut (*global).rx_packets, sum.rx_packets);
            std::ptr::write_volatile(&raw mut (*global).tx_packets, sum.tx_packets);
        }
        cost_of(self.cost.read(slot as usize))
    }

    /// Aggregate every slot into the global cost map.
    pub fn tick(&mut self) -> Snapshot {
        let start = Instant::now();
        self.ticks += 1;
        let unattributed = self.flush_slot(UNATTRIBUTED_SLOT, UNATTRIBUTED_SLOT);
        // Every change to `owned` publishes a new generation.
        if self.tick_order.0 != Some(self.generation) || self.tick_order.1.len() != self.owned.len()
        {
            let mut order: Vec<(u64, u32)> = self
                .owned
                .iter()
                .map(|(id, (slot, _))| (*id, *slot))
                .collect();
            order.sort_unstable_by_key(|&(_, slot)| slot);
            self.tick_order = (Some(self.generation), order);
        }
        let order = std::mem::take(&mut self.tick_order.1);
        let mut by_cgroup = HashMap::with_capacity(order.len());
        for &(cgroup_id, slot) in &order {
            let pending_slot = self.pending_slot(cgroup_id, slot);
            by_cgroup.insert(cgroup_id, self.flush_slot(slot, pending_slot));
        }
        self.tick_order.1 = order;
        let health = self
            .windows
            .get(&0, 0)
            .map(|per_cpu| {
                per_cpu.iter().fold(Health::default(), |mut a, h| {
                    a.windows += h.windows;
                    a.packets_in_window += h.packets_in_window;
                    a.packets_outside_window += h.packets_outside_window;
                    a.unowned_windows += h.unowned_windows;
                    a.owner_lookups += h.owner_lookups;
                    a.packets_started += h.packets_started;
                    a.packets_without_socket += h.packets_without_socket;
                    a.stale_windows += h.stale_windows;
                    a.dropped_stretches += h.dropped_stretches;
                    a.xmits_started += h.xmits_started;
                    a.transmit_callbacks += h.transmit_callbacks;
                    a
                })
            })
            .unwrap_or_default();
        Snapshot {
            slots_used: by_cgroup.len(),
            by_cgroup,
            unattributed,
            health,
            programs_attached: self.tracepoints_attached
                + self.socket_hooks.links()
                + self.ingress.as_ref().map_or(0, IngressLimiter::attached),
            hooked_cgroups: self.socket_hooks.attached.len(),
            slots_capacity: self.capacity - 1,
            tick_duration_ns: start.elapsed().as_nanos() as u64,
            ticks: self.ticks,
        }
    }
}

/// Remove every pin whose key size, value size or capacity is not what this build's
/// programs expect (an upgrade changed a shared type): aya reuses a pinned map by name
/// without comparing, and the verifier would then refuse the programs. Pins that still
/// fit are kept, so an upgrade that changes only the window state keeps the bills.
fn remove_mismatched_pins(pin_dir: &Path, capacity: u32, percpu_entries: u32) {
    let size = |bytes: usize| bytes as u32;
    let expected = [
        (SLOTS_MAP, 8, 4, capacity),
        (ENFORCE_MAP, 8, 4, capacity),
        (
            PERCPU_COST_MAP,
            4,
            size(size_of::<CpuCost>()),
            percpu_entries,
        ),
        (COST_MAP, 4, size(size_of::<GlobalCost>()), capacity),
        (WINDOW_MAP, 4, size(size_of::<WindowState>()), 1),
        (SETTINGS_MAP, 4, size(size_of::<Settings>()), 1),
        (BASE_MAP, 4, size(size_of::<CpuCost>()), capacity),
        (KERNEL_OFFSETS_MAP, 4, size(size_of::<KernelOffsets>()), 1),
    ];
    let mut replaced = Vec::new();
    for (name, key_size, value_size, max_entries) in expected {
        let path = pin_dir.join(name);
        let Ok(info) = aya::maps::MapInfo::from_pin(&path) else {
            continue;
        };
        let found = (info.key_size(), info.value_size(), info.max_entries());
        if found != (key_size, value_size, max_entries) {
            replaced.push(name);
            tracing::warn!(
                map = name,
                "pinned map has key/value/entries {found:?}, this build needs {:?}: removing it and starting that map fresh",
                (key_size, value_size, max_entries)
            );
            let _ = std::fs::remove_file(&path);
        }
    }
    // A fresh settings map restarts the generation, which the owner caches in a kept
    // window map could still hold: they go too.
    if replaced.contains(&SETTINGS_MAP) {
        let _ = std::fs::remove_file(pin_dir.join(WINDOW_MAP));
    }
}

/// The scheduler's map of quota groups, borrowed from the loaded object.
fn enforce_map(ebpf: &mut Ebpf) -> Result<BpfHashMap<&mut MapData, u64, u32>, ObserverError> {
    let map = ebpf.map_mut(ENFORCE_MAP).ok_or(ObserverError::Map {
        name: ENFORCE_MAP,
        detail: "missing from the object".into(),
    })?;
    BpfHashMap::try_from(map).map_err(|e| ObserverError::Map {
        name: ENFORCE_MAP,
        detail: e.to_string(),
    })
}

/// Load program `name` and attach it to each of `tracepoints`; returns how many
/// attached. The softirq and packet tracepoints exist on every kernel DOVE supports; a
/// missing callback tracepoint (`tasklet_entry` came in 5.18) only loses that class of
/// transmit work, and is said.
fn attach_raw_tracepoints(
    ebpf: &mut Ebpf,
    name: &str,
    tracepoints: &[&str],
) -> Result<usize, ObserverError> {
    let program: &mut RawTracePoint = program(ebpf, name)?;
    program.load().map_err(|source| ObserverError::Program {
        what: format!("loading {name}"),
        source,
    })?;
    let mut attached = 0;
    for tracepoint in tracepoints {
        match program.attach(tracepoint) {
            Ok(_) => attached += 1,
            Err(source) if tracepoints.len() > 1 => tracing::warn!(
                "attaching {name} to raw tracepoint {tracepoint} failed ({source}): transmit work in those callbacks goes unattributed"
            ),
            Err(source) => {
                return Err(ObserverError::Program {
                    what: format!("attaching {name} to raw tracepoint {tracepoint}"),
                    source,
                })
            }
        }
    }
    Ok(attached)
}

/// Resolve the kernel struct offsets the transmit programs read and hand them over;
/// without them NET_TX work is unattributed (and said), the rest works. Pins do not
/// outlive a boot, so offsets a previous doved pinned are this kernel's: parsing the BTF
/// (6 MB) is done once per boot, not at every restart.
fn publish_offsets(ebpf: &mut Ebpf) -> Result<(), ObserverError> {
    let map = ebpf.map_mut(KERNEL_OFFSETS_MAP).ok_or(ObserverError::Map {
        name: KERNEL_OFFSETS_MAP,
        detail: "missing from the object".into(),
    })?;
    let mut array: Array<&mut MapData, KernelOffsets> =
        Array::try_from(map).map_err(|e| ObserverError::Map {
            name: KERNEL_OFFSETS_MAP,
            detail: e.to_string(),
        })?;
    if array.get(&0, 0).is_ok_and(|pinned| pinned.valid != 0) {
        return Ok(());
    }
    let offsets = match super::offsets::resolve(Path::new(super::offsets::VMLINUX_BTF)) {
        Ok(offsets) => offsets,
        Err(e) => {
            tracing::warn!(
                "NET_TX work will be unattributed: its packets' owners are read from the skb at offsets the kernel's BTF gives, and {e}"
            );
            KernelOffsets::default()
        }
    };
    array.set(0, offsets, 0).map_err(|e| ObserverError::Map {
        name: KERNEL_OFFSETS_MAP,
        detail: e.to_string(),
    })
}

/// Close every CPU's window, keeping the counters: a pinned state may hold a window
/// that was open when the previous doved died.
fn reset_windows(ebpf: &mut Ebpf) -> Result<(), ObserverError> {
    let map = ebpf.map_mut(WINDOW_MAP).ok_or(ObserverError::Map {
        name: WINDOW_MAP,
        detail: "missing from the object".into(),
    })?;
    let mut windows: PerCpuArray<&mut MapData, WindowState> =
        PerCpuArray::try_from(map).map_err(|e| ObserverError::Map {
            name: WINDOW_MAP,
            detail: e.to_string(),
        })?;
    let per_cpu = windows.get(&0, 0).map_err(|e| ObserverError::Map {
        name: WINDOW_MAP,
        detail: e.to_string(),
    })?;
    let values: Vec<WindowState> = per_cpu
        .iter()
        .map(|w| WindowState {
            active: 0,
            packet_slot: NO_PACKET,
            ..*w
        })
        .collect();
    let values = aya::maps::PerCpuValues::try_from(values).map_err(|e| ObserverError::Map {
        name: WINDOW_MAP,
        detail: e.to_string(),
    })?;
    windows.set(0, values, 0).map_err(|e| ObserverError::Map {
        name: WINDOW_MAP,
        detail: e.to_string(),
    })
}

fn load(pin_dir: &Path, capacity: u32, percpu_entries: u32) -> Result<Ebpf, aya::EbpfError> {
    EbpfLoader::new()
        .map_pin_path(pin_dir)
        .set_global(SLOT_CAPACITY_GLOBAL, &capacity, true)
        .set_max_entries(SLOTS_MAP, capacity)
        .set_max_entries(ENFORCE_MAP, capacity)
        .set_max_entries(COST_MAP, capacity)
        .set_max_entries(BASE_MAP, capacity)
        .set_max_entries(PERCPU_COST_MAP, percpu_entries)
        .load(OBJECT)
}

/// The slot capacity to load with: the one the pinned slot-indexed maps have, when a
/// previous start left some (their counters are bills), else `max_containers` + 1. Read
/// from the first pin that still has this build's layout, counters first, so an upgrade
/// that changed one map's layout still keeps the others at their size.
fn slot_capacity(pin_dir: &Path, max_containers: u32, nr_cpus: usize) -> u32 {
    let wanted = configured_capacity(max_containers);
    let candidates = [
        (COST_MAP, 4, size_of::<GlobalCost>(), 1),
        (BASE_MAP, 4, size_of::<CpuCost>(), 1),
        (PERCPU_COST_MAP, 4, size_of::<CpuCost>(), nr_cpus as u32),
        (SLOTS_MAP, 8, 4, 1),
    ];
    let pinned = candidates
        .into_iter()
        .find_map(|(name, key_size, value_size, rows)| {
            let info = aya::maps::MapInfo::from_pin(pin_dir.join(name)).ok()?;
            let entries = info.max_entries();
            let fits = info.key_size() == key_size
                && info.value_size() as usize == value_size
                && rows > 0
                && entries % rows == 0;
            fits.then(|| entries / rows)
                .filter(|capacity| (2..=MAX_SLOTS).contains(capacity))
        });
    match pinned {
        Some(pinned) if pinned != wanted => {
            tracing::warn!(
                "observer.max_containers is {max_containers}, but the cost maps pinned at {} hold {} containers: keeping them, so no counter is lost. The new size takes effect once they are gone (next boot, or stop doved, remove {} and start it: counters then restart from zero)",
                pin_dir.display(),
                pinned - 1,
                pin_dir.display()
            );
            pinned
        }
        _ => wanted,
    }
}

fn configured_capacity(max_containers: u32) -> u32 {
    max_containers.saturating_add(1).clamp(2, MAX_SLOTS)
}

pub(super) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, ObserverError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| ObserverError::Program {
            what: format!("program {name} is missing from the object"),
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?;
    program.try_into().map_err(|source| ObserverError::Program {
        what: format!("program {name}"),
        source,
    })
}

fn map_fd<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a aya::maps::MapFd, ObserverError> {
    match ebpf.map(name) {
        Some(Map::Array(data)) | Some(Map::HashMap(data)) => Ok(data.fd()),
        _ => Err(ObserverError::Map {
            name,
            detail: "missing from the object or not an array or hash".into(),
        }),
    }
}

pub(super) fn take<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, ObserverError> {
    let map = ebpf.take_map(name).ok_or(ObserverError::Map {
        name,
        detail: "missing from the object".into(),
    })?;
    convert(map).map_err(|e| ObserverError::Map {
        name,
        detail: e.to_string(),
    })
}

/// An exclusive, non-blocking lock on the pin directory, held for the daemon's life.
fn lock_dir(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, ObserverError> {
    let file = std::fs::File::open(dir).map_err(|source| ObserverError::PinDir {
        path: dir.to_owned(),
        source,
    })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| ObserverError::PinDirBusy(dir.to_owned()))
}

/// Whether this kernel checks CAP_BPF on every `bpf()` command while
/// `kernel.unprivileged_bpf_disabled` is set (the default on most distributions): before
/// 6.0 it did, so doved must keep CAP_BPF to update its slot map after setup.
pub fn map_updates_need_cap_bpf() -> bool {
    parse_version(&kernel_release()).is_none_or(|v| v < (6, 0))
}

/// The capabilities doved keeps after setup, in the accounting thread alone: none for
/// the maps (updates go through fds it already holds; from 6.0 the kernel checks
/// capabilities only when maps are created and programs loaded, before that CAP_BPF on
/// every command), CAP_NET_ADMIN to attach the socket programs as containers register.
pub fn accounting_capabilities() -> Vec<caps::Capability> {
    let mut keep = vec![caps::Capability::CAP_NET_ADMIN];
    if map_updates_need_cap_bpf() {
        keep.push(caps::Capability::CAP_BPF);
    }
    keep
}

/// Drop every capability of the calling thread but `keep`, from every set, the bounding
/// set included. Capabilities belong to threads: each thread drops its own, and threads
/// started afterwards inherit what their creator kept.
pub fn drop_capabilities(keep: &[caps::Capability]) -> Result<(), String> {
    for cap in caps::all() {
        // Shrinking the bounding set needs CAP_SETPCAP, so do it first.
        if !keep.contains(&cap) {
            let _ = caps::drop(None, caps::CapSet::Bounding, cap);
        }
    }
    let keep: caps::CapsHashSet = keep.iter().copied().collect();
    for set in [caps::CapSet::Ambient, caps::CapSet::Inheritable] {
        caps::clear(None, set).map_err(|e| e.to_string())?;
    }
    // Effective first: it must stay within Permitted.
    for set in [caps::CapSet::Effective, caps::CapSet::Permitted] {
        caps::set(None, set, &keep).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A cgroup's level in the v2 tree: `/` is 0, `/a` is 1, `/a/b` is 2.
pub fn cgroup_level(path: &str) -> u32 {
    path.split('/').filter(|c| !c.is_empty()).count() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(parse_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(parse_version("5.8.0"), Some((5, 8)));
        assert!(parse_version("6.1.0-18-amd64").unwrap() >= MIN_KERNEL);
        assert!(parse_version("5.4.0").unwrap() < MIN_KERNEL);
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn cgroup_tree_relations() {
        assert!(is_below("/a/b", "/a"));
        assert!(is_below("/a/b/c", "/a"));
        assert!(is_below("/a", "/"));
        assert!(!is_below("/ab", "/a"), "a sibling sharing a prefix");
        assert!(!is_below("/a", "/a"));
        assert!(!is_below("/a/", "/a"));

        let registered: BTreeSet<String> = ["/k/pod", "/k/pod/c1", "/kx", "/other/deep/x"]
            .into_iter()
            .map(String::from)
            .collect();
        let covered = |set: &BTreeSet<String>, path| has_ancestor(path, |a| set.contains(a));
        assert!(covered(&registered, "/k/pod/c1"));
        assert!(covered(&registered, "/k/pod/c2/sub"));
        assert!(!covered(&registered, "/k/pod"));
        assert!(covered(&registered, "/kx/y"));
        assert!(!covered(&registered, "/other/deep"));
        let mut with_root = registered.clone();
        with_root.insert("/".into());
        assert!(covered(&with_root, "/k/pod"));

        let from = below_prefix("/k");
        assert_eq!(
            descendants(registered.range(from..), "/k"),
            ["/k/pod", "/k/pod/c1"],
            "/kx is not below /k"
        );
        let sorted: BTreeSet<String> = ["/k/a", "/k/a-b", "/k/a/x", "/k/b/c", "/k/b/c/d"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(
            outermost(sorted.into_iter().collect()),
            ["/k/a", "/k/a-b", "/k/b/c"]
        );
    }
}
