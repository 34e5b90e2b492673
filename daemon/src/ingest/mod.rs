//! How doved learns about containers: the socket server (`dove-hook`, `dovectl`) and the
//! replay of requests hooks spooled while doved was unreachable. The containerd NRI
//! plugin joins here.

pub mod nri;
pub mod replay;
pub mod server;
