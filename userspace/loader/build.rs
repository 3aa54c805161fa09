//! Builds tpbpf's kernel programs (`bpf/ebpf`) for `bpfel-unknown-none` and
//! leaves the object in `OUT_DIR/tpbpf.bpf.o`, which `src/lib.rs` embeds.
//!
//! The kernel crate needs `-Z build-std=core`, so the compiler must come with
//! its library source. In order of preference:
//! 1. `TPBPF_EBPF_CARGO` / `TPBPF_EBPF_RUSTC`, if set;
//! 2. Debian's rustc-web + rust-web-src (`/usr/bin/cargo`, `/usr/bin/rustc`,
//!    sources under `/usr/lib/rustlib/src/rust`), with `RUSTC_BOOTSTRAP=1`;
//! 3. rustup's nightly with the `rust-src` component.
//!
//! `TPBPF_SKIP_EBPF=1` skips the build (for jobs that only lint userspace);
//! the resulting binaries refuse to load programs and say why.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.join("../..").canonicalize().unwrap();
    let ebpf_dir = root.join("bpf/ebpf");
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let object = out_dir.join("tpbpf.bpf.o");

    for path in ["src", "Cargo.toml", "Cargo.lock", ".cargo/config.toml"] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(path).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("bpf/common/src").display()
    );
    for var in ["TPBPF_SKIP_EBPF", "TPBPF_EBPF_CARGO", "TPBPF_EBPF_RUSTC"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    if env::var_os("TPBPF_SKIP_EBPF").is_some_and(|v| !v.is_empty() && v != "0") {
        println!(
            "cargo:warning=TPBPF_SKIP_EBPF is set: the kernel programs are not built or embedded"
        );
        fs::write(&object, b"").unwrap();
        return;
    }

    let toolchain = match find_toolchain() {
        Ok(t) => t,
        Err(msg) => fail(&msg),
    };
    if which("bpf-linker").is_none() {
        fail(
            "bpf-linker is not on PATH. It links the kernel programs. Run `sudo bash \
             xtask/setup.sh` (it builds bpf-linker against LLVM 22), or `cargo install \
             bpf-linker` on a machine with rustup nightly.",
        );
    }

    // One target dir for every profile of the outer build, so `core` is
    // built once. Cargo's lock on it serialises concurrent build scripts.
    let target_dir = root.join("target/ebpf");
    let mut cmd = Command::new(&toolchain.cargo);
    if let Some(t) = &toolchain.rustup_toolchain {
        cmd.arg(format!("+{t}"));
    }
    cmd.current_dir(&ebpf_dir)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    // Do not let the outer cargo's settings leak into the inner build.
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_") && !matches!(key, "CARGO_HOME" | "CARGO_NET_OFFLINE")
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTUP_TOOLCHAIN")
            || key.starts_with("RUSTDOC")
            || key.starts_with("DEP_")
            || matches!(
                key,
                "RUSTFLAGS"
                    | "MAKEFLAGS"
                    | "MFLAGS"
                    | "OUT_DIR"
                    | "TARGET"
                    | "HOST"
                    | "NUM_JOBS"
                    | "OPT_LEVEL"
                    | "DEBUG"
                    | "PROFILE"
            )
        {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUSTC_BOOTSTRAP", "1");
    if let Some(rustc) = &toolchain.rustc {
        cmd.env("RUSTC", rustc);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| fail(&format!("running {}: {e}", toolchain.cargo.display())));
    if !status.success() {
        fail(&format!(
            "building the kernel programs in {} with {} failed ({status}); the compiler's \
             output is above",
            ebpf_dir.display(),
            toolchain.describe()
        ));
    }
    let built = target_dir.join("bpfel-unknown-none/release/tpbpf");
    fs::copy(&built, &object).unwrap_or_else(|e| {
        fail(&format!(
            "copying {} to {}: {e}",
            built.display(),
            object.display()
        ))
    });
}

struct Toolchain {
    cargo: PathBuf,
    rustc: Option<PathBuf>,
    rustup_toolchain: Option<String>,
}

impl Toolchain {
    fn describe(&self) -> String {
        match (&self.rustup_toolchain, &self.rustc) {
            (Some(t), _) => format!("rustup toolchain {t}"),
            (None, Some(rustc)) => format!("{} + {}", self.cargo.display(), rustc.display()),
            (None, None) => self.cargo.display().to_string(),
        }
    }
}

fn find_toolchain() -> Result<Toolchain, String> {
    if let Some(cargo) = env::var_os("TPBPF_EBPF_CARGO") {
        return Ok(Toolchain {
            cargo: cargo.into(),
            rustc: env::var_os("TPBPF_EBPF_RUSTC").map(Into::into),
            rustup_toolchain: None,
        });
    }
    let debian = Path::new("/usr/bin/cargo");
    let debian_rustc = Path::new("/usr/bin/rustc");
    if debian.exists() && debian_rustc.exists() && sysroot_has_src(&Command::new(debian_rustc)) {
        return Ok(Toolchain {
            cargo: debian.into(),
            rustc: Some(debian_rustc.into()),
            rustup_toolchain: None,
        });
    }
    if let Some(rustup) = which("rustup") {
        let mut probe = Command::new(&rustup);
        probe.args(["run", "nightly", "rustc"]);
        if sysroot_has_src(&probe) {
            return Ok(Toolchain {
                cargo: which("cargo").unwrap_or_else(|| "cargo".into()),
                rustc: None,
                rustup_toolchain: Some("nightly".into()),
            });
        }
    }
    Err(
        "no Rust compiler with its library source was found, which building the kernel \
         programs for bpfel-unknown-none needs (-Z build-std=core). On Debian 12 run `sudo bash \
         xtask/setup.sh` (installs rustc-web, cargo-web, rust-web-src); elsewhere `rustup \
         toolchain install nightly --component rust-src`. Or set TPBPF_EBPF_CARGO and \
         TPBPF_EBPF_RUSTC to such a toolchain, or TPBPF_SKIP_EBPF=1 to build without the kernel \
         programs."
            .into(),
    )
}

/// Does `<rustc> --print sysroot` have `lib/rustlib/src/rust/library`?
fn sysroot_has_src(rustc: &Command) -> bool {
    let mut cmd = Command::new(rustc.get_program());
    cmd.args(rustc.get_args()).args(["--print", "sysroot"]);
    cmd.env_remove("RUSTUP_TOOLCHAIN");
    let Ok(out) = cmd.output() else { return false };
    if !out.status.success() {
        return false;
    }
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Path::new(&sysroot)
        .join("lib/rustlib/src/rust/library/core")
        .exists()
}

fn which(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    panic!("tpbpf-loader build script: {msg}");
}
