# Sourced by the other deploy/ scripts: the environment every Flower process of a deployment shares.
#
#   FEDTUNE_VENV         a virtual environment whose bin/ holds flwr, flower-superlink, flower-supernode
#                        (default: the repository's .venv when it exists, else whatever is on PATH)
#   FEDTUNE_DEPLOY_HOME  this deployment's Flower home, exported as FLWR_HOME (default: .flwr-deploy/
#                        at the repository root). It holds the CLI's `deployment` connection
#                        (config.toml), register-nodes.sh's node -> organisation record (nodes.tsv),
#                        a SuperNode's unpacked apps and the SuperLink's default database. A FLWR_HOME
#                        already set by the caller is ignored: ~/.flwr and .flwr/ are left alone.
DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$DEPLOY_DIR")"
FEDTUNE_VENV="${FEDTUNE_VENV:-$REPO_DIR/.venv}"
[ -x "$FEDTUNE_VENV/bin/flwr" ] && export PATH="$FEDTUNE_VENV/bin:$PATH"
mkdir -p "${FEDTUNE_DEPLOY_HOME:-$REPO_DIR/.flwr-deploy}"
FLWR_HOME="$(cd "${FEDTUNE_DEPLOY_HOME:-$REPO_DIR/.flwr-deploy}" && pwd)"
export FLWR_HOME
# Use the installed environment as it is: no `uv sync` of the app's dependencies at run time
# (it would pull a CUDA torch), no update check, no telemetry.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_TELEMETRY_ENABLED=0

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

# write_connection HOST:PORT CA_CERT -- the `deployment` SuperLink connection of the Flower CLI.
write_connection() {
    local ca
    [ -f "$2" ] || die "no CA certificate at $2 (deploy/make-certs.sh writes ca.crt)"
    ca="$(realpath "$2")"
    cat > "$FLWR_HOME/config.toml" <<TOML
# Written by deploy/env.sh: the SuperLink that \`flwr\` talks to (Control API, HTTPS).
[superlink]
default = "deployment"

[superlink.deployment]
address = "$1"
root-certificates = "$ca"
TOML
}

# flwr_json EXPR < REPLY -- REPLY: the answer of a `flwr ... --format json` command (which exits 0
# even when it failed). Prints the Python expression EXPR of `reply` (the parsed answer), e.g.
# 'reply["node-id"]'; when Flower answered with an error, prints its message and fails.
flwr_json() {
    python3 -c '
import json, sys
text = sys.stdin.read()
try:
    reply = json.loads(text[text.index("{"):])
except ValueError:
    print(text.strip() or "no answer from flwr"); sys.exit(1)
if not reply.get("success"):
    # The last paragraph is the cause ("Using SuperLink: ..." and progress lines come first).
    print(str(reply.get("error-message", text)).strip().split("\n\n")[-1]); sys.exit(1)
print(eval(sys.argv[1], {"reply": reply}))
' "$1"
}
