//! Network namespaces: the one way tpbpf enters them (`setns(2)` through
//! nix), for a whole process (`--netns`) or for one piece of code on a
//! thread of its own.
use std::{
    fs::File,
    io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use nix::sched::{setns, CloneFlags};

/// `/run/netns/NAME` for an `ip netns` name; a path as it is.
pub fn path_of(name: &str) -> PathBuf {
    if name.contains('/') {
        PathBuf::from(name)
    } else {
        Path::new("/run/netns").join(name)
    }
}

/// Opens the network namespace `name` (an `ip netns` name or a path).
pub fn open(name: &str) -> io::Result<File> {
    let path = path_of(name);
    File::open(&path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("opening network namespace {}: {e}", path.display()),
        )
    })
}

/// Moves the calling thread into the network namespace `ns`.
pub fn enter(ns: &impl AsFd) -> io::Result<()> {
    setns(ns, CloneFlags::CLONE_NEWNET)
        .map_err(|e| io::Error::other(format!("entering a network namespace: {e} (needs root)")))
}

/// Runs `f` in the network namespace `ns`, on a thread of its own (which
/// ends with it): nothing else changes namespace.
pub fn run_in<T: Send>(ns: &File, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns)?;
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other("the network namespace thread panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_code_in_a_namespace_and_leaves_the_caller_where_it_was() {
        let own = File::open("/proc/self/ns/net").unwrap();
        let before = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let inside = run_in(&own, || {
            std::fs::read_link("/proc/thread-self/ns/net").unwrap()
        });
        match inside {
            Ok(link) => assert_eq!(link, before),
            // Without CAP_SYS_ADMIN setns is refused, and says so.
            Err(e) => assert!(e.to_string().contains("needs root"), "{e}"),
        }
        assert_eq!(
            std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
            before
        );
    }
}
