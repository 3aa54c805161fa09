//! `cargo xtask dist`: the release artifacts in `target/dist/`.
//! - `tpbpf_VERSION_amd64.deb`: `/usr/bin/tpbpf` (the user's side and the
//!   command line) and `/usr/bin/tpbpfd` (root's service; the eBPF object is
//!   embedded in both), their debug info split out, the tpbpfd unit (the one
//!   `tpbpf service install` writes, for `/usr/bin/tpbpfd`), and maintainer
//!   scripts: `postinst` creates group `tpbpf` and, where systemd runs,
//!   enables and starts tpbpfd; `prerm` stops it.
//! - `tpbpf-dbgsym_VERSION_amd64.deb`: the debug info, under
//!   `/usr/lib/debug/.build-id/`, where gdb and perf look.
//! - `tpbpf-agent.oci.tar`: the agent's image (`cargo xtask image`).
//!
//! Sizes are printed, so docs/building.md can say what a user downloads.
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{cargo, is_root, root_dir, run, step};

#[derive(clap::Args)]
pub struct Args {
    /// Package the debug build (what the tests built) instead of a
    /// release build: for checking the package, not for publishing.
    #[arg(long)]
    pub debug: bool,
    /// Leave out the agent image (it needs buildah and root).
    #[arg(long)]
    pub no_image: bool,
}

/// What `dist` made.
pub struct Made {
    pub deb: PathBuf,
}

pub fn dist(args: &Args) -> Result<Made> {
    for tool in ["dpkg-deb", "objcopy", "dpkg-shlibdeps"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            bail!(
                "{tool} not found: `sudo bash xtask/setup.sh dist` installs dpkg-dev and binutils"
            );
        }
    }
    let profile = if args.debug { "debug" } else { "release" };
    step(&format!("build tpbpf and tpbpfd ({profile})"));
    let mut build = cargo();
    build.args(["build", "-p", "tpbpf", "-p", "tpbpfd", "--locked"]);
    if !args.debug {
        build.arg("--release");
    }
    run(&mut build)?;
    let target = target_dir()?;
    let bin = target.join(profile).join("tpbpf");
    let version = version()?;

    let dist = target.join("dist");
    let stage = dist.join("stage");
    let _ = fs::remove_dir_all(&stage);
    let pkg = stage.join("tpbpf");
    let dbg = stage.join("tpbpf-dbgsym");

    step("split the debug info out, strip the binaries");
    let usr_bin = pkg.join("usr/bin");
    fs::create_dir_all(&usr_bin)?;
    let stripped = usr_bin.join("tpbpf");
    let debug_file = split_debug(&bin, &stripped, &dbg)?;
    let daemon_bin = target.join(profile).join("tpbpfd");
    let daemon_stripped = usr_bin.join("tpbpfd");
    split_debug(&daemon_bin, &daemon_stripped, &dbg)?;

    step("the tpbpfd unit, maintainer scripts, docs");
    let unit_dir = pkg.join("usr/lib/systemd/system");
    fs::create_dir_all(&unit_dir)?;
    let unit = Command::new(&bin)
        .args([
            "service",
            "install",
            "--dry-run",
            "--exe",
            "/usr/bin/tpbpfd",
        ])
        .output()
        .context("running tpbpf service install --dry-run")?;
    if !unit.status.success() {
        bail!(
            "tpbpf service install --dry-run failed: {}",
            String::from_utf8_lossy(&unit.stderr)
        );
    }
    fs::write(unit_dir.join("tpbpfd.service"), &unit.stdout)?;
    let doc = pkg.join("usr/share/doc/tpbpf");
    fs::create_dir_all(&doc)?;
    fs::write(
        doc.join("copyright"),
        format!(
            "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
             Upstream-Name: tpbpf\n\
             Source: {REPOSITORY}\n\n\
             Files: *\n\
             License: Apache-2.0\n \
             On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.\n"
        ),
    )?;
    fs::copy(root_dir().join("README.md"), doc.join("README.md"))?;
    shell_and_manual(&bin, &pkg)?;
    let dbg_doc = dbg.join("usr/share/doc");
    fs::create_dir_all(&dbg_doc)?;
    std::os::unix::fs::symlink("tpbpf", dbg_doc.join("tpbpf-dbgsym"))?;

    let depends = shlib_depends(&stripped, &stage)?;
    let control = pkg.join("DEBIAN");
    fs::create_dir_all(&control)?;
    let installed_kib = du_kib(&pkg)?;
    fs::write(
        control.join("control"),
        format!(
            "Package: tpbpf\n\
             Version: {version}\n\
             Architecture: amd64\n\
             Maintainer: tpbpf maintainers <tpbpf@users.noreply.github.com>\n\
             Installed-Size: {installed_kib}\n\
             Depends: {depends}\n\
             Recommends: systemd\n\
             Section: net\n\
             Priority: optional\n\
             Homepage: {REPOSITORY}\n\
             Description: bridge a Linux machine and a Kubernetes cluster with eBPF\n \
             tpbpf lets local processes reach cluster services by IP and DNS name, and\n \
             intercepts a workload's incoming traffic into a local process, with eBPF\n \
             programs held by links its daemon owns: no TUN device, no route or\n \
             resolv.conf changes, no sidecar. Members of group tpbpf bridge without sudo\n \
             through the tpbpfd service.\n"
        ),
    )?;
    write_script(&control.join("postinst"), POSTINST)?;
    write_script(&control.join("prerm"), PRERM)?;
    write_script(&control.join("postrm"), POSTRM)?;
    let dbg_control = dbg.join("DEBIAN");
    fs::create_dir_all(&dbg_control)?;
    fs::write(
        dbg_control.join("control"),
        format!(
            "Package: tpbpf-dbgsym\n\
             Version: {version}\n\
             Architecture: amd64\n\
             Maintainer: tpbpf maintainers <tpbpf@users.noreply.github.com>\n\
             Installed-Size: {}\n\
             Depends: tpbpf (= {version})\n\
             Section: debug\n\
             Priority: optional\n\
             Description: debug symbols for tpbpf\n \
             The debug info split out of /usr/bin/tpbpf and /usr/bin/tpbpfd, found by build id.\n",
            du_kib(&dbg)?
        ),
    )?;

    step("dpkg-deb --build");
    let deb = dist.join(format!("tpbpf_{version}_amd64.deb"));
    let dbg_deb = dist.join(format!("tpbpf-dbgsym_{version}_amd64.deb"));
    for (dir, out) in [(&pkg, &deb), (&dbg, &dbg_deb)] {
        run(Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(dir)
            .arg(out))?;
    }
    let mut image = None;
    if !args.no_image {
        if is_root() {
            let out = dist.join("tpbpf-agent.oci.tar");
            crate::image::build_and_check(!args.debug, Some(out.clone()))?;
            image = Some(out);
        } else {
            println!("SKIP the agent image: buildah and runc need root here (or pass --no-image)");
        }
    }
    step("sizes");
    println!(
        "{:>9}  {} (unstripped, {profile})",
        mib(&bin)?,
        bin.display()
    );
    println!("{:>9}  /usr/bin/tpbpf in the package", mib(&stripped)?);
    println!(
        "{:>9}  /usr/bin/tpbpfd in the package (root's service: no Kubernetes, HTTP or TLS code)",
        mib(&daemon_stripped)?
    );
    println!("{:>9}  tpbpf's debug info (compressed)", mib(&debug_file)?);
    let _ = fs::remove_dir_all(&stage);
    for p in [Some(&deb), Some(&dbg_deb), image.as_ref()]
        .into_iter()
        .flatten()
    {
        println!("{:>9}  {}", mib(p)?, p.display());
    }
    Ok(Made { deb })
}

const REPOSITORY: &str = env!("CARGO_PKG_REPOSITORY");

const POSTINST: &str = r#"#!/bin/sh
# tpbpf: the group whose members may use tpbpfd, then the service.
set -e
if [ "$1" = configure ]; then
    if ! getent group tpbpf >/dev/null; then
        groupadd --system tpbpf
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl enable tpbpfd.service >/dev/null
        systemctl restart tpbpfd.service
    else
        echo "tpbpf: no systemd here: start tpbpfd with \`sudo tpbpf service start\` (after each boot)"
    fi
    echo "tpbpf: let a user bridge without sudo: sudo usermod -aG tpbpf USER (then log in again)"
fi
exit 0
"#;

const PRERM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    systemctl disable --now tpbpfd.service >/dev/null 2>&1 || true
fi
exit 0
"#;

const POSTRM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
exit 0
"#;

/// The shell completions (bash, zsh, fish: `tpbpf completion SHELL`) and
/// the manual pages (`tpbpf __man`, gzipped as Debian ships them), where
/// each shell and `man` look in a package.
fn shell_and_manual(bin: &Path, pkg: &Path) -> Result<()> {
    step("shell completions (bash, zsh, fish) and manual pages");
    for (shell, dir, file) in [
        ("bash", "usr/share/bash-completion/completions", "tpbpf"),
        ("zsh", "usr/share/zsh/vendor-completions", "_tpbpf"),
        ("fish", "usr/share/fish/vendor_completions.d", "tpbpf.fish"),
    ] {
        let out = Command::new(bin)
            .args(["completion", shell])
            .output()
            .with_context(|| format!("running tpbpf completion {shell}"))?;
        if !out.status.success() || out.stdout.is_empty() {
            bail!(
                "tpbpf completion {shell} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        fs::create_dir_all(pkg.join(dir))?;
        fs::write(pkg.join(dir).join(file), &out.stdout)?;
    }
    let man = pkg.join("usr/share/man/man1");
    run(Command::new(bin).arg("__man").arg(&man))?;
    run(Command::new("gzip").args(["-9", "-n", "-f"]).args(
        fs::read_dir(&man)?
            .flatten()
            .map(|e| e.path())
            .collect::<Vec<_>>(),
    ))?;
    Ok(())
}

fn write_script(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, text)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn target_dir() -> Result<PathBuf> {
    let out = cargo()
        .args(["metadata", "--format-version=1", "--no-deps"])
        .output()
        .context("cargo metadata")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(PathBuf::from(
        v["target_directory"]
            .as_str()
            .context("cargo metadata names no target directory")?,
    ))
}

/// The workspace's version, and for a build from a commit after it, the
/// commit (`0.1.0+git20261201.abc1234`; dpkg orders it after 0.1.0).
fn version() -> Result<String> {
    let base = env!("CARGO_PKG_VERSION");
    let out = Command::new("git")
        .args(["log", "-1", "--format=%cd.%h", "--date=format:%Y%m%d%H%M"])
        .current_dir(root_dir())
        .output();
    Ok(match out {
        Ok(o) if o.status.success() => {
            format!("{base}+git{}", String::from_utf8_lossy(&o.stdout).trim())
        }
        _ => base.to_string(),
    })
}

fn build_id(bin: &Path) -> Result<String> {
    let out = Command::new("readelf")
        .args(["-n"])
        .arg(bin)
        .output()
        .context("readelf -n")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .map(str::to_string)
        .with_context(|| format!("{} has no build id note", bin.display()))
}

/// The packages the binary's shared libraries come from, as
/// dpkg-shlibdeps says (it needs a debian/control beside it).
fn shlib_depends(bin: &Path, stage: &Path) -> Result<String> {
    let debian = stage.join("debian");
    fs::create_dir_all(&debian)?;
    fs::write(
        debian.join("control"),
        "Source: tpbpf\n\nPackage: tpbpf\nArchitecture: amd64\n",
    )?;
    let out = Command::new("dpkg-shlibdeps")
        .args(["-O", "--ignore-missing-info"])
        .arg(bin)
        .current_dir(stage)
        .output()
        .context("dpkg-shlibdeps")?;
    let _ = fs::remove_dir_all(&debian);
    if !out.status.success() {
        bail!(
            "dpkg-shlibdeps {} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let deps: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("shlibs:Depends="))
        .flat_map(|d| d.split(", ").map(str::to_string).collect::<Vec<_>>())
        .collect();
    if deps.is_empty() {
        bail!("dpkg-shlibdeps named no dependency for {}", bin.display());
    }
    Ok(deps.into_iter().collect::<Vec<_>>().join(", "))
}

fn du_kib(dir: &Path) -> Result<u64> {
    let out = Command::new("du").args(["-sk"]).arg(dir).output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0))
}

fn mib(path: &Path) -> Result<String> {
    let len = fs::metadata(path)
        .with_context(|| format!("{}", path.display()))?
        .len();
    Ok(format!("{:.1} MiB", len as f64 / (1024.0 * 1024.0)))
}

/// Strips `bin` into `stripped`, its debug info into the dbgsym package at
/// `dbg`, found by build id; returns the debug info's file.
fn split_debug(bin: &Path, stripped: &Path, dbg: &Path) -> Result<PathBuf> {
    let build_id = build_id(bin)?;
    let debug_file = dbg.join(format!(
        "usr/lib/debug/.build-id/{}/{}.debug",
        &build_id[..2],
        &build_id[2..]
    ));
    fs::create_dir_all(debug_file.parent().unwrap())?;
    run(Command::new("objcopy")
        .args(["--only-keep-debug", "--compress-debug-sections"])
        .arg(bin)
        .arg(&debug_file))?;
    run(Command::new("objcopy")
        .args([
            "--strip-debug",
            "--strip-unneeded",
            "--remove-section=.comment",
        ])
        .arg(format!("--add-gnu-debuglink={}", debug_file.display()))
        .arg(bin)
        .arg(stripped))?;
    Ok(debug_file)
}
