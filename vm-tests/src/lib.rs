//! Helpers for tpbpf's privileged tests: guards for network namespaces and
//! cgroups that clean up on `Drop` (also when a test fails), unique names so
//! tests run in parallel, the kernel's own view of programs and links, and
//! skips with a printed reason where the machine cannot run a test.
use std::{
    fs, io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name no other test (or test run) uses at the same time.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Returns false, after printing why, when the test cannot run here.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!(
            "SKIP {test}: needs root (eBPF, cgroups, network namespaces); run the tests as root"
        );
        return false;
    }
    if tpbpf_cgroup_mount().is_none() {
        println!("SKIP {test}: no cgroup v2 hierarchy is mounted on this machine");
        return false;
    }
    true
}

/// Where cgroup v2 is mounted, from /proc/self/mountinfo.
pub fn tpbpf_cgroup_mount() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(left.split_whitespace().nth(4)?))
    })
}

/// The `tpbpf` binary of this build (next to the test's `deps/` directory),
/// or `$TPBPF_BIN`.
pub fn tpbpf_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TPBPF_BIN") {
        return p.into();
    }
    built_bin("tpbpf")
}

/// The test client built with these tests (`src/bin/testclient.rs`).
pub fn testclient_bin() -> PathBuf {
    built_bin("tpbpf-testclient")
}

fn built_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build --workspace`, which `cargo xtask test` does)",
        bin.display()
    );
    bin
}

/// A network namespace with only `lo` (up) and no routes beyond it: a
/// connect that is not redirected fails at once, and nothing leaves the
/// machine. Deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn new() -> Self {
        let name = unique_name("tpbpf-t");
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A cgroup for one test, under the cgroup v2 root, removed on drop (any
/// process left inside is moved out first).
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    pub fn new() -> Self {
        let root = tpbpf_cgroup_mount().expect("cgroup v2 mount");
        let path = root.join(unique_name("tpbpf-test"));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.path);
    }
}

/// Removes a cgroup and its children, moving processes to the parent.
pub fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let deadline = Instant::now() + Duration::from_secs(3);
    while dir.exists() {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = fs::write(parent.join("cgroup.procs"), pid);
            }
        }
        if fs::remove_dir(dir).is_ok() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Moves the calling thread into a network namespace.
pub fn enter_netns(name: &str) -> io::Result<()> {
    let f = fs::File::open(Path::new("/run/netns").join(name))?;
    // SAFETY: a valid netns fd; affects only the calling thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The kernel's own view, through bpftool: ids of loaded programs.
pub fn kernel_prog_ids() -> Vec<u64> {
    bpftool_ids(&["-j", "prog", "show"])
}

/// The kernel's own view, through bpftool: ids of bpf links.
pub fn kernel_link_ids() -> Vec<u64> {
    bpftool_ids(&["-j", "link", "show"])
}

/// Program ids attached to a cgroup (any attach type), through bpftool.
pub fn cgroup_prog_ids(dir: &Path) -> Vec<u64> {
    bpftool_ids(&["-j", "cgroup", "show", &dir.display().to_string()])
}

fn bpftool_ids(args: &[&str]) -> Vec<u64> {
    let out = run(Command::new("bpftool").args(args));
    let v: serde_json::Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("bpftool {args:?} gave non-JSON ({e}): {out}"));
    v.as_array()
        .map(|a| a.iter().filter_map(|e| e["id"].as_u64()).collect())
        .unwrap_or_default()
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
