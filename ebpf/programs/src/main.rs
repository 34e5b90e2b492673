//! DOVE's kernel-side programs.
//!
//! Softirq windows come from the `softirq_entry` / `softirq_exit` raw tracepoints; packet
//! ownership from `cgroup_skb` programs attached at the cgroup v2 root, which run where
//! the stack hands an skb to a socket (ingress) and where a socket's skb is transmitted
//! (egress) and can read the socket's cgroup ID. Inside a NET_RX/NET_TX window, each
//! stretch of time up to a packet is charged to that packet's owner; the tail after the
//! last packet goes to the last owner; a window with no owned packet goes to the
//! unattributed slot. Outside a window nothing is charged: that work ran in a task's
//! own context and is already in its runtime.
//!
//! Hot-path cost per packet: one per-CPU array lookup (window state, counters and a
//! one-entry owner cache), one array lookup (settings), one array lookup (cost), no
//! atomics; the owner's hash lookups (one, plus one per registered ancestor level) only
//! when the socket cgroup differs from the previous packet's on this CPU or the owner
//! map changed.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{
        bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_skb_ancestor_cgroup_id,
        bpf_skb_cgroup_id,
    },
    macros::{cgroup_skb, map, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray},
    programs::{RawTracePointContext, SkBuffContext},
    EbpfContext,
};
use dove_ebpf_common::{
    CpuCost, GlobalCost, Settings, WindowState, BPF_F_MMAPABLE, MAX_LEVEL,
    NET_RX_SOFTIRQ, NET_TX_SOFTIRQ, SLOTS, UNATTRIBUTED_SLOT,
};

#[map(name = "DOVE_SLOTS")]
static SLOT_OF: HashMap<u64, u32> = HashMap::pinned(SLOTS, 0);

/// Read by the patched scheduler, written by doved; declared here so that it is created
/// and pinned with the other maps.
#[map(name = "DOVE_ENFORCE")]
static ENFORCE: HashMap<u64, u32> = HashMap::pinned(SLOTS, 0);

/// Resized by doved at load time to `nr_cpus × SLOTS`.
#[map(name = "DOVE_PERCPU_COST")]
static PERCPU_COST: Array<CpuCost> = Array::pinned(SLOTS, BPF_F_MMAPABLE);

/// Written by doved, read here only so that it is created and pinned with the others.
#[map(name = "DOVE_COST")]
static COST: Array<GlobalCost> = Array::pinned(SLOTS, BPF_F_MMAPABLE);

#[map(name = "DOVE_WINDOW")]
static WINDOW: PerCpuArray<WindowState> = PerCpuArray::pinned(1, 0);

#[map(name = "DOVE_SETTINGS")]
static SETTINGS: Array<Settings> = Array::pinned(1, 0);

const NO_SLOT: u32 = u32::MAX;

#[inline(always)]
fn raw_arg0(ctx: &RawTracePointContext) -> u64 {
    // SAFETY: a raw tracepoint's context is its argument array.
    unsafe { *(ctx.as_ptr() as *const u64) }
}

#[inline(always)]
fn charge(slot: u32, ns: u64, rx: bool, packet: bool) {
    // SAFETY: helper without preconditions.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(cost) = PERCPU_COST.get_ptr_mut(cpu * SLOTS + slot) else {
        return;
    };
    // Only this CPU writes this entry, and softirqs do not nest on a CPU: plain adds.
    unsafe {
        if rx {
            (*cost).rx_ns += ns;
            if packet {
                (*cost).rx_packets += 1;
            }
        } else {
            (*cost).tx_ns += ns;
            if packet {
                (*cost).tx_packets += 1;
            }
        }
    }
}

#[raw_tracepoint(tracepoint = "softirq_entry")]
pub fn dove_softirq_entry(ctx: RawTracePointContext) -> i32 {
    let vec = raw_arg0(&ctx) as u32;
    if vec != NET_RX_SOFTIRQ && vec != NET_TX_SOFTIRQ {
        return 0;
    }
    let Some(w) = WINDOW.get_ptr_mut(0) else {
        return 0;
    };
    unsafe {
        (*w).mark_ns = bpf_ktime_get_ns();
        (*w).last_slot = NO_SLOT;
        (*w).active = vec + 1;
        (*w).windows += 1;
    }
    0
}

#[raw_tracepoint(tracepoint = "softirq_exit")]
pub fn dove_softirq_exit(ctx: RawTracePointContext) -> i32 {
    let vec = raw_arg0(&ctx) as u32;
    let Some(w) = WINDOW.get_ptr_mut(0) else {
        return 0;
    };
    unsafe {
        if (*w).active != vec + 1 {
            return 0;
        }
        (*w).active = 0;
        let now = bpf_ktime_get_ns();
        let tail = now.saturating_sub((*w).mark_ns);
        let slot = if (*w).last_slot == NO_SLOT {
            (*w).unowned_windows += 1;
            UNATTRIBUTED_SLOT
        } else {
            (*w).last_slot
        };
        charge(slot, tail, vec == NET_RX_SOFTIRQ, false);
    }
    0
}

/// The registered container that owns this skb's socket, through this CPU's one-entry
/// cache: consecutive packets mostly belong to the same socket cgroup.
#[inline(always)]
fn owner(skb: *mut __sk_buff, w: *mut WindowState) -> u32 {
    // SAFETY: cgroup_skb programs may call this helper on their context.
    let id = unsafe { bpf_skb_cgroup_id(skb) };
    let Some(settings) = SETTINGS.get(0) else {
        return UNATTRIBUTED_SLOT;
    };
    // Read before resolving: if doved changes the owner map meanwhile, it bumps the
    // generation after, and the next packet resolves again.
    let generation = settings.generation;
    // SAFETY: `w` is this CPU's window state; softirqs do not nest on a CPU.
    unsafe {
        if (*w).owner_cache_cgroup == id && (*w).owner_cache_generation == generation {
            return (*w).owner_cache_slot;
        }
        let slot = resolve(skb, id, settings.level_mask);
        (*w).owner_cache_cgroup = id;
        (*w).owner_cache_slot = slot;
        (*w).owner_cache_generation = generation;
        (*w).owner_lookups += 1;
        slot
    }
}

/// The socket cgroup's own slot, or that of the nearest ancestor at a level where some
/// container is registered.
#[inline(always)]
fn resolve(skb: *mut __sk_buff, id: u64, mask: u64) -> u32 {
    if let Some(slot) = unsafe { SLOT_OF.get(&id) } {
        return *slot;
    }
    if mask == 0 {
        return UNATTRIBUTED_SLOT;
    }
    let mut level = MAX_LEVEL;
    while level > 0 {
        if mask & (1u64 << level) != 0 {
            let ancestor = unsafe { bpf_skb_ancestor_cgroup_id(skb, level as i32) };
            if ancestor != 0 {
                if let Some(slot) = unsafe { SLOT_OF.get(&ancestor) } {
                    return *slot;
                }
            }
        }
        level -= 1;
    }
    UNATTRIBUTED_SLOT
}

#[inline(always)]
fn on_packet(ctx: &SkBuffContext, rx: bool) {
    let Some(w) = WINDOW.get_ptr_mut(0) else {
        return;
    };
    unsafe {
        if (*w).active == 0 {
            (*w).packets_outside_window += 1;
            return;
        }
        let slot = owner(ctx.skb.skb, w);
        let now = bpf_ktime_get_ns();
        charge(slot, now.saturating_sub((*w).mark_ns), rx, true);
        (*w).mark_ns = now;
        (*w).last_slot = slot;
        (*w).packets_in_window += 1;
    }
}

#[cgroup_skb]
pub fn dove_ingress(ctx: SkBuffContext) -> i32 {
    on_packet(&ctx, true);
    1
}

#[cgroup_skb]
pub fn dove_egress(ctx: SkBuffContext) -> i32 {
    on_packet(&ctx, false);
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[no_mangle]
#[link_section = "license"]
pub static LICENSE: [u8; 4] = *b"GPL\0";
