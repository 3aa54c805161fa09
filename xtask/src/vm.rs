//! `cargo xtask vm-test --kernel VERSION`: the privileged suite on another
//! kernel. One of Debian's kernel packages (bullseye's 5.10, bookworm's
//! 6.1, trixie's 6.12) is fetched from Debian's archive (the archive's
//! signature checked with gpgv and the keyring Debian ships, then each
//! file's SHA-256), unpacked under `target/vm/`, and booted under qemu with
//! a busybox initramfs. The guest shares this machine's `/` read-only over
//! 9p, lays a tmpfs over it, and runs the already built test binaries in a
//! chroot of that: the same binaries, the same servers, another kernel. It
//! has no network device, so nothing it does leaves the guest.
//!
//! Results come back through a second, writable 9p share; each test is
//! reported as pass, fail or skip (with the skip's reason, which names the
//! missing kernel feature), and `--record` writes them into
//! `docs/kernels.json` and the matrix in `docs/kernels.md`.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{cargo, is_root, root_dir, run, step};

/// Where Debian's archive is; `TPBPF_DEBIAN_MIRROR` points elsewhere (a
/// local mirror with the same layout).
const MIRROR: &str = "http://deb.debian.org";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The kernels `--kernel` knows: the version line, and the archive and
/// suite that serve its newest security update.
const KERNELS: &[(&str, &str, &str)] = &[
    ("5.10", "debian-security", "bullseye-security"),
    ("6.1", "debian-security", "bookworm-security"),
    ("6.12", "debian-security", "trixie-security"),
];

/// Modules the guest needs before it can reach its root (9p over virtio,
/// the overlay) and for entropy. Those the kernel has built in are skipped.
const BOOT_MODULES: &[&str] = &["virtio_pci", "virtio_rng", "9pnet_virtio", "9p", "overlay"];

/// Modules loaded inside the guest before the tests (the rest load on
/// demand through the kernel's modprobe, which the guest has).
const TEST_MODULES: &[&str] = &[
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

/// A subset that runs in CI on 6.1, inside its time box: the datapath,
/// `run`, next to other eBPF, `up` and an intercept through the lab. Each entry is a test
/// binary and the test-name filters passed to it (empty: all of it).
const CI_SUBSET: &[(&str, &[&str])] = &[
    ("doctor", &["doctor_as_root_meets_every_requirement"]),
    ("redirect", &[]),
    (
        "bridge",
        &[
            "run_bridges_curl_to_cluster_ipv4_and_ipv6",
            "run_resolves_cluster_names_and_forwards_the_rest",
            "tc_path_bridges_a_container_namespace_and_sigkill_leaves_nothing",
        ],
    ),
    ("coexist", &[]),
    (
        "up",
        &["up_discovers_the_cluster_and_bridges_a_subtree_until_down"],
    ),
    (
        "intercept_up",
        &["intercept_sends_a_deployments_connections_to_the_developer_and_gives_them_back"],
    ),
];

#[derive(clap::Args)]
pub struct Args {
    /// The kernel: 5.10, 6.1 or 6.12 (Debian's newest package of that line).
    #[arg(long)]
    kernel: String,
    /// Run only the CI subset (the datapath, run, up, an intercept).
    #[arg(long)]
    ci_subset: bool,
    /// Run only these test binaries (vm-tests/tests/NAME.rs), or with
    /// NAME::FILTER the tests of NAME whose names contain FILTER; repeatable.
    #[arg(long = "test", value_name = "NAME")]
    tests: Vec<String>,
    /// Also install this .deb in the guest (`dpkg -i`) and run
    /// `tpbpf doctor` and `tpbpf debug redirect` from it.
    #[arg(long, value_name = "DEB")]
    pub deb: Option<PathBuf>,
    /// Write the results into docs/kernels.json and docs/kernels.md.
    #[arg(long)]
    record: bool,
    /// Run this shell command in the guest instead of the suite (its
    /// output goes to the console), for a look at that kernel.
    #[arg(long, value_name = "CMD")]
    exec: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 4096)]
    memory: u32,
    /// Give up on the guest after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout: u64,
    /// Each test binary is killed after this many seconds.
    #[arg(long, default_value_t = 600)]
    binary_timeout: u64,
}

impl Args {
    /// The CI subset on kernel `line`, with the default limits.
    pub fn ci_subset(line: &str) -> Self {
        Self {
            kernel: line.into(),
            ci_subset: true,
            tests: Vec::new(),
            deb: None,
            record: false,
            exec: None,
            memory: 4096,
            timeout: 1500,
            binary_timeout: 600,
        }
    }
}

pub fn vm_test(args: Args) -> Result<()> {
    if !is_root() {
        bail!("the guest runs the privileged suite as root in a chroot of this machine's /, which needs root here: run `sudo bash xtask/dev.sh vm-test --kernel {}`", args.kernel);
    }
    for tool in [
        "qemu-system-x86_64",
        "busybox",
        "depmod",
        "gpgv",
        "xz",
        "dpkg-deb",
    ] {
        if !on_path(tool) {
            bail!("{tool} not found: `sudo bash xtask/setup.sh vm-test` installs qemu-system-x86, busybox-static, kmod, gpgv and xz-utils");
        }
    }
    let started = Instant::now();
    let vm_dir = root_dir().join("target/vm");
    fs::create_dir_all(&vm_dir)?;

    step(&format!("Debian's {} kernel", args.kernel));
    let kernel = fetch_kernel(&args.kernel, &vm_dir)?;
    println!(
        "{} ({}), unpacked in {}",
        kernel.package,
        kernel.version,
        kernel.root.display()
    );

    let binaries = if args.exec.is_some() {
        Vec::new()
    } else {
        step("build the privileged suite (vm-tests) and tpbpf");
        build_suite()?
    };
    let selected = if args.exec.is_some() {
        Vec::new()
    } else {
        select(&binaries, &args)?
    };

    step("initramfs (busybox, the modules to reach the shared root)");
    let run_dir = vm_dir.join(format!("run-{}-{}", args.kernel, std::process::id()));
    let _ = fs::remove_dir_all(&run_dir);
    fs::create_dir_all(run_dir.join("out/logs"))?;
    let _cleanup = RemoveDir(run_dir.clone());
    let initrd = build_initramfs(&kernel, &run_dir)?;
    let selected = snapshot(selected, &run_dir)?;
    write_job(&kernel, &selected, &args, &run_dir)?;

    step(&format!(
        "boot {} under qemu ({}) and run {} test binaries",
        kernel.release,
        accel(),
        selected.len()
    ));
    let boot = Instant::now();
    let console = run_dir.join("console.log");
    boot_guest(&kernel, &initrd, &run_dir, &args, &console)?;
    let guest_secs = boot.elapsed().as_secs_f64();

    let out = run_dir.join("out");
    if args.exec.is_some() {
        print!("{}", fs::read_to_string(&console).unwrap_or_default());
        return Ok(());
    }
    let results = collect(&out, &selected)?;
    print_results(&results);
    let mut failed = results
        .iter()
        .filter(|r| r.outcome == Outcome::Fail)
        .count();
    if let Some(deb) = &args.deb {
        let deb_log = fs::read_to_string(out.join("deb.log")).unwrap_or_default();
        let deb_ok = fs::read_to_string(out.join("deb.status"))
            .map(|s| s.trim() == "0")
            .unwrap_or(false);
        println!(
            "\n{} {}: dpkg -i, tpbpf doctor, tpbpf debug redirect in the guest\n{}",
            if deb_ok { "PASS" } else { "FAIL" },
            deb.display(),
            indent(&deb_log)
        );
        if !deb_ok {
            failed += 1;
        }
    }
    let ran_all = results.iter().any(|r| r.outcome != Outcome::NotRun);
    if !ran_all {
        let tail = tail_lines(&fs::read_to_string(&console).unwrap_or_default(), 40);
        bail!(
            "the guest ran no test (kernel {}); its console ended with:\n{}",
            kernel.release,
            indent(&tail)
        );
    }
    let (pass, fail, skip) = counts(&results);
    println!(
        "\nkernel {}: {pass} passed, {fail} failed, {skip} skipped; guest {guest_secs:.0} s, all {:.0} s",
        kernel.release,
        started.elapsed().as_secs_f64()
    );
    if args.record {
        record(
            &kernel,
            &results,
            guest_secs,
            args.ci_subset || !args.tests.is_empty(),
        )?;
    }
    if failed > 0 {
        let kept = vm_dir.join(format!("last-{}", args.kernel));
        let _ = fs::remove_dir_all(&kept);
        fs::rename(&out, &kept).ok();
        fs::copy(&console, kept.join("console.log")).ok();
        bail!(
            "{failed} failed on kernel {}; the guest's logs are in {}",
            kernel.release,
            kept.display()
        );
    }
    Ok(())
}

/// One kernel package, unpacked.
struct Kernel {
    package: String,
    version: String,
    /// `uname -r` of the kernel (the modules directory's name).
    release: String,
    /// The unpacked package.
    root: PathBuf,
    vmlinuz: PathBuf,
    /// `ROOT/lib/modules/RELEASE`, with modules.dep made by depmod.
    modules: PathBuf,
}

fn fetch_kernel(line: &str, vm_dir: &Path) -> Result<Kernel> {
    let Some(&(_, archive, suite)) = KERNELS.iter().find(|(v, _, _)| *v == line) else {
        bail!(
            "no kernel line `{line}`: choose one of {}",
            KERNELS.iter().map(|k| k.0).collect::<Vec<_>>().join(", ")
        );
    };
    let mirror = std::env::var("TPBPF_DEBIAN_MIRROR").unwrap_or_else(|_| MIRROR.into());
    let cache = vm_dir.join("cache");
    fs::create_dir_all(&cache)?;
    let base = format!("{mirror}/{archive}");

    // The index: InRelease signed by Debian's archive key, the package
    // list checked against the hash it names.
    let inrelease = cache.join(format!("{suite}.InRelease"));
    download(&format!("{base}/dists/{suite}/InRelease"), &inrelease)?;
    let verified = Command::new("gpgv")
        .args(["--keyring", KEYRING, "--output", "-"])
        .arg(&inrelease)
        .stderr(Stdio::piped())
        .output()
        .context("running gpgv")?;
    if !verified.status.success() {
        bail!(
            "{suite}'s InRelease from {base} does not carry a good signature from Debian's archive keys ({KEYRING}): {}. Install debian-archive-keyring, or check TPBPF_DEBIAN_MIRROR",
            String::from_utf8_lossy(&verified.stderr).trim()
        );
    }
    let release = String::from_utf8_lossy(&verified.stdout).to_string();
    let entry = "main/binary-amd64/Packages.xz";
    let want = sha256_entry(&release, entry)
        .with_context(|| format!("{suite}'s InRelease names no SHA256 for {entry}"))?;
    let packages_xz = cache.join(format!("{suite}.Packages.xz"));
    if sha256(&packages_xz).ok().as_deref() != Some(want.as_str()) {
        download(&format!("{base}/dists/{suite}/{entry}"), &packages_xz)?;
        check_sha256(&packages_xz, &want)?;
    }
    let packages = Command::new("xz")
        .arg("-dc")
        .arg(&packages_xz)
        .output()
        .context("running xz")?;
    if !packages.status.success() {
        bail!("xz -dc {} failed", packages_xz.display());
    }
    let packages = String::from_utf8_lossy(&packages.stdout);

    let (name, version, filename, hash) = newest_kernel(&packages, line)?;
    let root = vm_dir.join("kernels").join(&name);
    let done = root.join(".unpacked");
    if !done.exists() {
        let deb = cache.join(filename.rsplit('/').next().unwrap_or(&name));
        if sha256(&deb).ok().as_deref() != Some(hash.as_str()) {
            println!("downloading {filename}");
            download(&format!("{base}/{filename}"), &deb)?;
            check_sha256(&deb, &hash)?;
        }
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root)?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        fs::write(&done, &version)?;
    }
    // bookworm keeps modules in /lib/modules, trixie in /usr/lib/modules;
    // depmod -b reads BASE/lib/modules.
    if !root.join("lib").exists() && root.join("usr/lib/modules").exists() {
        std::os::unix::fs::symlink("usr/lib", root.join("lib"))?;
    }
    let modules_dir = root.join("lib/modules");
    let release = fs::read_dir(&modules_dir)
        .with_context(|| format!("{} has no lib/modules", name))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .next()
        .with_context(|| format!("{} has no modules directory", modules_dir.display()))?;
    let modules = modules_dir.join(&release);
    if !modules.join("modules.dep").exists() {
        run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
    }
    let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
    if !vmlinuz.exists() {
        bail!("{} has no {}", name, vmlinuz.display());
    }
    Ok(Kernel {
        package: name,
        version,
        release,
        root,
        vmlinuz,
        modules,
    })
}

/// The newest `linux-image-LINE.*-amd64` (the generic flavour, signed).
fn newest_kernel(packages: &str, line: &str) -> Result<(String, String, String, String)> {
    let prefix = format!("linux-image-{line}.");
    let mut best: Option<(String, String, String, String)> = None;
    for stanza in packages.split("\n\n") {
        let field = |f: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{f}: ")))
                .map(str::to_string)
        };
        let Some(name) = field("Package") else {
            continue;
        };
        let generic = name.starts_with(&prefix)
            && name.ends_with("-amd64")
            && !name.ends_with("-cloud-amd64")
            && !name.ends_with("-rt-amd64");
        if !generic {
            continue;
        }
        let (Some(version), Some(filename), Some(hash)) =
            (field("Version"), field("Filename"), field("SHA256"))
        else {
            continue;
        };
        let newer = match &best {
            None => true,
            Some((_, v, _, _)) => Command::new("dpkg")
                .args(["--compare-versions", &version, "gt", v])
                .status()
                .is_ok_and(|s| s.success()),
        };
        if newer {
            best = Some((name, version, filename, hash));
        }
    }
    best.with_context(|| format!("Debian's archive lists no package {prefix}*-amd64"))
}

fn sha256_entry(release: &str, entry: &str) -> Option<String> {
    let mut in_sha256 = false;
    for l in release.lines() {
        if !l.starts_with(' ') {
            in_sha256 = l.starts_with("SHA256:");
            continue;
        }
        if in_sha256 {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() == 3 && f[2] == entry {
                return Some(f[0].to_string());
            }
        }
    }
    None
}

fn download(url: &str, to: &Path) -> Result<()> {
    let part = to.with_extension("part");
    let status = Command::new("curl")
        .args(["-fsSL", "--retry", "3", "--max-time", "900", "-o"])
        .arg(&part)
        .arg(url)
        .status()
        .context("running curl")?;
    if !status.success() {
        let _ = fs::remove_file(&part);
        bail!(
            "downloading {url} failed (curl: {status}); check the network or TPBPF_DEBIAN_MIRROR"
        );
    }
    fs::rename(&part, to)?;
    Ok(())
}

fn sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    if !out.status.success() {
        bail!("sha256sum {} failed", path.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string())
}

fn check_sha256(path: &Path, want: &str) -> Result<()> {
    let got = sha256(path)?;
    if got != want {
        let _ = fs::remove_file(path);
        bail!(
            "{}: SHA-256 {got}, but Debian's signed index says {want}; removed it, run again",
            path.display()
        );
    }
    Ok(())
}

/// A test binary of vm-tests: its name (`tests/NAME.rs`) and path.
struct TestBinary {
    name: String,
    path: PathBuf,
}

fn build_suite() -> Result<Vec<TestBinary>> {
    run(cargo().args(["build", "--workspace", "--all-targets"]))?;
    let out = cargo()
        .args([
            "test",
            "-p",
            "tpbpf-vm-tests",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the privileged suite failed");
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let is_test = v["reason"] == "compiler-artifact"
            && v["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"))
            && v["profile"]["test"] == true;
        if let (true, Some(exe)) = (is_test, v["executable"].as_str()) {
            bins.push(TestBinary {
                name: v["target"]["name"].as_str().unwrap_or("?").to_string(),
                path: exe.into(),
            });
        }
    }
    bins.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(bins)
}

/// What runs in the guest: a binary and its test-name filters.
struct Selected<'a> {
    bin: &'a TestBinary,
    filters: Vec<String>,
}

/// The binaries a test finds beside its own (`target/debug/NAME`).
const SIBLINGS: &[&str] = &[
    "tpbpf",
    "tpbpf-agent",
    "tpbpf-testclient",
    "tpbpf-testserver",
];

/// Copies the selected test binaries and their siblings into the run's
/// directory, laid out as `debug/deps/` and `debug/`, so that a build that
/// replaces them while the guest runs does not change them under it.
fn snapshot(selected: Vec<Selected<'_>>, run_dir: &Path) -> Result<Vec<Selected<'static>>> {
    let deps = run_dir.join("snap/debug/deps");
    fs::create_dir_all(&deps)?;
    let mut out = Vec::new();
    let mut from_dir = None;
    for s in selected {
        let dst = deps.join(s.bin.path.file_name().context("a test binary's name")?);
        fs::copy(&s.bin.path, &dst).with_context(|| format!("copying {}", s.bin.path.display()))?;
        from_dir = s
            .bin
            .path
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf);
        let bin: &'static TestBinary = Box::leak(Box::new(TestBinary {
            name: s.bin.name.clone(),
            path: dst,
        }));
        out.push(Selected {
            bin,
            filters: s.filters,
        });
    }
    if let Some(dir) = from_dir {
        for name in SIBLINGS {
            let src = dir.join(name);
            if src.exists() {
                fs::copy(&src, run_dir.join("snap/debug").join(name))
                    .with_context(|| format!("copying {}", src.display()))?;
            }
        }
    }
    Ok(out)
}

fn select<'a>(bins: &'a [TestBinary], args: &Args) -> Result<Vec<Selected<'a>>> {
    let find = |name: &str| {
        bins.iter()
            .find(|b| b.name == name)
            .with_context(|| format!("no test binary `{name}` in vm-tests/tests"))
    };
    if args.ci_subset {
        return CI_SUBSET
            .iter()
            .map(|(name, filters)| {
                Ok(Selected {
                    bin: find(name)?,
                    filters: filters.iter().map(|f| f.to_string()).collect(),
                })
            })
            .collect();
    }
    if !args.tests.is_empty() {
        return args
            .tests
            .iter()
            .map(|spec| {
                let (name, filter) = match spec.split_once("::") {
                    Some((n, f)) => (n, vec![f.to_string()]),
                    None => (spec.as_str(), Vec::new()),
                };
                Ok(Selected {
                    bin: find(name)?,
                    filters: filter,
                })
            })
            .collect();
    }
    Ok(bins
        .iter()
        .map(|bin| Selected {
            bin,
            filters: Vec::new(),
        })
        .collect())
}

/// The guest's `/init`: modules, the shared root with a tmpfs over it,
/// the kernel's file systems inside it, then the job in a chroot.
const INIT: &str = r#"#!/bin/busybox sh
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

fn build_initramfs(kernel: &Kernel, run_dir: &Path) -> Result<PathBuf> {
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

/// `kernel/net/x/foo.ko.xz` → `foo.ko`.
fn module_file_name(rel: &str) -> String {
    let base = rel.rsplit('/').next().unwrap_or(rel);
    let base = base
        .strip_suffix(".xz")
        .or_else(|| base.strip_suffix(".zst"))
        .unwrap_or(base);
    base.to_string()
}

/// modules.dep: each module's path and the modules it needs.
struct ModuleDeps {
    by_name: BTreeMap<String, (String, Vec<String>)>,
}

impl ModuleDeps {
    fn read(dir: &Path) -> Result<Self> {
        let text = fs::read_to_string(dir.join("modules.dep"))
            .with_context(|| format!("reading {}/modules.dep", dir.display()))?;
        let mut by_name = BTreeMap::new();
        for line in text.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let deps = deps.split_whitespace().map(str::to_string).collect();
            by_name.insert(Self::name_of(path), (path.to_string(), deps));
        }
        Ok(Self { by_name })
    }

    fn name_of(path: &str) -> String {
        module_file_name(path)
            .trim_end_matches(".ko")
            .replace('-', "_")
    }

    /// Appends `name`'s dependencies (deepest first) and then `name`, once
    /// each; a module built into the kernel is not in modules.dep and adds
    /// nothing.
    fn load_order(&self, name: &str, order: &mut Vec<String>) {
        let Some((path, deps)) = self.by_name.get(&name.replace('-', "_")) else {
            return;
        };
        for d in deps.iter().rev() {
            self.load_order(&Self::name_of(d), order);
        }
        if !order.contains(path) {
            order.push(path.clone());
        }
    }
}

fn write_job(kernel: &Kernel, selected: &[Selected], args: &Args, run_dir: &Path) -> Result<()> {
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
            "( set -x; dpkg -i {deb} && tpbpf --version && tpbpf doctor && tpbpf debug redirect --cidr 10.96.0.0/12 -- curl -sS --max-time 5 http://10.96.0.10/ ) > /vmout/deb.log 2>&1; echo $? > /vmout/deb.status",
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

fn accel() -> &'static str {
    // KVM where the host can run a guest with it; this machine kind's
    // /dev/kvm cannot (TOOLCHAIN: a nested device that hangs guests), so
    // TPBPF_VM_ACCEL=kvm opts in.
    if std::env::var("TPBPF_VM_ACCEL").is_ok_and(|a| a == "kvm") {
        "kvm"
    } else {
        "tcg"
    }
}

fn boot_guest(
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

fn deadline_elapsed(deadline: Instant, timeout: u64) -> f64 {
    timeout as f64
        - deadline
            .saturating_duration_since(Instant::now())
            .as_secs_f64()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    Pass,
    Fail,
    Skip,
    /// The binary was selected but never reported (killed, or the guest
    /// ended first).
    NotRun,
}

struct TestResult {
    binary: String,
    test: String,
    outcome: Outcome,
    /// A skip's reason, or what ended a binary that did not report.
    note: String,
}

fn collect(out: &Path, selected: &[Selected]) -> Result<Vec<TestResult>> {
    let status = fs::read_to_string(out.join("status")).unwrap_or_default();
    let mut results = Vec::new();
    for s in selected {
        let name = &s.bin.name;
        let log = fs::read_to_string(out.join(format!("logs/{name}.log"))).unwrap_or_default();
        let code = status.lines().find_map(|l| {
            l.strip_prefix(&format!("{name} "))
                .and_then(|c| c.trim().parse::<i32>().ok())
        });
        let mut skips = BTreeMap::new();
        for l in log.lines() {
            if let Some(rest) = l.strip_prefix("SKIP ") {
                if let Some((test, reason)) = rest.split_once(": ") {
                    skips.insert(test.to_string(), reason.to_string());
                }
            }
        }
        let mut seen = BTreeSet::new();
        for l in log.lines() {
            let Some(rest) = l.strip_prefix("test ") else {
                continue;
            };
            let Some((test, result)) = rest.rsplit_once(" ... ") else {
                continue;
            };
            let test = test.to_string();
            let (outcome, note) = match result.trim() {
                "ok" => match skips.get(&test) {
                    Some(r) => (Outcome::Skip, r.clone()),
                    None => (Outcome::Pass, String::new()),
                },
                "FAILED" => (Outcome::Fail, failure_of(&log, &test)),
                "ignored" => (Outcome::Skip, "ignored".into()),
                _ => continue,
            };
            seen.insert(test.clone());
            results.push(TestResult {
                binary: name.clone(),
                test,
                outcome,
                note,
            });
        }
        let finished = log.contains("test result:");
        if !finished {
            let note = match code {
                Some(137) => "killed at --binary-timeout".to_string(),
                Some(c) => format!("exited {c} before reporting"),
                None => "did not run".to_string(),
            };
            results.push(TestResult {
                binary: name.clone(),
                test: "(binary)".into(),
                outcome: if code.is_some() {
                    Outcome::Fail
                } else {
                    Outcome::NotRun
                },
                note,
            });
        }
    }
    Ok(results)
}

/// What a failed test's output says of the cause: tpbpf's own error line
/// or the verifier's verdict where there is one, else the panic's place and
/// its first line.
fn failure_of(log: &str, test: &str) -> String {
    let marker = format!("---- {test} stdout ----");
    let Some(at) = log.find(&marker) else {
        return String::new();
    };
    let block = &log[at + marker.len()..];
    let block = block.split("\n---- ").next().unwrap_or(block);
    let lines: Vec<&str> = block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let cause = lines
        .iter()
        .find(|l| l.contains("tpbpf: error:") && !l.ends_with("did not start:"))
        .or_else(|| {
            lines
                .iter()
                .find(|l| l.contains("verifier_log:") || l.contains("Verifier output:"))
        })
        .map(|l| l.to_string());
    let text = cause.unwrap_or_else(|| {
        let mut it = lines.iter().skip_while(|l| !l.contains("panicked at"));
        let place = it
            .next()
            .and_then(|l| l.split("panicked at ").nth(1))
            .unwrap_or("")
            .trim_end_matches(':')
            .to_string();
        format!("{place}: {}", it.next().unwrap_or(&""))
    });
    text.chars().take(240).collect()
}

fn counts(results: &[TestResult]) -> (usize, usize, usize) {
    let n = |o| results.iter().filter(|r| r.outcome == o).count();
    (n(Outcome::Pass), n(Outcome::Fail), n(Outcome::Skip))
}

fn print_results(results: &[TestResult]) {
    println!();
    for r in results {
        let word = match r.outcome {
            Outcome::Pass => "pass",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "skip",
            Outcome::NotRun => "NOT RUN",
        };
        if r.note.is_empty() {
            println!("{word:<7} {}::{}", r.binary, r.test);
        } else {
            println!("{word:<7} {}::{}  ({})", r.binary, r.test, r.note);
        }
    }
}

/// Merges this run into docs/kernels.json (one object per kernel line)
/// and rewrites the matrix in docs/kernels.md from it.
fn record(kernel: &Kernel, results: &[TestResult], guest_secs: f64, partial: bool) -> Result<()> {
    let json_path = root_dir().join("docs/kernels.json");
    let mut all: BTreeMap<String, Value> = fs::read_to_string(&json_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let line = kernel
        .release
        .split('.')
        .take(2)
        .collect::<Vec<_>>()
        .join(".");
    let mut tests = serde_json::Map::new();
    for r in results {
        let word = match r.outcome {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Skip => "skip",
            Outcome::NotRun => "not run",
        };
        tests.insert(
            format!("{}::{}", r.binary, r.test),
            json!({ "result": word, "note": r.note }),
        );
    }
    let package = format!("{} {}", kernel.package, kernel.version);
    // A partial run of the same package updates its tests in a whole-suite
    // entry (a re-run of what failed); anything else replaces the entry.
    let (tests, partial, guest_secs) = match all.get(&line) {
        Some(old)
            if partial
                && old["partial"] == false
                && old["package"].as_str() == Some(package.as_str()) =>
        {
            let mut merged = old["tests"].as_object().cloned().unwrap_or_default();
            merged.extend(tests);
            (
                merged,
                false,
                old["guest_seconds"].as_f64().unwrap_or(0.0) + guest_secs,
            )
        }
        _ => (tests, partial, guest_secs),
    };
    let n = |word: &str| tests.values().filter(|t| t["result"] == word).count();
    let (pass, fail, skip) = (n("pass"), n("fail"), n("skip"));
    all.insert(
        line,
        json!({
            "release": kernel.release,
            "package": package,
            "partial": partial,
            "guest_seconds": guest_secs.round() as u64,
            "passed": pass, "failed": fail, "skipped": skip,
            "tests": tests,
        }),
    );
    fs::write(&json_path, serde_json::to_string_pretty(&all)? + "\n")?;
    write_matrix(&all)?;
    println!("recorded in docs/kernels.json and docs/kernels.md");
    Ok(())
}

const MATRIX_BEGIN: &str =
    "<!-- matrix: written by `cargo xtask vm-test --record`; do not edit -->";
const MATRIX_END: &str = "<!-- end of matrix -->";

fn write_matrix(all: &BTreeMap<String, Value>) -> Result<()> {
    let md_path = root_dir().join("docs/kernels.md");
    let text = fs::read_to_string(&md_path)
        .unwrap_or_else(|_| format!("# Kernels\n\n{MATRIX_BEGIN}\n{MATRIX_END}\n"));
    let (Some(b), Some(e)) = (text.find(MATRIX_BEGIN), text.find(MATRIX_END)) else {
        bail!("docs/kernels.md has lost its matrix markers ({MATRIX_BEGIN} … {MATRIX_END})");
    };
    let mut names = BTreeSet::new();
    for v in all.values() {
        if let Some(t) = v["tests"].as_object() {
            names.extend(t.keys().cloned());
        }
    }
    let mut kernels: Vec<(&String, &Value)> = all.iter().collect();
    kernels.sort_by_key(|(k, _)| {
        k.split('.')
            .map(|p| p.parse::<u32>().unwrap_or(0))
            .collect::<Vec<_>>()
    });
    let mut m = String::new();
    writeln!(m, "{MATRIX_BEGIN}\n")?;
    writeln!(
        m,
        "| kernel | package | run | passed | failed | skipped | guest time |"
    )?;
    writeln!(m, "|---|---|---|---|---|---|---|")?;
    for (k, v) in &kernels {
        writeln!(
            m,
            "| {k} ({}) | {} | {} | {} | {} | {} | {} s |",
            v["release"].as_str().unwrap_or("?"),
            v["package"].as_str().unwrap_or("?"),
            if v["partial"] == true {
                "subset"
            } else {
                "whole suite"
            },
            v["passed"],
            v["failed"],
            v["skipped"],
            v["guest_seconds"]
        )?;
    }
    writeln!(m)?;
    write!(m, "| test |")?;
    for (k, _) in &kernels {
        write!(m, " {k} |")?;
    }
    writeln!(m)?;
    write!(m, "|---|")?;
    for _ in &kernels {
        write!(m, "---|")?;
    }
    writeln!(m)?;
    let mut notes = Vec::new();
    for name in &names {
        write!(m, "| `{name}` |")?;
        for (k, v) in &kernels {
            let t = &v["tests"][name.as_str()];
            let cell = match t["result"].as_str() {
                None => "".to_string(),
                Some(r) => {
                    let note = t["note"].as_str().unwrap_or("");
                    if note.is_empty() || r == "pass" {
                        r.to_string()
                    } else {
                        notes.push(format!("{k}, `{name}`: {note}"));
                        format!("{r} [{}]", notes.len())
                    }
                }
            };
            write!(m, " {cell} |")?;
        }
        writeln!(m)?;
    }
    if !notes.is_empty() {
        writeln!(m)?;
        for (i, n) in notes.iter().enumerate() {
            writeln!(m, "{}. {}", i + 1, n.replace('|', "\\|"))?;
        }
    }
    writeln!(m, "\n{MATRIX_END}")?;
    let new = format!(
        "{}{}{}",
        &text[..b],
        m,
        &text[e + MATRIX_END.len()..].trim_start_matches('\n')
    );
    fs::write(&md_path, new)?;
    Ok(())
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn on_path(tool: &str) -> bool {
    which(tool).is_some()
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

fn tail_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
