#!/usr/bin/env bash
# Set up edgeq on a fresh Debian/Ubuntu machine. Idempotent: re-running installs only what is missing.
#   - system packages: C/C++ compilers (for the kernels), the aarch64 cross compilers, qemu-user, debootstrap, Fashion-MNIST, opencv-doc's sample photos, llvm (llvm-mca for benchmarks/arm_estimate.py)
#   - a virtual environment in .venv (unless one is already active) with edgeq and its test extra
#   - the arm64 emulation environment (Debian rootfs + aarch64 TVM runtime) in ~/.cache/edgeq
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="gcc g++ gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user debootstrap dataset-fashion-mnist opencv-doc ca-certificates llvm"
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi

missing=""
for package in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing="$missing $package"
done
if [ -n "$missing" ]; then
  echo "edgeq setup: installing system packages:$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    echo "edgeq setup: creating .venv"
    "${PYTHON:-python3}" -m venv .venv
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
echo "edgeq setup: installing edgeq into $(dirname "$(dirname "$(command -v python)")")"
python -m pip install --quiet --disable-pip-version-check -e ".[test]"

if ! python -c "import edgeq.emulation as e, sys; sys.exit(0 if e.is_ready() else 1)"; then
  echo "edgeq setup: building the arm64 emulation environment (about a minute)"
  if [ -z "$SUDO" ]; then
    edgeq emulator setup
  else
    cache="${EDGEQ_CACHE:-$HOME/.cache/edgeq}"
    $SUDO env EDGEQ_CACHE="$cache" "$(command -v edgeq)" emulator setup
    $SUDO chown -R "$(id -u):$(id -g)" "$cache"
  fi
fi
echo "edgeq setup: done"
