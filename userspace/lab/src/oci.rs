//! The agent's container as runc runs it: the rootfs (the agent binary and
//! the shared libraries it links, as `cargo xtask image` stages the image),
//! and the OCI runtime config built from the DaemonSet's container spec the
//! way containerd's CRI plugin builds it (capabilities, no-new-privileges,
//! a read-only root, RuntimeDefault seccomp, the pod's network namespace,
//! hostPID as no PID namespace of its own).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::{json, Value};

use crate::{
    agent::{ContainerSpec, Seccomp},
    LabError, Result,
};

/// Where Debian's containers-common keeps the default seccomp profile
/// (what `RuntimeDefault` means to Podman and CRI-O).
pub const DEFAULT_SECCOMP: &str = "/usr/share/containers/seccomp.json";

/// containerd's default capabilities for a container that drops nothing.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability (a privileged container's).
pub const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Where the image puts the agent (its ENTRYPOINT, deploy/Containerfile).
pub const AGENT_IN_IMAGE: &str = "/tpbpf-agent";

/// Whether runc is installed and answers.
pub fn runc_installed() -> bool {
    Command::new("runc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The image's filesystem in `dir`: the shared libraries `agent` links
/// (at the paths ldd prints, the dynamic loader included) and an empty
/// `/tpbpf-agent` over which the binary is bind-mounted read-only (the
/// lab's binary is large with debug info; the container sees it as the
/// image's). Made once per lab; returns the rootfs path.
pub fn stage_rootfs(dir: &Path, agent: &Path) -> Result<PathBuf> {
    let rootfs = dir.join("rootfs");
    let stamp = dir.join("staged-from");
    let key = agent.display().to_string();
    if fs::read_to_string(&stamp).ok().as_deref() == Some(key.as_str()) {
        return Ok(rootfs);
    }
    let io = |what: String| move |source| LabError::Io { what, source };
    if rootfs.exists() {
        fs::remove_dir_all(&rootfs).map_err(io(format!("emptying {}", rootfs.display())))?;
    }
    for d in [
        "proc",
        "sys",
        "dev",
        "etc",
        "tmp",
        SERVICE_ACCOUNT_DIR.trim_start_matches('/'),
    ] {
        crate::mkdir(&rootfs.join(d))?;
    }
    for f in [AGENT_IN_IMAGE, "/etc/resolv.conf"] {
        let p = rootfs.join(f.trim_start_matches('/'));
        fs::write(&p, "").map_err(io(format!("creating {}", p.display())))?;
    }
    for lib in linked_libraries(agent)? {
        let dest = rootfs.join(lib.strip_prefix("/").unwrap_or(&lib));
        if let Some(parent) = dest.parent() {
            crate::mkdir(parent)?;
        }
        // fs::copy follows symlinks: the image gets the file itself.
        fs::copy(&lib, &dest).map_err(io(format!("copying {}", lib.display())))?;
    }
    crate::write(&stamp, &key)?;
    Ok(rootfs)
}

/// The files `bin` loads at run time, as ldd resolves them here (none for
/// a static binary).
fn linked_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .map_err(|source| LabError::Io {
            what: "running ldd (Debian's libc-bin)".into(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    if text.contains("not a dynamic executable") || err.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.contains("not found") {
            return Err(LabError::NotReady(format!(
                "{} needs a library this machine lacks: {line}",
                bin.display()
            )));
        }
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`,
        // `/lib64/ld-linux-x86-64.so.2 (0x...)`, `linux-vdso.so.1 (0x...)`
        let path = line.split_once(" => ").map_or(line, |(_, p)| p);
        let path = path.split(" (").next().unwrap_or_default().trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// What one agent container's config is made of.
pub struct Bundle<'a> {
    pub container: &'a ContainerSpec,
    pub rootfs: &'a Path,
    /// The agent binary, mounted at [`AGENT_IN_IMAGE`].
    pub agent: &'a Path,
    pub hostname: &'a str,
    pub env: &'a [(String, String)],
    /// The pod's network namespace (the sandbox's, joined).
    pub netns: &'a str,
    pub resolv: &'a Path,
    /// The node's network namespace, mounted at the same path inside.
    pub node_netns: &'a str,
    /// The container's cgroup, relative to runc's own (so under the lab's).
    pub cgroup: &'a str,
    /// The service account's directory, mounted at [`SERVICE_ACCOUNT_DIR`].
    pub service_account: Option<&'a Path>,
}

/// Where a kubelet mounts a pod's service-account token, CA and namespace.
pub const SERVICE_ACCOUNT_DIR: &str = tpbpf_agent_api::SERVICE_ACCOUNT_DIR;

/// The OCI runtime config (runtime-spec 1.0) for `b`.
pub fn config(b: &Bundle<'_>) -> Result<Value> {
    let c = b.container;
    let caps = c.capabilities();
    let mut args = if c.command.is_empty() {
        vec![AGENT_IN_IMAGE.to_string()]
    } else {
        c.command.clone()
    };
    args.extend(c.args.iter().cloned());
    let env: Vec<String> = b
        .env
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .chain([format!("HOSTNAME={}", b.hostname)])
        .collect();
    // A process that is not root has no effective capabilities (as
    // containerd gives a non-root user).
    let effective = if c.run_as_user == 0 {
        caps.clone()
    } else {
        Vec::new()
    };
    let mut namespaces = vec![
        json!({"type": "mount"}),
        json!({"type": "network", "path": b.netns}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
    ];
    if !c.host_pid {
        namespaces.push(json!({"type": "pid"}));
    }
    let mut resources = json!({"devices": [{"allow": false, "access": "rwm"}]});
    if let Some(m) = c.cpu_limit_millis {
        resources["cpu"] = json!({"quota": m * 100, "period": 100_000});
    }
    if let Some(bytes) = c.memory_limit_bytes {
        resources["memory"] = json!({"limit": bytes});
    }
    let mut linux = json!({
        "namespaces": namespaces,
        "cgroupsPath": b.cgroup,
        "resources": resources,
        "maskedPaths": [
            "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
            "/sys/firmware", "/sys/devices/virtual/powercap"
        ],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    });
    if !c.privileged {
        let profile = match &c.seccomp {
            Seccomp::Unconfined => None,
            Seccomp::RuntimeDefault => Some(PathBuf::from(DEFAULT_SECCOMP)),
            Seccomp::Localhost(p) => Some(p.clone()),
        };
        if let Some(path) = profile {
            let text = fs::read_to_string(&path).map_err(|source| LabError::Io {
                what: format!(
                    "reading the seccomp profile {} (RuntimeDefault is containers-common's: \
                     sudo apt-get install containers-common)",
                    path.display()
                ),
                source,
            })?;
            let docker: Value = serde_json::from_str(&text).map_err(|e| {
                LabError::NotReady(format!("the seccomp profile {}: {e}", path.display()))
            })?;
            linux["seccomp"] = seccomp_for(&docker, &caps);
        }
    }
    let bind = |src: &str, dst: &str, ro: bool| {
        let mut options = vec!["rbind", "nosuid", "nodev"];
        if ro {
            options.push("ro");
        }
        json!({"destination": dst, "type": "bind", "source": src, "options": options})
    };
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        bind(&b.agent.display().to_string(), AGENT_IN_IMAGE, true),
        bind(&b.resolv.display().to_string(), "/etc/resolv.conf", true),
        json!({"destination": b.node_netns, "type": "bind", "source": b.node_netns, "options": ["bind"]}),
    ];
    if let Some(dir) = b.service_account {
        mounts.push(bind(&dir.display().to_string(), SERVICE_ACCOUNT_DIR, true));
    }
    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": c.run_as_user, "gid": 0},
            "args": args,
            "env": env,
            "cwd": "/",
            "capabilities": {
                "bounding": caps,
                "effective": effective,
                "permitted": effective,
                "inheritable": [],
                "ambient": [],
            },
            // No rlimits: the container inherits the lab's (containerd's
            // come from its own service's limits too).
            "noNewPrivileges": c.no_new_privileges,
        },
        "root": {"path": b.rootfs, "readonly": c.read_only_root},
        "hostname": b.hostname,
        "mounts": mounts,
        "linux": linux,
    }))
}

/// The runtime-spec seccomp section for a container with `caps`, from a
/// profile in Docker's format (containers-common's): a rule applies when
/// the container has every capability it `includes` and none it
/// `excludes`, and its arches (if any) name this machine's, as Podman and
/// containerd read the same file.
pub fn seccomp_for(docker: &Value, caps: &[String]) -> Value {
    let arch = std::env::consts::ARCH;
    let go_arch = match arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let scmp_native = format!(
        "SCMP_ARCH_{}",
        match arch {
            "x86_64" => "X86_64",
            "aarch64" => "AARCH64",
            other => other,
        }
    );
    let mut architectures = vec![json!(scmp_native)];
    for m in docker["archMap"].as_array().into_iter().flatten() {
        if m["architecture"] == scmp_native.as_str() {
            architectures.extend(
                m["subArchitectures"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
            );
        }
    }
    let has = |c: &Value| c.as_str().is_some_and(|c| caps.iter().any(|x| x == c));
    let arch_in = |v: &Value| {
        v.as_array()
            .is_some_and(|a| a.iter().any(|x| x == go_arch || x == arch))
    };
    let mut syscalls = Vec::new();
    for rule in docker["syscalls"].as_array().into_iter().flatten() {
        let inc = &rule["includes"];
        let exc = &rule["excludes"];
        let inc_caps = inc["caps"].as_array().cloned().unwrap_or_default();
        if !inc_caps.iter().all(has) {
            continue;
        }
        if inc["arches"].as_array().is_some_and(|a| !a.is_empty()) && !arch_in(&inc["arches"]) {
            continue;
        }
        if exc["caps"].as_array().into_iter().flatten().any(has) || arch_in(&exc["arches"]) {
            continue;
        }
        let names = rule["names"]
            .as_array()
            .cloned()
            .or_else(|| rule["name"].as_str().map(|n| vec![json!(n)]))
            .unwrap_or_default();
        let mut out = json!({"names": names, "action": rule["action"]});
        if let Some(e) = rule["errnoRet"].as_u64() {
            out["errnoRet"] = json!(e);
        }
        if let Some(a) = rule["args"].as_array().filter(|a| !a.is_empty()) {
            out["args"] = json!(a);
        }
        syscalls.push(out);
    }
    let mut out = json!({
        "defaultAction": docker["defaultAction"],
        "architectures": architectures,
        "syscalls": syscalls,
    });
    if let Some(e) = docker["defaultErrnoRet"].as_u64() {
        out["defaultErrnoRet"] = json!(e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seccomp_rules_follow_the_containers_capabilities() {
        let docker = json!({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
        "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]}],
        "syscalls": [
            {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["bpf", "perf_event_open"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
            {"names": ["bpf", "perf_event_open"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1, "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
            {"names": ["chroot"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_CHROOT"]}},
            {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64", "x32"]}},
            {"names": ["s390_runtime_instr"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["s390x"]}},
        ]});
        let caps = vec!["CAP_SYS_ADMIN".to_string(), "CAP_BPF".to_string()];
        let s = seccomp_for(&docker, &caps);
        let names: Vec<String> = s["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                format!(
                    "{}:{}",
                    r["names"][0].as_str().unwrap(),
                    r["action"].as_str().unwrap()
                )
            })
            .collect();
        assert!(
            names.contains(&"read:SCMP_ACT_ALLOW".to_string()),
            "{names:?}"
        );
        assert!(
            names.contains(&"bpf:SCMP_ACT_ALLOW".to_string()),
            "{names:?}"
        );
        assert!(
            !names.contains(&"bpf:SCMP_ACT_ERRNO".to_string()),
            "{names:?}"
        );
        assert!(!names.iter().any(|n| n.starts_with("chroot")), "{names:?}");
        assert!(!names.iter().any(|n| n.starts_with("s390")), "{names:?}");
        if std::env::consts::ARCH == "x86_64" {
            assert!(
                names.iter().any(|n| n.starts_with("arch_prctl")),
                "{names:?}"
            );
            assert_eq!(
                s["architectures"],
                json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"])
            );
        }
        assert_eq!(s["defaultErrnoRet"], 38);
    }
}
