//! Empty programs at DOVE's six per-packet hooks, for the overhead benchmark
//! (`tests/bench/observer_overhead.rs`): what the kernel's hook dispatch costs before a
//! program does any work, the floor under what DOVE's programs can cost. doved never
//! loads them.
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{cgroup_skb, raw_tracepoint},
    programs::{RawTracePointContext, SkBuffContext},
};

#[raw_tracepoint(tracepoint = "softirq_entry")]
pub fn floor_softirq_entry(_ctx: RawTracePointContext) -> i32 {
    0
}

#[raw_tracepoint(tracepoint = "softirq_exit")]
pub fn floor_softirq_exit(_ctx: RawTracePointContext) -> i32 {
    0
}

#[raw_tracepoint(tracepoint = "netif_receive_skb")]
pub fn floor_packet_start(_ctx: RawTracePointContext) -> i32 {
    0
}

#[raw_tracepoint(tracepoint = "net_dev_start_xmit")]
pub fn floor_xmit_start(_ctx: RawTracePointContext) -> i32 {
    0
}

#[cgroup_skb]
pub fn floor_ingress(_ctx: SkBuffContext) -> i32 {
    1
}

#[cgroup_skb]
pub fn floor_egress(_ctx: SkBuffContext) -> i32 {
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
