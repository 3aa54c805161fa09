#!/usr/bin/env bash
# tpbpf's entry point on a fresh Debian 12 machine: installs what is missing
# (xtask/setup.sh, idempotent), then runs a task.
#   sudo bash xtask/dev.sh demo    the main job: tpbpf doctor + a real redirect
#   sudo bash xtask/dev.sh test    everything CI runs (lint, unit, privileged tests)
#   sudo bash xtask/dev.sh lint    rustfmt and clippy only
#   sudo bash xtask/dev.sh bench   benchmarks (release build)
#   bash xtask/dev.sh fuzz         a short fuzz run of the tunnel protocol decoder
#   sudo bash xtask/dev.sh image   the agent's image, an OCI archive (target/image)
#   sudo bash xtask/dev.sh vm-test --kernel 6.1   the privileged suite on Debian's 6.1 under qemu
#   bash xtask/dev.sh book         the docs as a book (mdBook) in target/book
#   sudo bash xtask/dev.sh dist    the release artifacts: the .deb and the agent image (target/dist)
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
    demo|test|lint|bench|fuzz|image|vm-test|dist|book) ;;
    *) echo "usage: sudo bash xtask/dev.sh demo|test|lint|bench|fuzz|image|vm-test|dist|book" >&2; exit 2 ;;
esac

bash xtask/setup.sh "$1"

export PATH="${HOME:-/root}/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null; then
    # No rustup: Debian's cargo-web (installed by setup.sh) builds everything.
    export PATH="/usr/bin:$PATH"
    echo "[dev] rustup's cargo not found; using Debian's $(/usr/bin/cargo --version)"
fi
exec cargo xtask "$@"
