#!/usr/bin/env bash
# Install NVIDIA's perf_analyzer into $(git rev-parse --show-toplevel)/tools (git-ignored):
#
#   tools/bin/perf_analyzer          a wrapper that sets LD_LIBRARY_PATH and runs the binary
#   tools/perf_analyzer/bin/         the perf_analyzer binary of the tritonclient==2.44.0 wheel
#                                    (unzipped from the wheel; that old client is NOT installed)
#   tools/perf_analyzer/lib/         libcudart.so.12 (PyPI nvidia-cuda-runtime-cu12) and libb64.so.0d
#                                    (Debian libb64-0d, extracted with dpkg-deb, nothing installed)
#
# Why this way (measured, shared/design/TOOLING.md): the perf-analyzer wheels on PyPI need glibc
# 2.38 (Debian 12 has 2.36) and pip silently installs an empty placeholder; the binary inside the
# tritonclient 2.44.0 wheel runs here once libb64 and libcudart are found. Nothing is installed
# system-wide. About 15 MB downloaded, a few seconds. Idempotent: does nothing when the wrapper runs.
#
# Usage: bash benchmarks/install_perf_analyzer.sh [PYTHON]   (PYTHON runs `pip download`; default python3)
set -euo pipefail

ROOT="$(git -C "$(dirname "$0")" rev-parse --show-toplevel 2>/dev/null || (cd "$(dirname "$0")/.." && pwd))"
TOOLS="$ROOT/tools"
DEST="$TOOLS/perf_analyzer"
WRAPPER="$TOOLS/bin/perf_analyzer"
PYTHON="${1:-python3}"
TRITONCLIENT="tritonclient==2.44.0"
CUDART="nvidia-cuda-runtime-cu12==12.4.127"
B64_DEB="libb64-0d"

log() { echo "install_perf_analyzer.sh: $*" >&2; }
die() { echo "install_perf_analyzer.sh: ERROR: $*" >&2; exit 1; }

if [[ -x "$WRAPPER" ]] && "$WRAPPER" --version >/dev/null 2>&1; then
    log "found $WRAPPER"
    exit 0
fi
command -v unzip >/dev/null || die "unzip is needed"
mkdir -p "$DEST/bin" "$DEST/lib" "$TOOLS/bin"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# 1. the binary, from the tritonclient 2.44.0 wheel
if [[ ! -x "$DEST/bin/perf_analyzer" ]]; then
    log "pip download $TRITONCLIENT"
    "$PYTHON" -m pip download -q --no-deps --only-binary :all: \
        -d "$work/tc" "$TRITONCLIENT" || die "pip download $TRITONCLIENT failed"
    unzip -q -o -j "$work"/tc/tritonclient-2.44.0-*.whl 'tritonclient-2.44.0.data/data/bin/perf_analyzer' -d "$DEST/bin"
    chmod 0755 "$DEST/bin/perf_analyzer"
fi

# 2. libcudart.so.12, from the PyPI wheel
if [[ ! -e "$DEST/lib/libcudart.so.12" ]]; then
    log "pip download $CUDART"
    "$PYTHON" -m pip download -q --no-deps --only-binary :all: \
        -d "$work/cudart" "$CUDART" || die "pip download $CUDART failed"
    unzip -q -o -j "$work"/cudart/nvidia_cuda_runtime_cu12-*.whl 'nvidia/cuda_runtime/lib/libcudart.so.12' -d "$DEST/lib"
fi

# 3. libb64.so.0d: the system's if present, else extracted from Debian's package
if ! ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d' && [[ ! -e "$DEST/lib/libb64.so.0d" ]]; then
    command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || die "libb64.so.0d missing and no apt-get/dpkg-deb to fetch $B64_DEB"
    log "apt-get download $B64_DEB"
    if ! (cd "$work" && apt-get download -q "$B64_DEB" >/dev/null 2>&1); then
        apt-get update -q >/dev/null 2>&1 || die "apt-get update failed (root is needed to refresh the package lists)"
        (cd "$work" && apt-get download -q "$B64_DEB" >/dev/null 2>&1) || die "apt-get download $B64_DEB failed"
    fi
    dpkg-deb -x "$work"/libb64-0d_*.deb "$work/b64"
    cp -L "$(find "$work/b64" -name 'libb64.so.0d' | head -1)" "$DEST/lib/libb64.so.0d"
fi

cat > "$WRAPPER" <<EOF
#!/bin/sh
# perf_analyzer from the tritonclient 2.44.0 wheel (benchmarks/install_perf_analyzer.sh)
LD_LIBRARY_PATH="$DEST/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$DEST/bin/perf_analyzer" "\$@"
EOF
chmod 0755 "$WRAPPER"
"$WRAPPER" --version >/dev/null 2>&1 || { "$WRAPPER" --version || true; die "$WRAPPER does not run"; }
log "installed $WRAPPER"
