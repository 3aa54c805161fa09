#!/usr/bin/env bash
# Installs what building and testing tpbpf needs on a Debian 12 machine.
# Idempotent: every step checks first and says what it does.
# Usage: bash xtask/setup.sh [bench]    (run as root; `bench` adds the
#        benchmarks' clients and peers)
set -euo pipefail

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[setup] error:\033[0m %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
    die "tpbpf's set-up installs Debian packages and loads eBPF programs, so it needs root. Run it again with sudo: sudo bash $0"
fi
if ! command -v apt-get >/dev/null; then
    die "apt-get not found: this set-up supports Debian 12 (bookworm). On other systems install the packages listed in docs/building.md by hand."
fi

# Debian packages, and why:
#  rustc-web cargo-web rust-web-src  rustc 1.96 with LLVM 22 and the library source,
#                                    so `-Z build-std=core` can build for bpfel-unknown-none
#  rust-web-clippy rustfmt-web       lint the eBPF crate with the same compiler (and userspace without rustup)
#  llvm-22-dev libpolly-22-dev       bpf-linker links against LLVM 22, the same as rustc-web's
#  zlib1g-dev libzstd-dev            libraries LLVM's link line names
#  build-essential pkg-config        C toolchain for -sys crates
#  bpftool                           the kernel's own view of programs, links and cgroups (tests)
#  clang-22 libbpf-dev               compile the coexistence tests' stand-ins for other eBPF
#                                    (vm-tests/coexist-bpf, C for -target bpf; vm-tests/build.rs)
#  iproute2                          network namespaces and veth pairs (tests, demo)
#  curl                              a real client for the demo and the tests
#  dnsmasq-base bind9-dnsutils       a real DNS server (no service started) and dig, for the tests
#  socat util-linux                  UDP echo peers, unshare (private resolv.conf) for the tests
#  kubernetes-client                 kubectl (if none is installed), a real client for the lab's API endpoint
#  buildah runc                      build the agent image (cargo xtask image) and run it to check it
#                                    (runc: crun 1.8 refuses hybrid cgroup hierarchies)
#  python3-venv                      a virtualenv of its own for checkov, the manifest linter (below)
#  qemu-system-x86 busybox-static    boot Debian's other kernels (5.10, 6.1, 6.12) and run the
#  kmod xz-utils gpgv                privileged suite inside (cargo xtask vm-test): the guest's init,
#                                    its modules' dependencies (depmod), the archive's signature
PKGS=(rustc-web cargo-web rust-web-src rust-web-clippy rustfmt-web llvm-22-dev libpolly-22-dev
      zlib1g-dev libzstd-dev build-essential pkg-config bpftool iproute2 curl clang-22 libbpf-dev
      dnsmasq-base bind9-dnsutils socat util-linux buildah runc python3-venv
      qemu-system-x86 busybox-static kmod xz-utils gpgv)

# Servers for the lab cluster (nginx, Redis, PostgreSQL in network
# namespaces) and nftables for its ClusterIPs. Installed without starting
# their system services: the lab runs its own instances.
SERVER_PKGS=(nginx-light redis-server postgresql nftables)
# The end-to-end benchmark's clients and peers (sudo bash xtask/dev.sh bench):
# iperf3, wrk, and sshuttle over ssh to a lab node (openssh-server, its
# service not started; the benchmark runs its own sshd in the node).
if [ "${1:-}" = bench ]; then
    SERVER_PKGS+=(iperf3 wrk sshuttle openssh-server iptables)
fi

missing=()
for p in "${PKGS[@]}" "${SERVER_PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
# kubectl for the lab's API tests: Debian's kubernetes-client, unless a
# kubectl is already installed (some images ship one from another package,
# which kubernetes-client would conflict with).
if ! command -v kubectl >/dev/null; then
    missing+=(kubernetes-client)
fi
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || die "apt-get update failed: check the machine's Debian mirrors (/etc/apt/sources.list*)"
    # policy-rc.d 101: packages must not start their services (nginx on :80,
    # redis, postgresql); the lab starts its own, inside namespaces.
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod +x "$policy"
        made_policy=1
    fi
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
        || { [ "$made_policy" = 1 ] && rm -f "$policy"; die "apt-get install ${missing[*]} failed: see the output above; rustc-web and llvm-22 come from bookworm-security"; }
    [ "$made_policy" = 1 ] && rm -f "$policy"
else
    say "Debian packages present"
fi

# cargo for the host (userspace) build: rustup's, or Debian's as a fallback.
if ! command -v cargo >/dev/null; then
    if [ -x /root/.cargo/bin/cargo ]; then
        export PATH="/root/.cargo/bin:$PATH"
    else
        die "cargo not found on PATH: install Rust (rustup, or Debian's cargo-web) and run again"
    fi
fi

# bpf-linker, built against Debian's LLVM 22.
BPF_LINKER_VERSION=0.13.0
bpf_linker_ok() {
    command -v bpf-linker >/dev/null && bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"
}
if bpf_linker_ok; then
    say "bpf-linker $BPF_LINKER_VERSION present"
else
    say "building bpf-linker $BPF_LINKER_VERSION against LLVM 22 (about a minute)"
    LLVM_PREFIX=/usr/lib/llvm-22 LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 \
        cargo install bpf-linker --version "$BPF_LINKER_VERSION" --locked \
        --no-default-features --features llvm-22 \
        || die "building bpf-linker failed: see the output above (it needs llvm-22-dev)"
    bpf_linker_ok || die "bpf-linker was installed but is not on PATH: add ~/.cargo/bin to PATH"
fi

# mdBook (crates.io): `cargo xtask book` builds docs/ into target/book.
MDBOOK_VERSION=0.5.4
if command -v mdbook >/dev/null && mdbook --version 2>/dev/null | grep -q "v$MDBOOK_VERSION"; then
    say "mdbook $MDBOOK_VERSION present"
else
    say "building mdbook $MDBOOK_VERSION from crates.io (the docs as a book; about two minutes)"
    cargo install mdbook --version "$MDBOOK_VERSION" --locked --no-default-features --features search \
        || die "building mdbook failed: see the output above"
fi

# kubernetes-validate (PyPI): the tests check `tpbpf install`'s manifests
# against the Kubernetes JSON schemas of several versions.
# The tests run it as `python3 -m kubernetes_validate` (no PATH or pyenv
# shim needed).
if python3 -c 'import kubernetes_validate' 2>/dev/null; then
    say "kubernetes-validate present"
else
    say "installing kubernetes-validate from PyPI (manifest schema checks)"
    python3 -m pip install -q --disable-pip-version-check kubernetes-validate \
        || die "pip install kubernetes-validate failed: see the output above"
    python3 -c 'import kubernetes_validate' \
        || die "kubernetes-validate was installed but python3 cannot import it"
fi

# checkov (PyPI): the tests lint `tpbpf install`'s manifests for security
# findings (skips and their reasons: deploy/checkov.yaml). In a virtualenv
# of its own under /opt/tpbpf (where the xtask looks for it): its pinned
# dependencies (boto3, botocore, ...) would replace other tools' in a shared
# Python.
CHECKOV_VERSION=3.3.30
CHECKOV_VENV=/opt/tpbpf/checkov
checkov_ok() {
    [ "$("$CHECKOV_VENV/bin/checkov" --version 2>/dev/null)" = "$CHECKOV_VERSION" ]
}
if checkov_ok; then
    say "checkov $CHECKOV_VERSION present ($CHECKOV_VENV)"
else
    say "installing checkov $CHECKOV_VERSION from PyPI into $CHECKOV_VENV (manifest linter, about 30 s, 290 MB)"
    [ -x "$CHECKOV_VENV/bin/python" ] || /usr/bin/python3 -m venv "$CHECKOV_VENV" \
        || die "creating the virtualenv $CHECKOV_VENV failed: see the output above (it needs python3-venv)"
    "$CHECKOV_VENV/bin/python" -m pip install -q --disable-pip-version-check "checkov==$CHECKOV_VERSION" \
        || die "pip install checkov into $CHECKOV_VENV failed: see the output above"
    checkov_ok || die "checkov was installed into $CHECKOV_VENV but does not report version $CHECKOV_VERSION"
fi

say "ready: $(/usr/bin/rustc --version), $(bpf-linker --version | head -1), kernel $(uname -r)"
