//! What tpbpf does with root: `sudo tpbpf run -- CMD` runs CMD as the user
//! who ran sudo; `down` signals only its own tpbpfd; bridge names cannot
//! name paths.
use std::{process::Command, time::Duration};

use tpbpf_vm_tests::*;

/// `tpbpf run` in a fresh namespace, as if run by `sudo` for user nobody.
fn run_as_sudo_for_nobody(extra: &[&str], script: &str) -> (String, String, bool) {
    let (ns, upstream) = (NetNs::new(), NetNs::new());
    let parent = TestCgroup::new();
    let out = Command::new(tpbpf_bin())
        .args(["--netns", ns.name(), "run", "--no-dns"])
        .args(["--upstream", &format!("netns:{}", upstream.name())])
        .args(["--cidr", "10.96.0.0/12", "--cgroup-parent"])
        .arg(parent.path())
        .args(extra)
        .args(["--", "sh", "-c", script])
        .env("SUDO_UID", "65534")
        .env("SUDO_GID", "65534")
        .env("SUDO_USER", "nobody")
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

#[test]
fn sudo_tpbpf_run_runs_the_command_as_the_invoking_user() {
    if !require_root() {
        return;
    }
    let (out, err, ok) = run_as_sudo_for_nobody(&[], "id -u; id -g; echo \"$HOME $USER\"");
    assert!(ok, "{out}{err}");
    // The ready line first, then the command's output.
    let lines: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(
        lines,
        ["65534", "65534", "/nonexistent nobody"],
        "{out}{err}"
    );

    let (out, err, ok) = run_as_sudo_for_nobody(&["--as-root"], "id -u");
    assert!(ok, "{out}{err}");
    assert_eq!(out.lines().nth(1), Some("0"), "{out}{err}");
}

#[test]
fn down_signals_only_its_own_tpbpfd_and_names_cannot_be_paths() {
    if !require_root() {
        return;
    }
    // A bridge whose recorded pid now belongs to another process.
    let instance = unique_name("pid");
    let dir = std::path::Path::new("/run/tpbpf").join(&instance);
    std::fs::create_dir_all(&dir).unwrap();
    let mut victim = Command::new("sleep").arg("30").spawn().unwrap();
    std::fs::write(
        dir.join("state.json"),
        format!("{{\"pid\": {}}}", victim.id()),
    )
    .unwrap();
    let out = Command::new(tpbpf_bin())
        .args(["down", "--instance", &instance])
        .output()
        .unwrap();
    let still_alive = victim.try_wait().unwrap().is_none();
    let _ = victim.kill();
    let _ = victim.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not its tpbpfd"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        still_alive,
        "tpbpf down signalled a process that is not its tpbpfd"
    );

    for bad in ["../etc", "a/b", ".hidden", ""] {
        let out = Command::new(tpbpf_bin())
            .args(["status", "--instance", bad])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "--instance {bad:?} was taken");
        assert!(String::from_utf8_lossy(&out.stderr).contains("not a bridge name"));
    }
}

/// A command's stdout then stderr, for assertions and their messages.
fn both(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A group id no group of this machine has (the kernel needs no name for
/// it), so the test changes nothing in /etc/group.
fn unused_gid() -> u32 {
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let used: Vec<u32> = groups
        .lines()
        .filter_map(|l| l.split(':').nth(2)?.parse().ok())
        .collect();
    (45000 + std::process::id() % 10000..)
        .find(|g| !used.contains(g))
        .unwrap()
}

/// A directory of user nobody's: its kubeconfig, whose exec credential
/// plugin records the uid it runs as (and prints the token of the lab's
/// exec identity, an admin), and what that plugin writes.
struct NobodyHome(std::path::PathBuf);

impl NobodyHome {
    fn new(lab_kubeconfig: &str) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(unique_name("tpbpf-home"));
        std::fs::create_dir(&dir).unwrap();
        let home = Self(dir);
        let text = std::fs::read_to_string(lab_kubeconfig).unwrap();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(&format!("{name}: ")))
                .unwrap_or_else(|| panic!("no {name} in the lab's kubeconfig"))
                .to_string()
        };
        let (server, ca) = (field("server"), field("certificate-authority-data"));
        let tokens = std::path::Path::new(lab_kubeconfig).with_file_name("tokens.csv");
        let token = std::fs::read_to_string(&tokens)
            .unwrap()
            .lines()
            .find_map(|l| {
                let mut f = l.split(',');
                let (token, user) = (f.next()?, f.next()?);
                (user == tpbpf_lab::identity::EXEC_USER).then(|| token.to_string())
            })
            .expect("the exec identity's token in the lab's tokens.csv");
        let plugin = home.0.join("credential-plugin");
        std::fs::write(
            &plugin,
            format!(
                "#!/bin/sh\nid -u >> {}/plugin-uids\nprintf '{{\"apiVersion\":\"client.authentication.k8s.io/v1beta1\",\"kind\":\"ExecCredential\",\"status\":{{\"token\":\"{token}\"}}}}\\n'\n",
                home.0.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(
            home.kubeconfig(),
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: dev\n  user:\n    exec:\n      apiVersion: client.authentication.k8s.io/v1beta1\n      command: {}\n      interactiveMode: Never\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: dev\n    namespace: default\ncurrent-context: lab\n",
                plugin.display()
            ),
        )
        .unwrap();
        for p in [&home.0, &plugin, &home.kubeconfig()] {
            std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
        }
        std::fs::set_permissions(&home.0, std::fs::Permissions::from_mode(0o755)).unwrap();
        home
    }

    fn kubeconfig(&self) -> std::path::PathBuf {
        self.0.join("kubeconfig")
    }

    fn plugin_uids(&self) -> Vec<String> {
        std::fs::read_to_string(self.0.join("plugin-uids"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for NobodyHome {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Ends nobody's bridge `name` (its user side, then its state) even when
/// the test fails.
struct NobodyBridge(String);

impl Drop for NobodyBridge {
    fn drop(&mut self) {
        let dir = std::path::Path::new("/run/tpbpf/uid-65534").join(&self.0);
        let state = std::fs::read_to_string(dir.join("state.json")).unwrap_or_default();
        let pid = serde_json::from_str::<serde_json::Value>(&state)
            .ok()
            .and_then(|s| s["pid"].as_i64());
        if let Some(pid) = pid {
            // The user's side this test started, still running (its cmdline).
            if std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(6).any(|w| w == b"daemon"))
            {
                // SAFETY: kill has no memory preconditions.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir("/run/tpbpf/uid-65534");
    }
}

#[test]
fn a_member_of_group_tpbpf_bridges_and_intercepts_without_root() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("pv") else {
        return;
    };
    // tpbpfd, the service, in the developer's namespace (as on a laptop).
    let m = Members::start(&lab);
    let (dev, gid) = (m.dev.clone(), m.gid.clone());
    let (home, bin, socket) = (&m.home, &m.bin, &m.socket);
    let cg = m.machine.child();
    std::os::unix::fs::chown(cg.path(), Some(65534), Some(65534)).unwrap();
    let bridge = NobodyBridge(unique_name("nb"));
    let nobody = |groups: &str, args: &[&str]| {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &dev,
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                groups,
            ])
            .arg(bin.path())
            .args(args)
            .env("TPBPF_SERVICE_SOCKET", socket)
            .env("HOME", &home.0)
            .env_remove("KUBECONFIG")
            .env_remove("SUDO_UID")
            .output()
            .unwrap();
        let text = both(&out);
        (out.status.success(), text)
    };
    let kubeconfig = home.kubeconfig().display().to_string();
    let cgroup = m.machine.seen(&cg);
    let up = [
        "up",
        "--kubeconfig",
        &kubeconfig,
        "--instance",
        &bridge.0,
        "--cgroup",
        &cgroup,
    ];

    // Not in the group: refused, and told what to do.
    let (ok, text) = nobody("--clear-groups", &up);
    assert!(!ok, "{text}");
    assert!(text.contains("group `tpbpf`"), "{text}");

    // In the group, but a cgroup that is not the user's: refused.
    let theirs = m.machine.child();
    let theirs_path = m.machine.seen(&theirs);
    let mut not_mine = up;
    not_mine[6] = &theirs_path;
    let (ok, text) = nobody(&format!("--groups={gid}"), &not_mine);
    assert!(!ok, "{text}");
    assert!(text.contains("belongs to uid 0, not to you"), "{text}");
    assert!(cgroup_prog_ids(theirs.path()).is_empty());

    // In the group: up, without root.
    let in_group = format!("--groups={gid}");
    let (ok, text) = nobody(&in_group, &up);
    assert!(ok, "{text}");
    let state_dir = std::path::Path::new("/run/tpbpf/uid-65534").join(&bridge.0);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state_dir.join("state.json")).unwrap())
            .unwrap();
    let pid = state["pid"].as_u64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("65534")),
        "the user's side does not run as the user:\n{status}"
    );
    assert!(
        !cgroup_prog_ids(cg.path()).is_empty(),
        "nothing attached to the user's cgroup"
    );

    // Another member of the group: tpbpfd does not let it exempt a socket
    // from nobody's bridge, and refuses malformed frames.
    let attack = r#"
import array, json, socket, sys
def ask(frame, fds=()):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(sys.argv[1])
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', fds))] if fds else []
    s.sendmsg([frame], anc)
    print(s.recv(70000)[2:].decode())
h = json.dumps({"op": "exempt", "id": 1}).encode()
mine = socket.socket()
ask(len(h).to_bytes(2, 'big') + h, [mine.fileno()])
ask(b'\xff\xff{')
"#;
    let out = Command::new("setpriv")
        .args(["--reuid=65533", "--regid=65533", &format!("--groups={gid}")])
        .args(["/usr/bin/python3", "-c", attack])
        .arg(socket)
        .arg(&bridge.0)
        .output()
        .unwrap();
    let answers = String::from_utf8_lossy(&out.stdout);
    assert!(
        answers.contains("on a bridge's own connection"),
        "{answers}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(answers.contains("a malformed request"), "{answers}");

    // That user's process reaches the cluster by name.
    let resolv = home.0.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.53\n").unwrap();
    let r = bridged_shell(
        cg.path(),
        &dev,
        &resolv,
        "exec setpriv --reuid=65534 --regid=65534 --clear-groups curl -sS -m 5 http://web.default/",
    )
    .output()
    .unwrap();
    let got = String::from_utf8_lossy(&r.stdout);
    assert!(
        got.contains("served by nginx"),
        "{got}{}",
        String::from_utf8_lossy(&r.stderr)
    );

    // Intercept and leave, as that user.
    let mut server = Command::new(testserver_bin());
    server
        .args(["--netns", &dev, "http", "127.0.0.1:18080"])
        .env("TAG", "developer");
    let mut server = Bg::spawn(&mut server);
    server
        .wait_event(Duration::from_secs(5), |e| e["event"] == "ready")
        .expect("developer server");
    let (ok, text) = nobody(
        &in_group,
        &[
            "intercept",
            "web",
            "--port",
            "80:18080",
            "--instance",
            &bridge.0,
        ],
    );
    assert!(ok, "{text}");
    let client_pod = format!("{}-cache-redis-0", lab.name);
    let got = curl_from(&client_pod, "http://10.96.0.20/");
    assert!(got.contains("developer"), "{got}");
    let (ok, text) = nobody(&in_group, &["list", "--instance", &bridge.0]);
    assert!(ok && text.contains("web"), "{text}");
    let (ok, text) = nobody(&in_group, &["leave", "web-80", "--instance", &bridge.0]);
    assert!(ok, "{text}");
    assert!(
        wait_for(Duration::from_secs(5), || curl_from(
            &client_pod,
            "http://10.96.0.20/"
        )
        .contains("served by nginx")),
        "leave did not give web back"
    );

    // `tpbpf run` as that user: the command runs as the user, bridged.
    let out = m
        .machine
        .command(std::path::Path::new("ip"))
        .args(["netns", "exec", &dev, "unshare", "-m", "sh", "-c"])
        .arg(format!(
            "mount --bind {} /etc/resolv.conf && exec setpriv --reuid=65534 --regid=65534 --groups={gid} {} run --kubeconfig {kubeconfig} -- sh -c 'id -u; curl -sS -m 5 http://web.default/'",
            resolv.display(),
            bin.path().display()
        ))
        .env("TPBPF_SERVICE_SOCKET", socket)
        .env("HOME", &home.0)
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    let text = both(&out);
    assert!(out.status.success(), "{text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().nth(1), Some("65534"), "{text}");
    assert!(stdout.contains("served by nginx"), "{text}");
    // The command's cgroup, made by tpbpfd, is gone with it.
    let run_cgroup = stdout
        .split(" from cgroup ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap_or_else(|| panic!("no cgroup in {stdout}"));
    assert!(run_cgroup.contains("tpbpf-run-"), "{run_cgroup}");
    assert!(
        !std::path::Path::new(run_cgroup).exists(),
        "{run_cgroup} left behind"
    );

    // Other namespaces stay root's.
    let other = NobodyBridge(unique_name("nb"));
    let (ok, text) = nobody(
        &in_group,
        &[
            "up",
            "--kubeconfig",
            &kubeconfig,
            "--instance",
            &other.0,
            "--attach-netns",
            &dev,
        ],
    );
    assert!(!ok, "{text}");
    assert!(text.contains("need root"), "{text}");

    // The exec plugin ran as the user, never as root.
    let uids = home.plugin_uids();
    assert!(!uids.is_empty(), "the exec plugin never ran");
    assert!(
        uids.iter().all(|u| u == "65534"),
        "exec plugin uids: {uids:?}"
    );

    // down, as that user: everything detached.
    let (ok, text) = nobody(&in_group, &["down", "--instance", &bridge.0]);
    assert!(ok, "{text}");
    assert!(
        wait_for(Duration::from_secs(5), || cgroup_prog_ids(cg.path())
            .is_empty()),
        "programs still attached after down"
    );
}

/// `tpbpf service run` for group `gid` on `socket` (in network namespace
/// `netns`, and with `machine` for the whole machine), once it serves.
fn service(
    machine: Option<&MachineCgroup>,
    netns: Option<&str>,
    gid: &str,
    socket: &std::path::Path,
) -> Bg {
    let mut cmd = match machine {
        Some(m) => m.command(&tpbpf_bin()),
        None => Command::new(tpbpf_bin()),
    };
    if let Some(ns) = netns {
        cmd.args(["--netns", ns]);
    }
    cmd.args(["service", "run", "-o", "json", "--group", gid, "--socket"])
        .arg(socket);
    let mut service = Bg::spawn(&mut cmd);
    service
        .wait_event(Duration::from_secs(10), |e| e["event"] == "ready")
        .expect("tpbpfd's service ready");
    service
}

/// tpbpfd's service in the lab's developer namespace for a group of its
/// own (a gid no group has), and how its member uid 65534 runs `tpbpf`
/// there: a copy of the binary anyone may run, a home with the kubeconfig.
/// Its "whole machine" is a [`MachineCgroup`]: the test's bridged
/// processes run in `machine`'s cgroups.
struct Members {
    service: Bg,
    machine: MachineCgroup,
    gid: String,
    dev: String,
    bin: PublicCopy,
    socket: std::path::PathBuf,
    home: NobodyHome,
    kubeconfig: String,
}

impl Members {
    fn start(lab: &LabGuard) -> Self {
        let dev = lab.dev_netns();
        let gid = unused_gid().to_string();
        let home = NobodyHome::new(&lab.kubeconfig());
        let bin = PublicCopy::of(&tpbpf_bin());
        let socket = bin.path().with_file_name("tpbpfd.sock");
        let machine = MachineCgroup::new();
        let service = service(Some(&machine), Some(&dev), &gid, &socket);
        let kubeconfig = home.kubeconfig().display().to_string();
        Self {
            service,
            machine,
            gid,
            dev,
            bin,
            socket,
            home,
            kubeconfig,
        }
    }

    /// `tpbpf ARGS` as the member: whether it succeeded, and what it said.
    fn tpbpf(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.dev, "setpriv"])
            .args(["--reuid=65534", "--regid=65534"])
            .arg(format!("--groups={}", self.gid))
            .arg(self.bin.path())
            .args(args)
            .env("TPBPF_SERVICE_SOCKET", &self.socket)
            .env("HOME", &self.home.0)
            .env_remove("KUBECONFIG")
            .env_remove("SUDO_UID")
            .output()
            .unwrap();
        (out.status.success(), both(&out))
    }

    /// The member's `tpbpf up` for `bridge` with `extra` flags: must succeed.
    fn up(&self, bridge: &NobodyBridge, extra: &[&str]) {
        let mut args = vec![
            "up",
            "--kubeconfig",
            &self.kubeconfig,
            "--instance",
            &bridge.0,
        ];
        args.extend_from_slice(extra);
        let (ok, text) = self.tpbpf(&args);
        assert!(ok, "{text}");
    }

    /// tpbpfd's open descriptors.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.service.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// A resolv.conf naming `server`, for [`bridged_shell`].
    fn resolv(&self, server: &str) -> std::path::PathBuf {
        let resolv = self.home.0.join("resolv.conf");
        std::fs::write(&resolv, format!("nameserver {server}\n")).unwrap();
        resolv
    }
}

/// A member's whole-machine bridge: it takes cluster ranges only (not
/// loopback, tpbpf's UDP slots, or a top-level DNS domain), and carries
/// that member's sockets only: root's and another account's TCP and DNS to
/// the cluster's ranges and names, from the same network namespace and any
/// cgroup, go where they would without tpbpf (nowhere: the namespace has no
/// route to the cluster).
#[test]
fn a_members_bridge_takes_only_cluster_ranges_and_carries_only_that_members_sockets() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("po") else {
        return;
    };
    let m = Members::start(&lab);
    let bridge = NobodyBridge(unique_name("nw"));
    let refused = |extra: &[&str], why: &str| {
        let mut args = vec!["up", "--kubeconfig", &m.kubeconfig, "--instance", &bridge.0];
        args.extend_from_slice(extra);
        let (ok, text) = m.tpbpf(&args);
        assert!(!ok, "{extra:?} accepted: {text}");
        assert!(text.contains(why), "{extra:?}: {text}");
    };
    // Ranges and domains that would take others' traffic, or tpbpf's own.
    for range in [
        "0.0.0.0/1",
        "127.0.0.0/8",
        "127.100.0.0/16",
        "169.254.169.254/32",
    ] {
        refused(&["--cidr", range], "cluster ranges only");
    }
    refused(&["--cluster-domain", "com"], "top-level domain");

    // The whole machine (no --cgroup): this member's sockets only.
    m.up(&bridge, &[]);
    let elsewhere = m.machine.child();
    let resolv = m.resolv("127.0.0.53");
    let curl = |who: &str, url: &str| {
        let script = format!("exec {who} curl -sS -m 3 {url}");
        let out = bridged_shell(elsewhere.path(), &m.dev, &resolv, &script)
            .output()
            .unwrap();
        (out.status.success(), both(&out))
    };
    let member = "setpriv --reuid=65534 --regid=65534 --clear-groups";
    let other = "setpriv --reuid=65533 --regid=65533 --clear-groups";
    for url in ["http://web.default/", "http://10.96.0.20/"] {
        let (ok, text) = curl(member, url);
        assert!(
            ok && text.contains("served by nginx"),
            "the member, {url}: {text}"
        );
        for (who, name) in [("", "root"), (other, "another account")] {
            let (ok, text) = curl(who, url);
            assert!(
                !ok && !text.contains("served by nginx"),
                "{name}'s {url} went through the member's bridge: {text}"
            );
        }
    }
    let (ok, text) = m.tpbpf(&["down", "--instance", &bridge.0]);
    assert!(ok, "{text}");
}

/// Two whole-machine bridges of group members and a DNS query to a
/// resolver outside the cluster: tpbpfd forwards it once, its own
/// forwarding socket is no member's to capture, so the bridges do not hand
/// the query to each other forever, and tpbpfd's descriptors stay flat.
#[test]
fn two_members_bridges_do_not_forward_dns_to_each_other() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("pl") else {
        return;
    };
    let m = Members::start(&lab);
    let bridges = [
        NobodyBridge(unique_name("l1")),
        NobodyBridge(unique_name("l2")),
    ];
    for b in &bridges {
        m.up(b, &[]);
    }
    let before = m.fds();
    let elsewhere = m.machine.child();
    let resolv = m.resolv("192.0.2.1");
    for transport in ["+tcp", "+notcp"] {
        let script = format!(
            "exec setpriv --reuid=65534 --regid=65534 --clear-groups dig {transport} +time=2 +tries=1 @192.0.2.1 example.org"
        );
        let _ = bridged_shell(elsewhere.path(), &m.dev, &resolv, &script)
            .output()
            .unwrap();
    }
    // Nothing is to happen: a loop would still be growing, so give it the
    // time a query had.
    let grew = wait_for(scaled(Duration::from_secs(3)), || m.fds() > before + 16);
    let after = m.fds();
    assert!(
        !grew,
        "tpbpfd went from {before} to {after} open descriptors after one query each way"
    );
}

/// Root's two whole-machine bridges, each in a tpbpfd of its own (`sudo
/// tpbpf up` for two clusters), and a DNS query to a resolver outside the
/// cluster: each tpbpfd's forwarding socket is exempt in every bridge of
/// the machine, not just its own, so neither hands the query to the other
/// forever, and both tpbpfds' descriptors stay flat.
#[test]
fn roots_bridges_in_two_tpbpfds_do_not_forward_dns_to_each_other() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("pr") else {
        return;
    };
    let (dev, kubeconfig) = (lab.dev_netns(), lab.kubeconfig());
    let machine = MachineCgroup::new();
    let instances = [Instance(unique_name("r1")), Instance(unique_name("r2"))];
    let mut pids = Vec::new();
    for instance in &instances {
        let out = machine
            .command(&tpbpf_bin())
            .args(["--netns", &dev, "up", "--kubeconfig", &kubeconfig])
            .args(["--instance", &instance.0])
            .output()
            .unwrap();
        assert!(out.status.success(), "up {}: {}", instance.0, both(&out));
        let state = std::path::Path::new("/run/tpbpf")
            .join(&instance.0)
            .join("state.json");
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(state).unwrap()).unwrap();
        pids.push(state["pid"].as_u64().expect("tpbpfd's pid"));
    }
    let fds = || -> Vec<usize> {
        pids.iter()
            .map(|pid| {
                std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .map(|d| d.count())
                    .unwrap_or(0)
            })
            .collect()
    };
    let before = fds();
    let elsewhere = machine.child();
    let home = TempDir::new("tpbpf-resolv");
    let resolv = home.0.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 192.0.2.1\n").unwrap();
    for transport in ["+tcp", "+notcp"] {
        let script = format!("exec dig {transport} +time=2 +tries=1 @192.0.2.1 example.org");
        let _ = bridged_shell(elsewhere.path(), &dev, &resolv, &script)
            .output()
            .unwrap();
    }
    // A loop would still be growing: give it the time a query had.
    let grew = wait_for(scaled(Duration::from_secs(3)), || {
        fds().iter().zip(&before).any(|(now, was)| *now > was + 16)
    });
    let after = fds();
    assert!(
        !grew,
        "the two tpbpfds went from {before:?} to {after:?} open descriptors after one query each way"
    );
}

/// A bridged process floods tpbpfd with DNS: 3,000 UDP queries and 300
/// DNS-over-TCP connections to a resolver that never answers (each forward
/// would hold a socket for its timeout). tpbpfd's descriptors stay under
/// the bounds it documents (forwards and TCP connections per bridge), and
/// another bridge of the same tpbpfd keeps working meanwhile.
#[test]
fn a_dns_flood_from_a_bridged_process_stays_within_tpbpfds_bounds() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("pf") else {
        return;
    };
    let m = Members::start(&lab);
    // A resolver that takes every query and answers none.
    let mut hole = Bg::spawn(Command::new("ip").args([
        "netns",
        "exec",
        &m.dev,
        "/usr/bin/python3",
        "-c",
        SILENT_RESOLVER,
    ]));
    hole.wait_event(Duration::from_secs(10), |e| e["event"] == "ready")
        .expect("the silent resolver");
    let cg = m.machine.child();
    std::os::unix::fs::chown(cg.path(), Some(65534), Some(65534)).unwrap();
    let (flooded, other) = (
        NobodyBridge(unique_name("f1")),
        NobodyBridge(unique_name("f2")),
    );
    m.up(&flooded, &[]);
    m.up(&other, &["--cgroup", &m.machine.seen(&cg)]);
    let before = m.fds();
    let elsewhere = m.machine.child();
    let resolv = m.resolv("127.0.0.53");
    // In a file: bridged_shell quotes its script in single quotes.
    let flood_py = m.home.0.join("flood.py");
    std::fs::write(&flood_py, DNS_FLOOD).unwrap();
    let script = format!(
        "exec setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/python3 {}",
        flood_py.display()
    );
    let mut flooder = bridged_shell(elsewhere.path(), &m.dev, &resolv, &script);
    let flooder = Bg::spawn(&mut flooder);
    // While it holds its connections: the bounds hold, the other bridge works.
    let mut peak = 0;
    let during = std::time::Instant::now();
    while during.elapsed() < Duration::from_secs(3) {
        peak = peak.max(m.fds());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Forwards in flight, DNS-over-TCP connections served, and the flood's
    // own 300 connections, each accepted before one past the bound is reset.
    let bound = before + 256 + 64 + 300;
    eprintln!("tpbpfd's descriptors: {before} before the flood, {peak} at most during it");
    assert!(
        peak <= bound,
        "tpbpfd held {peak} descriptors during the flood (from {before}; bound {bound})"
    );
    let r = bridged_shell(
        cg.path(),
        &m.dev,
        &resolv,
        "exec setpriv --reuid=65534 --regid=65534 --clear-groups curl -sS -m 5 http://web.default/",
    )
    .output()
    .unwrap();
    assert!(
        String::from_utf8_lossy(&r.stdout).contains("served by nginx"),
        "the other bridge during the flood: {}",
        both(&r)
    );
    drop(flooder);
}

/// A DNS server on 127.0.0.1:53 (UDP and TCP) that reads and never answers.
const SILENT_RESOLVER: &str = r#"
import socket, threading
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 53))
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("127.0.0.1", 53)); t.listen(4096)
held = []
def tcp():
    while True:
        held.append(t.accept()[0])
threading.Thread(target=tcp, daemon=True).start()
print('{"event":"ready"}', flush=True)
while True:
    u.recv(65535)
"#;

/// 3,000 UDP queries, then 300 DNS-over-TCP connections held for 4 s.
const DNS_FLOOD: &str = r#"
import socket, struct, time
q = struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x07example\x03org\x00\x00\x01\x00\x01"
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(3000):
    u.sendto(q, ("127.0.0.1", 53))
held = []
for i in range(300):
    try:
        s = socket.create_connection(("127.0.0.1", 53), timeout=2)
        s.sendall(struct.pack(">H", len(q)) + q)
        held.append(s)
    except OSError:
        pass
print(len(held), flush=True)
time.sleep(4)
"#;

/// One member holding idle connections to tpbpfd cannot take them all:
/// past its share its connections are closed at once, and another member
/// is still answered.
#[test]
fn one_member_cannot_hold_every_connection_to_tpbpfd() {
    if !require_root() {
        return;
    }
    let gid = unused_gid().to_string();
    let bin = PublicCopy::of(&tpbpf_bin());
    let socket = bin.path().with_file_name("tpbpfd.sock");
    let _service = service(None, None, &gid, &socket);
    // Member 65534 opens 40 connections and keeps them, asking nothing;
    // then counts how many tpbpfd closed at once (read returns EOF).
    let hog = r#"
import socket, sys, time
held = []
for i in range(40):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(sys.argv[1])
    held.append(s)
time.sleep(0.5)
closed = 0
for s in held:
    s.setblocking(False)
    try:
        if s.recv(10) == b"":
            closed += 1
    except BlockingIOError:
        pass
print(closed, flush=True)
time.sleep(3)
"#;
    let mut hog = Bg::spawn(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", &format!("--groups={gid}")])
            .args(["/usr/bin/python3", "-c", hog])
            .arg(&socket),
    );
    let closed = hog
        .wait_event(Duration::from_secs(10), |e| e.is_number())
        .and_then(|n| n.as_u64())
        .expect("the hog's count") as usize;
    assert_eq!(
        closed,
        40 - 16,
        "tpbpfd kept {} of one member's idle connections",
        40 - closed
    );
    // Another member is answered meanwhile.
    let ask = r#"
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
h = json.dumps({"op": "prepare"}).encode()
s.send(len(h).to_bytes(2, "big") + h)
print(s.recv(70000)[2:].decode())
"#;
    let out = Command::new("setpriv")
        .args(["--reuid=65533", "--regid=65533", &format!("--groups={gid}")])
        .args(["/usr/bin/python3", "-c", ask])
        .arg(&socket)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all("/run/tpbpf/uid-65533");
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(answer.contains("\"prepared\""), "{answer}{}", both(&out));
}
