//! Who deducts a container's softirq cost from its CFS quota: the patched scheduler, to
//! which doved hands its cost maps, or on other kernels the cpu.max controller
//! ([`cpumax`]), with [`early_drop`] for floods a quota cannot absorb.

pub mod cpumax;
pub mod early_drop;
pub mod interfaces;

use crate::bpf::observer::{self, Observer, ObserverError};
use crate::config::EnforcementMode;

#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    #[error(transparent)]
    Observer(#[from] ObserverError),
    #[error("enforcement.mode = \"cpumax\" but no cpu controller is mounted (neither cpu.max on cgroup v2 nor a v1 cpu hierarchy): mount one, or set enforcement.mode = \"auto\" or \"none\"")]
    NoCpuController,
    #[error(transparent)]
    Quota(#[from] cpumax::QuotaError),
}

/// The enforcement in effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// Measure and report only.
    None,
    /// The patched scheduler, from the cost maps doved handed it.
    Kernel,
    /// The user-space cpu.max controller.
    CpuMax,
    /// An enforcer outside doved, from the pinned cost map.
    External,
}

impl Enforcement {
    pub fn as_str(self) -> &'static str {
        match self {
            Enforcement::None => "none",
            Enforcement::Kernel => "kernel",
            Enforcement::CpuMax => "cpumax",
            Enforcement::External => "external",
        }
    }
}

/// Decide from the configured mode and the running kernel, and hand the scheduler the
/// cost maps when it will enforce. Needs privileges (it writes the scheduler's sysctls).
///
/// `cpu_controller`: whether a `cpu` controller is mounted (cpumax needs one).
pub fn start(
    mode: EnforcementMode,
    observer: Option<&mut Observer>,
    cpu_controller: bool,
) -> Result<Enforcement, EnforceError> {
    let Some(observer) = observer else {
        return Ok(Enforcement::None);
    };
    let enforcement = match mode {
        EnforcementMode::None => Enforcement::None,
        EnforcementMode::External => Enforcement::External,
        EnforcementMode::Kernel if !observer::kernel_patched() => {
            return Err(ObserverError::KernelUnpatched.into());
        }
        EnforcementMode::Cpumax if !cpu_controller => return Err(EnforceError::NoCpuController),
        EnforcementMode::Cpumax => Enforcement::CpuMax,
        EnforcementMode::Auto if !observer::kernel_patched() && cpu_controller => {
            tracing::info!(
                "the kernel has no DOVE scheduler patch ({} is missing): the cpu.max controller deducts softirq cost from quotas",
                observer::SLOT_SYSCTL
            );
            Enforcement::CpuMax
        }
        EnforcementMode::Auto if !observer::kernel_patched() => {
            tracing::info!(
                "no DOVE scheduler patch and no cpu controller mounted: measuring only, quotas are not charged"
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
        Enforcement::CpuMax => tracing::info!(
            "enforcement: cpumax (each tick, quotas are lowered by the softirq cost attributed to their containers)"
        ),
        Enforcement::External => tracing::info!(
            "enforcement: external (pending cost accrues in the pinned {} map for an enforcer outside doved)",
            dove_ebpf_common::COST_MAP
        ),
        Enforcement::None => {}
    }
    Ok(enforcement)
}
