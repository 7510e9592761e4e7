#!/usr/bin/env bash
# Run the app through Flower's own CLI: `bash simulations/flwr-run.sh [extra flwr run args]`.
# Uses a project-local FLWR_HOME, keeps the current environment (no uv re-install, which would
# pull a CUDA torch), and stops the background SuperLink that `flwr run .` starts.
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_TELEMETRY_ENABLED=0
mkdir -p "$FLWR_HOME"
[ -f "$FLWR_HOME/config.toml" ] || cp simulations/flwr-config.toml "$FLWR_HOME/config.toml"
stop_superlink() { pkill -f "flower-superlink.*--database $FLWR_HOME/" 2>/dev/null || true; }
trap stop_superlink EXIT
flwr_bin="${FLWR:-flwr}"
# flwr starts `flower-superlink` by name: it must be on PATH beside flwr.
[[ "$flwr_bin" == */* ]] && export PATH="$(dirname "$flwr_bin"):$PATH"
"$flwr_bin" run . --stream "$@"
