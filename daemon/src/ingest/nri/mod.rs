//! The NRI plugin: how doved learns about containers on runtimes that do not read OCI
//! hooks.d (containerd) and, after either side restarts, about every container that
//! already runs (NRI's `Synchronize`, the reconciliation hooks cannot give).
//!
//! NRI runs two ttrpc connections over the one unix socket a plugin opens to the runtime
//! ([`mux`]): on one the runtime calls the plugin's `Plugin` service, on the other the
//! plugin calls the runtime's `Runtime` service. [`api`] holds the messages, [`translate`]
//! turns a container into a registration, [`plugin`] runs the connection.

pub mod api;
pub mod mux;
pub mod plugin;
pub mod translate;
