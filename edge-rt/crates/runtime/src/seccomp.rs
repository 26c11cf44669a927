//! The default seccomp profile, compiled to BPF in pure Rust by `seccompiler`
//! (Firecracker's filter compiler), so the same filter works in the static
//! musl build where libseccomp's shared library is not available.
//!
//! It follows Docker's and containerd's default profile in effect: the
//! syscalls that profile refuses to an unprivileged container fail with EPERM
//! (namespace creation through clone flags included), and clone3 fails with
//! ENOSYS so that libc falls back to clone, whose flags can be checked.
//! Syscalls a granted capability legitimately needs (CAP_SYS_ADMIN for
//! mount, CAP_SYS_PTRACE for ptrace, ...) are left to that capability, as
//! Docker's profile does.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

// Missing from libc's musl tables on some targets; the numbers are the kernel's.
#[cfg(target_arch = "x86_64")]
const SYS_KEXEC_FILE_LOAD: i64 = 320;
#[cfg(not(target_arch = "x86_64"))]
const SYS_KEXEC_FILE_LOAD: i64 = 294;

/// Two filters, installed in this order: the EPERM denylist and the ENOSYS
/// one for clone3.
pub struct Profile {
    pub filters: Vec<BpfProgram>,
}

fn arch() -> Option<TargetArch> {
    match std::env::consts::ARCH {
        "x86_64" => Some(TargetArch::x86_64),
        "aarch64" => Some(TargetArch::aarch64),
        "riscv64" => Some(TargetArch::riscv64),
        _ => None,
    }
}

/// Syscalls refused unless the container holds the capability named.
fn denied(caps: &[String]) -> Vec<i64> {
    let has = |c: &str| caps.iter().any(|x| x == c || x == "ALL");
    let mut v: Vec<i64> = vec![
        libc::SYS_acct,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_keyctl,
        libc::SYS_bpf,
        libc::SYS_clock_adjtime,
        libc::SYS_clock_settime,
        libc::SYS_settimeofday,
        libc::SYS_delete_module,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_kexec_load,
        SYS_KEXEC_FILE_LOAD,
        libc::SYS_get_mempolicy,
        libc::SYS_set_mempolicy,
        libc::SYS_mbind,
        libc::SYS_move_pages,
        libc::SYS_lookup_dcookie,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_name_to_handle_at,
        libc::SYS_open_by_handle_at,
        libc::SYS_perf_event_open,
        libc::SYS_quotactl,
        libc::SYS_reboot,
        libc::SYS_setns,
        libc::SYS_unshare,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_syslog,
        libc::SYS_userfaultfd,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_kcmp,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_vhangup,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        libc::SYS_iopl,
        libc::SYS_ioperm,
        libc::SYS_nfsservctl,
        libc::SYS_uselib,
        libc::SYS_ustat,
        libc::SYS_sysfs,
        libc::SYS__sysctl,
    ]);
    let allowed_by_cap: Vec<i64> = [
        (
            "CAP_SYS_ADMIN",
            vec![
                libc::SYS_mount,
                libc::SYS_umount2,
                libc::SYS_pivot_root,
                libc::SYS_setns,
                libc::SYS_unshare,
                libc::SYS_quotactl,
                libc::SYS_fsopen,
                libc::SYS_fsconfig,
                libc::SYS_fsmount,
                libc::SYS_fspick,
                libc::SYS_move_mount,
                libc::SYS_open_tree,
                libc::SYS_name_to_handle_at,
                libc::SYS_lookup_dcookie,
                libc::SYS_perf_event_open,
                libc::SYS_bpf,
            ],
        ),
        (
            "CAP_SYS_PTRACE",
            vec![
                libc::SYS_ptrace,
                libc::SYS_process_vm_readv,
                libc::SYS_process_vm_writev,
                libc::SYS_kcmp,
            ],
        ),
        (
            "CAP_SYS_MODULE",
            vec![
                libc::SYS_init_module,
                libc::SYS_finit_module,
                libc::SYS_delete_module,
            ],
        ),
        (
            "CAP_SYS_TIME",
            vec![
                libc::SYS_settimeofday,
                libc::SYS_clock_settime,
                libc::SYS_clock_adjtime,
            ],
        ),
        (
            "CAP_SYS_BOOT",
            vec![libc::SYS_reboot, libc::SYS_kexec_load, SYS_KEXEC_FILE_LOAD],
        ),
        ("CAP_SYSLOG", vec![libc::SYS_syslog]),
        ("CAP_SYS_PACCT", vec![libc::SYS_acct]),
        ("CAP_DAC_READ_SEARCH", vec![libc::SYS_open_by_handle_at]),
        (
            "CAP_SYS_NICE",
            vec![
                libc::SYS_mbind,
                libc::SYS_set_mempolicy,
                libc::SYS_get_mempolicy,
                libc::SYS_move_pages,
            ],
        ),
        ("CAP_SYS_TTY_CONFIG", vec![libc::SYS_vhangup]),
    ]
    .into_iter()
    .filter(|(c, _)| has(c))
    .flat_map(|(_, s)| s)
    .collect();
    v.retain(|s| !allowed_by_cap.contains(s));
    v.sort_unstable();
    v.dedup();
    v
}

/// Compile the default profile for a container holding `caps`.
pub fn default_profile(caps: &[String]) -> Result<Profile, String> {
    let arch =
        arch().ok_or_else(|| format!("no seccomp support for {}", std::env::consts::ARCH))?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        denied(caps).into_iter().map(|s| (s, vec![])).collect();
    let sys_admin = caps.iter().any(|c| c == "CAP_SYS_ADMIN" || c == "ALL");
    if !sys_admin {
        // clone with any namespace flag: one rule per flag, any of them matches.
        let flags = [
            libc::CLONE_NEWNS,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
            libc::CLONE_NEWCGROUP,
        ];
        let clone_rules = flags
            .iter()
            .map(|f| {
                SeccompRule::new(vec![SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(*f as u64),
                    *f as u64,
                )
                .map_err(|e| e.to_string())?])
                .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, String>>()?;
        rules.insert(libc::SYS_clone, clone_rules);
    }
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| e.to_string())?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(|e| e.to_string())?;
    let mut filters = Vec::new();
    for f in [deny, clone3] {
        filters.push(BpfProgram::try_from(f).map_err(|e| e.to_string())?);
    }
    Ok(Profile { filters })
}

/// Install the filters in the calling process. Needs no_new_privs or
/// CAP_SYS_ADMIN; unlike `seccompiler::apply_filter` it does not set
/// no_new_privs itself, since a container may be allowed to escalate.
pub fn install(profile: &Profile) -> std::io::Result<()> {
    for f in &profile.filters {
        let prog = libc::sock_fprog {
            len: f.len() as u16,
            filter: f.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: prog points at a live, correctly sized BPF program.
        let rc = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                &prog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Right before exec: install `profile` (if any) in this process, and drop
/// CAP_SYS_ADMIN if edge-rt's init held it only for its own work (see
/// `init`: installing seccomp for a container allowed to escalate, mounting
/// the cgroup view). Raised to install, then gone from the effective and
/// permitted sets for good: the workload never has it.
pub fn enter(profile: Option<&Profile>, drop_sys_admin: bool) -> std::io::Result<()> {
    use caps::{CapSet, Capability};
    if let Some(p) = profile {
        if drop_sys_admin {
            let _ = caps::raise(None, CapSet::Effective, Capability::CAP_SYS_ADMIN);
        }
        install(p)?;
    }
    if drop_sys_admin {
        caps::drop(None, CapSet::Effective, Capability::CAP_SYS_ADMIN)
            .and_then(|_| caps::drop(None, CapSet::Permitted, Capability::CAP_SYS_ADMIN))
            .map_err(std::io::Error::other)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_open_their_syscalls() {
        let none = denied(&[]);
        assert!(none.contains(&libc::SYS_mount));
        assert!(none.contains(&libc::SYS_ptrace));
        let admin = denied(&["CAP_SYS_ADMIN".into()]);
        assert!(!admin.contains(&libc::SYS_mount));
        assert!(admin.contains(&libc::SYS_ptrace));
        assert!(default_profile(&[]).unwrap().filters.len() == 2);
    }
}
