//! tpbpf next to other eBPF: what Cilium, Calico or a mesh would already
//! have attached on a node or a laptop. Stand-ins for those programs
//! (`coexist-bpf/others.c`, built by `build.rs`) go on the same hooks as
//! tpbpf's — a socket load balancer on `cgroup/connect4` (the same cgroup
//! and a parent), another `sk_lookup` program in a pod's network namespace,
//! another tc/tcx ingress program on the interface of tpbpf's tc path —
//! before and after tpbpf. Each test checks, with real sockets in namespaces
//! and cgroups of its own, the order the kernel runs them in, that both keep
//! working, and that ending tpbpf leaves the others attached and working.
//! docs/datapath.md ("Next to other eBPF programs") states the results.
use std::{
    fs::File,
    io::{Read, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use aya::{
    maps::{Array, MapData, SockMap},
    programs::{
        loaded_links, tc::TcAttachOptions, CgroupAttachMode, CgroupSockAddr, LinkOrder,
        SchedClassifier, SkLookup, TcAttachType,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use serde_json::Value;
use tpbpf_vm_tests::*;

/// The stand-ins, compiled for `-target bpf` at build time (empty when
/// the build had no clang).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/coexist.bpf.o"));

/// The service a socket load balancer knows, and its backend pod.
const VIP: [u8; 4] = [10, 96, 0, 10];
const VIP_PORT: u16 = 80;
const BACKEND: [u8; 4] = [10, 244, 1, 5];
const BACKEND_PORT: u16 = 8080;

fn be(ip: [u8; 4]) -> u32 {
    u32::from_ne_bytes(ip)
}

fn ip_of_be(v: u32) -> String {
    std::net::Ipv4Addr::from(v.to_ne_bytes()).to_string()
}

/// One loaded copy of the stand-ins: its own maps, its programs attached
/// by the test (and detached when it is dropped).
struct Other {
    ebpf: Ebpf,
    links: Vec<u32>,
}

impl Other {
    /// `None` (after saying why) when the build could not compile them.
    fn load() -> Option<Self> {
        if OBJECT.is_empty() {
            skip(
                "the stand-in eBPF programs were not built (no clang when vm-tests was built, \
                 or TPBPF_SKIP_EBPF): sudo bash xtask/setup.sh installs clang-22 and libbpf-dev",
            );
            return None;
        }
        let ebpf = EbpfLoader::new()
            .load(OBJECT)
            .unwrap_or_else(|e| panic!("loading coexist.bpf.o: {e}"));
        Some(Self {
            ebpf,
            links: Vec::new(),
        })
    }

    fn array(&mut self, name: &str) -> Array<&mut MapData, u32> {
        Array::try_from(
            self.ebpf
                .map_mut(name)
                .unwrap_or_else(|| panic!("map {name}")),
        )
        .unwrap_or_else(|e| panic!("map {name}: {e}"))
    }

    fn set(&mut self, map: &str, index: u32, value: u32) {
        self.array(map)
            .set(index, value, 0)
            .unwrap_or_else(|e| panic!("setting {map}[{index}]: {e}"));
    }

    fn get(&mut self, map: &str, index: u32) -> u32 {
        self.array(map)
            .get(&index, 0)
            .unwrap_or_else(|e| panic!("reading {map}[{index}]: {e}"))
    }

    fn prog_id(&self, name: &str) -> u32 {
        self.ebpf
            .program(name)
            .unwrap_or_else(|| panic!("program {name}"))
            .info()
            .unwrap_or_else(|e| panic!("program {name}: {e}"))
            .id()
    }

    /// Notes the kernel's link ids of `prog`'s links (after an attach).
    fn record_links(&mut self, prog: &str) {
        let id = self.prog_id(prog);
        for l in loaded_links().filter_map(Result::ok) {
            if l.program_id() == id && !self.links.contains(&l.id()) {
                self.links.push(l.id());
            }
        }
    }

    /// A socket load balancer: connects to VIP:80 go to BACKEND:8080.
    fn socket_lb() -> Option<Self> {
        let mut o = Self::load()?;
        o.set("lb_config", 0, be(VIP));
        o.set("lb_config", 1, VIP_PORT.into());
        o.set("lb_config", 2, be(BACKEND));
        o.set("lb_config", 3, BACKEND_PORT.into());
        let p: &mut CgroupSockAddr = o.ebpf.program_mut("socket_lb").unwrap().try_into().unwrap();
        p.load().expect("loading socket_lb");
        Some(o)
    }

    /// Attaches the load balancer to `cgroup` through a bpf_link.
    fn attach_lb_link(&mut self, cgroup: &Path) {
        let fd = File::open(cgroup).unwrap();
        let p: &mut CgroupSockAddr = self
            .ebpf
            .program_mut("socket_lb")
            .unwrap()
            .try_into()
            .unwrap();
        // A cgroup link takes no flags: the kernel always attaches it as
        // BPF_F_ALLOW_MULTI (BPF_F_ALLOW_MULTI itself is EINVAL there).
        p.attach(&fd, CgroupAttachMode::Single)
            .unwrap_or_else(|e| panic!("attaching socket_lb to {}: {e}", cgroup.display()));
        self.record_links("socket_lb");
    }

    /// (calls, rewrites, the destination the last call was handed).
    fn lb_stats(&mut self) -> (u32, u32, String) {
        let (calls, rewrites) = (self.get("lb_stats", 0), self.get("lb_stats", 1));
        let last = format!(
            "{}:{}",
            ip_of_be(self.get("lb_stats", 2)),
            self.get("lb_stats", 3)
        );
        (calls, rewrites, last)
    }
}

/// A legacy (`BPF_PROG_ATTACH`, `BPF_F_ALLOW_MULTI`, no link) attachment
/// through bpftool, as older agents make them; detached on drop.
struct LegacyCgroupAttach {
    cgroup: PathBuf,
    prog_id: u32,
}

impl LegacyCgroupAttach {
    fn new(cgroup: &Path, prog_id: u32) -> Self {
        Self::with_flags(cgroup, prog_id, &["multi"])
    }

    /// No flags: an exclusive attachment (bpftool's default).
    fn exclusive(cgroup: &Path, prog_id: u32) -> Self {
        Self::with_flags(cgroup, prog_id, &[])
    }

    fn with_flags(cgroup: &Path, prog_id: u32, flags: &[&str]) -> Self {
        run(Command::new("bpftool")
            .args(["cgroup", "attach"])
            .arg(cgroup)
            .args(["connect4", "id", &prog_id.to_string()])
            .args(flags));
        Self {
            cgroup: cgroup.to_path_buf(),
            prog_id,
        }
    }
}

impl Drop for LegacyCgroupAttach {
    fn drop(&mut self) {
        let _ = Command::new("bpftool")
            .args(["cgroup", "detach"])
            .arg(&self.cgroup)
            .args(["connect4", "id", &self.prog_id.to_string()])
            .output();
    }
}

/// The effective `connect4` array of `cgroup` (what runs, in order),
/// from the kernel through bpftool.
fn effective_connect4(cgroup: &Path) -> Vec<u64> {
    let out = run(Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .arg("effective"));
    let v: Vec<Value> = serde_json::from_str(out.trim()).unwrap_or_default();
    v.iter()
        .filter(|e| e["attach_type"] == "connect4" || e["attach_type"] == "cgroup_inet4_connect")
        .filter_map(|e| e["id"].as_u64())
        .collect()
}

fn ids(ready: &Value, key: &str) -> Vec<u64> {
    ready[key]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// `tpbpf daemon` in the client namespace, bridging the service range
/// (10.96.0.0/12) from `cgroup` to the cluster namespace.
fn daemon(client: &Client, cluster: &Cluster, cgroup: &Path, extra: &[&str]) -> (Bg, Value) {
    let mut cmd = Command::new(tpbpf_bin());
    cmd.args([
        "--netns",
        client.ns.name(),
        "daemon",
        "-o",
        "json",
        "--no-dns",
    ])
    .args(extra)
    .args(["--upstream", &format!("netns:{}", cluster.ns.name())])
    .args(["--cidr", CLUSTER_CIDR4])
    .arg("--cgroup")
    .arg(cgroup);
    let mut bg = Bg::spawn(&mut cmd);
    let ready = bg
        .wait_event(Duration::from_secs(10), |e| e["event"] == "ready")
        .expect("tpbpf daemon did not get ready");
    (bg, ready)
}

/// Ends tpbpfd with `sig` and waits until the kernel no longer has its
/// links and programs.
fn end_tpbpf(d: &mut Bg, ready: &Value, sig: libc::c_int) {
    d.kill(sig);
    assert!(
        d.wait_exit(Duration::from_secs(5)).is_some(),
        "tpbpfd did not exit"
    );
    let (progs, links) = (ids(ready, "program_ids"), ids(ready, "link_ids"));
    assert!(
        wait_for(Duration::from_secs(3), || {
            let (p, l) = (kernel_prog_ids(), kernel_link_ids());
            progs.iter().all(|x| !p.contains(x)) && links.iter().all(|x| !l.contains(x))
        }),
        "tpbpf's programs {progs:?} / links {links:?} still in the kernel"
    );
}

fn assert_links_live(links: &[u32], who: &str) {
    let live = kernel_link_ids();
    for l in links {
        assert!(
            live.contains(&u64::from(*l)),
            "{who}'s link {l} is gone: {live:?}"
        );
    }
}

/// One TCP connection from `cgroup` in the client namespace: the test
/// client's JSON (ok, peer, response).
fn connect_from(client: &Client, cgroup: &Path, addr: &str) -> Value {
    connect_from_with(client, cgroup, &[], addr)
}

fn connect_from_with(client: &Client, cgroup: &Path, flags: &[&str], addr: &str) -> Value {
    let out = run(Command::new(testclient_bin())
        .args(["--netns", client.ns.name(), "--cgroup"])
        .arg(cgroup)
        .args(flags)
        .arg(addr));
    serde_json::from_str(out.lines().next().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {out}"))
}

const VIA_TPBPF: &str = "served-by 10.96.0.10:80 lb-cluster";
const DIRECT_TO_BACKEND: &str = "served-by 10.244.1.5:8080 node-backend";

/// The cluster behind tpbpf, and on the developer's machine the backend pod
/// the load balancer picks (reachable directly, as on a node).
fn lb_world() -> (Cluster, Client, Bg) {
    let cluster = Cluster::new("lb-cluster");
    let client = Client::new();
    run(Command::new("ip").args([
        "-n",
        client.ns.name(),
        "addr",
        "add",
        "10.244.1.5/32",
        "dev",
        "lo",
    ]));
    let mut backend = Command::new(testserver_bin());
    backend
        .args(["--netns", client.ns.name(), "http", "10.244.1.5:8080"])
        .env("TAG", "node-backend");
    let mut backend = Bg::spawn(&mut backend);
    backend
        .wait_event(Duration::from_secs(5), |e| e["event"] == "ready")
        .expect("the backend pod's server");
    (cluster, client, backend)
}

fn answer(r: &Value) -> String {
    assert_eq!(r["ok"], true, "connection failed: {r}");
    r["response"].as_str().unwrap_or("").to_string()
}

/// Same cgroup: programs run in attach order. A load balancer attached
/// before tpbpf rewrites the ClusterIP first, so tpbpf sees the backend's
/// address (outside the bridged ranges: not bridged); one attached after
/// tpbpf is handed tpbpf's listener address and leaves it alone. Ending
/// tpbpf leaves the load balancer attached and balancing.
#[test]
fn a_socket_lb_on_the_same_cgroup_runs_in_attach_order_and_outlives_tpbpf() {
    if !require_root() {
        return;
    }
    let Some(mut before) = Other::socket_lb() else {
        return;
    };
    let (cluster, client, _backend) = lb_world();
    let cg = TestCgroup::new();

    // Before tpbpf: it runs first.
    before.attach_lb_link(cg.path());
    let (mut d, ready) = daemon(&client, &cluster, cg.path(), &[]);
    let lb_id = u64::from(before.prog_id("socket_lb"));
    let order = effective_connect4(cg.path());
    println!("same cgroup, LB attached first: effective connect4 = {order:?} (LB {lb_id})");
    assert_eq!(order.first(), Some(&lb_id), "attach order: {order:?}");
    assert_eq!(order.len(), 2, "the LB and tpbpf's connect4: {order:?}");
    let r = connect_from(&client, cg.path(), "10.96.0.10:80");
    assert!(answer(&r).contains(DIRECT_TO_BACKEND), "{r}");
    let (calls, rewrites, last) = before.lb_stats();
    println!("  LB first: calls {calls}, rewrites {rewrites}, handed {last}; answer: {r}");
    assert_eq!((rewrites, last.as_str()), (1, "10.96.0.10:80"));
    // A bridged destination the LB does not know: tpbpf still bridges it.
    let r = connect_from_with(&client, cg.path(), &["--udp-connected"], "10.96.0.10:7");
    assert!(answer(&r).contains("ping"), "{r}");

    // The same LB attached after tpbpf instead: tpbpf runs first.
    drop(before);
    let Some(mut after) = Other::socket_lb() else {
        return;
    };
    after.attach_lb_link(cg.path());
    let lb_id = u64::from(after.prog_id("socket_lb"));
    let order = effective_connect4(cg.path());
    println!("same cgroup, LB attached after tpbpf: effective connect4 = {order:?} (LB {lb_id})");
    assert_eq!(order.last(), Some(&lb_id), "attach order: {order:?}");
    let r = connect_from(&client, cg.path(), "10.96.0.10:80");
    assert!(answer(&r).contains(VIA_TPBPF), "{r}");
    assert_eq!(r["peer"], "10.96.0.10:80", "{r}");
    let (calls, rewrites, last) = after.lb_stats();
    println!("  LB after tpbpf: calls {calls}, rewrites {rewrites}, handed {last}; answer: {r}");
    assert_eq!(rewrites, 0, "the LB must not see the ClusterIP after tpbpf");
    assert_eq!(
        last,
        ready["tcp4"].as_str().unwrap_or("tpbpf's listener"),
        "the LB is handed tpbpf's listener address"
    );

    // tpbpf ends (SIGKILL): the LB stays attached and balances again.
    end_tpbpf(&mut d, &ready, libc::SIGKILL);
    assert_links_live(&after.links, "the load balancer");
    assert_eq!(effective_connect4(cg.path()), vec![lb_id]);
    let r = connect_from(&client, cg.path(), "10.96.0.10:80");
    assert!(answer(&r).contains(DIRECT_TO_BACKEND), "{r}");
    assert_eq!(after.lb_stats().1, 1);
}

/// Parent cgroup (where Cilium's and Calico's socket LBs sit: the root of
/// the hierarchy): the kernel runs a cgroup's own programs before its
/// parent's, so tpbpf, on the bridged cgroup, runs before a parent's
/// load balancer whenever either was attached, through a link or the
/// legacy multi attach. Processes outside the bridged cgroup keep the
/// load balancer's rewrite; ending tpbpf leaves it to everyone.
#[test]
fn a_socket_lb_on_a_parent_cgroup_runs_after_tpbpf_whenever_attached() {
    if !require_root() {
        return;
    }
    let Some(mut first) = Other::socket_lb() else {
        return;
    };
    let Some(mut second) = Other::socket_lb() else {
        return;
    };
    let (cluster, client, _backend) = lb_world();
    let parent = TestCgroup::new();
    let bridged = parent.path().join("bridged");
    std::fs::create_dir(&bridged).unwrap();

    // One LB on the parent before tpbpf (a link), one after (BPF_PROG_ATTACH multi).
    first.attach_lb_link(parent.path());
    let (mut d, ready) = daemon(&client, &cluster, &bridged, &[]);
    let _legacy = LegacyCgroupAttach::new(parent.path(), second.prog_id("socket_lb"));
    let (id1, id2) = (
        u64::from(first.prog_id("socket_lb")),
        u64::from(second.prog_id("socket_lb")),
    );
    let order = effective_connect4(&bridged);
    println!("child cgroup's effective connect4 = {order:?} (parent's LBs: {id1}, {id2})");
    assert_eq!(order.len(), 3, "{order:?}");
    assert_eq!(
        &order[1..],
        &[id1, id2],
        "the cgroup's own program first, then the parent's in attach order"
    );

    let r = connect_from(&client, &bridged, "10.96.0.10:80");
    assert!(answer(&r).contains(VIA_TPBPF), "{r}");
    let (s1, s2) = (first.lb_stats(), second.lb_stats());
    println!("  bridged: LB1 {s1:?}, LB2 {s2:?}; answer: {r}");
    let listener = ready["tcp4"].as_str().unwrap_or("tpbpf's listener");
    assert_eq!((s1.1, s1.2.as_str()), (0, listener));
    assert_eq!((s2.1, s2.2.as_str()), (0, listener));

    // The parent's own processes: only the LBs.
    let r = connect_from(&client, parent.path(), "10.96.0.10:80");
    assert!(answer(&r).contains(DIRECT_TO_BACKEND), "{r}");
    let (s1, s2) = (first.lb_stats(), second.lb_stats());
    println!("  parent: LB1 {s1:?}, LB2 {s2:?}");
    assert_eq!((s1.1, s1.2.as_str()), (1, "10.96.0.10:80"));
    assert_eq!(
        (s2.1, s2.2.as_str()),
        (0, "10.244.1.5:8080"),
        "the second LB runs after the first and is handed its rewrite"
    );

    // tpbpf ends: both LBs stay attached and balance the bridged cgroup too.
    end_tpbpf(&mut d, &ready, libc::SIGKILL);
    assert_links_live(&first.links, "the first load balancer");
    assert_eq!(effective_connect4(&bridged), vec![id1, id2]);
    let r = connect_from(&client, &bridged, "10.96.0.10:80");
    assert!(answer(&r).contains(DIRECT_TO_BACKEND), "{r}");
}

/// A legacy exclusive attachment (no BPF_F_ALLOW_MULTI) on an ancestor
/// takes the hook for the whole subtree: the kernel refuses tpbpf's links
/// (EPERM), and tpbpf refuses to start, saying what it could not attach,
/// rather than taking the hook over. The other program keeps working.
#[test]
fn an_exclusive_program_on_an_ancestor_makes_tpbpf_refuse_to_start() {
    if !require_root() {
        return;
    }
    let Some(mut lb) = Other::socket_lb() else {
        return;
    };
    let (cluster, client, _backend) = lb_world();
    let parent = TestCgroup::new();
    let bridged = parent.path().join("bridged");
    std::fs::create_dir(&bridged).unwrap();
    let _exclusive = LegacyCgroupAttach::exclusive(parent.path(), lb.prog_id("socket_lb"));

    let out = Command::new(tpbpf_bin())
        .args([
            "--netns",
            client.ns.name(),
            "daemon",
            "-o",
            "json",
            "--no-dns",
        ])
        .args(["--upstream", &format!("netns:{}", cluster.ns.name())])
        .args(["--cidr", CLUSTER_CIDR4, "--cgroup"])
        .arg(&bridged)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("tpbpf under an exclusive ancestor: {} {stderr}", out.status);
    assert!(!out.status.success(), "tpbpf started: {stderr}");
    assert!(
        stderr.contains("attaching") && stderr.contains("exclusively"),
        "{stderr}"
    );
    assert_eq!(
        effective_connect4(&bridged),
        vec![u64::from(lb.prog_id("socket_lb"))],
        "only the exclusive program"
    );
    let r = connect_from(&client, &bridged, "10.96.0.10:80");
    assert!(answer(&r).contains(DIRECT_TO_BACKEND), "{r}");
    assert_eq!(lb.lb_stats().1, 1);
}

// ---- sk_lookup ----

/// sk_lookup_config modes (coexist-bpf/others.c).
const LOOKUP_OFF: u32 = 0;
const LOOKUP_ASSIGN: u32 = 1;
const LOOKUP_REPLACE: u32 = 2;
const LOOKUP_DROP: u32 = 3;

/// Another sk_lookup program in a pod's namespace, with a listener of its
/// own there that answers `served by the other sk_lookup program`.
struct OtherLookup {
    other: Other,
    _listener: TcpListener,
}

impl OtherLookup {
    fn attach(pod: &NetNs) -> Option<Self> {
        let mut other = Other::load()?;
        let listener = {
            let ns = pod.name().to_string();
            std::thread::spawn(move || {
                enter_netns(&ns).unwrap();
                TcpListener::bind("127.0.0.1:0").unwrap()
            })
            .join()
            .unwrap()
        };
        let serving = listener.try_clone().unwrap();
        std::thread::spawn(move || {
            for mut c in serving.incoming().flatten() {
                let mut buf = [0u8; 1024];
                let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = c.read(&mut buf);
                let _ =
                    c.write_all(b"HTTP/1.0 200 OK\r\n\r\nserved by the other sk_lookup program\n");
            }
        });
        {
            let mut socks: SockMap<_> =
                SockMap::try_from(other.ebpf.map_mut("lookup_socks").unwrap()).unwrap();
            socks.set(0, &listener, 0).expect("lookup_socks[0]");
        }
        other.set("lookup_config", 0, 80);
        other.set("lookup_config", 1, LOOKUP_OFF);
        let netns = File::open(pod.path()).unwrap();
        let p: &mut SkLookup = other
            .ebpf
            .program_mut("other_lookup")
            .unwrap()
            .try_into()
            .unwrap();
        p.load().expect("loading other_lookup");
        p.attach(&netns).expect("attaching other_lookup");
        other.record_links("other_lookup");
        Some(Self {
            other,
            _listener: listener,
        })
    }

    fn mode(&mut self, mode: u32) {
        self.other.set("lookup_config", 1, mode);
    }

    /// (runs, saw a socket already selected, assigned, assignments refused, last error).
    fn stats(&mut self) -> [u32; 5] {
        [0, 1, 2, 3, 4].map(|i| self.other.get("lookup_stats", i))
    }
}

/// What a client in the node's namespace gets from the pod's port 80.
fn pod_answer(node: &NetNs) -> String {
    let out = run(Command::new(testclient_bin()).args(["--netns", node.name(), "10.244.1.10:80"]));
    let r: Value = serde_json::from_str(out.lines().next().unwrap_or("")).unwrap();
    if r["ok"] == true {
        r["response"].as_str().unwrap_or("").to_string()
    } else {
        format!("error: {} (errno {})", r["error"], r["errno"])
    }
}

const APP: &str = "served-by 10.244.1.10:80 app";
const DEVELOPER: &str = "served-by 10.244.1.1:18080 developer";
const OTHER: &str = "served by the other sk_lookup program";

/// Two sk_lookup programs in one pod: all of them run, in attach order,
/// each seeing the socket chosen so far. The first to assign a socket wins
/// (a later `bpf_sk_assign` without `BPF_SK_LOOKUP_F_REPLACE` fails with
/// EEXIST, as tpbpf's does after another's); a later one with REPLACE
/// takes it over; a drop loses to any program's selection. With tpbpf's
/// agent gone the other program stays attached and in effect.
#[test]
fn two_sk_lookup_programs_first_assignment_wins_and_the_other_outlives_the_intercept() {
    if !require_root() {
        return;
    }
    let (node, pod) = (NetNs::new(), NetNs::new());
    let n = unique_name("k").replace('-', "");
    let (node_if, pod_if) = (
        format!("{}n", &n[..n.len().min(13)]),
        format!("{}p", &n[..n.len().min(13)]),
    );
    run(Command::new("ip").args([
        "link",
        "add",
        &node_if,
        "netns",
        node.name(),
        "type",
        "veth",
        "peer",
        "name",
        &pod_if,
        "netns",
        pod.name(),
    ]));
    for (ns, ifc, addr) in [
        (&node, &node_if, "10.244.1.1/24"),
        (&pod, &pod_if, "10.244.1.10/24"),
    ] {
        run(Command::new("ip").args(["-n", ns.name(), "addr", "add", addr, "dev", ifc]));
        run(Command::new("ip").args(["-n", ns.name(), "link", "set", ifc, "up"]));
    }
    let server = |ns: &NetNs, addr: &str, tag: &str| {
        let mut cmd = Command::new(testserver_bin());
        cmd.args(["--netns", ns.name(), "http", addr])
            .env("TAG", tag);
        let mut bg = Bg::spawn(&mut cmd);
        bg.wait_event(Duration::from_secs(5), |e| e["event"] == "ready")
            .unwrap_or_else(|| panic!("server {addr}"));
        bg
    };
    let _app = server(&pod, "10.244.1.10:80", "app");
    let _developer = server(&node, "10.244.1.1:18080", "developer");
    assert!(pod_answer(&node).contains(APP));

    // Another program, attached first, assigning port 80 to its socket.
    let Some(mut first) = OtherLookup::attach(&pod) else {
        return;
    };
    first.mode(LOOKUP_ASSIGN);
    assert!(pod_answer(&node).contains(OTHER));

    // tpbpf's intercept after it.
    let mut agent = Command::new("ip");
    agent
        .args(["netns", "exec", node.name()])
        .arg(agent_bin())
        .args(["intercept", "--netns", pod.name()])
        .args(["--target", "10.244.1.10:80", "--to", "10.244.1.1:18080"]);
    let mut agent = Bg::spawn(&mut agent);
    let ready = agent
        .wait_event(Duration::from_secs(10), |e| e["event"] == "ready")
        .expect("agent intercept ready");
    let links = sk_lookup_links_in(pod.name());
    println!("sk_lookup links in the pod, in attach order: {links:?}");
    assert_eq!(links.len(), 2, "{links:?}");
    let got = pod_answer(&node);
    println!(
        "other (first, assign) + tpbpf (second): {got:?}; other: {:?}",
        first.stats()
    );
    assert!(got.contains(OTHER), "the first assignment wins: {got}");
    assert_eq!(first.stats()[1], 0, "the first program saw no selection");

    // The first one steps aside: tpbpf's intercept takes the connections.
    first.mode(LOOKUP_OFF);
    let got = pod_answer(&node);
    assert!(got.contains(DEVELOPER), "{got}");

    // Another program after tpbpf: without REPLACE it cannot take over.
    let Some(mut last) = OtherLookup::attach(&pod) else {
        return;
    };
    last.mode(LOOKUP_ASSIGN);
    let got = pod_answer(&node);
    let s = last.stats();
    println!("tpbpf + other (last, assign): {got:?}; other: {s:?}");
    assert!(got.contains(DEVELOPER), "{got}");
    assert_eq!(s[1], 1, "the later program sees tpbpf's selection");
    assert_eq!((s[3], s[4]), (1, libc::EEXIST as u32), "{s:?}");
    // With REPLACE it does.
    last.mode(LOOKUP_REPLACE);
    let got = pod_answer(&node);
    println!(
        "tpbpf + other (last, replace): {got:?}; other: {:?}",
        last.stats()
    );
    assert!(got.contains(OTHER), "{got}");
    // A drop loses to tpbpf's selection.
    last.mode(LOOKUP_DROP);
    let got = pod_answer(&node);
    println!("tpbpf + other (last, drop): {got:?}");
    assert!(got.contains(DEVELOPER), "{got}");

    // The agent dies: its link goes; the other program stays, and its drop
    // now holds (nothing selects a socket).
    let agent_links = ids(&ready, "link_ids");
    agent.kill(libc::SIGKILL);
    assert!(agent.wait_exit(Duration::from_secs(2)).is_some());
    assert!(
        wait_for(Duration::from_secs(2), || {
            let live = kernel_link_ids();
            agent_links.iter().all(|l| !live.contains(l))
        }),
        "the intercept's link stayed"
    );
    let left = sk_lookup_links_in(pod.name());
    assert_eq!(left.len(), 2, "the other programs stay: {left:?}");
    assert_links_live(&first.other.links, "the first sk_lookup program");
    assert_links_live(&last.other.links, "the last sk_lookup program");
    let got = pod_answer(&node);
    println!("other (drop) alone: {got:?}");
    assert!(got.contains("refused"), "{got}");
    last.mode(LOOKUP_ASSIGN);
    assert!(pod_answer(&node).contains(OTHER));
    drop((first, last));
    assert!(pod_answer(&node).contains(APP));
}

// ---- tc / tcx ----

/// tc verdicts as the stand-in returns them.
const TC_ACT_UNSPEC: u32 = u32::MAX; // -1: TCX_NEXT, "go on"
const TC_ACT_OK: u32 = 0;

/// Another tc ingress program on an interface of the client namespace.
struct OtherTc {
    other: Other,
    /// Where the program is pinned for `tc filter ... object-pinned`: a
    /// bpffs of the test's own (a machine need not have one mounted).
    pin: Option<(BpfFs, PathBuf)>,
}

/// A bpffs mounted for one test in a directory of its own, unmounted and
/// removed on drop.
struct BpfFs(PathBuf);

impl BpfFs {
    fn mount() -> Self {
        let dir = std::env::temp_dir().join(unique_name("tpbpf-bpffs"));
        std::fs::create_dir(&dir).unwrap();
        let fs = Self(dir);
        run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&fs.0));
        fs
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

impl OtherTc {
    fn load(verdict: u32, watch: [u8; 4]) -> Option<Self> {
        let mut other = Other::load()?;
        other.set("tc_config", 0, verdict);
        other.set("tc_config", 1, be(watch));
        let p: &mut SchedClassifier = other
            .ebpf
            .program_mut("other_tc")
            .unwrap()
            .try_into()
            .unwrap();
        p.load().expect("loading other_tc");
        Some(Self { other, pin: None })
    }

    /// A tcx link on `iface` of `netns` (Linux 6.6+), at the end of the list.
    fn attach_tcx(&mut self, netns: &str, iface: &str) {
        let p: &mut SchedClassifier = self
            .other
            .ebpf
            .program_mut("other_tc")
            .unwrap()
            .try_into()
            .unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                // The interface is looked up in the thread's namespace.
                enter_netns(netns).unwrap();
                p.attach_with_options(
                    iface,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .expect("attaching other_tc (tcx)");
            })
            .join()
            .unwrap();
        });
        self.other.record_links("other_tc");
    }

    /// A classic tc filter (clsact, direct-action) on `iface` of `netns`,
    /// with iproute2, at `pref`: as agents on kernels without tcx attach.
    /// Netlink stays inside the namespace (`ip netns exec`).
    fn attach_filter(&mut self, netns: &str, iface: &str, pref: u16) {
        let fs = BpfFs::mount();
        let pin = fs.0.join("other_tc");
        let p: &mut SchedClassifier = self
            .other
            .ebpf
            .program_mut("other_tc")
            .unwrap()
            .try_into()
            .unwrap();
        p.pin(&pin).expect("pinning other_tc");
        self.pin = Some((fs, pin.clone()));
        let _ = tc_in(netns)
            .args(["qdisc", "add", "dev", iface, "clsact"])
            .output();
        run(tc_in(netns)
            .args(["filter", "add", "dev", iface])
            .args([
                "ingress",
                "pref",
                &pref.to_string(),
                "bpf",
                "da",
                "object-pinned",
            ])
            .arg(&pin));
    }

    /// (packets, packets to the watched address).
    fn stats(&mut self) -> (u32, u32) {
        (self.other.get("tc_stats", 0), self.other.get("tc_stats", 1))
    }
}

impl Drop for OtherTc {
    fn drop(&mut self) {
        if let Some((_, pin)) = &self.pin {
            let _ = std::fs::remove_file(pin);
        }
    }
}

/// `tc` in network namespace `netns`. Through nsenter, not `ip netns
/// exec`, which mounts a sysfs of its own where bpffs pins are not seen.
fn tc_in(netns: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{netns}")).arg("tc");
    cmd
}

fn tc_filters(netns: &str, iface: &str) -> String {
    run(tc_in(netns).args(["filter", "show", "dev", iface, "ingress"]))
}

/// The container's connect to the cluster through tpbpf's tc path.
fn container_answer(container: &NetNs) -> Value {
    let out =
        run(Command::new(testclient_bin()).args(["--netns", container.name(), "10.96.0.10:80"]));
    serde_json::from_str(out.lines().next().unwrap_or("")).unwrap()
}

/// tc ingress next to tpbpf's. With tcx (6.6+) the links run in list
/// order, and every classic clsact filter after all of them; a program
/// returning TC_ACT_OK ends the run. tpbpf's program ends it only for the
/// packets it steers (cluster-bound TCP, assigned to tpbpfd's socket) and
/// passes every other packet on (TCX_NEXT), so what comes after it (later
/// tcx links, all classic filters) still sees the rest of the traffic; what
/// comes before it and goes on runs, and tpbpf's path works. An earlier
/// program's TC_ACT_OK hides the packets from tpbpf. Ending tpbpf leaves
/// the others attached, and they see all the traffic again.
#[test]
fn tc_programs_next_to_tpbpf_run_in_list_order_and_outlive_it() {
    if !require_root() {
        return;
    }
    let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
    let Some(mut before) = OtherTc::load(TC_ACT_UNSPEC, VIP) else {
        return;
    };
    let Some(mut filter) = OtherTc::load(TC_ACT_UNSPEC, VIP) else {
        return;
    };
    let Some(mut late_filter) = OtherTc::load(TC_ACT_UNSPEC, VIP) else {
        return;
    };
    let cluster = Cluster::new("tc");
    let client = Client::new();
    let container = NetNs::new();
    let n = unique_name("v").replace('-', "");
    let (host_if, ctr_if) = (
        format!("{}h", &n[..n.len().min(13)]),
        format!("{}c", &n[..n.len().min(13)]),
    );
    run(Command::new("ip").args([
        "link",
        "add",
        &host_if,
        "netns",
        client.ns.name(),
        "type",
        "veth",
        "peer",
        "name",
        &ctr_if,
        "netns",
        container.name(),
    ]));
    for (ns, ifc, addr) in [
        (client.ns.name(), &host_if, "10.200.0.1/24"),
        (container.name(), &ctr_if, "10.200.0.2/24"),
    ] {
        run(Command::new("ip").args(["-n", ns, "addr", "add", addr, "dev", ifc]));
        run(Command::new("ip").args(["-n", ns, "link", "set", ifc, "up"]));
    }
    run(Command::new("ip").args([
        "-n",
        container.name(),
        "route",
        "add",
        "default",
        "via",
        "10.200.0.1",
    ]));

    // Before tpbpf: a tcx link where there is tcx, and a classic filter.
    if tcx {
        before.attach_tcx(client.ns.name(), &host_if);
    } else {
        skip_line("no tcx before Linux 6.6: only classic tc filters next to tpbpf's");
    }
    // Classic filters at a small pref (Cilium's 1) and at a large one.
    filter.attach_filter(client.ns.name(), &host_if, 1);
    late_filter.attach_filter(client.ns.name(), &host_if, 50000);
    let cg = TestCgroup::new();
    let (mut d, ready) = daemon(
        &client,
        &cluster,
        cg.path(),
        &["--attach-netns", container.name()],
    );
    assert_eq!(
        ready["attached_ifaces"],
        serde_json::json!([host_if]),
        "{ready}"
    );
    let tpbpf_links = ids(&ready, "link_ids");
    println!(
        "tcx: {tcx}; links: tpbpf {tpbpf_links:?}, other before {:?}; filters:\n{}",
        before.other.links,
        tc_filters(client.ns.name(), &host_if)
    );

    let r = container_answer(&container);
    assert!(
        answer(&r).contains("served-by 10.96.0.10:80 tc"),
        "tpbpf's tc path: {r}"
    );
    let (b, f, l) = (before.stats(), filter.stats(), late_filter.stats());
    println!(
        "tcx before tpbpf {b:?}, classic filters at pref 1 {f:?} and 50000 {l:?} (packets, to \
         the ClusterIP)"
    );
    assert_eq!(l.1, 0, "the filter at pref 50000 runs after tpbpf: {l:?}");
    if tcx {
        assert!(
            b.1 > 0,
            "a tcx program before tpbpf sees the traffic: {b:?}"
        );
        assert_eq!(
            f.1, 0,
            "classic filters run after tcx, which tpbpf ends: {f:?}"
        );
    } else {
        // Classic filters run in `pref` order: the one at pref 1 first;
        // tpbpf's (a pref the kernel picks) before the one at 50000.
        assert!(f.1 > 0, "the filter at pref 1 runs before tpbpf's: {f:?}");
        let filters = tc_filters(client.ns.name(), &host_if);
        assert!(
            filters.contains("pref 49999 bpf chain 0 handle 0x1 tpbpf_tc_ingress"),
            "the kernel puts tpbpf's filter just before the one at 50000: {filters}"
        );
    }

    // After tpbpf, at the end of the tcx list: not reached while tpbpf is there.
    let mut after = None;
    if tcx {
        let Some(mut a) = OtherTc::load(TC_ACT_UNSPEC, VIP) else {
            return;
        };
        a.attach_tcx(client.ns.name(), &host_if);
        let r = container_answer(&container);
        assert!(answer(&r).contains("served-by 10.96.0.10:80 tc"), "{r}");
        // A packet tpbpf does not steer (TCP to the host side, outside the
        // bridged ranges; refused) goes on.
        let _ = Command::new(testclient_bin())
            .args(["--netns", container.name(), "10.200.0.1:9"])
            .output();
        let s = a.stats();
        println!("tcx after tpbpf: {s:?}");
        assert_eq!(
            s.1, 0,
            "tpbpf ends the tcx run for the packets it steers: {s:?}"
        );
        assert!(
            s.0 > 0,
            "the packets tpbpf does not steer go on to the next program: {s:?}"
        );
        after = Some(a);

        // An earlier program that ends the run itself hides the packets from tpbpf.
        before.other.set("tc_config", 0, TC_ACT_OK);
        let r = container_answer(&container);
        println!("tcx before tpbpf returning TC_ACT_OK: {r}");
        assert_ne!(r["ok"], true, "tpbpf must not see the packets: {r}");
        before.other.set("tc_config", 0, TC_ACT_UNSPEC);
        assert_eq!(container_answer(&container)["ok"], true);
    }

    // tpbpf ends. Without tcx its filter is not held by a link: a clean exit
    // removes it (SIGTERM); with tcx the kernel removes the link (SIGKILL).
    end_tpbpf(
        &mut d,
        &ready,
        if tcx { libc::SIGKILL } else { libc::SIGTERM },
    );
    let filters = tc_filters(client.ns.name(), &host_if);
    println!("after tpbpf: filters:\n{filters}");
    assert!(
        filters.contains("other_tc"),
        "the classic filter stays: {filters}"
    );
    let qdiscs = run(tc_in(client.ns.name()).args(["qdisc", "show", "dev", &host_if]));
    assert!(
        qdiscs.contains("clsact"),
        "the clsact qdisc stays: {qdiscs}"
    );
    if tcx {
        assert_links_live(&before.other.links, "the tcx program before tpbpf");
    }
    let others: Vec<(u32, u32)> = [
        tcx.then_some(&mut before),
        after.as_mut(),
        Some(&mut filter),
        Some(&mut late_filter),
    ]
    .into_iter()
    .flatten()
    .map(OtherTc::stats)
    .collect();
    // The container's connects now go unanswered (nothing routes 10.96/12
    // here), but every program sees them.
    let r = container_answer(&container);
    assert_ne!(r["ok"], true, "{r}");
    let now: Vec<(u32, u32)> = [
        tcx.then_some(&mut before),
        after.as_mut(),
        Some(&mut filter),
        Some(&mut late_filter),
    ]
    .into_iter()
    .flatten()
    .map(OtherTc::stats)
    .collect();
    println!("without tpbpf: {others:?} -> {now:?}");
    for (was, is) in others.iter().zip(&now) {
        assert!(
            is.1 > was.1,
            "every other program sees the traffic again: {others:?} -> {now:?}"
        );
    }
}

/// A printed note for a part of a test that this kernel cannot run (the
/// rest runs).
fn skip_line(reason: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "NOTE {}: {reason}",
        std::thread::current().name().unwrap_or("test")
    );
}
