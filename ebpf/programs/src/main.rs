//! DOVE's kernel-side programs.
//!
//! Softirq windows come from the `softirq_entry` / `softirq_exit` raw tracepoints; the
//! start of each received packet's processing from the `netif_receive_skb` raw
//! tracepoint (it fires in `__netif_receive_skb_core`, on every receive path); packet
//! ownership from `cgroup_skb` programs that doved attaches at each outermost registered
//! cgroup, which run where the stack hands an skb to a socket of that cgroup or below it
//! (ingress) and where such a socket's skb is transmitted (egress), and read the socket's
//! cgroup ID. Sockets of unregistered cgroups run neither.
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
        bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    macros::{cgroup_skb, classifier, map, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
    programs::{RawTracePointContext, SkBuffContext, TcContext},
    EbpfContext,
};
use dove_ebpf_common::{
    CpuCost, DropConfig, DropState, Dropped, DROP_INTERFACES, GlobalCost, KernelOffsets, Settings, WindowState, BPF_F_MMAPABLE,
    HRTIMER_SOFTIRQ, MAX_LEVEL, MAX_STRETCH_NS, NET_RX_SOFTIRQ, NET_TX_SOFTIRQ, NO_PACKET,
    OWNER_PENDING, SLOTS, TASKLET_SOFTIRQ, TIMER_SOFTIRQ, UNATTRIBUTED_SLOT,
};

#[map(name = "DOVE_SLOTS")]
static SLOT_OF: HashMap<u64, u32> = HashMap::pinned(SLOTS, 0);

/// Read by the patched scheduler, written by doved; declared here so that it is created
/// and pinned with the other maps.
#[map(name = "DOVE_ENFORCE")]
static ENFORCE: HashMap<u64, u32> = HashMap::pinned(SLOTS, 0);

/// Every slot-indexed map is resized by doved at load time to its configured capacity
/// ([`SLOT_CAPACITY`]); this one to `nr_cpus × SLOT_CAPACITY`, row `cpu × capacity + slot`.
#[map(name = "DOVE_PERCPU_COST")]
static PERCPU_COST: Array<CpuCost> = Array::pinned(SLOTS, BPF_F_MMAPABLE);

/// doved's own (what a slot had before the per-CPU map was last created afresh);
/// declared here so that it is created and pinned with the others.
#[map(name = "DOVE_BASE")]
static BASE: Array<CpuCost> = Array::pinned(SLOTS, BPF_F_MMAPABLE);

/// Written by doved, read here only so that it is created and pinned with the others.
#[map(name = "DOVE_COST")]
static COST: Array<GlobalCost> = Array::pinned(SLOTS, BPF_F_MMAPABLE);

/// Slots per CPU row of [`PERCPU_COST`]: set by doved at load time (a read-only global,
/// so the verifier sees a constant), from `observer.max_containers`.
#[no_mangle]
static SLOT_CAPACITY: u32 = SLOTS;

#[map(name = "DOVE_WINDOW")]
static WINDOW: PerCpuArray<WindowState> = PerCpuArray::pinned(1, 0);

#[map(name = "DOVE_SETTINGS")]
static SETTINGS: Array<Settings> = Array::pinned(1, 0);

#[map(name = "DOVE_KERNEL_OFFSETS")]
static OFFSETS: Array<KernelOffsets> = Array::pinned(1, 0);

/// Whether `active` (a vector plus one) is a softirq whose network work is done by
/// callbacks (timers, hrtimers, tasklets) charged one by one.
#[inline(always)]
fn callback_window(active: u32) -> bool {
    active == TIMER_SOFTIRQ + 1 || active == TASKLET_SOFTIRQ + 1 || active == HRTIMER_SOFTIRQ + 1
}

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
    // SAFETY: a plain read of a global; volatile so the compiler does not fold in the
    // default that doved overrides at load time.
    let capacity = unsafe { core::ptr::read_volatile(&SLOT_CAPACITY) };
    // A slot beyond a row would land in the next CPU's row, whose owner adds without
    // atomics: doved never hands one out, and this keeps it so.
    if slot >= capacity {
        return;
    }
    let Some(cost) = PERCPU_COST.get_ptr_mut(cpu * capacity + slot) else {
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
    charge_stretch(w, now, slot, packets);
}

/// Charge the stretch from the mark to `now` to `slot` (receive time in NET_RX windows,
/// transmit time in the others), and start the next stretch at `now`.
///
/// SAFETY: `w` is this CPU's window state, with a window open.
#[inline(always)]
unsafe fn charge_stretch(w: *mut WindowState, now: u64, slot: u32, packets: u64) {
    let ns = now.saturating_sub((*w).mark_ns);
    (*w).mark_ns = now;
    if ns > MAX_STRETCH_NS {
        (*w).dropped_stretches += 1;
        return;
    }
    charge(slot, ns, (*w).active == NET_RX_SOFTIRQ + 1, packets);
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
        (*w).callback = 0;
        if callback_window(vec + 1) {
            // Its callbacks open and close their own stretches.
            (*w).active = vec + 1;
            return 0;
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
        if !callback_window((*w).active) {
            close_stretch(w, bpf_ktime_get_ns());
        }
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

/// A NET_TX window hands a packet to a driver (`net_dev_start_xmit`, after the qdisc
/// dequeued it): the previous packet's stretch ends here and this one's begins, owned by
/// the socket that sent it. No socket hook runs here, so the owner is read from the skb.
#[raw_tracepoint(tracepoint = "net_dev_start_xmit")]
pub fn dove_xmit_start(ctx: RawTracePointContext) -> i32 {
    let Some(w) = WINDOW.get_ptr_mut(0) else {
        return 0;
    };
    unsafe {
        if (*w).active != NET_TX_SOFTIRQ + 1 {
            return 0;
        }
        (*w).xmits_started += 1;
        let slot = skb_owner(raw_arg0(&ctx), w);
        if (*w).packet_slot != NO_PACKET {
            close_stretch(w, bpf_ktime_get_ns());
        }
        // The window's overhead before its first packet joins that packet.
        (*w).packet_slot = slot;
    }
    0
}

/// A timer, hrtimer, tasklet or BH work item callback begins. Inside a
/// TIMER/HRTIMER/TASKLET window only callbacks that transmit for a socket are charged
/// (TCP's retransmit and keepalive timers, the pacing hrtimer, TSQ's tasklet or, from
/// 6.9, its BH work item): the others are not network work. Attached to
/// `timer_expire_entry`, `hrtimer_expire_entry`, `tasklet_entry` and
/// `workqueue_execute_start` (ignored outside those windows: kworkers run with none open).
#[raw_tracepoint]
pub fn dove_callback_entry(ctx: RawTracePointContext) -> i32 {
    let Some(w) = WINDOW.get_ptr_mut(0) else {
        return 0;
    };
    unsafe {
        // A callback inside another (a hardirq hrtimer in a softirq one) is part of it.
        if !callback_window((*w).active) || (*w).callback != 0 {
            return 0;
        }
        (*w).callback = raw_arg0(&ctx);
        (*w).mark_ns = bpf_ktime_get_ns();
        (*w).packet_slot = NO_PACKET;
    }
    0
}

/// A callback ends: its time after its last transmit goes to that transmit's owner.
/// Attached to the matching `*_exit` / `workqueue_execute_end` tracepoints.
#[raw_tracepoint]
pub fn dove_callback_exit(ctx: RawTracePointContext) -> i32 {
    let Some(w) = WINDOW.get_ptr_mut(0) else {
        return 0;
    };
    unsafe {
        if !callback_window((*w).active) || (*w).callback != raw_arg0(&ctx) {
            return 0;
        }
        (*w).callback = 0;
        if (*w).packet_slot != NO_PACKET {
            (*w).transmit_callbacks += 1;
            charge_stretch(w, bpf_ktime_get_ns(), (*w).packet_slot, 0);
            (*w).packet_slot = NO_PACKET;
        }
    }
    0
}

/// Read a kernel pointer-sized value at `addr + offset`; 0 when unreadable.
#[inline(always)]
fn read_u64(addr: u64, offset: u32) -> u64 {
    // SAFETY: bpf_probe_read_kernel copies through the kernel's fault-tolerant path.
    unsafe { bpf_probe_read_kernel((addr + offset as u64) as *const u64).unwrap_or(0) }
}

/// The registered owner of the socket that sent `skb` (a `struct sk_buff *`), from the
/// kernel structs at the offsets doved resolved from BTF; the unattributed slot for
/// packets of no full socket, of unregistered cgroups, or when the offsets are unknown.
///
/// SAFETY: `w` is this CPU's window state.
#[inline(always)]
unsafe fn skb_owner(skb: u64, w: *mut WindowState) -> u32 {
    let Some(off) = OFFSETS.get(0) else {
        return UNATTRIBUTED_SLOT;
    };
    if off.valid == 0 {
        return UNATTRIBUTED_SLOT;
    }
    let sk = read_u64(skb, off.skb_sk);
    if sk == 0 {
        return UNATTRIBUTED_SLOT;
    }
    // Only full sockets carry a cgroup: not request (NEW_SYN_RECV) or TIME_WAIT minis.
    let state: u8 = bpf_probe_read_kernel((sk + off.sk_state as u64) as *const u8).unwrap_or(0);
    if state == TCP_TIME_WAIT || state == TCP_NEW_SYN_RECV {
        return UNATTRIBUTED_SLOT;
    }
    let cgroup = read_u64(sk, off.sk_cgroup);
    if cgroup == 0 {
        return UNATTRIBUTED_SLOT;
    }
    let id = read_u64(read_u64(cgroup, off.cgroup_kn), off.kn_id);
    let Some(settings) = SETTINGS.get_ptr(0) else {
        return UNATTRIBUTED_SLOT;
    };
    let generation = core::ptr::read_volatile(&raw const (*settings).generation);
    let mask = core::ptr::read_volatile(&raw const (*settings).level_mask);
    // Without the ancestors array this lookup cannot find a nested cgroup's container,
    // which the socket hooks' lookup can: it must not leave its answer in their cache.
    let cacheable = generation & 1 == 0 && (mask == 0 || off.cgroup_ancestors != 0);
    if cacheable && (*w).owner_cache_cgroup == id && (*w).owner_cache_generation == generation {
        return (*w).owner_cache_slot;
    }
    let mut slot = match SLOT_OF.get(&id) {
        Some(slot) => *slot,
        None => UNATTRIBUTED_SLOT,
    };
    if slot == UNATTRIBUTED_SLOT && mask != 0 && off.cgroup_ancestors != 0 {
        // The array holds `level + 1` entries: never read past the socket cgroup's own.
        let own_level: i32 = bpf_probe_read_kernel((cgroup + off.cgroup_level as u64) as *const i32)
            .unwrap_or(0);
        let mut level = MAX_LEVEL;
        while level > 0 {
            if (level as i32) < own_level && mask & (1u64 << level) != 0 {
                let ancestor = read_u64(cgroup, off.cgroup_ancestors + 8 * level);
                if ancestor != 0 {
                    let ancestor_id = read_u64(read_u64(ancestor, off.cgroup_kn), off.kn_id);
                    if let Some(s) = SLOT_OF.get(&ancestor_id) {
                        slot = *s;
                        break;
                    }
                }
            }
            level -= 1;
        }
    }
    // Cache only if doved did not start rewriting the settings meanwhile (the seqlock's
    // second read: on weakly ordered CPUs the lookups may have seen a newer owner map).
    if cacheable && core::ptr::read_volatile(&raw const (*settings).generation) == generation {
        (*w).owner_cache_cgroup = id;
        (*w).owner_cache_slot = slot;
        (*w).owner_cache_generation = generation;
    }
    (*w).owner_lookups += 1;
    slot
}

/// `include/net/tcp_states.h`.
const TCP_TIME_WAIT: u8 = 6;
const TCP_NEW_SYN_RECV: u8 = 12;

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
        // The seqlock's second read: cache only if doved did not start rewriting the
        // settings meanwhile (on weakly ordered CPUs the lookups may have seen a newer map).
        if core::ptr::read_volatile(&raw const (*settings).generation) == generation {
            (*w).owner_cache_cgroup = id;
            (*w).owner_cache_slot = slot;
            (*w).owner_cache_generation = generation;
        }
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
        if callback_window((*w).active) {
            if delivery || (*w).callback == 0 {
                return;
            }
            // A callback transmits: the stretch up to here is this socket's (a TSQ
            // tasklet serves several sockets in turn), and so is the callback's tail.
            (*w).packets_in_window += 1;
            let slot = owner(ctx.skb.skb, w);
            charge_stretch(w, bpf_ktime_get_ns(), slot, 1);
            (*w).packet_slot = slot;
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

/// Early drop's buckets, by the host-side interface a container's traffic leaves through:
/// doved's settings, and the program's fill.
#[map(name = "DOVE_DROP_CONFIG")]
static DROP_CONFIG: HashMap<u32, DropConfig> = HashMap::with_max_entries(DROP_INTERFACES, 0);

#[map(name = "DOVE_DROP_STATE")]
static DROP_STATE: HashMap<u32, DropState> = HashMap::with_max_entries(DROP_INTERFACES, 0);

#[map(name = "DOVE_DROPPED")]
static DROPPED: PerCpuHashMap<u32, Dropped> = PerCpuHashMap::with_max_entries(DROP_INTERFACES, 0);

/// `TC_ACT_UNSPEC`: no verdict, the next program (tcx) or filter (clsact) decides.
const NEXT: i32 = -1;
const SHOT: i32 = 2;
/// A bucket idle this long starts over full (and the credit's product cannot overflow).
const MAX_IDLE_NS: u64 = 10_000_000_000;
const ETH_HLEN: usize = 14;
const IPPROTO_ICMPV6: u8 = 58;

/// IPv6 neighbour discovery and router messages (ICMPv6 133-137), which must pass like
/// ARP does, or the container's neighbours go stale while it is limited.
#[inline(always)]
fn neighbour_discovery(ctx: &TcContext) -> bool {
    // Fixed header only: ND never comes behind extension headers.
    matches!(ctx.load::<u8>(ETH_HLEN + 6), Ok(IPPROTO_ICMPV6))
        && matches!(ctx.load::<u8>(ETH_HLEN + 40), Ok(133..=137))
}

/// Early drop, at tc egress of a container's host-side interface: the container's IP
/// packets beyond what its quota can pay for in softirq time are dropped before its
/// side of the pair processes them. ARP and IPv6 neighbour discovery always pass, so
/// neighbours stay resolved and TCP recovers as soon as the container is back under
/// budget.
///
/// The bucket is a credit (rate × time since `epoch_ns`) less what was spent, so the only
/// write per admitted packet is one add to `spent_ns`. CPUs racing on one container's
/// traffic can lose each other's add (the BPF target has no atomic read-modify-write in
/// Rust's `core`): each lost add admits one packet beyond the rate, never a whole refill.
#[classifier]
pub fn dove_early_drop(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: the context pointer the kernel passed; the verifier checks the accesses.
    let (protocol, ifindex, len) = unsafe { ((*skb).protocol, (*skb).ifindex, (*skb).len) };
    let ipv6 = protocol == (0x86ddu16).to_be() as u32;
    if protocol != (0x0800u16).to_be() as u32 && !ipv6 {
        return NEXT;
    }
    // SAFETY: a map value the kernel keeps while the program runs; doved replaces it
    // whole, so the copy is one consistent setting.
    let Some(config) = (unsafe { DROP_CONFIG.get(&ifindex) }).copied() else {
        return NEXT;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if config.rate_ns_per_s == 0 || now > config.expires_ns {
        return NEXT;
    }
    if ipv6 && neighbour_discovery(&ctx) {
        return NEXT;
    }
    let Some(state) = DROP_STATE.get_ptr_mut(&ifindex) else {
        return NEXT;
    };
    // SAFETY: as above; the program is the only writer after doved creates it.
    unsafe {
        let mut elapsed = now.saturating_sub((*state).epoch_ns);
        let spent = (*state).spent_ns;
        let mut restart = elapsed > MAX_IDLE_NS;
        if !restart {
            // µs × (ns/s) / 10⁶: no overflow below MAX_IDLE_NS at any rate up to 1.8 × 10¹²
            // ns/s (1,800 CPUs).
            let credit = elapsed / 1000 * config.rate_ns_per_s / 1_000_000;
            restart = credit.saturating_sub(spent) > config.burst_ns;
        }
        if restart {
            // Full: start over at a full bucket, so credit never piles up past the burst.
            // A racing CPU's spend can be lost here too: one packet more admitted.
            (*state).epoch_ns = now.saturating_sub(config.burst_window_ns);
            (*state).spent_ns = 0;
            elapsed = config.burst_window_ns;
        }
        let credit = elapsed / 1000 * config.rate_ns_per_s / 1_000_000;
        let spent = if restart { 0 } else { spent };
        if credit >= spent.saturating_add(config.packet_cost_ns) {
            (*state).spent_ns += config.packet_cost_ns;
            return NEXT;
        }
        match DROPPED.get_ptr_mut(&ifindex) {
            Some(dropped) => {
                (*dropped).packets += 1;
                (*dropped).bytes += len as u64;
            }
            None => {
                let first = Dropped {
                    packets: 1,
                    bytes: len as u64,
                };
                let _ = DROPPED.insert(&ifindex, &first, 0);
            }
        }
    }
    SHOT
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[no_mangle]
#[link_section = "license"]
pub static LICENSE: [u8; 4] = *b"GPL\0";
