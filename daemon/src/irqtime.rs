//! Whether the running kernel accounts IRQ time apart from tasks' runtime.
//!
//! It decides who already paid for softirq work. With IRQ time accounting active, the
//! scheduler excludes hardirq and softirq time from the interrupted task's runtime: no task
//! paid, and DOVE's charge is the whole bill. Without it, the task that happened to be
//! interrupted was billed too, so deducting DOVE's charge from the owner bills that time
//! twice unless the victim is credited.
//!
//! Being built in (`CONFIG_IRQ_TIME_ACCOUNTING`) is not enough: x86 turns it off at boot
//! with `tsc=noirqtime` and whenever the TSC is found unstable, at boot or at any time
//! later (`mark_tsc_unstable`). The kernel does not export the switch. What shows it
//! running is PSI's `irq` line, which only grows while IRQ time is being accounted (it is
//! fed from the same per-CPU IRQ time counters); but PSI keeps its total, so once the
//! switch goes off later only the TSC shows it: a TSC found unstable loses its
//! high-resolution flag, and with the tick in one-shot mode (NO_HZ or high-resolution
//! timers, every distribution kernel) `available_clocksource` stops listing it. x86 only
//! enables the accounting from `tsc_init`, so no listed TSC means none.

use std::path::Path;

/// What the running kernel does with IRQ time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqTimeAccounting {
    /// The kernel is built without it: the interrupted task pays.
    NotBuilt,
    /// Built, switched off on the command line (`tsc=noirqtime`).
    DisabledAtBoot,
    /// Built, switched off by the kernel: the TSC was found unstable (x86).
    DisabledTscUnstable,
    /// Built and accounting: PSI has recorded IRQ time since boot.
    Active,
    /// Built, but nothing shows it running: PSI is off or has recorded no IRQ time (an
    /// idle host, or accounting switched off when the TSC was found unstable).
    Unconfirmed,
    /// Neither the kernel's configuration nor PSI is readable.
    Unknown,
}

impl IrqTimeAccounting {
    pub const ALL: [IrqTimeAccounting; 6] = [
        IrqTimeAccounting::NotBuilt,
        IrqTimeAccounting::DisabledAtBoot,
        IrqTimeAccounting::DisabledTscUnstable,
        IrqTimeAccounting::Active,
        IrqTimeAccounting::Unconfirmed,
        IrqTimeAccounting::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IrqTimeAccounting::NotBuilt => "not-built",
            IrqTimeAccounting::DisabledAtBoot => "disabled-at-boot",
            IrqTimeAccounting::DisabledTscUnstable => "disabled-tsc-unstable",
            IrqTimeAccounting::Active => "active",
            IrqTimeAccounting::Unconfirmed => "unconfirmed",
            IrqTimeAccounting::Unknown => "unknown",
        }
    }

    /// Read the running kernel's configuration, command line and PSI.
    pub fn probe() -> Self {
        // The configuration cannot change under a running kernel, and reading it (a
        // quarter of a megabyte, perhaps gzipped) would dominate every status request.
        // Kept only once found: /boot may be mounted, or the configs module loaded, later.
        static CONFIG_LINE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let config = match CONFIG_LINE.get() {
            Some(line) => Some(line.clone()),
            None => Self::kernel_config().map(|text| {
                let line = text
                    .lines()
                    .find(|l| l.contains("CONFIG_IRQ_TIME_ACCOUNTING"))
                    .unwrap_or_default()
                    .to_owned();
                CONFIG_LINE.get_or_init(|| line).clone()
            }),
        };
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let psi = std::fs::read_to_string("/proc/pressure/irq")
            .map(Psi::Read)
            .unwrap_or_else(|e| match e.kind() {
                // From 6.0, PSI has an irq file exactly when IRQ time accounting is built.
                std::io::ErrorKind::NotFound
                    if Path::new("/proc/pressure/cpu").exists()
                        && aya::util::KernelVersion::current()
                            .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 0, 0)) =>
                {
                    Psi::AbsentWhilePsiRuns
                }
                std::io::ErrorKind::NotFound => Psi::Absent,
                _ => Psi::Unreadable,
            });
        let tsc = if cfg!(target_arch = "x86_64") {
            std::fs::read_to_string(
                "/sys/devices/system/clocksource/clocksource0/available_clocksource",
            )
            .map(|list| Tsc::from_available(&list))
            .unwrap_or(Tsc::Unknown)
        } else {
            Tsc::NotX86
        };
        Self::classify(config.as_deref(), &cmdline, psi, tsc)
    }

    fn kernel_config() -> Option<String> {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        std::fs::read_to_string(Path::new("/boot").join(format!("config-{release}")))
            .ok()
            .or_else(|| {
                use std::io::Read;
                let file = std::fs::File::open("/proc/config.gz").ok()?;
                let mut text = String::new();
                flate2::read::GzDecoder::new(file)
                    .read_to_string(&mut text)
                    .ok()?;
                Some(text)
            })
    }

    /// The decision, from the texts [`Self::probe`] reads.
    pub fn classify(kernel_config: Option<&str>, cmdline: &str, psi: Psi, tsc: Tsc) -> Self {
        let configured = kernel_config.and_then(|c| {
            c.lines().find_map(|l| match l.trim() {
                "CONFIG_IRQ_TIME_ACCOUNTING=y" => Some(true),
                "# CONFIG_IRQ_TIME_ACCOUNTING is not set" => Some(false),
                _ => None,
            })
        });
        // /proc/pressure/irq exists only in kernels built with it (and PSI).
        let built = match (&psi, configured) {
            (Psi::Read(_) | Psi::Unreadable, _) => true,
            (Psi::Absent | Psi::AbsentWhilePsiRuns, Some(built)) => built,
            (Psi::AbsentWhilePsiRuns, None) => false,
            (Psi::Absent, None) => return IrqTimeAccounting::Unknown,
        };
        if !built {
            return IrqTimeAccounting::NotBuilt;
        }
        if cmdline.split_whitespace().any(|arg| arg == "tsc=noirqtime") {
            return IrqTimeAccounting::DisabledAtBoot;
        }
        if tsc == Tsc::NotListed {
            return IrqTimeAccounting::DisabledTscUnstable;
        }
        match psi {
            Psi::Read(text) if psi_irq_total(&text).is_some_and(|t| t > 0) => {
                IrqTimeAccounting::Active
            }
            _ => IrqTimeAccounting::Unconfirmed,
        }
    }
}

/// `/proc/pressure/irq` as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Psi {
    Read(String),
    /// Not there: the kernel lacks IRQ time accounting or PSI.
    Absent,
    /// Not there while PSI runs on a kernel from 6.0 (which has the file whenever IRQ time
    /// accounting is built): the kernel lacks it, even with no configuration to read (a
    /// host without /boot, doved in a container).
    AbsentWhilePsiRuns,
    /// There but unreadable.
    Unreadable,
}

/// The TSC as `available_clocksource` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tsc {
    /// Listed (`tsc`, or `tsc-early` before its calibration is refined): not found
    /// unstable, or the tick is periodic and the list cannot tell.
    Listed,
    /// Not listed: found unstable, or never usable; either way no IRQ time accounting.
    NotListed,
    /// The list could not be read.
    Unknown,
    /// Not an x86 machine: the TSC has nothing to do with it.
    NotX86,
}

impl Tsc {
    fn from_available(list: &str) -> Self {
        if list
            .split_whitespace()
            .any(|name| name == "tsc" || name == "tsc-early")
        {
            Tsc::Listed
        } else {
            Tsc::NotListed
        }
    }
}

/// The `total=` (µs) of the `full` line.
fn psi_irq_total(text: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with("full "))?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUILT: &str = "CONFIG_PSI=y\nCONFIG_IRQ_TIME_ACCOUNTING=y\n";
    const NOT_BUILT: &str =
        "# CONFIG_IRQ_TIME_ACCOUNTING is not set\nCONFIG_HAVE_IRQ_TIME_ACCOUNTING=y\n";
    const BUSY: &str = "full avg10=0.12 avg60=0.05 avg300=0.01 total=8811\n";
    const IDLE: &str = "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";

    #[test]
    fn decides_from_config_cmdline_and_psi() {
        use IrqTimeAccounting::*;
        let read = |t: &str| Psi::Read(t.to_owned());
        let cases = [
            // (config, cmdline, psi, expected), the TSC listed
            (Some(NOT_BUILT), "quiet", Psi::Absent, NotBuilt),
            (None, "quiet", Psi::Absent, Unknown),
            (None, "quiet", Psi::AbsentWhilePsiRuns, NotBuilt),
            (Some(NOT_BUILT), "quiet", Psi::AbsentWhilePsiRuns, NotBuilt),
            (Some(BUILT), "quiet", read(BUSY), Active),
            (None, "quiet", read(BUSY), Active),
            (
                Some(BUILT),
                "quiet tsc=noirqtime",
                read(IDLE),
                DisabledAtBoot,
            ),
            (Some(BUILT), "quiet", read(IDLE), Unconfirmed),
            (Some(BUILT), "quiet", Psi::Unreadable, Unconfirmed),
            // psi=0 removes /proc/pressure: the configuration still says it is built.
            (Some(BUILT), "quiet psi=0", Psi::Absent, Unconfirmed),
            // Built, but PSI compiled out: nothing confirms it runs.
            (Some(BUILT), "quiet", Psi::Absent, Unconfirmed),
            (Some(BUILT), "quiet", read("garbage"), Unconfirmed),
            // Another tsc= option does not switch it off.
            (Some(BUILT), "tsc=reliable", read(BUSY), Active),
        ];
        for (config, cmdline, psi, expected) in cases {
            assert_eq!(
                IrqTimeAccounting::classify(config, cmdline, psi.clone(), Tsc::Listed),
                expected,
                "{config:?} {cmdline:?} {psi:?}"
            );
        }
    }

    #[test]
    fn a_tsc_found_unstable_switches_it_off_whatever_psi_recorded() {
        use IrqTimeAccounting::*;
        let busy = || Psi::Read(BUSY.to_owned());
        let tsc = |list: &str| Tsc::from_available(list);
        let cases = [
            // PSI keeps the IRQ time recorded before the TSC was found unstable.
            (
                Some(BUILT),
                "quiet",
                tsc("hpet acpi_pm \n"),
                DisabledTscUnstable,
            ),
            (Some(BUILT), "quiet", tsc("tsc hpet acpi_pm \n"), Active),
            (Some(BUILT), "quiet", tsc("tsc-early hpet\n"), Active),
            (Some(BUILT), "quiet", tsc("kvm-clock tsc hpet\n"), Active),
            // A name that merely starts like it is not it.
            (
                Some(BUILT),
                "quiet",
                tsc("tscx hpet\n"),
                DisabledTscUnstable,
            ),
            (Some(BUILT), "quiet", Tsc::Unknown, Active),
            (Some(BUILT), "quiet", Tsc::NotX86, Active),
            // The command line and the build decide first.
            (Some(BUILT), "tsc=noirqtime", tsc("hpet\n"), DisabledAtBoot),
            (Some(NOT_BUILT), "quiet", tsc("hpet\n"), NotBuilt),
        ];
        for (config, cmdline, tsc, expected) in cases {
            let psi = if config == Some(NOT_BUILT) {
                Psi::Absent
            } else {
                busy()
            };
            assert_eq!(
                IrqTimeAccounting::classify(config, cmdline, psi, tsc),
                expected,
                "{cmdline:?} {tsc:?}"
            );
        }
    }
}
