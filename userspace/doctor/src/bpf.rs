//! Raw `bpf()` calls for the probes. The doctor calls the kernel directly so
//! each row reports the errno the kernel gave for exactly that program type
//! and attach type.
use std::{
    fs, io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

// enum bpf_cmd
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;

const BPF_MAP_TYPE_ARRAY: u32 = 2;
/// `BPF_TCX_INGRESS` in enum bpf_attach_type (Linux 6.6).
const BPF_TCX_INGRESS: u32 = 46;

/// enum bpf_prog_type
#[derive(Clone, Copy, Debug)]
#[repr(u32)]
pub enum ProgType {
    SchedCls = 3,
    SockOps = 13,
    CgroupSockAddr = 18,
    SkLookup = 30,
}

/// enum bpf_attach_type
#[derive(Clone, Copy, Debug)]
#[repr(u32)]
pub enum AttachType {
    CgroupInet4Connect = 10,
    CgroupInet6Connect = 11,
    CgroupUdp4Sendmsg = 14,
    CgroupUdp6Sendmsg = 15,
    CgroupUdp4Recvmsg = 19,
    CgroupUdp6Recvmsg = 20,
    CgroupInet4Getpeername = 29,
    CgroupInet6Getpeername = 30,
    SkLookupAttach = 36,
}

/// `union bpf_attr`, as 128 zeroed bytes with fields written at their
/// offsets; the kernel requires unused bytes to be zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }
    fn u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn get_u32(&self, off: usize) -> u32 {
        u32::from_ne_bytes([
            self.0[off],
            self.0[off + 1],
            self.0[off + 2],
            self.0[off + 3],
        ])
    }
}

fn sys_bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, writable 128-byte bpf_attr for the call's
    // duration; pointers inside it point at live buffers owned by the caller.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), attr.0.len()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn fd(rc: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

pub fn create_array_map() -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32(0, BPF_MAP_TYPE_ARRAY)
        .u32(4, 4)
        .u32(8, 8)
        .u32(12, 1);
    sys_bpf(BPF_MAP_CREATE, &mut attr).map(fd)
}

/// Loads `r0 = 1; exit`, a program every hook accepts, with the given type
/// and expected attach type.
pub fn load_trivial(prog: ProgType, attach: Option<AttachType>) -> io::Result<OwnedFd> {
    // mov64 r0, 1 ; exit
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 1, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    load(prog, attach, &insns)
}

/// A connect4 program with one atomic fetch-and-add (`BPF_ATOMIC |
/// BPF_FETCH`, Linux 5.12), as tpbpf's programs use for the UDP slot
/// counter. Older verifiers refuse it ("BPF_STX uses reserved fields").
pub fn load_atomic_fetch() -> io::Result<OwnedFd> {
    let insns: [u64; 6] = [
        // r1 = 0; *(u64 *)(r10 - 8) = r1
        u64::from_le_bytes([0xb7, 0x01, 0, 0, 0, 0, 0, 0]),
        u64::from_le_bytes([0x7b, 0x1a, 0xf8, 0xff, 0, 0, 0, 0]),
        // r1 = 1; r1 = atomic_fetch_add((u64 *)(r10 - 8), r1)
        u64::from_le_bytes([0xb7, 0x01, 0, 0, 1, 0, 0, 0]),
        u64::from_le_bytes([0xdb, 0x1a, 0xf8, 0xff, 0x01, 0, 0, 0]),
        // r0 = 1; exit
        u64::from_le_bytes([0xb7, 0, 0, 0, 1, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    load(
        ProgType::CgroupSockAddr,
        Some(AttachType::CgroupInet4Connect),
        &insns,
    )
}

fn load(prog: ProgType, attach: Option<AttachType>, insns: &[u64]) -> io::Result<OwnedFd> {
    let license = b"GPL\0";
    let mut log = vec![0u8; 4096];
    let mut attr = Attr::new();
    attr.u32(0, prog as u32)
        .u32(4, insns.len() as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64);
    attr.0[48..48 + 12].copy_from_slice(b"tpbpf_doctor");
    if let Some(a) = attach {
        attr.u32(68, a as u32);
    }
    let r = sys_bpf(BPF_PROG_LOAD, &mut attr).map(fd);
    drop(log);
    r
}

/// Native code size of a loaded program: zero when the JIT is off.
pub fn jited_len(prog: &OwnedFd) -> io::Result<u32> {
    let mut info = [0u8; 32];
    let mut attr = Attr::new();
    attr.u32(0, prog.as_raw_fd() as u32)
        .u32(4, info.len() as u32)
        .u64(8, info.as_mut_ptr() as u64);
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    // struct bpf_prog_info: type, id, tag[8], jited_prog_len ...
    Ok(u32::from_ne_bytes([info[16], info[17], info[18], info[19]]))
}

/// Queries tcx ingress programs on `lo` (ifindex 1): reads only, and fails
/// with EINVAL on kernels without tcx.
pub fn query_tcx_ingress_lo() -> io::Result<u32> {
    let mut attr = Attr::new();
    attr.u32(0, 1).u32(4, BPF_TCX_INGRESS);
    sys_bpf(BPF_PROG_QUERY, &mut attr)?;
    Ok(attr.get_u32(24))
}

/// Creates an empty scratch cgroup, attaches a `connect4` test program to it
/// through a bpf_link, closes the link and removes the cgroup.
pub fn attach_in_scratch_cgroup(mount: &Path) -> io::Result<PathBuf> {
    let prog = load_trivial(
        ProgType::CgroupSockAddr,
        Some(AttachType::CgroupInet4Connect),
    )?;
    let scratch = mount.join(format!("tpbpf-doctor-{}", std::process::id()));
    fs::create_dir(&scratch)?;
    let result = (|| -> io::Result<()> {
        let dir = fs::File::open(&scratch)?;
        let mut attr = Attr::new();
        attr.u32(0, prog.as_raw_fd() as u32)
            .u32(4, dir.as_raw_fd() as u32)
            .u32(8, AttachType::CgroupInet4Connect as u32);
        let link = sys_bpf(BPF_LINK_CREATE, &mut attr).map(fd)?;
        drop(link);
        Ok(())
    })();
    let removed = fs::remove_dir(&scratch);
    result?;
    removed?;
    Ok(scratch)
}

/// errno with its name, so a remedy can be looked up.
pub fn describe(e: &io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(libc::EPERM) => "EPERM",
        Some(libc::EACCES) => "EACCES",
        Some(libc::EINVAL) => "EINVAL",
        Some(libc::ENOSYS) => "ENOSYS",
        Some(libc::E2BIG) => "E2BIG",
        Some(libc::ENOTSUP) => "ENOTSUP",
        _ => "",
    };
    if name.is_empty() {
        e.to_string()
    } else {
        format!("{name}: {e}")
    }
}
