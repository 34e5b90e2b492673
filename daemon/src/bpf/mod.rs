//! The eBPF side: host preflight, loading and pinning the programs and maps, cost slots
//! (`observer`), the kernel struct offsets the transmit programs need (`offsets`), and
//! the thread that owns them and aggregates every tick (`accounting`).

pub mod accounting;
pub mod ingress_limit;
pub mod observer;
pub mod offsets;
