//! The guest: its initramfs (busybox, the modules to reach the shared
//! root), the job it runs in the chroot, and qemu.
use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::root_dir;

use super::*;

/// Modules the guest needs before it can reach its root (9p over virtio,
/// the overlay) and for entropy. Those the kernel has built in are skipped.
pub(super) const BOOT_MODULES: &[&str] =
    &["virtio_pci", "virtio_rng", "9pnet_virtio", "9p", "overlay"];

/// Modules loaded inside the guest before the tests (the rest load on
/// demand through the kernel's modprobe, which the guest has).
pub(super) const TEST_MODULES: &[&str] = &[
    "veth",
    "bridge",
    "dummy",
    "sch_ingress",
    "cls_bpf",
    "act_bpf",
    "sch_htb",
    "sch_tbf",
    "nf_tables",
    "nft_nat",
    "nft_chain_nat",
    "nft_ct",
    "nft_redir",
    "nf_conntrack",
    "tls",
    "inet_diag",
    "tcp_diag",
    "udp_diag",
];

/// The guest's `/init`: modules, the shared root with a tmpfs over it,
/// the kernel's file systems inside it, then the job in a chroot.
pub(super) const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.load); do insmod "/mods/$m" || echo "tpbpf-vm: insmod $m failed"; done
mkdir -p /host /upper /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host || { echo "tpbpf-vm: mounting the shared root failed"; poweroff -f; }
mount -t tmpfs -o size=75% upper /upper
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/host,upperdir=/upper/u,workdir=/upper/w /newroot || { echo "tpbpf-vm: overlay failed"; poweroff -f; }
R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs shm $R/dev/shm
mount -t tmpfs run $R/run
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup
mount -t bpf bpf $R/sys/fs/bpf
mount -t tracefs tracefs $R/sys/kernel/tracing 2>/dev/null
mkdir -p $R/vmout
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out $R/vmout
MODS=$(cat /modules.dir)
mkdir -p "$R/lib/modules/$(uname -r)"
mount --bind "$R$MODS" "$R/lib/modules/$(uname -r)"
# The kernel's module requests (a qdisc, an nft expression, a sock_diag
# handler) run its helper in this root, not the chroot's: hand them over.
printf '#!/bin/busybox sh\nexec /bin/busybox chroot /newroot /sbin/modprobe "$@"\n' > /bin/modprobe-in-root
chmod 755 /bin/modprobe-in-root
echo /bin/modprobe-in-root > /proc/sys/kernel/modprobe
chroot $R /bin/sh /vmout/job.sh
echo "tpbpf-vm: job ended ($?)"
sync
poweroff -f
"#;

pub(super) fn build_initramfs(kernel: &Kernel, run_dir: &Path) -> Result<PathBuf> {
    let dir = run_dir.join("initramfs");
    for d in ["bin", "mods", "proc", "sys", "dev"] {
        fs::create_dir_all(dir.join(d))?;
    }
    fs::copy(
        which("busybox").context("busybox not found")?,
        dir.join("bin/busybox"),
    )?;
    let init = dir.join("init");
    fs::write(&init, INIT)?;
    set_mode(&init, 0o755)?;

    let deps = ModuleDeps::read(&kernel.modules)?;
    let mut order = Vec::new();
    for m in BOOT_MODULES {
        deps.load_order(m, &mut order);
    }
    let mut load = String::new();
    for rel in &order {
        let src = kernel.modules.join(rel);
        let base = module_file_name(rel);
        let dst = dir.join("mods").join(&base);
        if rel.ends_with(".xz") {
            let out = Command::new("xz").arg("-dc").arg(&src).output()?;
            fs::write(&dst, out.stdout)?;
        } else if rel.ends_with(".zst") {
            let out = Command::new("zstd").arg("-dc").arg(&src).output()?;
            fs::write(&dst, out.stdout)?;
        } else {
            fs::copy(&src, &dst)?;
        }
        writeln!(load, "{base}")?;
    }
    fs::write(dir.join("modules.load"), load)?;
    fs::write(
        dir.join("modules.dir"),
        kernel.modules.to_string_lossy().as_bytes(),
    )?;

    let initrd = run_dir.join("initrd.cpio");
    let list = Command::new("find")
        .arg(".")
        .current_dir(&dir)
        .output()
        .context("find")?;
    let mut cpio = Command::new("busybox")
        .args(["cpio", "-o", "-H", "newc"])
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(fs::File::create(&initrd)?)
        .stderr(Stdio::null())
        .spawn()
        .context("busybox cpio")?;
    cpio.stdin
        .take()
        .context("cpio stdin")?
        .write_all(&list.stdout)?;
    if !cpio.wait()?.success() {
        bail!("busybox cpio failed");
    }
    Ok(initrd)
}

pub(super) fn write_job(
    kernel: &Kernel,
    selected: &[Selected],
    args: &Args,
    run_dir: &Path,
) -> Result<()> {
    let vm_tests = root_dir().join("vm-tests");
    let mut job = String::new();
    // This machine's PATH (pyenv's python3, rustup's tools), then the
    // system's.
    let path = std::env::var("PATH").unwrap_or_default();
    writeln!(
        job,
        "export PATH={}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 TPBPF_VM_KERNEL={}",
        shell_quote(&path),
        kernel.release
    )?;
    if let Ok(ci) = std::env::var("CI") {
        writeln!(job, "export CI={}", shell_quote(&ci))?;
    }
    if accel() == "tcg" {
        // Emulated: bulk tests move less (each says how much it moved),
        writeln!(job, "export TPBPF_TEST_UPLOAD_MIB=256")?;
        // Time bounds the tests assert, stretched for emulation.
        writeln!(job, "export TPBPF_TEST_TIME_SCALE=10")?;
    }
    writeln!(job, "hostname tpbpf-vm")?;
    writeln!(job, "ip link set lo up")?;
    writeln!(
        job,
        "for m in {}; do modprobe -q $m || echo \"tpbpf-vm: no module $m\"; done",
        TEST_MODULES.join(" ")
    )?;
    writeln!(job, "uname -r > /vmout/uname")?;
    if let Some(deb) = &args.deb {
        let deb =
            fs::canonicalize(deb).with_context(|| format!("{}: no such package", deb.display()))?;
        writeln!(
            job,
            "( set -x; dpkg -i {deb} && tpbpf --version && tpbpf doctor && test -s /usr/share/bash-completion/completions/tpbpf && test -s /usr/share/zsh/vendor-completions/_tpbpf && test -s /usr/share/fish/vendor_completions.d/tpbpf.fish && zcat /usr/share/man/man1/tpbpf-up.1.gz | grep -q tpbpf && tpbpf debug redirect --cidr 10.96.0.0/12 -- curl -sS --max-time 5 http://10.96.0.10/ ) > /vmout/deb.log 2>&1; echo $? > /vmout/deb.status",
            deb = shell_quote(&deb.to_string_lossy())
        )?;
    }
    writeln!(job, "cd {}", shell_quote(&vm_tests.to_string_lossy()))?;
    if let Some(cmd) = &args.exec {
        writeln!(job, "{cmd}")?;
        return fs::write(run_dir.join("out/job.sh"), job).map_err(Into::into);
    }
    for s in selected {
        let mut argv = vec![shell_quote(&s.bin.path.to_string_lossy())];
        argv.extend(s.filters.iter().map(|f| shell_quote(f)));
        writeln!(
            job,
            "echo \"tpbpf-vm: {name}\"; timeout -s KILL {t} {argv} --test-threads=2 > /vmout/logs/{name}.log 2>&1; echo \"{name} $?\" >> /vmout/status",
            name = s.bin.name,
            t = args.binary_timeout,
            argv = argv.join(" ")
        )?;
    }
    fs::write(run_dir.join("out/job.sh"), job)?;
    Ok(())
}

pub(super) fn accel() -> &'static str {
    // KVM where the host can run a guest with it; this machine kind's
    // /dev/kvm cannot (TOOLCHAIN: a nested device that hangs guests), so
    // TPBPF_VM_ACCEL=kvm opts in.
    if std::env::var("TPBPF_VM_ACCEL").is_ok_and(|a| a == "kvm") {
        "kvm"
    } else {
        "tcg"
    }
}

pub(super) fn boot_guest(
    kernel: &Kernel,
    initrd: &Path,
    run_dir: &Path,
    args: &Args,
    console: &Path,
) -> Result<()> {
    let out = run_dir.join("out");
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", accel(), "-cpu", "max", "-smp", "2"])
        .args(["-m", &args.memory.to_string()])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .args(["-device", "virtio-rng-pci"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=4"])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=out,security_model=none",
            out.display()
        ))
        .stdin(Stdio::null())
        .stdout(fs::File::create(console)?)
        .stderr(Stdio::inherit());
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let mut seen = 0usize;
    loop {
        // Say which binary runs as the guest reaches it.
        if let Ok(text) = fs::read_to_string(console) {
            for line in text.lines().skip(seen) {
                if let Some(rest) = line.trim().strip_prefix("tpbpf-vm: ") {
                    println!(
                        "[guest {:>4.0} s] {rest}",
                        deadline_elapsed(deadline, args.timeout)
                    );
                }
                seen += 1;
            }
        }
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!(
                    "qemu exited with {status}; the console is in {}",
                    console.display()
                );
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the guest did not finish within {} s (--timeout); its console: {}",
                args.timeout,
                console.display()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub(super) fn deadline_elapsed(deadline: Instant, timeout: u64) -> f64 {
    timeout as f64
        - deadline
            .saturating_duration_since(Instant::now())
            .as_secs_f64()
}
