#!/usr/bin/env bash
# Builds the web app and serves it on http://127.0.0.1:8080 (set PORT to change).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh serve
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/sefi/target}
exec trunk serve --release --address 127.0.0.1 --port "${PORT:-8080}"
