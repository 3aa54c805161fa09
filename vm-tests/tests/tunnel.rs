//! `tpbpf up` through the tunnel to the lab's agents (port-forward through
//! the lab's API endpoint, TLS, token): a download survives the transport
//! being killed; the bridge comes back by itself when the agents do.
use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use tpbpf_vm_tests::*;
use wait_timeout::ChildExt;

struct Setup {
    lab: LabGuard,
    cg: TestCgroup,
    resolv: std::path::PathBuf,
    instance: Instance,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.resolv);
    }
}

fn setup(prefix: &str) -> Option<Setup> {
    let lab = LabGuard::up(prefix)?;
    let cg = TestCgroup::new();
    let resolv = std::env::temp_dir().join(format!("{}.resolv.conf", lab.name));
    std::fs::write(&resolv, "nameserver 127.0.0.53\n").unwrap();
    let instance = Instance(unique_name(prefix));
    let out = Command::new(tpbpf_bin())
        .args([
            "--netns",
            &lab.dev_netns(),
            "up",
            "-o",
            "json",
            "--kubeconfig",
            &lab.kubeconfig(),
            "--instance",
            &instance.0,
            "--cgroup",
        ])
        .arg(cg.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tpbpf up: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        state["bridge"]["upstream"]
            .as_str()
            .unwrap_or("")
            .contains("agent"),
        "{state}"
    );
    Some(Setup {
        lab,
        cg,
        resolv,
        instance,
    })
}

fn status(instance: &str) -> Value {
    let st = Command::new(tpbpf_bin())
        .args(["status", "-o", "json", "--instance", instance])
        .output()
        .unwrap();
    serde_json::from_slice(&st.stdout).unwrap_or(Value::Null)
}

fn curl_page(s: &Setup) -> std::process::Output {
    bridged_shell(
        s.cg.path(),
        &s.lab.dev_netns(),
        &s.resolv,
        "curl -sS -m 5 http://web.default/",
    )
    .output()
    .unwrap()
}

#[test]
fn a_download_survives_killing_the_port_forward_connection() {
    if !require_root() {
        return;
    }
    let Some(s) = setup("tk") else {
        return;
    };
    let dev = s.lab.dev_netns();
    let out = std::env::temp_dir().join(format!("{}.blob", s.lab.name));
    // 24 MiB at 6 MB/s: about four seconds of download.
    let curl = bridged_shell(
        s.cg.path(),
        &dev,
        &s.resolv,
        &format!(
            "curl -sS -m 60 --limit-rate 6M -o {} http://web.default/blob",
            out.display()
        ),
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut curl = KillOnDrop(curl);
    let written = || std::fs::metadata(&out).map_or(0, |m| m.len());
    // Kill tpbpfd's connections to the API endpoint (the port-forward
    // transport) in the kernel, a reset rather than a polite close: once
    // the download is under way, and again once the session has resumed
    // over a new transport and the download moves through it.
    assert!(
        wait_for(Duration::from_secs(20), || written() > 0),
        "the download never started"
    );
    let mut killed = kill_transports(&dev);
    let at_first_kill = written();
    assert!(
        (at_first_kill as usize) < tpbpf_lab::BLOB_LEN,
        "the download was over before the first kill"
    );
    let resumed = wait_for_every(Duration::from_secs(20), Duration::from_millis(100), || {
        let t = &status(&s.instance.0)["live"]["tunnel"];
        t["connected"] == true
            && t["resumes"].as_u64().unwrap_or(0) >= 1
            && written() > at_first_kill
    });
    assert!(
        resumed,
        "the session did not resume after the first kill, or the download stood still: {}",
        status(&s.instance.0)["live"]["tunnel"]
    );
    killed += kill_transports(&dev);
    println!(
        "transports killed at {at_first_kill} and {} of {} bytes",
        written(),
        tpbpf_lab::BLOB_LEN
    );
    assert!(killed >= 2, "ss -K killed no transport connection");
    let status = curl
        .0
        .wait_timeout(Duration::from_secs(60))
        .unwrap()
        .expect("the download did not finish in 60 s");
    let mut err = String::new();
    if let Some(mut e) = curl.0.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert!(status.success(), "the download failed: {status}: {err}");
    let got = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    assert_eq!(got.len(), tpbpf_lab::BLOB_LEN, "download length");
    assert!(
        got == tpbpf_lab::blob_bytes(),
        "the download differs from /blob"
    );
    let st = status_after(&s.instance.0, |st| {
        st["live"]["tunnel"]["connected"] == true
    });
    let t = &st["live"]["tunnel"];
    println!("after {killed} transport kills: {t}");
    assert!(t["resumes"].as_u64().unwrap_or(0) >= 1, "{t}");
    assert_eq!(t["sessions"], 1, "the session was remade, not resumed: {t}");
}

/// A background command, killed if the test ends first (sh, ip netns
/// exec, unshare and curl all exec: it is curl's process).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tpbpf status` once `ok` holds of it, or its last answer after 45 s
/// (the caller's asserts then say what is wrong).
fn status_after(instance: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let mut st = Value::Null;
    wait_for_every(Duration::from_secs(45), Duration::from_millis(250), || {
        st = status(instance);
        ok(&st)
    });
    st
}

#[test]
fn the_bridge_comes_back_by_itself_when_the_agents_do() {
    if !require_root() {
        return;
    }
    let Some(s) = setup("ta") else {
        return;
    };
    let r = curl_page(&s);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    // Kill every agent.
    let state = Path::new("/run/tpbpf-lab").join(&s.lab.name);
    for node in ["node1", "node2"] {
        let pid: i32 = std::fs::read_to_string(state.join(format!("agent-{node}.pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: the agent this test's lab started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    // `status` says the tunnel is down, and why.
    let st = status_after(&s.instance.0, |st| {
        st["live"]["tunnel"]["connected"] == false
    });
    let t = &st["live"]["tunnel"];
    assert_eq!(t["connected"], false, "{st}");
    let text = Command::new(tpbpf_bin())
        .args(["status", "--instance", &s.instance.0])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    println!("{text}");
    assert!(text.contains("tunnel: DOWN"), "{text}");

    // The agents return (as a DaemonSet restarts them); the bridge follows
    // without a new `tpbpf up`.
    let t0 = Instant::now();
    run(Command::new(tpbpf_bin()).args(["lab", "up", "--name", &s.lab.name]));
    let st = status_after(&s.instance.0, |st| {
        st["live"]["tunnel"]["connected"] == true
    });
    let t = &st["live"]["tunnel"];
    println!("tunnel back after {:?}: {t}", t0.elapsed());
    assert_eq!(t["connected"], true, "{st}");
    assert!(t["sessions"].as_u64().unwrap_or(0) >= 2, "{t}");
    let r = curl_page(&s);
    assert!(
        r.status.success() && String::from_utf8_lossy(&r.stdout).contains("served by nginx"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );

    // down leaves nothing attached.
    run(Command::new(tpbpf_bin()).args(["down", "--instance", &s.instance.0]));
    assert!(cgroup_prog_ids(s.cg.path()).is_empty());
}
