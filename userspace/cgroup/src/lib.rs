//! cgroup v2 for tpbpf: where the hierarchy is mounted, which cgroup a
//! process is in, and child cgroups that tpbpf creates to scope its programs
//! (`tpbpf run`) and removes again, even when the process that made them is
//! killed (see [`reaper`]).
//!
//! The hierarchy is found from `/proc/self/mountinfo`, not assumed: systems
//! with the unified layout mount it at `/sys/fs/cgroup`, hybrid systems at
//! `/sys/fs/cgroup/unified`. Where none is visible — cgroup v1-only systems
//! (older WSL2 set-ups), `ip netns exec` (which remounts `/sys` and so hides
//! it), containers that bind-mount only their own subtree — tpbpf mounts one
//! of its own at [`OWN_MOUNT`], as Cilium does with `/run/cilium/cgroupv2`:
//! cgroup v2 can be mounted beside v1 controllers, and attaching programs
//! needs no controllers.

mod empty;
pub mod reaper;

pub use empty::{evacuate_and_remove, move_member};

use std::{
    fs,
    io::{self, ErrorKind},
    path::{Path, PathBuf},
    time::Duration,
};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CgroupError {
    #[error(
        "this kernel has no cgroup v2 (no `cgroup2` in /proc/filesystems): tpbpf attaches its \
         programs to a cgroup v2, which Linux has had since 4.5; use a kernel built with \
         CONFIG_CGROUPS (every distribution kernel is)"
    )]
    NoCgroup2,
    #[error(
        "no cgroup v2 hierarchy is visible here, and mounting one at {path} failed: {source}. \
         Run tpbpf as root, or mount one yourself (`mount -t cgroup2 none {path}`)"
    )]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} names no cgroup v2 path for this process (no `0::` line)")]
    NotInCgroup2 { path: PathBuf },
    #[error(
        "{path} says the process is in cgroup {cgroup}, outside this cgroup namespace (tpbpf \
         runs in a container or a namespace of its own): run it in tpbpfd's cgroup namespace, \
         or name a cgroup inside it (--cgroup, --cgroup-parent)"
    )]
    OutsideNamespace { path: PathBuf, cgroup: String },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating cgroup {path}: {source} (tpbpf needs root to create cgroups)")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("moving process {pid} into cgroup {path}: {source}")]
    Move {
        pid: u32,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("removing cgroup {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {path} is not inside the cgroup v2 hierarchy at {root}")]
    Outside { path: PathBuf, root: PathBuf },
}

pub type Result<T, E = CgroupError> = std::result::Result<T, E>;

/// Where tpbpf mounts a cgroup v2 hierarchy of its own when none is visible.
pub const OWN_MOUNT: &str = "/run/tpbpf/cgroupv2";

/// A cgroup v2 hierarchy tpbpf can use, and whether tpbpf mounted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup2Mount {
    pub path: PathBuf,
    /// Mounted by tpbpf at [`OWN_MOUNT`] (now or by an earlier run in this
    /// mount namespace), because none was visible.
    pub own: bool,
}

/// Where the cgroup v2 hierarchy is mounted: the first whole-hierarchy
/// `cgroup2` mount in `/proc/self/mountinfo`, else one tpbpf mounts at
/// [`OWN_MOUNT`] (see [`cgroup2`]).
pub fn cgroup2_mount() -> Result<PathBuf> {
    cgroup2().map(|m| m.path)
}

/// Finds a whole-hierarchy cgroup v2 mount, mounting one at [`OWN_MOUNT`]
/// where none is visible. The mount is made in the caller's mount namespace
/// and stays there (a later run reuses it); it holds no processes of its
/// own, so leaving it is harmless.
pub fn cgroup2() -> Result<Cgroup2Mount> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.into(),
        source,
    })?;
    if let Some(found) = parse_cgroup2_mount(&text) {
        let own = found == Path::new(OWN_MOUNT);
        return Ok(Cgroup2Mount { path: found, own });
    }
    if !kernel_has_cgroup2() {
        return Err(CgroupError::NoCgroup2);
    }
    mount_own(Path::new(OWN_MOUNT))?;
    Ok(Cgroup2Mount {
        path: OWN_MOUNT.into(),
        own: true,
    })
}

/// Whether the kernel offers the `cgroup2` filesystem (`/proc/filesystems`).
pub fn kernel_has_cgroup2() -> bool {
    fs::read_to_string("/proc/filesystems")
        .map(|t| {
            t.lines()
                .any(|l| l.split_whitespace().last() == Some("cgroup2"))
        })
        // No /proc/filesystems: let the mount itself tell.
        .unwrap_or(true)
}

fn mount_own(dir: &Path) -> Result<()> {
    let mount_err = |source| CgroupError::Mount {
        path: dir.into(),
        source,
    };
    fs::create_dir_all(dir).map_err(mount_err)?;
    let target = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|e| mount_err(io::Error::new(ErrorKind::InvalidInput, e)))?;
    // SAFETY: NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENODEV) {
            return Err(CgroupError::NoCgroup2);
        }
        return Err(mount_err(e));
    }
    tracing::info!(path = %dir.display(), "no cgroup v2 hierarchy was visible: mounted one");
    Ok(())
}

/// Finds the first `cgroup2` mount of the whole hierarchy in mountinfo text.
///
/// A mountinfo line is `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [TAGS...] - FSTYPE SOURCE SUPER_OPTS`.
/// A mount whose ROOT is not `/` shows only a subtree (a container's
/// bind mount of its own cgroup): the paths in `/proc/PID/cgroup` do not
/// resolve under it, so it is passed over.
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mut fields = left.split_whitespace();
        if fields.nth(3)? != "/" {
            return None;
        }
        let mountpoint = fields.next()?;
        Some(PathBuf::from(unescape_mountinfo(mountpoint)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                out.push(
                    digits
                        .iter()
                        .fold(0u8, |v, d| v.wrapping_mul(8) + (d - b'0')),
                );
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 path (relative to the hierarchy's root) of a process, from
/// the `0::` line of `/proc/PID/cgroup`.
pub fn cgroup_of(pid: Option<u32>) -> Result<PathBuf> {
    let path = match pid {
        Some(pid) => PathBuf::from(format!("/proc/{pid}/cgroup")),
        None => PathBuf::from("/proc/self/cgroup"),
    };
    let text = fs::read_to_string(&path).map_err(|source| CgroupError::Read {
        path: path.clone(),
        source,
    })?;
    cgroup_in(&text, path)
}

/// The `0::` line of a `/proc/PID/cgroup` text (read from `path`), as a
/// path relative to the hierarchy's root.
fn cgroup_in(text: &str, path: PathBuf) -> Result<PathBuf> {
    let cgroup = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| CgroupError::NotInCgroup2 { path: path.clone() })?;
    // A cgroup above the reader's cgroup namespace shows as `/..`: it is
    // not below the mount, and joined to it would name a directory beside.
    let relative = PathBuf::from(cgroup.trim_start_matches('/'));
    if !relative
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        return Err(CgroupError::OutsideNamespace {
            path,
            cgroup: cgroup.to_string(),
        });
    }
    Ok(relative)
}

/// The absolute path of the cgroup the calling process is in.
pub fn current_cgroup_dir() -> Result<PathBuf> {
    Ok(cgroup2_mount()?.join(cgroup_of(None)?))
}

/// The processes in a cgroup (not its descendants).
pub fn procs(dir: &Path) -> Result<Vec<u32>> {
    let path = dir.join("cgroup.procs");
    let text = fs::read_to_string(&path).map_err(|source| CgroupError::Read { path, source })?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Moves a process into the cgroup at `dir`.
pub fn move_pid(dir: &Path, pid: u32) -> Result<()> {
    let path = dir.join("cgroup.procs");
    fs::write(&path, pid.to_string()).map_err(|source| CgroupError::Move {
        pid,
        path: dir.into(),
        source,
    })
}

/// A cgroup created by tpbpf. Dropping it moves any process still inside to
/// the parent and removes it.
#[derive(Debug)]
pub struct ChildCgroup {
    path: PathBuf,
    removed: bool,
}

impl ChildCgroup {
    /// Creates `parent/name`. `parent` must be inside the cgroup v2 hierarchy.
    pub fn create(parent: &Path, name: &str) -> Result<Self> {
        let root = cgroup2_mount()?;
        // Component-wise, and without `..`: `ROOT/../x` starts with ROOT
        // but is not below it.
        let plain = |p: &Path| {
            p.components()
                .all(|c| !matches!(c, std::path::Component::ParentDir))
        };
        if !parent.starts_with(&root)
            || !plain(parent)
            || !plain(Path::new(name))
            || name.contains('/')
        {
            return Err(CgroupError::Outside {
                path: parent.into(),
                root,
            });
        }
        let path = parent.join(name);
        fs::create_dir(&path).map_err(|source| CgroupError::Create {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            path,
            removed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the cgroup directory, as the kernel wants it for attaching programs.
    pub fn open(&self) -> Result<fs::File> {
        fs::File::open(&self.path).map_err(|source| CgroupError::Read {
            path: self.path.clone(),
            source,
        })
    }

    pub fn add(&self, pid: u32) -> Result<()> {
        move_pid(&self.path, pid)
    }

    /// Removes the cgroup now, reporting failure (drop only logs it).
    pub fn remove(mut self) -> Result<()> {
        self.removed = true;
        evacuate_and_remove(&self.path, Duration::from_secs(2))
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        if !self.removed {
            if let Err(e) = evacuate_and_remove(&self.path, Duration::from_secs(2)) {
                tracing::warn!("{e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cgroup_outside_the_namespace_is_not_taken_for_one_below_the_mount() {
        use super::{cgroup_in, CgroupError};
        let p = || std::path::PathBuf::from("/proc/7/cgroup");
        assert_eq!(
            cgroup_in("0::/user.slice/a b\n", p()).unwrap(),
            std::path::PathBuf::from("user.slice/a b")
        );
        assert_eq!(cgroup_in("0::/\n", p()).unwrap(), std::path::PathBuf::new());
        for outside in ["0::/..\n", "0::/../../system.slice/x\n"] {
            let e = cgroup_in(outside, p()).unwrap_err();
            assert!(matches!(e, CgroupError::OutsideNamespace { .. }), "{e}");
            assert!(
                e.to_string().contains("outside this cgroup namespace"),
                "{e}"
            );
        }
    }

    use super::*;

    #[test]
    fn finds_hybrid_unified_mount() {
        let text = "\
24 1 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
30 24 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,name=systemd
";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_unified_mount_with_optional_fields() {
        let text = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 master:2 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn v1_only_system_has_no_cgroup2() {
        let text = "\
30 24 0:26 / /sys/fs/cgroup rw shared:9 - tmpfs tmpfs rw
32 30 0:28 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu
";
        assert_eq!(parse_cgroup2_mount(text), None);
    }

    #[test]
    fn passes_over_a_mount_of_a_subtree() {
        // A container's bind mount of its own cgroup, then the whole hierarchy.
        let text = "\
40 30 0:27 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw
41 30 0:27 / /run/tpbpf/cgroupv2 rw - cgroup2 none rw
";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/run/tpbpf/cgroupv2"))
        );
        assert_eq!(
            parse_cgroup2_mount("40 30 0:27 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"),
            None
        );
    }

    #[test]
    fn unescapes_spaces_in_mountpoints() {
        let text = "31 30 0:27 / /mnt/cg\\040two rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/mnt/cg two"))
        );
    }
}
