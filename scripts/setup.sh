#!/usr/bin/env bash
# Takes a fresh Debian machine to a working venv with the whole stack.
# Idempotent: every step checks before it acts; MinkowskiEngine's wheel is cached
# outside the repository so only the first run pays for the build.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BIFUSION_VENV:-$ROOT/.venv}"
PYTHON="${BIFUSION_PYTHON:-python3.11}"
TORCH_VERSION="2.14.1"
TORCHVISION_VERSION="0.29.1"
ME_VERSION="0.5.4"
BUF_VERSION="1.75.0"
WHEEL_CACHE="${BIFUSION_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bifusion/wheels}"
APT_PACKAGES=(libopenblas-dev prometheus openssl)

log() { printf '[setup] %s\n' "$*" >&2; }

install_apt_packages() {
  local missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  # npm installs buf (install_buf); any npm will do (Debian's, or the one in NodeSource's nodejs).
  command -v npm >/dev/null || missing+=(npm)
  [ ${#missing[@]} -eq 0 ] && return
  log "installing Debian packages: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

make_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv at $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
  python -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
    || { log "the venv must use Python 3.11"; exit 1; }
}

install_torch() {
  if python -c "import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith('$TORCH_VERSION') and torchvision.__version__.startswith('$TORCHVISION_VERSION')))" 2>/dev/null; then
    return
  fi
  log "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
  pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" numpy ninja wheel
}

install_minkowski_engine() {
  if python - <<'PY' 2>/dev/null
import collections, collections.abc, sys
collections.Sequence = collections.abc.Sequence
import MinkowskiEngine as ME
sys.exit(ME.__version__ != "0.5.4")
PY
  then
    return
  fi
  local py_tag key dir
  py_tag="$(python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
  key="me${ME_VERSION}-torch${TORCH_VERSION}-${py_tag}-$(uname -m)-cpu"
  dir="$WHEEL_CACHE/$key"
  if ! ls "$dir"/MinkowskiEngine-*.whl >/dev/null 2>&1; then
    log "building MinkowskiEngine $ME_VERSION (CPU, OpenBLAS); this takes a few minutes once"
    mkdir -p "$dir.tmp"
    # Its setup.py needs numpy.distutils, which breaks on setuptools >= 70; torch wants
    # a newer setuptools at run time, so the old one is only there for the build.
    pip install -q numpy ninja wheel "setuptools<70"
    # No CUDA device here: build the CPU extension even when nvcc is installed.
    CUDA_VISIBLE_DEVICES="" MAX_JOBS="${MAX_JOBS:-2}" pip wheel --no-build-isolation --no-deps \
      --config-settings=--global-option=--blas=openblas \
      --config-settings=--global-option=--cpu_only \
      -w "$dir.tmp" "MinkowskiEngine==$ME_VERSION"
    pip install -q "setuptools>=77.0.3"
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
  log "installing cached MinkowskiEngine wheel from $dir"
  pip install -q --no-deps "$dir"/MinkowskiEngine-*.whl
}

install_project() {
  # Reinstall only when the project's metadata changed since the last install.
  local stamp="$VENV/.bifusion-project-stamp" want
  want="$(cat "$ROOT/pyproject.toml" "$ROOT/client/pyproject.toml" | sha256sum | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && python -c "import bifusion, bifusion_server, bifusion_client" 2>/dev/null; then
    return
  fi
  log "installing the project"
  # The client distribution first: the server's bifusion-client requirement is then met locally.
  pip install -q -e "$ROOT/client"
  pip install -q -e "$ROOT[dev]"
  echo "$want" >"$stamp"
}

install_buf() {
  # buf (the protobuf linter) from npm into a project-local folder, for tests/test_proto_contract.py.
  local dir="$ROOT/.tools/buf"
  if [ -x "$dir/node_modules/.bin/buf" ] && [ "$("$dir/node_modules/.bin/buf" --version)" = "$BUF_VERSION" ]; then
    return
  fi
  log "installing buf $BUF_VERSION into $dir"
  npm install --prefix "$dir" --no-audit --no-fund --silent "@bufbuild/buf@$BUF_VERSION"
}

install_apt_packages
install_buf
make_venv
install_torch
install_minkowski_engine
install_project
log "ready: $VENV"
