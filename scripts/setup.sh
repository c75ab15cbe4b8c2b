#!/usr/bin/env bash
# Takes a fresh Debian/Ubuntu machine to a working venv with the whole stack.
#
#   scripts/setup.sh [serve|test]
#
# `serve` installs what serving needs; `test` (the default) adds the test and lint tools
# (pytest, ruff, buf from npm, Prometheus, openssl). Every failure names the step that failed
# and what to do.
# Idempotent: every step checks before it acts; MinkowskiEngine's wheel is cached outside
# the repository (keyed by its version, torch, Python, machine, CPU/CUDA build and the
# source patches in docker/minkowski/) so only the first run pays for the build.
#
# Environment:
#   BIFUSION_VENV         where the venv goes (default: .venv in the repository)
#   BIFUSION_PYTHON       the interpreter for a new venv (default: the newest of python3.13,
#                         python3.12, python3.11 that runs)
#   BIFUSION_DEVICE       auto (default: cuda when nvidia-smi sees a GPU), cpu or cuda
#   BIFUSION_WHEEL_CACHE  MinkowskiEngine wheel cache (default: ~/.cache/bifusion/wheels)
#   TORCH_CUDA_ARCH_LIST  GPU architectures to compile for (default: the local GPUs')
#   MAX_JOBS              parallel compile jobs (default: the number of CPUs)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BIFUSION_VENV:-$ROOT/.venv}"
SUPPORTED_PYTHONS=(3.13 3.12 3.11)  # newest first; pyproject.toml's requires-python agrees
TORCH_VERSION="2.14.1"
TORCHVISION_VERSION="0.29.1"
TORCH_CPU_INDEX="${BIFUSION_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
ME_VERSION="0.5.4"
BUF_VERSION="1.75.0"
ME_SDIST_URL="${BIFUSION_ME_SDIST_URL:-https://files.pythonhosted.org/packages/21/5c/c543c4bc5fbe73ac3e38465b3da4f24a61f7a4ac5baec867e582e94aa551/MinkowskiEngine-0.5.4.tar.gz}"
ME_SDIST_SHA256="b1879c00d0b0b1d30ba622cce239886a7e3c78ee9da1064cdfe2f64c2ab15f94"
WHEEL_CACHE="${BIFUSION_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bifusion/wheels}"
SERVE_APT_PACKAGES=(libopenblas-dev)
TEST_APT_PACKAGES=(prometheus openssl)  # promtool and a real Prometheus; test certificates
PARTIAL_MARK=".bifusion-setup-incomplete"

log() { printf '[setup] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The running step and what to do if it fails: on_error (the ERR trap) says both, so no
# failing command ends the setup without a word.
STEP="setup" HINT=""
step() { STEP="$1" HINT="$2"; }
on_error() {
  local rc=$?
  log "error: $STEP failed (exit $rc: $BASH_COMMAND)"
  if [ -n "$HINT" ]; then log "what to do: $HINT"; fi
}

install_apt_packages() {
  local mode="${1:-test}" packages=("${SERVE_APT_PACKAGES[@]}") missing=()
  [ "$mode" = serve ] || packages+=("${TEST_APT_PACKAGES[@]}")
  for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  # npm installs buf (install_buf, tests only); any npm will do (Debian's, or NodeSource's nodejs).
  [ "$mode" = serve ] || command -v npm >/dev/null || missing+=(npm)
  [ ${#missing[@]} -eq 0 ] && return
  step "installing Debian packages (${missing[*]})" \
    "install them yourself (sudo apt-get install ${missing[*]}) or run this as a user who may, with the Debian mirror reachable; then run it again"
  log "installing Debian packages: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# "3.12" when $1 runs as a supported Python (with venv and ensurepip when $2 is "new"), else fails.
supported_version() {
  local version modules="sys"
  [ "${2:-}" = new ] && modules="sys, venv, ensurepip"
  version="$("$1" -c "import $modules; print('%d.%d' % sys.version_info[:2])" 2>/dev/null)" || return 1
  for want in "${SUPPORTED_PYTHONS[@]}"; do
    [ "$version" = "$want" ] && { echo "$version"; return 0; }
  done
  return 1
}

pick_python() {
  if [ -n "${BIFUSION_PYTHON:-}" ]; then
    supported_version "$BIFUSION_PYTHON" new >/dev/null \
      || die "BIFUSION_PYTHON=$BIFUSION_PYTHON does not run as Python ${SUPPORTED_PYTHONS[*]} with venv and ensurepip"
    echo "$BIFUSION_PYTHON"
    return
  fi
  for version in "${SUPPORTED_PYTHONS[@]}"; do
    # A name on PATH may be a shim that fails to run (pyenv): supported_version tries it.
    if command -v "python$version" >/dev/null && [ "$(supported_version "python$version" new)" = "$version" ]; then
      echo "python$version"
      return
    fi
  done
  die "no Python ${SUPPORTED_PYTHONS[*]} found that runs with venv and ensurepip; install one (e.g. apt-get install python3.11-venv) or set BIFUSION_PYTHON"
}

make_venv() {
  if [ -e "$VENV/$PARTIAL_MARK" ]; then
    log "removing the unfinished venv at $VENV from an interrupted run"
    rm -rf "$VENV"
  fi
  if [ -e "$VENV" ]; then
    local version
    version="$(supported_version "$VENV/bin/python")" \
      || die "$VENV exists but its python does not run as Python ${SUPPORTED_PYTHONS[*]}; remove it or set BIFUSION_VENV"
    log "using the existing venv at $VENV (Python $version)"
  else
    local python
    python="$(pick_python)"
    log "creating venv at $VENV with $python (Python $(supported_version "$python"))"
    # Marked unfinished until the whole setup succeeds: a failed or interrupted run is
    # cleaned up (now by the trap, or by the next run), never left half made.
    trap 'log "setup failed: removing the unfinished venv $VENV"; rm -rf "$VENV"' EXIT
    "$python" -m venv "$VENV"
    touch "$VENV/$PARTIAL_MARK"
  fi
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
}

finish_venv() {
  rm -f "$VENV/$PARTIAL_MARK"
  trap - EXIT
}

# cuda when BIFUSION_DEVICE says so, or (auto) when nvidia-smi lists a GPU; else cpu.
target_device() {
  case "${BIFUSION_DEVICE:-auto}" in
    cpu | cuda) echo "${BIFUSION_DEVICE}" ;;
    auto) if [ -n "$(gpu_arch_list)" ]; then echo cuda; else echo cpu; fi ;;
    *) die "BIFUSION_DEVICE must be auto, cpu or cuda, not ${BIFUSION_DEVICE}" ;;
  esac
}

# The local GPUs' compute capabilities, "8.6;9.0" (empty without a GPU or nvidia-smi).
gpu_arch_list() {
  command -v nvidia-smi >/dev/null || return 0
  nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | tr -d ' ' | grep -E '^[0-9]+\.[0-9]+$' \
    | sort -u | paste -sd';' || true
}

install_torch() {
  local device="$1"
  # Kept when the versions match; on a GPU host also the build must have CUDA (an existing
  # CPU build is replaced). A CUDA build on a CPU host is kept: it runs there too.
  if python -c "import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith('$TORCH_VERSION') and torchvision.__version__.startswith('$TORCHVISION_VERSION') and ('$device' == 'cpu' or torch.version.cuda)))" 2>/dev/null; then
    return
  fi
  if [ "$device" = cpu ]; then
    # PyPI's Linux torch is the CUDA build (about 4 GB with its nvidia-* wheels); a host
    # without a GPU takes the CPU build of the same version from PyTorch's own index.
    log "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION (CPU build from $TORCH_CPU_INDEX)"
    if pip install -q --timeout 20 --retries 1 --index-url "$TORCH_CPU_INDEX" --extra-index-url https://pypi.org/simple \
      "torch==$TORCH_VERSION+cpu" "torchvision==$TORCHVISION_VERSION+cpu" numpy ninja wheel; then
      return
    fi
    log "the CPU build is not reachable here; falling back to PyPI's default (CUDA) build, which also runs on CPU"
  else
    log "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION (CUDA build)"
  fi
  # --force-reinstall: a CPU build of the same version would otherwise count as installed.
  pip install -q --force-reinstall "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" numpy ninja wheel
}

# 0 when MinkowskiEngine $ME_VERSION imports, its CUDA support is what $1 (cpu/cuda) needs,
# and its CPU maps and convolution give the same bits whatever the threads do (built with
# patch_canonical_maps.py and patch_deterministic_convolution.py): the check the
# encoder runs at start-up, loaded from its file since the project may not be installed yet.
minkowski_ok() {
  python - "$1" "$ROOT/bifusion/minkowski.py" <<'PY' 2>/dev/null
import importlib.util, sys
spec = importlib.util.spec_from_file_location("bifusion_minkowski", sys.argv[2])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
ME = module.ME
if ME.__version__ != "0.5.4" or bool(ME.is_cuda_available()) != (sys.argv[1] == "cuda"):
    sys.exit(1)
module.check_cpu_determinism()
PY
}

# A short hash of the source patches: a wheel built before a patch changed is never reused.
minkowski_patches_hash() {
  cat "$ROOT"/docker/minkowski/patch_*.py | sha256sum | cut -c1-10
}

# The wheel cache folder for this MinkowskiEngine build: version, torch, Python, machine,
# cpu or cu<CUDA>-sm<archs>, and the patches' hash
# (e.g. me0.5.4-torch2.14.1-cp312-x86_64-cu130-sm90-p0123456789).
minkowski_cache_key() {
  local device="$1" arch="$2" py_tag variant=cpu
  py_tag="$(python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
  if [ "$device" = cuda ]; then
    local cuda
    cuda="$(python -c 'import torch; print(torch.version.cuda or "")')"
    [ -n "$cuda" ] || die "torch $(python -c 'import torch; print(torch.__version__)') has no CUDA; it cannot drive a CUDA MinkowskiEngine"
    variant="cu${cuda//./}-sm$(echo "$arch" | tr -d '.+A-Za-z' | tr ';' '-')"
  fi
  echo "me${ME_VERSION}-torch${TORCH_VERSION}-${py_tag}-$(uname -m)-${variant}-p$(minkowski_patches_hash)"
}

install_minkowski_engine() {
  local device="$1" arch="" flag=--cpu_only dir
  minkowski_ok "$device" && return
  if [ "$device" = cuda ]; then
    arch="${TORCH_CUDA_ARCH_LIST:-$(gpu_arch_list)}"
    [ -n "$arch" ] || die "BIFUSION_DEVICE=cuda but no GPU is visible: set TORCH_CUDA_ARCH_LIST (e.g. 9.0) to build for one"
    flag=--force_cuda
  fi
  dir="$WHEEL_CACHE/$(minkowski_cache_key "$device" "$arch")"
  if ! ls "$dir"/MinkowskiEngine-*.whl >/dev/null 2>&1; then
    build_minkowski_wheel "$dir.tmp" "$flag" "$arch"
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
  log "installing cached MinkowskiEngine wheel from $dir"
  pip install -q --no-deps --force-reinstall "$dir"/MinkowskiEngine-*.whl
  minkowski_ok "$device" || die "MinkowskiEngine from $dir does not import with $device support and the deterministic CPU patches (remove that folder to rebuild)"
}

# The pinned sdist, patched for CUDA 12/13 (a no-op for the CPU build), for canonical CPU
# kernel maps and for a CPU convolution whose gemms run on one thread each (same input, same
# bits whatever the threads do), built with setup.py:
# `pip wheel --config-settings` drops --force_cuda silently for this legacy sdist.
build_minkowski_wheel() {
  local out="$1" flag="$2" arch="$3" src
  src="$(mktemp -d)"
  rm -rf "$out" && mkdir -p "$out"
  log "building MinkowskiEngine $ME_VERSION ($flag${arch:+, arch $arch}, OpenBLAS); this takes a few minutes once"
  # Fetched directly, not with pip: pip would run its setup.py to read metadata, and that
  # setup.py uninstalls any MinkowskiEngine in the venv.
  python - "$ME_SDIST_URL" "$ME_SDIST_SHA256" "$src/me.tar.gz" <<'PY'
import hashlib, sys, urllib.request
url, sha256, path = sys.argv[1:]
data = urllib.request.urlopen(url, timeout=60).read()
if hashlib.sha256(data).hexdigest() != sha256:
    sys.exit(f"{url}: sha256 mismatch")
open(path, "wb").write(data)
PY
  tar xzf "$src/me.tar.gz" -C "$src"
  local tree="$src/MinkowskiEngine-$ME_VERSION"
  sed -i 's/^run_command("pip", "uninstall".*$/pass  # keep the installed build until the new one exists/' "$tree/setup.py"
  python "$ROOT/docker/minkowski/patch_cuda_sources.py" "$tree" >/dev/null
  python "$ROOT/docker/minkowski/patch_canonical_maps.py" "$tree" >/dev/null
  python "$ROOT/docker/minkowski/patch_deterministic_convolution.py" "$tree" >/dev/null
  # Its setup.py breaks on setuptools >= 70; torch wants a newer one at run time, so the old
  # one is there for the build only. --blas=openblas keeps numpy.distutils out (Python 3.12+).
  pip install -q numpy ninja wheel "setuptools<70"
  local env=(MAX_JOBS="${MAX_JOBS:-$(nproc)}")
  if [ "$flag" = --force_cuda ]; then
    local nvcc cuda_home
    nvcc="$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)"
    [ -n "$nvcc" ] || die "nvcc not found: install the CUDA toolkit matching torch's CUDA $(python -c 'import torch; print(torch.version.cuda)') to build MinkowskiEngine for the GPU"
    cuda_home="$(dirname "$(dirname "$(readlink -f "$nvcc")")")"
    # CUDA 13 keeps Thrust/CUB under include/cccl, which g++ needs for the .cpp files too.
    env+=(CUDA_HOME="$cuda_home" FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch"
      CPLUS_INCLUDE_PATH="$cuda_home/include/cccl:$cuda_home/targets/$(uname -m)-linux/include/cccl${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}")
  else
    env+=(CUDA_VISIBLE_DEVICES="")
  fi
  (cd "$tree" && env "${env[@]}" python setup.py -q bdist_wheel "$flag" --blas=openblas --dist-dir "$out")
  pip install -q "setuptools>=77.0.3"
  rm -rf "$src"
}

install_project() {
  # Reinstall only when the project's metadata changed since the last install, or when the
  # test tools are wanted and the last install was for serving only.
  local mode="${1:-test}" stamp="$VENV/.bifusion-project-stamp" want had=""
  want="$(cat "$ROOT/pyproject.toml" "$ROOT/client/pyproject.toml" | sha256sum | cut -d' ' -f1)"
  [ -f "$stamp" ] && had="$(cat "$stamp")"
  if { [ "$had" = "$want test" ] || [ "$had" = "$want $mode" ]; } && python -c "import bifusion, bifusion_server, bifusion_client" 2>/dev/null; then
    return
  fi
  step "installing the project ($mode)" "pip's message above says which package failed; check that pip reaches its index (PIP_INDEX_URL), then run this again"
  log "installing the project ($mode)"
  # The client distribution first: the server's bifusion-client requirement is then met locally.
  pip install -q -e "$ROOT/client"
  if [ "$mode" = serve ]; then pip install -q -e "$ROOT"; else pip install -q -e "$ROOT[dev]"; fi
  echo "$want $mode" >"$stamp"
}

install_buf() {
  # buf (the protobuf linter) from npm into a project-local folder, for tests/test_proto_contract.py.
  local dir="$ROOT/.tools/buf"
  if [ -x "$dir/node_modules/.bin/buf" ] && [ "$("$dir/node_modules/.bin/buf" --version)" = "$BUF_VERSION" ]; then
    return
  fi
  step "installing buf $BUF_VERSION (the proto linter, for the tests) with npm" \
    "serving does not need it (scripts/serve.sh skips it); for the tests, let npm reach its registry (npm config get registry; set it with npm config set registry URL) and run this again"
  log "installing buf $BUF_VERSION into $dir"
  npm install --prefix "$dir" --no-audit --no-fund --silent "@bufbuild/buf@$BUF_VERSION"
}

main() {
  local mode="${1:-test}"
  case "$mode" in
    serve | test) ;;
    *) die "usage: scripts/setup.sh [serve|test] (serve: what serving needs; test, the default: also the test tools)" ;;
  esac
  set -E  # the ERR trap in every function too
  trap on_error ERR
  install_apt_packages "$mode"
  if [ "$mode" = test ]; then install_buf; fi
  step "making the venv" "the message above says why; remove $VENV or set BIFUSION_VENV, then run this again"
  make_venv
  local device
  device="$(target_device)"
  log "target device: $device"
  step "installing torch" "check that pip reaches $TORCH_CPU_INDEX or PyPI (PIP_INDEX_URL, BIFUSION_TORCH_CPU_INDEX), then run this again"
  install_torch "$device"
  step "building or installing MinkowskiEngine" "the compiler's message above says what broke (it needs g++, Python's headers and libopenblas-dev); remove the wheel folder it names to rebuild"
  install_minkowski_engine "$device"
  install_project "$mode"
  finish_venv
  log "ready: $VENV (Python $(python -c 'import sys; print("%d.%d" % sys.version_info[:2])'), $device)"
}

# Sourced (by the tests), it only defines the functions.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
