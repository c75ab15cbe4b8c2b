#!/usr/bin/env bash
# Sets up the venv if needed, then starts the gRPC server (embedded demo checkpoint
# unless --checkpoint or BIFUSION_CHECKPOINT says otherwise). Extra arguments go to
# bifusion-server.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BIFUSION_VENV:-$ROOT/.venv}"
"$ROOT/scripts/setup.sh" serve  # what serving needs: no test or lint tools
exec "$VENV/bin/bifusion-server" "$@"
