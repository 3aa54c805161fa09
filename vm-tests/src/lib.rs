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

/// Returns false, after saying why ([`skip`]), when the test cannot run
/// here.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("needs root (eBPF, cgroups, network namespaces); run the tests as root");
        return false;
    }
    if !tpbpf_cgroup::kernel_has_cgroup2() {
        skip(&tpbpf_cgroup::CgroupError::NoCgroup2.to_string());
        return false;
    }
    true
}

/// The expected skips for the machine kind CI runs on, one test name per
/// line (`#` starts a comment): the one place that says which privileged
/// tests may not run there. `$TPBPF_EXPECTED_SKIPS` names another file.
pub const EXPECTED_SKIPS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/expected-skips");

/// Says that the running test cannot run here, and why, on a line of its
/// own written straight to stderr (libtest captures `println!`, so a skip
/// would otherwise read as a pass). Under `CI=true` an unexpected skip — a
/// test not listed in [`EXPECTED_SKIPS`] — fails the test. The caller
/// returns after this.
pub fn skip(reason: &str) {
    use std::io::Write;
    let test = std::thread::current()
        .name()
        .unwrap_or("an unnamed test")
        .to_string();
    let _ = writeln!(io::stderr(), "SKIP {test}: {reason}");
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        let file = std::env::var("TPBPF_EXPECTED_SKIPS").unwrap_or_else(|_| EXPECTED_SKIPS.into());
        let listed = fs::read_to_string(&file).unwrap_or_default();
        let expected = listed
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .any(|l| !l.is_empty() && (l == test || test.ends_with(&format!("::{l}"))));
        assert!(
            expected,
            "unexpected SKIP under CI=true: {test} did not run ({reason}). Make the machine able \
             to run it, or list it in {file} if this machine kind cannot"
        );
    }
}

/// Where the cgroup v2 hierarchy is, as tpbpf finds it (mounting its own
/// where none is visible).
pub fn tpbpf_cgroup_mount() -> Option<PathBuf> {
    tpbpf_cgroup::cgroup2_mount().ok()
}

/// A copy of a binary that any user can execute (in a 0755 directory under
/// the temporary directory), for tests that drop privileges: the build's
/// own directory may sit where other users cannot enter (a 0700 home or
/// `mktemp -d`). Removed on drop.
pub struct PublicCopy {
    dir: PathBuf,
    bin: PathBuf,
}

impl PublicCopy {
    pub fn of(bin: &Path) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(unique_name("tpbpf-bin"));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let guard = Self {
            bin: dir.join(bin.file_name().expect("a binary's file name")),
            dir,
        };
        fs::set_permissions(&guard.dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::copy(bin, &guard.bin).unwrap_or_else(|e| {
            panic!("copying {} to {}: {e}", bin.display(), guard.dir.display())
        });
        fs::set_permissions(&guard.bin, fs::Permissions::from_mode(0o755)).unwrap();
        guard
    }

    pub fn path(&self) -> &Path {
        &self.bin
    }
}

impl Drop for PublicCopy {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
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
    // Test binaries live in target/<profile>/deps, other binaries beside ours.
    let here = exe.parent().expect("binary dir");
    let bin = if here.ends_with("deps") {
        here.parent().expect("target dir").join(name)
    } else {
        here.join(name)
    };
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

impl TestCgroup {
    /// A cgroup for one test below `parent`.
    pub fn within(parent: &Path) -> Self {
        let path = parent.join(unique_name("tpbpf-test"));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self { path }
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

/// A directory of the test's own under the temporary directory, removed
/// on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(unique_name(prefix));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A cgroup that stands for the whole machine. [`MachineCgroup::command`]
/// runs a program in a cgroup namespace rooted here, with a cgroup v2 mount
/// of its own (a private mount namespace), as tpbpfd runs in a container:
/// a "whole-machine" bridge it makes attaches here, never at the real
/// machine's root cgroup, and bridged processes go [`MachineCgroup::child`].
pub struct MachineCgroup {
    cgroup: TestCgroup,
}

impl MachineCgroup {
    pub fn new() -> Self {
        Self {
            cgroup: TestCgroup::new(),
        }
    }

    pub fn path(&self) -> &Path {
        self.cgroup.path()
    }

    /// A cgroup of this "machine" (removed on drop).
    pub fn child(&self) -> TestCgroup {
        TestCgroup::within(self.path())
    }

    /// `cgroup`'s path as [`MachineCgroup::command`]'s programs see it.
    pub fn seen(&self, cgroup: &TestCgroup) -> String {
        let mount = tpbpf_cgroup_mount().expect("cgroup v2 mount");
        let below = cgroup
            .path()
            .strip_prefix(self.path())
            .expect("a cgroup of this machine");
        mount.join(below).display().to_string()
    }

    /// `program` (arguments to add) run in this cgroup as the root of its
    /// cgroup namespace. The process keeps its pid through each `exec`.
    pub fn command(&self, program: &Path) -> Command {
        let mount = tpbpf_cgroup_mount().expect("cgroup v2 mount");
        let inner = format!(
            "umount -l {m} && mount -t cgroup2 cgroup2 {m} && exec \"$0\" \"$@\"",
            m = mount.display()
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec unshare --cgroup --mount --propagation private sh -c '{inner}' \"$0\" \"$@\"",
                self.path().display()
            ))
            .arg(program);
        cmd
    }
}

impl Default for MachineCgroup {
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
    let v = bpftool_json(args);
    v.as_array()
        .map(|a| a.iter().filter_map(|e| e["id"].as_u64()).collect())
        .unwrap_or_default()
}

/// `bpftool ARGS` (JSON output), parsed; an empty output is an empty list.
/// bpftool failing (after the retries below) or giving output that is not
/// JSON fails the caller: a listing that silently came back empty would let
/// every "nothing is attached" check pass.
fn bpftool_json(args: &[&str]) -> serde_json::Value {
    // bpftool walks ids and then opens each: an object freed in between (by
    // a test running in parallel) fails the listing. Walk again.
    let mut attempt = 0;
    let out = loop {
        let out = Command::new("bpftool")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running bpftool {args:?}: {e} (is bpftool installed?)"));
        attempt += 1;
        if out.status.success() || attempt >= 10 {
            assert!(
                out.status.success(),
                "bpftool {args:?} failed {attempt} times, last with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if out.trim().is_empty() {
        return serde_json::Value::Array(Vec::new());
    }
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("bpftool {args:?} gave non-JSON ({e}): {out}"))
}

/// A time bound a test asserts, stretched by `TPBPF_TEST_TIME_SCALE`
/// (`cargo xtask vm-test` sets it under TCG, which emulates every
/// instruction: about ten times slower than this machine). The bound a user
/// sees is the unscaled one; the test prints what it measured.
pub fn scaled(d: Duration) -> Duration {
    let k: f64 = std::env::var("TPBPF_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|k: &f64| *k >= 1.0)
        .unwrap_or(1.0);
    d.mul_f64(k)
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, cond: impl FnMut() -> bool) -> bool {
    wait_for_every(timeout, Duration::from_millis(10), cond)
}

/// Polls `cond` every `every` until it holds or `timeout` passes: for a
/// condition that costs a process to check (`tpbpf status`, `ss`), or one
/// that changes only on a period (the live state, written twice a second).
pub fn wait_for_every(timeout: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// A background process, killed on drop; its stdout lines (JSON events)
/// are collected by a thread.
pub struct Bg {
    child: std::process::Child,
    lines: std::sync::Mutex<std::sync::mpsc::Receiver<String>>,
    seen: Vec<String>,
}

impl Bg {
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines: std::sync::Mutex::new(rx),
            seen: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a JSON line matching `pred`; lines seen are kept for [`Bg::events`].
    pub fn wait_event(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        for line in &self.seen {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                if pred(&v) {
                    return Some(v);
                }
            }
        }
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let line = self.lines.lock().ok()?.recv_timeout(left).ok()?;
            self.seen.push(line.clone());
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if pred(&v) {
                    return Some(v);
                }
            }
        }
    }

    /// All JSON lines received so far.
    pub fn events(&mut self) -> Vec<serde_json::Value> {
        if let Ok(rx) = self.lines.lock() {
            while let Ok(l) = rx.try_recv() {
                self.seen.push(l);
            }
        }
        self.seen
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn kill(&mut self, sig: libc::c_int) {
        // SAFETY: kill has no memory preconditions; the pid is our child's.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The addresses of a test "cluster".
pub const WEB4: &str = "10.96.0.10";
pub const WEB6: &str = "fd00:96::10";
pub const BULK4: &str = "10.96.0.11";
pub const CLUSTER_CIDR4: &str = "10.96.0.0/12";
pub const CLUSTER_CIDR6: &str = "fd00:96::/64";

/// A "cluster" network namespace: servers on cluster addresses (HTTP and a
/// UDP echo on 10.96.0.10 and fd00:96::10, a slow bulk sender on 10.96.0.11)
/// and dnsmasq serving `*.svc.cluster.local` on 10.96.0.10:53. No route in
/// or out: only tpbpf's upstream (which dials from inside it) reaches it.
pub struct Cluster {
    pub http: Bg,
    pub udp: Bg,
    /// Its `request` event says a transfer has begun.
    pub bulk: Bg,
    _dns: Bg,
    pub ns: NetNs,
}

impl Cluster {
    /// `tag` is part of every HTTP answer, to tell clusters apart.
    pub fn new(tag: &str) -> Self {
        let ns = NetNs::new();
        for a in [format!("{WEB4}/32"), format!("{BULK4}/32")] {
            run(Command::new("ip").args(["-n", ns.name(), "addr", "add", &a, "dev", "lo"]));
        }
        run(Command::new("ip").args([
            "-n",
            ns.name(),
            "addr",
            "add",
            &format!("{WEB6}/128"),
            "dev",
            "lo",
            "nodad",
        ]));
        let server = |mode: &str, addrs: &[String]| {
            let mut cmd = Command::new(testserver_bin());
            cmd.args(["--netns", ns.name(), mode])
                .args(addrs)
                .env("TAG", tag);
            let mut bg = Bg::spawn(&mut cmd);
            bg.wait_event(Duration::from_secs(5), |e| e["event"] == "ready")
                .unwrap_or_else(|| panic!("tpbpf-testserver {mode} did not start"));
            bg
        };
        let http = server("http", &[format!("{WEB4}:80"), format!("[{WEB6}]:80")]);
        let udp = server("udp-echo", &[format!("{WEB4}:7"), format!("[{WEB6}]:7")]);
        let bulk = server("bulk", &[format!("{BULK4}:80")]);
        let dns = dnsmasq(
            ns.name(),
            WEB4,
            &[
                format!("/web.default.svc.cluster.local/{WEB4}"),
                format!("/web.default.svc.cluster.local/{WEB6}"),
                format!("/bulk.default.svc.cluster.local/{BULK4}"),
                format!("/postgres.db.svc.cluster.local/{BULK4}"),
                // Authoritative for the domain, as CoreDNS is: NXDOMAIN
                // for names it does not have.
                "/cluster.local/".to_string(),
            ],
        );
        Self {
            http,
            udp,
            bulk,
            _dns: dns,
            ns,
        }
    }
}

/// dnsmasq (Debian's) in a namespace, answering `--address` records only.
pub fn dnsmasq(netns: &str, listen: &str, addresses: &[String]) -> Bg {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        netns,
        "dnsmasq",
        "--no-daemon",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--pid-file=",
        "--bind-interfaces",
        "--user=root",
    ])
    .arg(format!("--listen-address={listen}"));
    for a in addresses {
        cmd.arg(format!("--address={a}"));
    }
    let bg = Bg::spawn(cmd.stderr(std::process::Stdio::null()));
    let port_open = || {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "dig",
                "+short",
                "+time=1",
                "+tries=1",
                &format!("@{listen}"),
                "ready.invalid",
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    assert!(
        wait_for(Duration::from_secs(5), port_open),
        "dnsmasq on {listen} in {netns} did not start"
    );
    bg
}

/// The developer machine: a network namespace with no route off it, and its
/// own "normal" resolver (dnsmasq on 127.0.0.53, knowing `host-only.test`),
/// with a resolv.conf naming it for commands run through [`Client::wrap`].
pub struct Client {
    _resolver: Bg,
    resolv_conf: PathBuf,
    pub ns: NetNs,
}

impl Client {
    pub fn new() -> Self {
        let ns = NetNs::new();
        run(Command::new("ip").args(["-n", ns.name(), "addr", "add", "127.0.0.53/8", "dev", "lo"]));
        let resolver = dnsmasq(
            ns.name(),
            "127.0.0.53",
            &["/host-only.test/192.0.2.7".to_string()],
        );
        let resolv_conf = std::env::temp_dir().join(format!("{}.resolv.conf", ns.name()));
        fs::write(&resolv_conf, "nameserver 127.0.0.53\n").unwrap();
        Self {
            _resolver: resolver,
            resolv_conf,
            ns,
        }
    }

    /// `argv` run in a private mount namespace whose /etc/resolv.conf names
    /// the client's own resolver (never the machine's).
    pub fn wrap(&self, argv: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "unshare".into(),
            "-m".into(),
            "sh".into(),
            "-c".into(),
            format!(
                "mount --bind {} /etc/resolv.conf && exec \"$@\"",
                self.resolv_conf.display()
            ),
            "sh".into(),
        ];
        v.extend(argv.iter().map(|s| s.to_string()));
        v
    }
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.resolv_conf);
    }
}

/// The server's binary.
pub fn testserver_bin() -> PathBuf {
    built_bin("tpbpf-testserver")
}

/// For long-running tools (the benchmark): SIGINT, SIGTERM and SIGHUP set
/// the returned flag instead of killing the process, so it can stop between
/// steps and let its guards clean up. Call before starting any thread.
pub fn stop_on_signals() -> &'static std::sync::atomic::AtomicBool {
    use std::sync::atomic::AtomicBool;
    static STOP: AtomicBool = AtomicBool::new(false);
    // SAFETY: sigset manipulation on a local set; pthread_sigmask affects
    // this thread and, inherited, every thread it starts.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::spawn(move || {
            let mut sig = 0;
            libc::sigwait(&set, &mut sig);
            eprintln!("signal {sig}: stopping after this step and cleaning up");
            STOP.store(true, Ordering::SeqCst);
        });
    }
    &STOP
}

/// A lab cluster (`tpbpf lab up --name ...`) for one test, brought down on
/// drop even when the test fails.
pub struct LabGuard {
    pub name: String,
    /// `tpbpf lab up -o json`.
    pub status: serde_json::Value,
}

impl LabGuard {
    /// A lab with tpbpf installed (`tpbpf install`, the resume window 5 s
    /// so tests see a killed tpbpfd's intercepts go in seconds). `None`
    /// (with a printed reason) where the lab's servers are missing.
    pub fn up(prefix: &str) -> Option<Self> {
        let lab = Self::up_without_agent(prefix)?;
        lab.install();
        Some(lab)
    }

    /// `tpbpf install` into the lab, from the developer machine; returns
    /// once every node's agent is ready.
    pub fn install(&self) {
        self.install_with(&[]);
    }

    /// `tpbpf install` with more flags (`--intercept-rights port-forward`).
    pub fn install_with(&self, extra: &[&str]) {
        run(Command::new(tpbpf_bin())
            .args([
                "--netns",
                &self.dev_netns(),
                "install",
                "--kubeconfig",
                &self.kubeconfig(),
                "--resume-window-s",
                "5",
                "--timeout-s",
                "60",
            ])
            .args(extra));
    }

    /// A lab as it starts: no tpbpf agent until `install`.
    pub fn up_without_agent(prefix: &str) -> Option<Self> {
        Self::up_with(prefix, &[])
    }

    /// [`LabGuard::up_without_agent`] with more `lab up` flags (`--link`).
    pub fn up_with(prefix: &str, extra: &[&str]) -> Option<Self> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            skip("the lab's servers are not installed (sudo bash xtask/setup.sh installs them)");
            return None;
        }
        // The guard exists before `up`, so a failed `up` is still cleaned.
        let mut guard = Self {
            name: unique_name(prefix),
            status: serde_json::Value::Null,
        };
        let out = run(Command::new(tpbpf_bin())
            .args(["lab", "up", "--name", &guard.name, "-o", "json"])
            .args(extra));
        guard.status = serde_json::from_str(&out).expect("lab status JSON");
        Some(guard)
    }

    pub fn kubeconfig(&self) -> String {
        self.status["kubeconfig"]
            .as_str()
            .expect("kubeconfig")
            .to_string()
    }

    pub fn dev_netns(&self) -> String {
        self.status["dev_netns"]
            .as_str()
            .expect("dev netns")
            .to_string()
    }

    /// `tpbpf` arguments that bring bridge `instance` up for `cgroup` in
    /// the developer namespace, with the lab's kubeconfig.
    pub fn up_args(&self, instance: &str, cgroup: &Path) -> Vec<String> {
        [
            "--netns",
            &self.dev_netns(),
            "up",
            "--kubeconfig",
            &self.kubeconfig(),
            "--instance",
            instance,
            "--cgroup",
            &cgroup.display().to_string(),
        ]
        .map(str::to_string)
        .to_vec()
    }

    /// The lab's state directory (`/run/tpbpf-lab/NAME`).
    pub fn state_dir(&self) -> PathBuf {
        Path::new(&self.kubeconfig())
            .parent()
            .expect("the kubeconfig's directory")
            .to_path_buf()
    }

    /// The token user's kubeconfig (`lab-developer`).
    pub fn restricted_kubeconfig(&self) -> String {
        self.status["kubeconfig_restricted"]
            .as_str()
            .expect("kubeconfig_restricted")
            .to_string()
    }

    /// The exec credential plugin user's kubeconfig.
    pub fn exec_kubeconfig(&self) -> String {
        self.status["kubeconfig_exec"]
            .as_str()
            .expect("kubeconfig_exec")
            .to_string()
    }

    /// `curl` in the developer namespace with the admin's client
    /// certificate and the cluster CA: append options and the API path
    /// ([`LabGuard::api_url`]).
    pub fn api_curl(&self) -> Command {
        let pki = self.state_dir().join("pki");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.dev_netns(), "curl", "-sS", "-m", "3"])
            .arg("--cacert")
            .arg(pki.join("ca.crt"))
            .arg("--cert")
            .arg(pki.join("admin.crt"))
            .arg("--key")
            .arg(pki.join("admin.key"));
        cmd
    }

    /// The API server's URL for `path` (HTTPS).
    pub fn api_url(&self, path: &str) -> String {
        format!(
            "{}{path}",
            self.status["api_server"].as_str().expect("api_server")
        )
    }

    /// GET `path` from the API as the admin: the body, or curl's error.
    pub fn api_get(&self, path: &str) -> String {
        let out = self.api_curl().arg(self.api_url(path)).output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = Command::new(tpbpf_bin())
            .args(["lab", "down", "--name", &self.name])
            .output();
    }
}

/// Whether a process is running (a zombie is not).
pub fn process_running(pid: u64) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty()
        && !stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
}

/// The agent binary of this build.
pub fn agent_bin() -> PathBuf {
    built_bin("tpbpf-agent")
}

/// A shell command run in `cgroup` and network namespace `netns`, with
/// `resolv` bind-mounted over /etc/resolv.conf in a mount namespace of its
/// own: a process of the developer machine, bridged by tpbpf.
pub fn bridged_shell(cgroup: &Path, netns: &str, resolv: &Path, script: &str) -> Command {
    let inner = format!(
        "mount --bind {} /etc/resolv.conf && {script}",
        resolv.display()
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "echo $$ > {}/cgroup.procs && exec ip netns exec {netns} unshare -m sh -c '{inner}'",
        cgroup.display()
    ));
    cmd
}

/// `curl -sS -m 3 URL` run in network namespace `netns`: its output and
/// errors.
pub fn curl_from(netns: &str, url: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "curl", "-sS", "-m", "3", url])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `f` on a thread of its own in network namespace `netns`.
pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        enter_netns(&netns).unwrap_or_else(|e| panic!("entering netns {netns}: {e}"));
        f()
    })
    .join()
    .unwrap()
}

/// A TCP connection made inside `netns` (usable from any thread after).
pub fn connect_in(netns: &str, addr: &str) -> std::net::TcpStream {
    let addr = addr.to_string();
    in_netns(netns, move || std::net::TcpStream::connect(addr).unwrap())
}

/// Whether process `pid` is gone, or dead and waiting to be reaped.
pub fn process_gone(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

/// One `GET /` on a keep-alive connection; the first read of the answer.
pub fn http_get(stream: &mut std::net::TcpStream) -> String {
    use std::io::{Read, Write};
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Kills, in the kernel (`ss -K`), the TCP connections from network
/// namespace `netns` to the lab's API endpoint: tpbpf's port-forward
/// transports, reset rather than closed. Returns how many.
pub fn kill_transports(netns: &str) -> usize {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "ss",
            "-K",
            "-t",
            "dst",
            "172.31.0.1",
            "dport",
            "=",
            "6443",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("6443"))
        .count()
}

/// A bridge started with `tpbpf up --instance NAME`: `tpbpf down` when the
/// test ends, passed or failed.
pub struct Instance(pub String);

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = Command::new(tpbpf_bin())
            .args(["down", "--instance", &self.0])
            .output();
    }
}

/// sk_lookup links attached in the network namespace `netns`. A namespace
/// that is not there, or bpftool failing, fails the caller (rather than
/// answering "none", which every negative check would take for a pass).
pub fn sk_lookup_links_in(netns: &str) -> Vec<serde_json::Value> {
    let path = format!("/run/netns/{netns}");
    let ino = std::fs::metadata(&path)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap_or_else(|e| panic!("network namespace {netns}: {path}: {e}"));
    let links = bpftool_json(&["-j", "link", "show"]);
    let Some(links) = links.as_array() else {
        panic!("bpftool link show gave JSON that is not a list: {links}");
    };
    links
        .iter()
        .filter(|l| l["attach_type"] == "sk_lookup" && l["netns_ino"].as_u64() == Some(ino))
        .cloned()
        .collect()
}

/// The strings of a JSON array, sorted (for comparing sets the API or
/// tpbpf returns in no particular order).
pub fn sorted_strings(v: &serde_json::Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect();
    out.sort_unstable();
    out
}
