//! Kernel struct offsets for the transmit programs, from the running kernel's BTF.
//!
//! NET_TX work runs no socket hook: the packet's owner can only be read from the skb
//! (`skb->sk->sk_cgrp_data.cgroup->kn->id`). aya emits no CO-RE relocations for Rust
//! programs, so doved does the relocation itself: it reads the member offsets from
//! `/sys/kernel/btf/vmlinux` (the same description CO-RE relocates against) and hands them
//! to the programs in `DOVE_KERNEL_OFFSETS`. The programs read through
//! `bpf_probe_read_kernel`: a wrong offset gives a wrong owner at worst, never a fault.

use std::path::Path;

use btfparse::{Offset, Readable, TypeInformation};
use dove_ebpf_common::KernelOffsets;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum OffsetsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing the kernel's BTF: {0}")]
    Parse(String),
    #[error("the kernel's BTF has no {0}")]
    Missing(String),
}

/// The BTF file's bytes, for btfparse.
struct Bytes(Vec<u8>);

impl Readable for Bytes {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let source = start
            .checked_add(buffer.len())
            .and_then(|end| self.0.get(start..end))
            .ok_or_else(|| {
                btfparse::Error::new(btfparse::ErrorKind::InvalidOffset, "read past the end")
            })?;
        buffer.copy_from_slice(source);
        Ok(())
    }
}

/// Resolve every offset from the BTF file at `path`.
pub fn resolve(path: &Path) -> Result<KernelOffsets, OffsetsError> {
    let bytes = std::fs::read(path).map_err(|source| OffsetsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let types =
        TypeInformation::new(&Bytes(bytes)).map_err(|e| OffsetsError::Parse(format!("{e:?}")))?;
    let offset = |ty: &str, member: &str| -> Result<u32, OffsetsError> {
        let missing = || OffsetsError::Missing(format!("struct {ty} member {member}"));
        let id = types.id_of(ty).ok_or_else(missing)?;
        match types.offset_of(id, member) {
            Ok((_, Offset::ByteOffset(at))) => Ok(at),
            _ => Err(missing()),
        }
    };
    Ok(KernelOffsets {
        skb_sk: offset("sk_buff", "sk")?,
        sk_state: offset("sock", "__sk_common.skc_state")?,
        sk_cgroup: offset("sock", "sk_cgrp_data.cgroup")?,
        cgroup_kn: offset("cgroup", "kn")?,
        kn_id: offset("kernfs_node", "id")?,
        // Kernels before 6.1 keep ancestor IDs instead: nested cgroups inside a container
        // are then matched only at the container's own cgroup on transmit.
        cgroup_ancestors: offset("cgroup", "ancestors").unwrap_or(0),
        cgroup_level: offset("cgroup", "level")?,
        valid: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's offsets against what `bpftool btf dump` says of the same BTF
    /// (an instrument outside this crate).
    #[test]
    fn offsets_match_bpftool_on_this_kernel() {
        if !Path::new(VMLINUX_BTF).exists() {
            eprintln!("SKIPPED: {VMLINUX_BTF} is missing (a kernel without BTF)");
            return;
        }
        let offsets = resolve(Path::new(VMLINUX_BTF)).unwrap();
        let Ok(out) = std::process::Command::new("bpftool")
            .args(["btf", "dump", "file", VMLINUX_BTF])
            .output()
        else {
            eprintln!("SKIPPED: bpftool is not installed");
            return;
        };
        let dump = String::from_utf8_lossy(&out.stdout);
        // `[id] STRUCT 'sk_buff' size=N vlen=M` then `\t'sk' type_id=K bits_offset=B`.
        let bits_offset = |ty: &str, member: &str| -> u32 {
            let start = dump
                .find(&format!("STRUCT '{ty}' "))
                .unwrap_or_else(|| panic!("no struct {ty} in bpftool's dump"));
            dump[start..]
                .lines()
                .skip(1)
                .take_while(|l| l.starts_with('\t'))
                .find(|l| l.trim_start().starts_with(&format!("'{member}' ")))
                .and_then(|l| l.split("bits_offset=").nth(1))
                .and_then(|b| b.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("no member {member} of {ty} in bpftool's dump"))
        };
        assert_eq!(offsets.skb_sk * 8, bits_offset("sk_buff", "sk"));
        assert_eq!(offsets.cgroup_kn * 8, bits_offset("cgroup", "kn"));
        assert_eq!(offsets.kn_id * 8, bits_offset("kernfs_node", "id"));
        assert_eq!(offsets.cgroup_level * 8, bits_offset("cgroup", "level"));
        assert_eq!(
            offsets.cgroup_ancestors * 8,
            bits_offset("cgroup", "ancestors")
        );
        assert_eq!(
            offsets.sk_state * 8,
            bits_offset("sock", "__sk_common") + bits_offset("sock_common", "skc_state")
        );
        assert_eq!(
            offsets.sk_cgroup * 8,
            bits_offset("sock", "sk_cgrp_data") + bits_offset("sock_cgroup_data", "cgroup")
        );
        assert_eq!(offsets.valid, 1);
    }
}
