//! Where early drop could stand, for the placement benchmark
//! (`tests/bench/early_drop_placement.rs`): programs that drop a container's IPv4 traffic
//! where it enters the host (XDP or tc ingress, keyed by the container's address, as a
//! program at a host's NIC would have to be) and at the container's host-side veth (tc
//! egress, keyed by the interface, where doved's `dove_early_drop` stands). Each does one
//! hash lookup and drops (and counts) whatever it matches, so the benchmark compares the
//! placements, not the policies. `drop_tc_entry` at the sender's own egress measures what
//! the sender alone costs. doved never loads them.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};

/// IPv4 destinations (as they appear in the header) to drop at the entry.
#[map(name = "DROP_ADDRS")]
static DROP_ADDRS: HashMap<u32, u8> = HashMap::with_max_entries(64, 0);

/// Interfaces (ifindex) whose egress drops everything IPv4.
#[map(name = "DROP_IFINDEX")]
static DROP_IFINDEX: HashMap<u32, u8> = HashMap::with_max_entries(64, 0);

/// Packets the loaded program dropped (slot 0, per CPU): the benchmark tells its drops
/// from a full ring or backlog, which are cheaper and would flatter a placement.
#[map(name = "DROPPED")]
static DROPPED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

fn count_drop() {
    if let Some(n) = DROPPED.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; a program runs to completion on one CPU.
        unsafe { *n += 1 };
    }
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// `TC_ACT_UNSPEC`: no verdict, the next program decides.
const TC_NEXT: i32 = -1;
const TC_ACT_SHOT: i32 = 2;

#[xdp]
pub fn drop_xdp_entry(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + ETH_HLEN + 20 > end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: both reads lie inside [data, end), checked above.
    let (ethertype, dst) = unsafe {
        (
            core::ptr::read_unaligned((data + 12) as *const u16),
            core::ptr::read_unaligned((data + ETH_HLEN + 16) as *const u32),
        )
    };
    if ethertype != ETH_P_IP.to_be() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: a map value the kernel keeps while the program runs; only its presence counts.
    match unsafe { DROP_ADDRS.get(&dst) } {
        Some(_) => {
            count_drop();
            xdp_action::XDP_DROP
        }
        None => xdp_action::XDP_PASS,
    }
}

#[classifier]
pub fn drop_tc_entry(ctx: TcContext) -> i32 {
    let (Ok(ethertype), Ok(dst)) = (ctx.load::<u16>(12), ctx.load::<u32>(ETH_HLEN + 16)) else {
        return TC_NEXT;
    };
    if ethertype != ETH_P_IP.to_be() {
        return TC_NEXT;
    }
    // SAFETY: as above.
    match unsafe { DROP_ADDRS.get(&dst) } {
        Some(_) => {
            count_drop();
            TC_ACT_SHOT
        }
        None => TC_NEXT,
    }
}

#[classifier]
pub fn drop_tc_host_veth(ctx: TcContext) -> i32 {
    // SAFETY: the context pointer the kernel passed; the verifier checks the accesses.
    let (protocol, ifindex) = unsafe { ((*ctx.skb.skb).protocol, (*ctx.skb.skb).ifindex) };
    if protocol != ETH_P_IP.to_be() as u32 {
        return TC_NEXT;
    }
    // SAFETY: as above.
    match unsafe { DROP_IFINDEX.get(&ifindex) } {
        Some(_) => {
            count_drop();
            TC_ACT_SHOT
        }
        None => TC_NEXT,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[no_mangle]
#[link_section = "license"]
pub static LICENSE: [u8; 4] = *b"GPL\0";
