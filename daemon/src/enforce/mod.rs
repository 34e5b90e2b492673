//! Who deducts a container's softirq cost from its CFS quota. Today that is the patched
//! scheduler, to which doved hands its cost maps; the cpu.max controller and early drop
//! join here for kernels without the patch.

use crate::bpf::observer::{self, Observer, ObserverError};
use crate::config::EnforcementMode;

/// The enforcement in effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// Measure and report only.
    None,
    /// The patched scheduler, from the cost maps doved handed it.
    Kernel,
    /// An enforcer outside doved, from the pinned cost map.
    External,
}

impl Enforcement {
    pub fn as_str(self) -> &'static str {
        match self {
            Enforcement::None => "none",
            Enforcement::Kernel => "kernel",
            Enforcement::External => "external",
        }
    }
}

/// Decide from the configured mode and the running kernel, and hand the scheduler the
/// cost maps when it will enforce. Needs privileges (it writes the scheduler's sysctls).
pub fn start(
    mode: EnforcementMode,
    observer: Option<&mut Observer>,
) -> Result<Enforcement, ObserverError> {
    let Some(observer) = observer else {
        return Ok(Enforcement::None);
    };
    let enforcement = match mode {
        EnforcementMode::None => Enforcement::None,
        EnforcementMode::External => Enforcement::External,
        EnforcementMode::Kernel if !observer::kernel_patched() => {
            return Err(ObserverError::KernelUnpatched);
        }
        EnforcementMode::Auto if !observer::kernel_patched() => {
            tracing::info!(
                "the kernel has no DOVE scheduler patch ({} is missing): measuring only, quotas are not charged",
                observer::SLOT_SYSCTL
            );
            Enforcement::None
        }
        EnforcementMode::Auto | EnforcementMode::Kernel => Enforcement::Kernel,
    };
    // Pending accrues only while someone consumes it.
    observer.accrue_pending(enforcement != Enforcement::None);
    match enforcement {
        Enforcement::Kernel => {
            observer.hand_to_kernel()?;
            tracing::info!("enforcement: kernel (cost maps handed to the patched scheduler)");
        }
        Enforcement::External => tracing::info!(
            "enforcement: external (pending cost accrues in the pinned {} map for an enforcer outside doved)",
            dove_ebpf_common::COST_MAP
        ),
        Enforcement::None => {}
    }
    Ok(enforcement)
}
