//! Compiles the stand-ins for other eBPF (`coexist-bpf/*.c`: what Cilium or
//! Calico would attach next to tpbpf) with clang for `-target bpf` into
//! `OUT_DIR/coexist.bpf.o`, which `tests/coexist.rs` embeds. The object is
//! built on the host, so the same test binary runs in a VM without clang.
//!
//! The compiler: `$TPBPF_CLANG`, else the first of clang-22, clang-19 and
//! clang that runs (Debian's `clang-22`, with `libbpf-dev` for the headers;
//! `sudo bash xtask/setup.sh` installs both). Without one, or with
//! `TPBPF_SKIP_EBPF=1`, the object is left empty and the coexistence tests
//! skip, saying why.
use std::{env, fs, path::PathBuf, process::Command};

const SOURCES: [&str; 1] = ["coexist-bpf/others.c"];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("coexist.bpf.o");
    for s in SOURCES {
        println!("cargo:rerun-if-changed={}", manifest_dir.join(s).display());
    }
    println!("cargo:rerun-if-changed=build.rs");
    for var in ["TPBPF_CLANG", "TPBPF_SKIP_EBPF"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if env::var_os("TPBPF_SKIP_EBPF").is_some_and(|v| !v.is_empty() && v != "0") {
        fs::write(&out, b"").unwrap();
        return;
    }
    let Some(clang) = find_clang() else {
        println!(
            "cargo:warning=no clang found (clang-22, clang-19, clang or $TPBPF_CLANG): the \
             coexistence tests' programs are not built and those tests will skip; \
             `sudo bash xtask/setup.sh` installs clang-22 and libbpf-dev"
        );
        fs::write(&out, b"").unwrap();
        return;
    };
    // <asm/types.h>, which <linux/bpf.h> includes, lives under the
    // multiarch directory on Debian.
    let multiarch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "aarch64-linux-gnu",
        _ => "x86_64-linux-gnu",
    };
    let status = Command::new(&clang)
        .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .arg("-c")
        .arg(manifest_dir.join(SOURCES[0]))
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running {clang}: {e}"));
    assert!(
        status.success(),
        "{clang} failed on {} ({status}); are libbpf-dev's headers installed? \
         (`sudo bash xtask/setup.sh`)",
        SOURCES[0]
    );
}

fn find_clang() -> Option<String> {
    let candidates = env::var("TPBPF_CLANG")
        .ok()
        .into_iter()
        .chain(["clang-22", "clang-19", "clang"].map(String::from));
    candidates.into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}
