# Sourced by the other deploy/ scripts: the environment every Flower process of a deployment shares.
#
#   FEDTUNE_VENV  a virtual environment whose bin/ holds flwr, flower-superlink, flower-supernode
#                 (default: the repository's .venv when it exists, else whatever is on PATH)
#   FLWR_HOME     where the Flower CLI keeps its SuperLink connections and a SuperNode its apps
#                 (default: .flwr-deploy/ in the repository, so ~/.flwr and .flwr/ are left alone)
DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$DEPLOY_DIR")"
FEDTUNE_VENV="${FEDTUNE_VENV:-$REPO_DIR/.venv}"
[ -x "$FEDTUNE_VENV/bin/flwr" ] && export PATH="$FEDTUNE_VENV/bin:$PATH"
export FLWR_HOME="${FLWR_HOME:-$REPO_DIR/.flwr-deploy}"
# Use the installed environment as it is: no `uv sync` of the app's dependencies at run time
# (it would pull a CUDA torch), no update check, no telemetry.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_TELEMETRY_ENABLED=0

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

# write_connection HOST:PORT CA_CERT -- the `deployment` SuperLink connection of the Flower CLI.
write_connection() {
    local ca
    ca="$(realpath "$2")" || die "no CA certificate at $2"
    mkdir -p "$FLWR_HOME"
    cat > "$FLWR_HOME/config.toml" <<TOML
# Written by deploy/env.sh: the SuperLink that \`flwr\` talks to (Control API, HTTPS).
[superlink]
default = "deployment"

[superlink.deployment]
address = "$1"
root-certificates = "$ca"
TOML
}
