//! Map keys and values shared by DOVE's eBPF programs (`ebpf/programs`) and `doved`.
//!
//! Every type is `#[repr(C)]`, made of naturally aligned `u64`/`u32` fields with no
//! implicit padding, so both sides (and the kernel patch, which reads [`GlobalCost`])
//! agree on the layout. Build with the `user` feature for `aya::Pod` impls.
//!
//! Map layout (names are the pinned names under the daemon's bpffs directory). `SLOTS`
//! below is the slot capacity doved loads the programs with (one more than
//! `observer.max_containers`: [`SLOTS`] by default, at most [`MAX_SLOTS`]); the programs
//! read it from the [`SLOT_CAPACITY_GLOBAL`] global.
//! - [`SLOTS_MAP`]: hash, cgroup v2 ID → slot index, one per registered container.
//! - [`ENFORCE_MAP`]: hash, ID of the quota-holding cgroup (cgroup v2, or the v1 `cpu`
//!   hierarchy on hybrid hosts) → slot; read by the patched scheduler (kernel-patch/).
//! - [`PERCPU_COST_MAP`]: array of [`CpuCost`], `nr_cpus × SLOTS` entries, mmapable;
//!   entry `cpu × SLOTS + slot` is written only by programs running on `cpu`.
//! - [`COST_MAP`]: array of [`GlobalCost`], `SLOTS` entries, mmapable; written by doved
//!   (totals, and atomic adds to `pending_ns`), consumed by an enforcer (atomic exchange
//!   of `pending_ns` to zero).
//! - [`WINDOW_MAP`]: per-CPU [`WindowState`]: the softirq window in progress and the
//!   programs' own counters (one lookup per program run serves both).
//! - [`SETTINGS_MAP`]: one [`Settings`].
//! - [`BASE_MAP`]: array of [`CpuCost`], `SLOTS` entries, mmapable; doved's own.
//! - [`DROP_CONFIG_MAP`] / [`DROP_STATE_MAP`]: hash, host-side interface index →
//!   [`DropConfig`] (doved's) / [`DropState`] (the program's): early drop's token bucket
//!   for traffic into a container (not pinned).
//! - [`DROPPED_MAP`]: per-CPU hash, interface index → [`Dropped`].
#![no_std]

/// Slots in the cost maps by default: one per registered container, slot 0 for
/// unattributed time.
pub const SLOTS: u32 = 4096;
/// The most slots doved loads the maps with. The per-CPU cost map takes
/// `nr_cpus × slots × 32` bytes of kernel memory (2 MiB per CPU at this bound).
pub const MAX_SLOTS: u32 = 65536;
/// Name of the programs' read-only global holding the slot capacity (the row length of
/// [`PERCPU_COST_MAP`]).
pub const SLOT_CAPACITY_GLOBAL: &str = "SLOT_CAPACITY";
/// Slot that collects softirq time with no registered owner.
pub const UNATTRIBUTED_SLOT: u32 = 0;
/// Deepest cgroup level at which a registered container is looked for as an ancestor.
pub const MAX_LEVEL: u32 = 31;
/// `BPF_F_MMAPABLE`: the array's memory can be mapped into doved.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// softirq vector numbers (`include/linux/interrupt.h`).
pub const TIMER_SOFTIRQ: u32 = 1;
pub const NET_TX_SOFTIRQ: u32 = 2;
pub const NET_RX_SOFTIRQ: u32 = 3;
pub const TASKLET_SOFTIRQ: u32 = 6;
pub const HRTIMER_SOFTIRQ: u32 = 8;

pub const SLOTS_MAP: &str = "DOVE_SLOTS";
/// Hash: ID of the cgroup holding a CFS quota → slot whose pending cost the patched
/// scheduler deducts from that group (not used by the programs; created with them).
pub const ENFORCE_MAP: &str = "DOVE_ENFORCE";
pub const PERCPU_COST_MAP: &str = "DOVE_PERCPU_COST";
pub const COST_MAP: &str = "DOVE_COST";
pub const WINDOW_MAP: &str = "DOVE_WINDOW";
pub const SETTINGS_MAP: &str = "DOVE_SETTINGS";
/// Array of [`CpuCost`], `SLOTS` entries, mmapable: what each slot had accumulated when
/// the per-CPU map was last created afresh (an upgrade that changed its layout), so that
/// `DOVE_COST = DOVE_BASE + Σ DOVE_PERCPU_COST` and bills continue. Written only by doved.
pub const BASE_MAP: &str = "DOVE_BASE";
/// Array of one [`KernelOffsets`], written by doved from the running kernel's BTF.
pub const KERNEL_OFFSETS_MAP: &str = "DOVE_KERNEL_OFFSETS";

/// Early drop: host-side interfaces of containers over budget, at most.
pub const DROP_INTERFACES: u32 = 1024;
pub const DROP_CONFIG_MAP: &str = "DOVE_DROP_CONFIG";
pub const DROP_STATE_MAP: &str = "DOVE_DROP_STATE";
pub const DROPPED_MAP: &str = "DOVE_DROPPED";

/// What early drop admits into a container through one interface: a token bucket in
/// nanoseconds of the container's softirq time. Written by doved only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropConfig {
    /// Softirq time the container can pay for, in ns per second; 0 admits everything.
    pub rate_ns_per_s: u64,
    /// Most tokens the bucket holds (ns).
    pub burst_ns: u64,
    /// How long the rate takes to fill the bucket (ns): `burst_ns × 10⁹ / rate`.
    pub burst_window_ns: u64,
    /// What one packet costs the container, as doved last measured it (ns).
    pub packet_cost_ns: u64,
    /// The bucket drops nothing after this instant (`CLOCK_MONOTONIC`, as
    /// `bpf_ktime_get_ns`). doved moves it forward every tick, so a program a dead doved
    /// left attached (a clsact filter outlives its process; tcx links do not) stops
    /// dropping within moments.
    pub expires_ns: u64,
}

/// The bucket's fill, kept as what the rate has credited since `epoch_ns` less what was
/// spent, so that admitting a packet is one add (a race between CPUs loses at most that
/// packet's add, never a refill). Written by the early-drop program (doved only creates
/// it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropState {
    pub epoch_ns: u64,
    pub spent_ns: u64,
}

/// Packets and bytes the early-drop program dropped on one CPU for one interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    pub packets: u64,
    pub bytes: u64,
}

/// Softirq time one CPU spent for one slot. Cumulative, never reset while the slot is
/// owned; only programs on that CPU write it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuCost {
    /// Stretches of NET_RX windows charged to this slot (`ebpf/README.md`, the rule).
    pub rx_ns: u64,
    /// Stretches of NET_TX windows charged to this slot.
    pub tx_ns: u64,
    /// Packets whose stretch was charged here (the unattributed slot: packets that
    /// reached no registered socket).
    pub rx_packets: u64,
    pub tx_packets: u64,
}

/// One slot's cost across all CPUs, as doved publishes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalCost {
    /// Cost not yet consumed by an enforcer. doved adds with an atomic fetch-add; the
    /// enforcer takes it with an atomic exchange to zero.
    pub pending_ns: u64,
    /// Monotonic total (rx + tx): what a bill reads.
    pub total_ns: u64,
    pub rx_ns: u64,
    pub tx_ns: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// The cgroup v2 ID that owns the slot (0: free), so a reader can tell reuse.
    pub cgroup_id: u64,
    /// What an enforcer has deducted so far (written by the enforcer).
    pub charged_ns: u64,
}

/// The softirq window in progress on one CPU, and counters about the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowState {
    /// When the packet in flight began (its `netif_receive_skb`), or the window's start
    /// while no packet has begun.
    pub mark_ns: u64,
    /// Owner of the packet in flight: [`NO_PACKET`] before the window's first packet,
    /// [`OWNER_PENDING`] from a packet's start until a socket hook names its owner.
    pub packet_slot: u32,
    /// The softirq vector of the open window plus one; 0 when no NET window is open.
    pub active: u32,
    /// NET_RX / NET_TX windows seen.
    pub windows: u64,
    /// Packets seen by the socket hooks inside a window.
    pub packets_in_window: u64,
    /// Packets seen outside any window: process context, already in the task's runtime.
    pub packets_outside_window: u64,
    /// Windows in which no packet began and no socket hook ran (charged to unattributed).
    pub unowned_windows: u64,
    /// The last socket cgroup this CPU resolved to an owner, and the answer, valid while
    /// [`Settings::generation`] equals `owner_cache_generation`: a flow's packets come in
    /// runs, so most packets skip the hash lookups.
    pub owner_cache_cgroup: u64,
    pub owner_cache_slot: u32,
    pub owner_cache_generation: u32,
    /// Owner resolutions that missed the cache (hash lookups done).
    pub owner_lookups: u64,
    /// Packets that began inside a NET_RX window (`netif_receive_skb`).
    pub packets_started: u64,
    /// Packets that ended without reaching any socket hook (closed ports, drops,
    /// forwarding): their time went to the unattributed slot.
    pub packets_without_socket: u64,
    /// Windows found still open when another softirq began: their exit was never seen
    /// (doved started mid-window). Their time is charged to nobody.
    pub stale_windows: u64,
    /// Stretches longer than [`MAX_STRETCH_NS`], not charged: no packet takes that long,
    /// so the mark was stale.
    pub dropped_stretches: u64,
    /// The timer, hrtimer, tasklet or BH work item whose callback is in progress in a
    /// TIMER/HRTIMER/TASKLET window (its address, the first argument of its entry and exit
    /// tracepoints), or 0. Matching the exit by address, not by counting, keeps a hardirq
    /// hrtimer inside a softirq callback (whose entry or exit BPF's recursion guard may
    /// skip) from unbalancing anything.
    pub callback: u64,
    /// Packets a NET_TX window handed to a driver (`net_dev_start_xmit`).
    pub xmits_started: u64,
    /// Timer, hrtimer and tasklet callbacks that transmitted for a socket (charged).
    pub transmit_callbacks: u64,
}

/// Where the fields DOVE reads from kernel structs lie in the running kernel, resolved
/// by doved from `/sys/kernel/btf/vmlinux` before the programs that use them attach.
/// The programs read through `bpf_probe_read_kernel`, so a wrong offset yields a wrong
/// owner at worst, never a fault.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `struct sk_buff`: `sk`.
    pub skb_sk: u32,
    /// `struct sock`: `__sk_common.skc_state` (a byte).
    pub sk_state: u32,
    /// `struct sock`: `sk_cgrp_data.cgroup`.
    pub sk_cgroup: u32,
    /// `struct cgroup`: `kn`.
    pub cgroup_kn: u32,
    /// `struct kernfs_node`: `id` (the cgroup ID).
    pub kn_id: u32,
    /// `struct cgroup`: `ancestors`, the cgroup's ancestors by level, `level + 1` of them
    /// (0 when the kernel has no such array: then only a socket's own cgroup is looked up).
    pub cgroup_ancestors: u32,
    /// `struct cgroup`: `level` (an int; the root is 0).
    pub cgroup_level: u32,
    /// Non-zero once every offset above is resolved.
    pub valid: u32,
}

/// [`WindowState::packet_slot`] before the window's first packet.
pub const NO_PACKET: u32 = u32::MAX;
/// [`WindowState::packet_slot`] while a packet's owner is not known yet.
pub const OWNER_PENDING: u32 = u32::MAX - 1;
/// No single packet's processing takes this long (a whole NET_RX window is bounded by
/// `netdev_budget_usecs`, 2 ms by default): a longer stretch means a stale mark.
pub const MAX_STRETCH_NS: u64 = 50_000_000;

/// Knobs doved sets for the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Bit `n` set: some registered container's cgroup is at level `n` (root is 0).
    pub level_mask: u64,
    /// Bumped by doved after every change to the owner map; invalidates the programs'
    /// per-CPU owner caches. Never 0, which the caches start with. Odd while doved
    /// rewrites the settings (the syscall copies the value, so a program reading
    /// meanwhile may see either mask): programs cache nothing under an odd generation.
    pub generation: u32,
    /// doved's own flags ([`SETTINGS_PENDING_FOR_ENFORCER`]); the programs ignore them.
    pub flags: u32,
}

/// [`Settings::flags`]: the pending counters in [`COST_MAP`] accrued for an enforcer. A
/// doved that starts enforcing over pins without it zeroes them first, so an enforcer
/// never inherits cost from a time when nobody consumed it.
pub const SETTINGS_PENDING_FOR_ENFORCER: u32 = 1;

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain `#[repr(C)]` integers with no padding; every bit pattern is valid.
    unsafe impl aya::Pod for CpuCost {}
    unsafe impl aya::Pod for GlobalCost {}
    unsafe impl aya::Pod for WindowState {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for KernelOffsets {}
    unsafe impl aya::Pod for DropConfig {}
    unsafe impl aya::Pod for DropState {}
    unsafe impl aya::Pod for Dropped {}
}
