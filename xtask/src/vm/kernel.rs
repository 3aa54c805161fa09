//! Debian's kernel packages: the archive's signed index, the newest
//! package of a kernel line, its download checked by hash, unpacked, and
//! its modules indexed (depmod) and ordered by their dependencies.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::run;

/// Where Debian's archive is; `TPBPF_DEBIAN_MIRROR` points elsewhere (a
/// local mirror with the same layout).
pub(super) const MIRROR: &str = "http://deb.debian.org";

pub(super) const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The kernels `--kernel` knows: the version line, and the archive and
/// suite that serve its newest security update.
pub(super) const KERNELS: &[(&str, &str, &str)] = &[
    ("5.10", "debian-security", "bullseye-security"),
    ("6.1", "debian-security", "bookworm-security"),
    ("6.12", "debian-security", "trixie-security"),
];

/// One kernel package, unpacked.
pub(super) struct Kernel {
    pub(super) package: String,
    pub(super) version: String,
    /// `uname -r` of the kernel (the modules directory's name).
    pub(super) release: String,
    /// The unpacked package.
    pub(super) root: PathBuf,
    pub(super) vmlinuz: PathBuf,
    /// `ROOT/lib/modules/RELEASE`, with modules.dep made by depmod.
    pub(super) modules: PathBuf,
}

pub(super) fn fetch_kernel(line: &str, vm_dir: &Path) -> Result<Kernel> {
    let Some(&(_, archive, suite)) = KERNELS.iter().find(|(v, _, _)| *v == line) else {
        bail!(
            "no kernel line `{line}`: choose one of {}",
            KERNELS.iter().map(|k| k.0).collect::<Vec<_>>().join(", ")
        );
    };
    let mirror = std::env::var("TPBPF_DEBIAN_MIRROR").unwrap_or_else(|_| MIRROR.into());
    let cache = vm_dir.join("cache");
    fs::create_dir_all(&cache)?;
    let base = format!("{mirror}/{archive}");

    // The index: InRelease signed by Debian's archive key, the package
    // list checked against the hash it names.
    let inrelease = cache.join(format!("{suite}.InRelease"));
    download(&format!("{base}/dists/{suite}/InRelease"), &inrelease)?;
    let verified = Command::new("gpgv")
        .args(["--keyring", KEYRING, "--output", "-"])
        .arg(&inrelease)
        .stderr(Stdio::piped())
        .output()
        .context("running gpgv")?;
    if !verified.status.success() {
        bail!(
            "{suite}'s InRelease from {base} does not carry a good signature from Debian's archive keys ({KEYRING}): {}. Install debian-archive-keyring, or check TPBPF_DEBIAN_MIRROR",
            String::from_utf8_lossy(&verified.stderr).trim()
        );
    }
    let release = String::from_utf8_lossy(&verified.stdout).to_string();
    let entry = "main/binary-amd64/Packages.xz";
    let want = sha256_entry(&release, entry)
        .with_context(|| format!("{suite}'s InRelease names no SHA256 for {entry}"))?;
    let packages_xz = cache.join(format!("{suite}.Packages.xz"));
    if sha256(&packages_xz).ok().as_deref() != Some(want.as_str()) {
        download(&format!("{base}/dists/{suite}/{entry}"), &packages_xz)?;
        check_sha256(&packages_xz, &want)?;
    }
    let packages = Command::new("xz")
        .arg("-dc")
        .arg(&packages_xz)
        .output()
        .context("running xz")?;
    if !packages.status.success() {
        bail!("xz -dc {} failed", packages_xz.display());
    }
    let packages = String::from_utf8_lossy(&packages.stdout);

    let (name, version, filename, hash) = newest_kernel(&packages, line)?;
    let root = vm_dir.join("kernels").join(&name);
    let done = root.join(".unpacked");
    if !done.exists() {
        let deb = cache.join(filename.rsplit('/').next().unwrap_or(&name));
        if sha256(&deb).ok().as_deref() != Some(hash.as_str()) {
            println!("downloading {filename}");
            download(&format!("{base}/{filename}"), &deb)?;
            check_sha256(&deb, &hash)?;
        }
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root)?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        fs::write(&done, &version)?;
    }
    // bookworm keeps modules in /lib/modules, trixie in /usr/lib/modules;
    // depmod -b reads BASE/lib/modules.
    if !root.join("lib").exists() && root.join("usr/lib/modules").exists() {
        std::os::unix::fs::symlink("usr/lib", root.join("lib"))?;
    }
    let modules_dir = root.join("lib/modules");
    let release = fs::read_dir(&modules_dir)
        .with_context(|| format!("{} has no lib/modules", name))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .next()
        .with_context(|| format!("{} has no modules directory", modules_dir.display()))?;
    let modules = modules_dir.join(&release);
    if !modules.join("modules.dep").exists() {
        run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
    }
    let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
    if !vmlinuz.exists() {
        bail!("{} has no {}", name, vmlinuz.display());
    }
    Ok(Kernel {
        package: name,
        version,
        release,
        root,
        vmlinuz,
        modules,
    })
}

/// The newest `linux-image-LINE.*-amd64` (the generic flavour, signed).
pub(super) fn newest_kernel(
    packages: &str,
    line: &str,
) -> Result<(String, String, String, String)> {
    let prefix = format!("linux-image-{line}.");
    let mut best: Option<(String, String, String, String)> = None;
    for stanza in packages.split("\n\n") {
        let field = |f: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{f}: ")))
                .map(str::to_string)
        };
        let Some(name) = field("Package") else {
            continue;
        };
        let generic = name.starts_with(&prefix)
            && name.ends_with("-amd64")
            && !name.ends_with("-cloud-amd64")
            && !name.ends_with("-rt-amd64");
        if !generic {
            continue;
        }
        let (Some(version), Some(filename), Some(hash)) =
            (field("Version"), field("Filename"), field("SHA256"))
        else {
            continue;
        };
        let newer = match &best {
            None => true,
            Some((_, v, _, _)) => Command::new("dpkg")
                .args(["--compare-versions", &version, "gt", v])
                .status()
                .is_ok_and(|s| s.success()),
        };
        if newer {
            best = Some((name, version, filename, hash));
        }
    }
    best.with_context(|| format!("Debian's archive lists no package {prefix}*-amd64"))
}

pub(super) fn sha256_entry(release: &str, entry: &str) -> Option<String> {
    let mut in_sha256 = false;
    for l in release.lines() {
        if !l.starts_with(' ') {
            in_sha256 = l.starts_with("SHA256:");
            continue;
        }
        if in_sha256 {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() == 3 && f[2] == entry {
                return Some(f[0].to_string());
            }
        }
    }
    None
}

pub(super) fn download(url: &str, to: &Path) -> Result<()> {
    let part = to.with_extension("part");
    let status = Command::new("curl")
        .args(["-fsSL", "--retry", "3", "--max-time", "900", "-o"])
        .arg(&part)
        .arg(url)
        .status()
        .context("running curl")?;
    if !status.success() {
        let _ = fs::remove_file(&part);
        bail!(
            "downloading {url} failed (curl: {status}); check the network or TPBPF_DEBIAN_MIRROR"
        );
    }
    fs::rename(&part, to)?;
    Ok(())
}

pub(super) fn sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    if !out.status.success() {
        bail!("sha256sum {} failed", path.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string())
}

pub(super) fn check_sha256(path: &Path, want: &str) -> Result<()> {
    let got = sha256(path)?;
    if got != want {
        let _ = fs::remove_file(path);
        bail!(
            "{}: SHA-256 {got}, but Debian's signed index says {want}; removed it, run again",
            path.display()
        );
    }
    Ok(())
}

/// `kernel/net/x/foo.ko.xz` → `foo.ko`.
pub(super) fn module_file_name(rel: &str) -> String {
    let base = rel.rsplit('/').next().unwrap_or(rel);
    let base = base
        .strip_suffix(".xz")
        .or_else(|| base.strip_suffix(".zst"))
        .unwrap_or(base);
    base.to_string()
}

/// modules.dep: each module's path and the modules it needs.
pub(super) struct ModuleDeps {
    pub(super) by_name: BTreeMap<String, (String, Vec<String>)>,
}

impl ModuleDeps {
    pub(super) fn read(dir: &Path) -> Result<Self> {
        let text = fs::read_to_string(dir.join("modules.dep"))
            .with_context(|| format!("reading {}/modules.dep", dir.display()))?;
        let mut by_name = BTreeMap::new();
        for line in text.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let deps = deps.split_whitespace().map(str::to_string).collect();
            by_name.insert(Self::name_of(path), (path.to_string(), deps));
        }
        Ok(Self { by_name })
    }

    fn name_of(path: &str) -> String {
        module_file_name(path)
            .trim_end_matches(".ko")
            .replace('-', "_")
    }

    /// Appends `name`'s dependencies (deepest first) and then `name`, once
    /// each; a module built into the kernel is not in modules.dep and adds
    /// nothing.
    pub(super) fn load_order(&self, name: &str, order: &mut Vec<String>) {
        let Some((path, deps)) = self.by_name.get(&name.replace('-', "_")) else {
            return;
        };
        for d in deps.iter().rev() {
            self.load_order(&Self::name_of(d), order);
        }
        if !order.contains(path) {
            order.push(path.clone());
        }
    }
}
