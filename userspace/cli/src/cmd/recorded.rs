//! A process that tpbpf recorded to signal later (tpbpfd's pid file, a
//! bridge's state file): its pid and the start time the kernel gave it
//! (`/proc/PID/stat` field 22, clock ticks since boot). Once the process is
//! gone its pid may name any other process, whatever that one's command
//! line says (anyone can run a program called `tpbpfd`, with any
//! arguments); the pid and the start time together name one process per
//! boot. A recorded process is opened as a pidfd and checked against both
//! before anything is signalled, and signalled through that pidfd.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub pid: i32,
    pub start_time: u64,
}

/// The start time of process `pid` (clock ticks after boot).
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 of a `/proc/PID/stat` line; the command name (field 2) may
/// hold spaces and parentheses, so fields are counted after its last `)`.
fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (state): field 22 is its 20th.
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Recorded {
    /// The live process `pid`, as it is now.
    pub fn of(pid: u32) -> io::Result<Self> {
        let pid = i32::try_from(pid).map_err(io::Error::other)?;
        let start_time =
            start_time(pid).ok_or_else(|| io::Error::other(format!("reading /proc/{pid}/stat")))?;
        Ok(Self { pid, start_time })
    }

    /// What a pid file holds: `PID START_TIME`.
    pub fn to_line(self) -> String {
        format!("{} {}\n", self.pid, self.start_time)
    }

    /// A pid file's text; `None` unless it names both (a file of a bare
    /// pid, as older versions wrote, cannot be checked).
    pub fn parse_line(text: &str) -> Option<Self> {
        let mut words = text.split_whitespace();
        let pid = words.next()?.parse().ok().filter(|p| *p > 0)?;
        let start_time = words.next()?.parse().ok()?;
        words.next().is_none().then_some(Self { pid, start_time })
    }

    /// The recorded process, if it still lives: a pidfd for the pid, taken
    /// before its start time is read (so a pid reused after the check is
    /// not signalled) and checked alive after (so the start time read was
    /// the pidfd's process's).
    pub fn open(&self) -> Option<Process> {
        // SAFETY: pidfd_open takes no memory; the result is checked.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let process = Process(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        (start_time(self.pid) == Some(self.start_time) && process.alive()).then_some(process)
    }
}

/// A recorded process, held by a pidfd: signals reach it or nothing.
pub struct Process(OwnedFd);

impl Process {
    /// Whether it has not been reaped.
    pub fn alive(&self) -> bool {
        self.signal(0).is_ok()
    }

    /// Waits up to `timeout` for it to exit (a pidfd turns readable then);
    /// true if it did.
    pub fn wait_exit(&self, timeout: std::time::Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, the count given.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        rc > 0 || !self.alive()
    }

    pub fn signal(&self, sig: libc::c_int) -> io::Result<()> {
        // SAFETY: no siginfo is passed; the descriptor is a pidfd we own.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                sig,
                std::ptr::null::<u8>(),
                0,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_start_time_past_a_command_name_with_spaces_and_parens() {
        let stat =
            "4242 (a b) c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("4242 (x) S 1"), None);
    }

    #[test]
    fn a_pid_file_without_a_start_time_names_nothing() {
        assert_eq!(Recorded::parse_line("1234\n"), None);
        assert_eq!(Recorded::parse_line("1234 x\n"), None);
        assert_eq!(
            Recorded::parse_line("1234 5678\n"),
            Some(Recorded {
                pid: 1234,
                start_time: 5678
            })
        );
    }

    /// A live process whose pid is recorded with another start time (the
    /// recorded one is gone and its pid was handed out again) is not
    /// opened, so never signalled; with its own start time it is.
    #[test]
    fn a_reused_pid_is_not_the_recorded_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let now = Recorded::of(child.id()).unwrap();
        let stale = Recorded {
            start_time: now.start_time.wrapping_sub(1),
            ..now
        };
        assert!(
            stale.open().is_none(),
            "a stale record opened a live process"
        );
        let process = now.open().expect("the recorded process itself");
        assert!(process.alive());
        let _ = child.kill();
        let _ = child.wait();
        assert!(!process.alive());
    }
}
