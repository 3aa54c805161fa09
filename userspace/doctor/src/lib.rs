//! `tpbpf doctor`: one row per requirement, each probed by doing the thing
//! (loading a tiny program of that type, attaching it to a scratch cgroup),
//! not by reading version numbers, with a remedy for every failure.

mod bpf;
mod report;

pub use report::{Check, Report, Status};

use std::{fs, path::Path};

use aya::{
    programs::ProgramType,
    sys::{is_helper_supported, BpfHelper},
};
use bpf::{AttachType, ProgType};

const ROOT_REMEDY: &str =
    "run tpbpf as root (sudo tpbpf ...), or give it CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN";

/// Runs every probe and returns the report.
pub fn run() -> Report {
    let mut checks = vec![kernel_version()];
    if let Some(c) = wsl_check(
        &fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default(),
        Path::new("/run/systemd/system").is_dir(),
    ) {
        checks.push(c);
    }
    checks.extend(capabilities());
    checks.push(bpf_syscall());
    checks.push(jit());
    checks.push(btf());
    for (name, prog, attach, min) in program_probes() {
        checks.push(program_check(name, prog, attach, min));
    }
    checks.push(atomics());
    checks.push(tcx());
    for (name, prog, helper, min) in helper_probes() {
        checks.push(helper_check(name, prog, helper, min));
    }
    let (mount, cgroup) = cgroup2();
    checks.push(cgroup);
    checks.push(cgroup_link(mount.as_deref()));
    checks.push(ktls());
    Report { checks }
}

/// Kernel TLS: the TLS upper-layer protocol on a connected TCP socket
/// (loopback, this process's own), as the tunnel would set it.
fn ktls() -> Check {
    let name = "kernel TLS (TCP ULP tls)";
    match tpbpf_sys::kernel_tls_probe() {
        Ok(()) => Check::ok(name, "available"),
        Err(e) => Check::warn(
            name,
            format!("not available ({e})"),
            "the tunnel's TLS stays in user space (rustls); where the kernel has CONFIG_TLS, `modprobe tls` loads it",
        ),
    }
}

fn kernel_version() -> Check {
    let name = "kernel version";
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let parsed: Vec<u32> = release
        .split(|c: char| !c.is_ascii_digit())
        .take(2)
        .filter_map(|p| p.parse().ok())
        .collect();
    match parsed.as_slice() {
        [maj, min] if (*maj, *min) >= (5, 15) => Check::ok(name, format!("{release} (5.15 or newer)")),
        [_, _] => Check::fail(
            name,
            format!("{release}: older than 5.15"),
            "tpbpf needs Linux 5.15 or newer (bpf_link on cgroups, getpeername hooks, netns cookies from sock_ops); upgrade the kernel",
        ),
        _ => Check::warn(name, format!("could not parse `{release}`"), "the probes below are what count"),
    }
}

/// On WSL, what its kernel and its init mean for tpbpf; `None` elsewhere.
/// WSL 1 has no Linux kernel at all. WSL 2's own kernels
/// (`X.Y.Z-microsoft-standard-WSL2`) carry BTF and the cgroup BPF hooks from
/// 5.15.74.2 (WSL 1.0.0) on; before that they had no BTF. WSL 2 mounts
/// cgroup v2 beside v1 (at /sys/fs/cgroup/unified, found by tpbpf), and
/// runs systemd only where /etc/wsl.conf asks for it.
fn wsl_check(osrelease: &str, systemd: bool) -> Option<Check> {
    let release = osrelease.trim();
    let name = "platform";
    if release.ends_with("-Microsoft") {
        return Some(Check::fail(
            name,
            format!("WSL 1 ({release}): no Linux kernel, no eBPF"),
            "convert the distribution to WSL 2 from Windows: `wsl --set-version DISTRO 2`",
        ));
    }
    if !release.to_ascii_lowercase().contains("microsoft") {
        return None;
    }
    let version: Vec<u32> = release
        .split(|c: char| !c.is_ascii_digit())
        .take(4)
        .filter_map(|p| p.parse().ok())
        .collect();
    let custom = !release.contains("microsoft-standard-WSL2");
    if !custom && version.as_slice() < [5, 15, 74, 2].as_slice() {
        return Some(Check::fail(
            name,
            format!("WSL 2, kernel {release}: WSL's kernels before 5.15.74.2 have no BTF"),
            "update WSL's kernel from Windows: `wsl --update`, then `wsl --shutdown`",
        ));
    }
    let kernel = if custom {
        format!("WSL 2 with a custom kernel ({release}): the probes below decide")
    } else {
        format!("WSL 2, kernel {release}")
    };
    Some(if systemd {
        Check::ok(
            name,
            format!("{kernel}; systemd runs (tpbpfd can be a service)"),
        )
    } else {
        Check::warn(
            name,
            format!("{kernel}; systemd is off"),
            "for tpbpfd as a service add `[boot]` / `systemd=true` to /etc/wsl.conf and run `wsl --shutdown` from Windows, or run `sudo tpbpf service start` after each WSL start (docs/wsl2.md)",
        )
    })
}

fn capabilities() -> Vec<Check> {
    let eff = fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    });
    [
        ("CAP_BPF", 39u32),
        ("CAP_NET_ADMIN", 12),
        ("CAP_SYS_ADMIN", 21),
    ]
    .into_iter()
    .map(|(cap, bit)| {
        let name = format!("capability {cap}");
        match eff {
            Some(eff) if eff & (1 << bit) != 0 => Check::ok(name, "effective"),
            Some(_) => Check::fail(name, "missing from the effective set", ROOT_REMEDY),
            None => Check::warn(name, "could not read /proc/self/status", ROOT_REMEDY),
        }
    })
    .collect()
}

fn bpf_syscall() -> Check {
    let name = "bpf() syscall";
    match bpf::create_array_map() {
        Ok(_) => Check::ok(name, "map created"),
        Err(e) => Check::fail(
            name,
            bpf::describe(&e),
            remedy_for(&e, "the kernel needs CONFIG_BPF_SYSCALL=y"),
        ),
    }
}

fn jit() -> Check {
    let name = "BPF JIT";
    let sysctl = fs::read_to_string("/proc/sys/net/core/bpf_jit_enable")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    match bpf::load_trivial(
        ProgType::CgroupSockAddr,
        Some(AttachType::CgroupInet4Connect),
    )
    .and_then(|fd| bpf::jited_len(&fd))
    {
        Ok(len) if len > 0 => Check::ok(
            name,
            format!("programs are JIT-compiled ({len} bytes native; bpf_jit_enable={sysctl})"),
        ),
        Ok(_) => Check::warn(
            name,
            format!("programs run in the interpreter (bpf_jit_enable={sysctl})"),
            "enable the JIT for speed: sysctl -w net.core.bpf_jit_enable=1",
        ),
        Err(e) => Check::fail(
            name,
            format!("could not load a program to check: {}", bpf::describe(&e)),
            remedy_for(&e, "see the bpf() syscall row"),
        ),
    }
}

fn btf() -> Check {
    let name = "kernel BTF";
    let path = Path::new("/sys/kernel/btf/vmlinux");
    match aya::Btf::from_sys_fs() {
        Ok(_) => {
            let size = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            Check::ok(
                name,
                format!("{} parsed ({} KiB)", path.display(), size / 1024),
            )
        }
        Err(e) => Check::fail(
            name,
            format!("{}: {e}", path.display()),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (most distribution kernels are)",
        ),
    }
}

type ProgramProbe = (&'static str, ProgType, Option<AttachType>, &'static str);

fn program_probes() -> Vec<ProgramProbe> {
    use AttachType::*;
    use ProgType::*;
    vec![
        (
            "program cgroup/connect4",
            CgroupSockAddr,
            Some(CgroupInet4Connect),
            "4.17",
        ),
        (
            "program cgroup/connect6",
            CgroupSockAddr,
            Some(CgroupInet6Connect),
            "4.17",
        ),
        (
            "program cgroup/sendmsg4",
            CgroupSockAddr,
            Some(CgroupUdp4Sendmsg),
            "4.18",
        ),
        (
            "program cgroup/sendmsg6",
            CgroupSockAddr,
            Some(CgroupUdp6Sendmsg),
            "4.18",
        ),
        (
            "program cgroup/recvmsg4",
            CgroupSockAddr,
            Some(CgroupUdp4Recvmsg),
            "5.2",
        ),
        (
            "program cgroup/recvmsg6",
            CgroupSockAddr,
            Some(CgroupUdp6Recvmsg),
            "5.2",
        ),
        (
            "program cgroup/getpeername4",
            CgroupSockAddr,
            Some(CgroupInet4Getpeername),
            "5.8",
        ),
        (
            "program cgroup/getpeername6",
            CgroupSockAddr,
            Some(CgroupInet6Getpeername),
            "5.8",
        ),
        ("program sock_ops", SockOps, None, "4.13"),
        ("program sk_lookup", SkLookup, Some(SkLookupAttach), "5.9"),
        ("program sched_cls (tc)", SchedCls, None, "4.1"),
    ]
}

fn program_check(name: &str, prog: ProgType, attach: Option<AttachType>, min: &str) -> Check {
    match bpf::load_trivial(prog, attach) {
        Ok(_) => Check::ok(name, "loaded a test program"),
        Err(e) => Check::fail(
            name,
            bpf::describe(&e),
            remedy_for(&e, &format!("this program type needs Linux {min} or newer with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF")),
        ),
    }
}

fn atomics() -> Check {
    let name = "atomic fetch-add (BPF_ATOMIC)";
    match bpf::load_atomic_fetch() {
        Ok(_) => Check::ok(name, "loaded a test program"),
        Err(e) => Check::fail(
            name,
            bpf::describe(&e),
            remedy_for(
                &e,
                "needs Linux 5.12 or newer (tpbpf's UDP slots count with it)",
            ),
        ),
    }
}

fn tcx() -> Check {
    let name = "tcx attach (tc via bpf_link)";
    match bpf::query_tcx_ingress_lo() {
        Ok(n) => Check::ok(name, format!("supported ({n} programs on lo)")),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Check::warn(
            name,
            "not supported by this kernel (needs 6.6)",
            "tpbpf falls back to tc clsact filters, which it removes itself on exit; upgrade to 6.6+ for links the kernel removes on crash",
        ),
        Err(e) => Check::fail(name, bpf::describe(&e), remedy_for(&e, "needs Linux 6.6 or newer")),
    }
}

type HelperProbe = (&'static str, ProgramType, BpfHelper, &'static str);

fn helper_probes() -> Vec<HelperProbe> {
    vec![
        (
            "helper get_socket_cookie (sock_addr)",
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_socket_cookie,
            "5.7",
        ),
        (
            "helper get_netns_cookie (sock_ops)",
            ProgramType::SockOps,
            BpfHelper::BPF_FUNC_get_netns_cookie,
            "5.15",
        ),
        (
            "helper sk_assign (tc)",
            ProgramType::SchedClassifier,
            BpfHelper::BPF_FUNC_sk_assign,
            "5.7",
        ),
    ]
}

fn helper_check(name: &str, prog: ProgramType, helper: BpfHelper, min: &str) -> Check {
    match is_helper_supported(prog, helper) {
        Ok(true) => Check::ok(name, "available"),
        Ok(false) => Check::fail(name, "not available", format!("needs Linux {min} or newer")),
        Err(e) => {
            // Find the errno under aya's error, for the remedy.
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            let mut errno = None;
            while let Some(s) = source {
                if let Some(io) = s.downcast_ref::<std::io::Error>() {
                    errno = io.raw_os_error();
                }
                source = s.source();
            }
            let io = std::io::Error::from_raw_os_error(errno.unwrap_or(libc::EINVAL));
            Check::fail(
                name,
                format!("probe failed: {e}: {}", bpf::describe(&io)),
                remedy_for(&io, &format!("needs Linux {min} or newer")),
            )
        }
    }
}

fn cgroup2() -> (Option<std::path::PathBuf>, Check) {
    use tpbpf_cgroup::{CgroupError, OWN_MOUNT};
    let name = "cgroup v2 hierarchy";
    match tpbpf_cgroup::cgroup2() {
        Ok(m) => {
            let detail = if m.own {
                format!(
                    "none was visible here (cgroup v1 only, `ip netns exec`, or a container): \
                     tpbpf uses its own mount at {}",
                    m.path.display()
                )
            } else {
                let layout = if m.path.ends_with("unified") {
                    "hybrid layout"
                } else {
                    "unified layout"
                };
                format!("mounted at {} ({layout})", m.path.display())
            };
            (Some(m.path), Check::ok(name, detail))
        }
        Err(e @ CgroupError::NoCgroup2) => (
            None,
            Check::fail(name, "the kernel has no cgroup2 filesystem", e.to_string()),
        ),
        Err(CgroupError::Mount { source, .. })
            if matches!(source.raw_os_error(), Some(libc::EPERM | libc::EACCES)) =>
        {
            (
                None,
                Check::warn(
                    name,
                    format!("none visible here; as root, tpbpf mounts its own at {OWN_MOUNT}"),
                    ROOT_REMEDY,
                ),
            )
        }
        Err(e) => (
            None,
            Check::fail(name, "none visible, and mounting one failed", e.to_string()),
        ),
    }
}

fn cgroup_link(mount: Option<&Path>) -> Check {
    let name = "bpf_link to a cgroup";
    let Some(mount) = mount else {
        return Check::fail(
            name,
            "skipped: no cgroup v2 hierarchy",
            "see the cgroup v2 row",
        );
    };
    match bpf::attach_in_scratch_cgroup(mount) {
        Ok(scratch) => Check::ok(
            name,
            format!(
                "attached and detached a test program on {}",
                scratch.display()
            ),
        ),
        Err(e) => Check::fail(
            name,
            bpf::describe(&e),
            remedy_for(&e, "needs Linux 5.7 or newer with CONFIG_CGROUP_BPF"),
        ),
    }
}

fn remedy_for(e: &std::io::Error, otherwise: &str) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => ROOT_REMEDY.to_string(),
        Some(libc::ENOSYS) => {
            "the kernel was built without the bpf() syscall (CONFIG_BPF_SYSCALL=y)".to_string()
        }
        _ => otherwise.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wsl_kernels_are_recognised_with_what_they_need() {
        assert!(wsl_check("6.18.44-generic\n", true).is_none());
        assert!(wsl_check("6.1.0-57-amd64", false).is_none());
        let wsl1 = wsl_check("4.4.0-19041-Microsoft", false).unwrap();
        assert_eq!(wsl1.status, Status::Fail);
        assert!(wsl1.remedy.as_deref().unwrap().contains("--set-version"));
        let old = wsl_check("5.10.102.1-microsoft-standard-WSL2", true).unwrap();
        assert_eq!(old.status, Status::Fail);
        assert!(old.remedy.as_deref().unwrap().contains("wsl --update"));
        let no_systemd = wsl_check("5.15.153.1-microsoft-standard-WSL2\n", false).unwrap();
        assert_eq!(no_systemd.status, Status::Warn);
        assert!(no_systemd
            .remedy
            .as_deref()
            .unwrap()
            .contains("systemd=true"));
        let good = wsl_check("6.6.36.3-microsoft-standard-WSL2", true).unwrap();
        assert_eq!(good.status, Status::Ok);
        let custom = wsl_check("6.6.36.3-microsoft-custom-WSL2+", true).unwrap();
        assert_eq!(custom.status, Status::Ok);
        assert!(custom.detail.contains("custom kernel"));
    }
}
