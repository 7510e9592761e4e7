#!/usr/bin/env bash
# Usage: deploy/flwr.sh FLWR_ARGUMENTS...
#
# Flower's CLI, `flwr`, with this deployment's FLWR_HOME (.flwr-deploy/ at the repository root, or
# $FEDTUNE_DEPLOY_HOME; see deploy/env.sh), where deploy/register-nodes.sh and deploy/submit.sh
# wrote the `deployment` connection to the SuperLink. Equivalent to
# `FLWR_HOME=$PWD/.flwr-deploy flwr ...` from the repository root. For example:
#   deploy/flwr.sh supernode list deployment
#   deploy/flwr.sh supernode unregister NODE_ID deployment
#   deploy/flwr.sh ls deployment
#   deploy/flwr.sh log RUN_ID deployment --stream
#   deploy/flwr.sh stop RUN_ID deployment
set -euo pipefail
source "$(dirname "$0")/env.sh"
[ $# -ge 1 ] || { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" >&2; exit 2; }
[ -f "$FLWR_HOME/config.toml" ] || die "no SuperLink connection in $FLWR_HOME/config.toml: \
deploy/register-nodes.sh and deploy/submit.sh write it (run one of them first, or set FEDTUNE_DEPLOY_HOME to where they ran)"
exec flwr "$@"
