//! DOVE's kernel-side programs.
//!
//! Softirq windows come from the `softirq_entry` / `softirq_exit` raw tracepoints; the
//! start of each received packet's processing from the `netif_receive_skb` raw
//! tracepoint (it fires in `__netif_receive_skb_core`, on every receive path); packet
//! ownership from `cgroup_skb` programs attached at the cgroup v2 root, which run where
//! the stack hands an skb to a socket (ingress) and where a socket's skb is transmitted
//! (egress) and can read the socket's cgroup ID.
//!
//! The rule: a packet's stretch runs from its start to the next packet's start (or the
//! window's end) and is charged, when it closes, to the owner the first socket hook in it
//! named; a stretch in which no socket hook ran (closed port, drop, forwarding) goes to
//! the unattributed slot. The window's own overhead before its first packet joins that
//! packet's stretch. When several deliveries follow one start (list receive after GRO,
//! multicast), each further delivery closes the stretch so far for the owner before it.
//! A window with no packet and no hook goes to the unattributed slot. Outside a window
//! nothing is charged: that work ran in a task's own context and is in its runtime.
//! `ebpf/README.md` states the error bounds.
//!
//! Hot-path cost per packet: the start reads the clock and adds to one per-CPU cost
//! entry; the socket hook does one per-CPU array lookup (window state, counters and a
//! one-entry owner cache) and one array lookup (settings), no clock read and no atomics;
//! the owner's hash lookups (one, plus one per registered ancestor level) only when the
//! socket cgroup differs from the previous packet's on this CPU or the owner map changed.
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
    CpuCost, GlobalCost, Settings, WindowState, BPF_F_MMAPABLE, MAX_LEVEL, MAX_STRETCH_NS,
    NET_RX_SOFTIRQ, NET_TX_SOFTIRQ, NO_PACKET, OWNER_PENDING, SLOTS, UNATTRIBUTED_SLOT,
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

/// doved's own (what a slot had before the per-CPU map was last created afresh);
/// declared here so that it is created and pinned with the others.
#[map(name = "DOVE_BASE")]
static BASE: Array<CpuCost> = Array::pinned(SLOTS, BPF_F_MMAPABLE);

/// Written by doved, read here only so that it is created and pinned with the others.
#[map(name = "DOVE_COST")]
static COST: Array<GlobalCost> = Array::pinned(SLOTS, BPF_F_MMAPABLE);

#[map(name = "DOVE_WINDOW")]
static WINDOW: PerCpuArray<WindowState> = PerCpuArray::pinned(1, 0);

#[map(name = "DOVE_SETTINGS")]
static SETTINGS: Array<Settings> = Array::pinned(1, 0);

#[inline(always)]
fn raw_arg0(ctx: &RawTracePointContext) -> u64 {
    // SAFETY: a raw tracepoint's context is its argument array.
    unsafe { *(ctx.as_ptr() as *const u64) }
}

/// Add `ns` (and `packets`) to `slot`'s row for this CPU, as receive or transmit time.
#[inline(always)]
fn charge(slot: u32, ns: u64, rx: bool, packets: u64) {
    // SAFETY: helper without preconditions.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(cost) = PERCPU_COST.get_ptr_mut(cpu * SLOTS + slot) else {
        return;
    };
    // Only this CPU writes this entry, and softirqs do not nest on a CPU: plain adds.
    unsafe {
        if rx {
            (*cost).rx_ns += ns;
            (*cost).rx_packets += packets;
        } else {
            (*cost).tx_ns += ns;
            (*cost).tx_packets += packets;
        }
    }
}

/// Charge the stretch from the mark to `now` to the packet in flight's owner (the
/// unattributed slot when it reached no socket), and start the next stretch at `now`.
///
/// SAFETY: `w` is this CPU's window state, with a window open.
#[inline(always)]
unsafe fn close_stretch(w: *mut WindowState, now: u64) {
    let ns = now.saturating_sub((*w).mark_ns);
    (*w).mark_ns = now;
    let rx = (*w).active == NET_RX_SOFTIRQ + 1;
    let (slot, packets) = match (*w).packet_slot {
        NO_PACKET => {
            (*w).unowned_windows += 1;
            (UNATTRIBUTED_SLOT, 0)
        }
        OWNER_PENDING => {
            (*w).packets_without_socket += 1;
            (UNATTRIBUTED_SLOT, 1)
        }
        slot => (slot, 1),
    };
    if ns > MAX_STRETCH_NS {
        (*w).dropped_stretches += 1;
        return;
    }
    charge(slot, ns, rx, packets);
}

#[raw_tracepoint(tracepoint = "softirq_entry")]
pub fn dove_softirq_entry(ctx: RawTracePointContext) -> i32 {
    let vec = raw_arg0(&ctx) as u32;
    let Some(w) = WINDOW.get_ptr_mut(0) else {
        return 0;
    };
    unsafe {
        // Softirqs do not nest on a CPU: a window still open missed its exit (doved
        // attached between the two). When it ended is unknown, so nobody pays for it.
        if (*w).active != 0 {
            (*w).active = 0;
            (*w).stale_windows += 1;
        }
        if vec != NET_RX_SOFTIRQ && vec != NET_TX_SOFTIRQ {
            return 0;
        }
        (*w).mark_ns = bpf_ktime_get_ns();
        (*w).packet_slot = NO_PACKET;
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
        close_stretch(w, bpf_ktime_get_ns());
        (*w).active = 0;
    }
    0
}

/// A received packet begins its way through the stack: the previous packet's stretch
/// ends here.
#[raw_tracepoint(tracepoint = "netif_receive_skb")]
pub fn dove_packet_start(_ctx: RawTracePointContext) -> i32 {
    let Some(w) = WINDOW.get_ptr_mut(0) else {
        return 0;
    };
    unsafe {
        if (*w).active != NET_RX_SOFTIRQ + 1 {
            return 0;
        }
        (*w).packets_started += 1;
        if (*w).packet_slot == NO_PACKET {
            // The window's overhead so far joins its first packet.
            (*w).packet_slot = OWNER_PENDING;
            return 0;
        }
        close_stretch(w, bpf_ktime_get_ns());
        (*w).packet_slot = OWNER_PENDING;
    }
    0
}

/// The registered container that owns this skb's socket, through this CPU's one-entry
/// cache: consecutive packets mostly belong to the same socket cgroup.
#[inline(always)]
fn owner(skb: *mut __sk_buff, w: *mut WindowState) -> u32 {
    // SAFETY: cgroup_skb programs may call this helper on their context.
    let id = unsafe { bpf_skb_cgroup_id(skb) };
    let Some(settings) = SETTINGS.get_ptr(0) else {
        return UNATTRIBUTED_SLOT;
    };
    // SAFETY: `settings` points into the map's value, which doved rewrites whole: read
    // the generation first, then the mask (volatile, so neither is reordered or read
    // twice). If doved changes the owner map meanwhile, it bumps the generation after,
    // and the next packet resolves again. An odd generation is an update in progress
    // (the mask may be old or new): resolve, but cache nothing.
    let (generation, mask) = unsafe {
        let generation = core::ptr::read_volatile(&raw const (*settings).generation);
        (
            generation,
            core::ptr::read_volatile(&raw const (*settings).level_mask),
        )
    };
    // SAFETY: `w` is this CPU's window state; softirqs do not nest on a CPU.
    unsafe {
        if generation & 1 == 1 {
            return resolve(skb, id, mask);
        }
        if (*w).owner_cache_cgroup == id && (*w).owner_cache_generation == generation {
            return (*w).owner_cache_slot;
        }
        let slot = resolve(skb, id, mask);
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

/// A socket hook names the owner of the packet in flight. `delivery`: an ingress
/// delivery, which after another delivery in the same stretch (list receive,
/// multicast) closes the stretch for the owner before it; transmits inside a window
/// (ACKs, ICMP errors) belong to the packet that caused them.
#[inline(always)]
fn on_packet(ctx: &SkBuffContext, delivery: bool) {
    let Some(w) = WINDOW.get_ptr_mut(0) else {
        return;
    };
    unsafe {
        if (*w).active == 0 {
            (*w).packets_outside_window += 1;
            return;
        }
        (*w).packets_in_window += 1;
        let current = (*w).packet_slot;
        if current == NO_PACKET || current == OWNER_PENDING {
            (*w).packet_slot = owner(ctx.skb.skb, w);
        } else if delivery {
            close_stretch(w, bpf_ktime_get_ns());
            (*w).packet_slot = owner(ctx.skb.skb, w);
        }
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
