#!/usr/bin/env bash
# The benchmark peers' own venv (bench/peer_ray_serve.py): the whole project (scripts/setup.sh)
# on Python 3.13, plus NVIDIA Triton (the tritonserver binary, Python backend and stubs that
# PyPI's nvidia-pytriton wheel carries), tritonclient[grpc] and Ray Serve.
# Kept apart from the project's venv: nvidia-pytriton pins numpy<2 and tritonclient
# protobuf<7, neither of which the project wants.
#
# Python 3.13 because Triton's Python-backend stub embeds the interpreter: it needs a
# libpython of its own version as a shared library, and the 3.11 stub fails at model load
# on some 3.11 builds. Idempotent (each step checks first).
#
# Environment:
#   BIFUSION_PEERS_VENV    where the venv goes (default: .venv-peers in the repository)
#   BIFUSION_PEERS_PYTHON  a Python 3.13 with a shared libpython (default: python3.13 on PATH,
#                          else pyenv's newest 3.13)
#   BIFUSION_PEERS_RAY     0 to leave Ray out (default 1)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BIFUSION_PEERS_VENV:-$ROOT/.venv-peers}"
PYTRITON_VERSION="0.7.0"
TRITONCLIENT_VERSION="2.73.0"
RAY_VERSION="2.60.0"

log() { printf '[setup-peers] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

pick_python() {
  if [ -n "${BIFUSION_PEERS_PYTHON:-}" ]; then echo "$BIFUSION_PEERS_PYTHON"; return; fi
  local candidate
  for candidate in "$(command -v python3.13 || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.13*/bin/python3.13; do
    if [ -x "$candidate" ] && "$candidate" -c 'import sysconfig, sys; sys.exit(not sysconfig.get_config_var("Py_ENABLE_SHARED"))' 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
  die "no Python 3.13 with a shared libpython found; set BIFUSION_PEERS_PYTHON"
}

main() {
  local python
  if [ -x "$VENV/bin/python" ]; then python="$VENV/bin/python"; else python="$(pick_python)"; fi
  log "the project into $VENV"
  BIFUSION_VENV="$VENV" BIFUSION_PYTHON="$python" bash "$ROOT/scripts/setup.sh"
  local pip=("$VENV/bin/python" -m pip install -q)
  # --no-deps: only tritonserver and its libraries are used from nvidia-pytriton (not its
  # Python API, which wants numpy<2); tritonclient's generated code runs on protobuf 7.
  if ! "$VENV/bin/python" -c "import importlib.util as u, tritonclient.grpc, tritonclient.utils.shared_memory; assert u.find_spec('pytriton')" 2>/dev/null; then
    log "installing nvidia-pytriton==$PYTRITON_VERSION and tritonclient==$TRITONCLIENT_VERSION"
    "${pip[@]}" --no-deps "nvidia-pytriton==$PYTRITON_VERSION" "tritonclient==$TRITONCLIENT_VERSION"
    "${pip[@]}" python-rapidjson packaging urllib3 "ml-dtypes<=0.5.4"
  fi
  if [ "${BIFUSION_PEERS_RAY:-1}" != 0 ] && ! "$VENV/bin/python" -c "import ray.serve" 2>/dev/null; then
    log "installing ray[serve]==$RAY_VERSION"
    "${pip[@]}" "ray[serve]==$RAY_VERSION"
  fi
  log "ready: $VENV/bin/python bench/peer_ray_serve.py --help"
}

main "$@"
