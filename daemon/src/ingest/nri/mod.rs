//! The containerd NRI plugin (work in progress: the wire layer only, not yet wired into
//! doved). NRI runs two ttrpc connections over the one unix socket a plugin opens to the
//! runtime ([`mux`]): on one the runtime calls the plugin's `Plugin` service, on the
//! other the plugin calls the runtime's `Runtime` service.

pub mod api;
pub mod mux;
pub mod translate;

#[cfg(test)]
mod handshake_test;
