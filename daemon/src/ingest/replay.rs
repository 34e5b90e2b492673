//! Replays the hook's spool (requests it could not deliver while doved was down or stuck)
//! into the registry, oldest first, then deletes each file.
//!
//! A spooled request never undoes something newer: a registration or unregistration is
//! skipped when the registry holds a registration of that ID made after the hook spooled
//! it. A registration is validated like any other (the cgroup must still exist and be
//! the one named), so a container that came and went while doved was down is dropped.

use std::path::Path;
use std::time::SystemTime;

use dove_proto::spool::{read_spool, SpoolEntry};
use dove_proto::Request;

use crate::registry::{Named, Registry};

/// Replay every spooled request; returns how many were applied.
pub async fn replay_spool(registry: &Registry, dir: &Path) -> usize {
    let mut applied = 0;
    for (path, entry) in read_spool(dir) {
        match entry {
            Ok(entry) => {
                if apply(registry, &entry).await {
                    applied += 1;
                }
            }
            Err(e) => tracing::warn!("spool: {e}"),
        }
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), "spool: could not delete a replayed request: {e}");
        }
    }
    applied
}

/// Whether the registry holds a registration of `id` newer than `than`.
fn registered_after(registry: &Registry, id: &str, than: SystemTime) -> bool {
    registry
        .find(id)
        .is_some_and(|c| humantime::parse_rfc3339(&c.registered_at).is_ok_and(|at| at > than))
}

async fn apply(registry: &Registry, entry: &SpoolEntry) -> bool {
    let spooled_at = humantime::format_rfc3339_millis(entry.spooled_at());
    match &entry.request {
        Request::Register { container } => {
            let id = container.id.clone();
            if registered_after(registry, &id, entry.spooled_at()) {
                tracing::info!(%id, %spooled_at, "spool: registration skipped, a newer one is registered");
                return false;
            }
            // Only root's hooks spool (the directory is root's).
            match registry.register(container.clone(), 0).await {
                Ok(_) => {
                    tracing::info!(%id, %spooled_at, "spool: registered a container the hook could not deliver");
                    true
                }
                Err(e) => {
                    tracing::info!(%id, %spooled_at, "spool: registration dropped: {e}");
                    false
                }
            }
        }
        Request::Unregister {
            id,
            cgroup_path,
            bundle,
        } => {
            if registered_after(registry, id, entry.spooled_at()) {
                tracing::info!(%id, %spooled_at, "spool: unregistration skipped, the ID was registered again after it");
                return false;
            }
            let named = Named {
                cgroup_path: cgroup_path.as_deref(),
                bundle: bundle.as_deref(),
            };
            match registry.unregister(id, named, 0).await {
                Ok(existed) => {
                    tracing::info!(%id, %spooled_at, existed, "spool: unregistered a container the hook could not deliver");
                    existed
                }
                Err(e) => {
                    tracing::warn!(%id, "spool: unregistration failed: {e}");
                    false
                }
            }
        }
        other => {
            tracing::warn!("spool: {other:?} is not a request a hook spools; ignored");
            false
        }
    }
}
