//! Emptying a cgroup tpbpf made (`tpbpf_cgroup::evacuate_and_remove`, what
//! `tpbpf run`'s scope and its clean-up helper do): real cgroups holding
//! processes that fork. The processes go to the parent and keep running;
//! a pid that no longer names a process of the cgroup is never moved.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use tpbpf_vm_tests::*;

/// A process started in a cgroup (moved there before it execs); killed by
/// its pid and reaped on drop.
struct InCgroup(Child);

impl InCgroup {
    fn spawn(cgroup: &Path, script: &str) -> Self {
        use std::os::unix::process::CommandExt;
        let procs = std::ffi::CString::new(
            cgroup
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        // SAFETY: open, write and close are async-signal-safe; the path
        // was made before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
        Self(cmd.spawn().expect("starting sh in a test cgroup"))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for InCgroup {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The cgroup path of `pid`, relative to the hierarchy's root.
fn cgroup_of(pid: u32) -> Option<PathBuf> {
    tpbpf_cgroup::cgroup_of(Some(pid)).ok()
}

fn rel(dir: &Path) -> PathBuf {
    let mount = tpbpf_cgroup_mount().unwrap();
    dir.strip_prefix(&mount).unwrap().to_path_buf()
}

fn counter(file: &Path) -> u64 {
    fs::read_to_string(file)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// A shell that forks a short-lived child in a loop and counts them.
fn fork_loop(counter_file: &Path) -> String {
    format!(
        "i=0; while :; do i=$((i+1)); echo $i > {}; /bin/true; done",
        counter_file.display()
    )
}

/// A cgroup whose process forks without pause is emptied into the parent
/// and removed; the forking shell keeps running there (thawed), and a
/// forking process of another cgroup next to it stays where it was.
#[test]
fn a_forking_cgroup_is_emptied_into_its_parent_and_its_processes_keep_running() {
    if !require_root() {
        return;
    }
    let parent = TestCgroup::new();
    let bystanders = TestCgroup::new();
    let scope = parent.path().join("scope");
    fs::create_dir(&scope).unwrap();
    let tmp = std::env::temp_dir().join(unique_name("tpbpf-cg-empty"));
    fs::create_dir(&tmp).unwrap();
    let _tmp = RemoveDir(tmp.clone());
    let (ours, theirs) = (tmp.join("ours"), tmp.join("theirs"));
    let inside = InCgroup::spawn(&scope, &fork_loop(&ours));
    let outside = InCgroup::spawn(bystanders.path(), &fork_loop(&theirs));
    assert!(
        wait_for(Duration::from_secs(5), || counter(&ours) > 100
            && counter(&theirs) > 100),
        "the forking shells did not start"
    );

    tpbpf_cgroup::evacuate_and_remove(&scope, Duration::from_secs(5))
        .expect("emptying a forking cgroup");

    assert!(!scope.exists(), "the cgroup was not removed");
    assert_eq!(cgroup_of(inside.pid()), Some(rel(parent.path())));
    assert_eq!(cgroup_of(outside.pid()), Some(rel(bystanders.path())));
    let before = counter(&ours);
    assert!(
        wait_for(Duration::from_secs(5), || counter(&ours) > before + 100),
        "the moved shell is not running (left frozen?)"
    );
    // Whatever is in the parent now is the moved shell or its children.
    for pid in tpbpf_cgroup::procs(parent.path()).unwrap() {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid: u32 = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0);
        assert!(
            pid == inside.pid() || ppid == inside.pid() || stat.is_empty(),
            "pid {pid} (parent {ppid}) was moved into the parent cgroup but was not the cgroup's"
        );
    }
}

/// A pid read from the cgroup that names another process by the time it
/// is moved (here: a process of another cgroup, as a reused pid would) is
/// left where it is; the cgroup's own process is moved.
#[test]
fn a_pid_that_is_not_the_cgroups_is_never_moved() {
    if !require_root() {
        return;
    }
    let mount = tpbpf_cgroup_mount().unwrap();
    let parent = TestCgroup::new();
    let elsewhere = TestCgroup::new();
    let scope = parent.path().join("scope");
    fs::create_dir(&scope).unwrap();
    let member = InCgroup::spawn(&scope, "exec sleep 60");
    let stranger = InCgroup::spawn(elsewhere.path(), "exec sleep 60");

    assert!(
        !tpbpf_cgroup::move_member(&scope, &mount, parent.path(), stranger.pid()),
        "moved a process of another cgroup"
    );
    assert_eq!(cgroup_of(stranger.pid()), Some(rel(elsewhere.path())));
    assert!(tpbpf_cgroup::move_member(
        &scope,
        &mount,
        parent.path(),
        member.pid()
    ));
    assert_eq!(cgroup_of(member.pid()), Some(rel(parent.path())));
    let _ = fs::remove_dir(&scope);
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
