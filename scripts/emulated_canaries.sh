#!/usr/bin/env bash
# The CPU canary (scripts/cpu_canary.py) on CPUs this machine is not: an AVX2
# x86-64 CPU without AVX-512 (qemu-x86_64 -cpu Haswell) and an arm64 CPU (an
# arm64 Debian under qemu user-mode emulation). Each must print the recorded
# reference values (scripts/cpu_canary.json). Needs root, Debian's packages and
# PyPI (for the arm64 wheels); run it from the project.
#
#   scripts/emulated_canaries.sh setup     install qemu, build the arm64 root (~7 min once)
#   scripts/emulated_canaries.sh haswell   the canary on an emulated Haswell (~4 min)
#   scripts/emulated_canaries.sh arm64     the canary on emulated arm64 (~6 min)
#
# Arguments after haswell or arm64 go to the canary instead of its default
# "--check scripts/cpu_canary.json" (e.g. --write scripts/cpu_canary.json --label NAME).
#
# Emulation runs about 25 times slower than the host. The arm64 root lives in
# $JPR_ARM64_ROOT (default: ~/.cache/jpr/arm64-root) and is reused; qemu user
# mode shows the process the host's /proc/cpuinfo, so XLA targets generic
# ARMv8-A with NEON there: results stand for NEON machines (SVE ones may differ).
set -euo pipefail
cd "$(dirname "$0")/.."
PROJECT=$(pwd)
ROOT=${JPR_ARM64_ROOT:-${HOME}/.cache/jpr/arm64-root}
PY=${PYTHON:-$PROJECT/.venv/bin/python}
CANARY=(scripts/cpu_canary.py --check scripts/cpu_canary.json)

pins() {  # the project's runtime pins, from pyproject.toml
  "$PY" -c 'import sys, tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))'
}

mounts() {
  mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
  for d in proc dev sys; do mountpoint -q "$ROOT/$d" || mount --bind "/$d" "$ROOT/$d"; done
  mkdir -p "$ROOT/project"
  # this checkout, not whichever one an earlier run mounted there
  if mountpoint -q "$ROOT/project"; then umount "$ROOT/project"; fi
  mount --bind "$PROJECT" "$ROOT/project"
}

# Exit 0 only if every name==version given is what is installed.
PINNED_CHECK='import sys
from importlib import metadata
for pin in sys.argv[1:]:
    name, _, version = pin.partition("==")
    if metadata.version(name) != version:
        sys.exit(1)'

setup() {
  if ! command -v qemu-x86_64 >/dev/null || ! command -v mmdebstrap >/dev/null \
     || ! [ -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      qemu-user qemu-user-static binfmt-support mmdebstrap >/dev/null
  fi
  if ! [ -x "$ROOT/usr/bin/python3" ]; then
    mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)
    mkdir -p "$(dirname "$ROOT")"
    mmdebstrap --quiet --arch=arm64 --variant=minbase \
      --include=python3,python3-venv,ca-certificates bookworm "$ROOT" "$mirror"
  fi
  # shellcheck disable=SC2046
  if ! [ -x "$ROOT/opt/venv/bin/python" ] || \
     ! chroot "$ROOT" /opt/venv/bin/python -c "$PINNED_CHECK" $(pins) 2>/dev/null; then
    # aarch64 wheels are fetched on the host (its pip settings), installed offline inside
    mkdir -p "$ROOT/opt/wheels"
    # shellcheck disable=SC2046
    python3 -m pip download -q --only-binary=:all: --python-version 3.11 --implementation cp \
      --platform manylinux_2_36_aarch64 --platform manylinux_2_28_aarch64 \
      --platform manylinux_2_27_aarch64 --platform manylinux2014_aarch64 --platform any \
      -d "$ROOT/opt/wheels" $(pins)
    mounts
    [ -x "$ROOT/opt/venv/bin/python" ] || chroot "$ROOT" python3 -m venv /opt/venv
    # shellcheck disable=SC2046
    chroot "$ROOT" /opt/venv/bin/python -m pip install -q --no-index \
      --find-links /opt/wheels $(pins)
  fi
  echo "emulated canaries: qemu-x86_64 and the arm64 root ($ROOT) are ready"
}

haswell() {
  site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  real=$("$PY" -c 'import sys; print(sys.executable)')
  base=$("$PY" -c 'import os, sys; print(os.path.realpath(sys._base_executable))')
  [ -x "$base" ] || base=$real
  # qemu prints a warning per CPU feature it cannot emulate (and per thread);
  # no compilation cache: every program is compiled on the emulated CPU itself
  env -u JAX_COMPILATION_CACHE_DIR JPR_COMPILATION_CACHE=0 PYTHONPATH="$PROJECT/src:$site" \
    qemu-x86_64 -cpu Haswell "$base" "${CANARY[@]}" 2>&1 | grep -v "^qemu-x86_64: warning: TCG"
}

arm64() {
  mounts
  chroot "$ROOT" env -u JAX_COMPILATION_CACHE_DIR JAX_PLATFORMS=cpu JPR_COMPILATION_CACHE=0 \
    PYTHONPATH=/project/src \
    PATH=/opt/venv/bin:/usr/bin:/bin sh -c 'cd /project && exec python "$@"' sh "${CANARY[@]}"
}

cmd=${1:-}
[ $# -gt 1 ] && CANARY=(scripts/cpu_canary.py "${@:2}")
case "$cmd" in
  setup) setup ;;
  haswell) haswell ;;
  arm64) arm64 ;;
  *) echo "usage: $0 setup|haswell|arm64" >&2; exit 2 ;;
esac
