#!/usr/bin/env bash
# GPU benchmarks of the serving path and of the Triton peer, for a lent device machine (one
# NVIDIA GPU, its own python3 with torch+CUDA, no network; it sees the checkout plus at most
# 64 MiB of carried ignored files per call). Run from the project root. JSON and the log go
# to $OUT (gpu-check-log.txt); docs/benchmarks.md ("GPU check") has the whole procedure.
#
# Prepare on a machine with network (once):
#   mkdir -p .gpu-kit && cp -r ../shared/gpu-kit/. .gpu-kit/ && cp -r ../shared/data .gpu-kit/data
#   bash bench/gpu_check.sh prepare     # .peer-kit/: Triton's wheels for the device's Python
# Then two calls made back to back (the machine keeps /tmp and .gpu-kit while warm):
#   call 1: carry [".gpu-kit"],  command "bash bench/gpu_check.sh encoder determinism serve1 profile"
#   call 2: carry [".peer-kit"], command "bash bench/gpu_check.sh peers serve2"
# (.gpu-kit is 32 MB, .peer-kit 57 MB: together over one call's 64 MiB.)
#
# Steps (any order, any subset):
#   encoder  bench/encoder.py --device cuda, B = 1 8 16 32 (the output stage per batch size)
#   serve1   bench/serve.py --device cuda, every transport, 1/4/16/64 clients, --instances 1
#   serve2   the same with --instances 2
#   peers    ours vs Triton (gRPC and system shared memory) at 1/16/64 clients
#   profile  one batch-16 call under torch.profiler; SM busy under 64 clients (nvidia-smi dmon)
#   determinism  bench/determinism.py --device cuda: the same batch of 16, 10 times (atomics)
# Knobs: GPU_SECONDS (per serve level, default 10), GPU_MAX_BATCH (default 16),
# GPU_TRANSPORTS (default every transport).
set -u
ROOT="$(pwd)"; KIT="$ROOT/.gpu-kit"; PEER_KIT="$ROOT/.peer-kit"; OUTD="${OUT:-/tmp/gpu-out}"
SECONDS_PER_LEVEL="${GPU_SECONDS:-10}"; MAX_BATCH="${GPU_MAX_BATCH:-16}"
TRANSPORTS="${GPU_TRANSPORTS:-float32 float16 int8 bfloat16 shm}"
PYTRITON_WHEEL="nvidia-pytriton==0.7.0"; TRITONCLIENT_WHEEL="tritonclient==2.73.0"

if [ "${1:-}" = prepare ]; then
  # Wheels for the device's Python (3.12 unless DEVICE_PYTHON_VERSION says otherwise).
  rm -rf "$PEER_KIT" && mkdir -p "$PEER_KIT"
  python3 -m pip download -q --no-deps --only-binary :all: -d "$PEER_KIT" \
    --python-version "${DEVICE_PYTHON_VERSION:-3.12}" --platform manylinux_2_35_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    "$PYTRITON_WHEEL" "$TRITONCLIENT_WHEEL" python-rapidjson || exit 1  # ml-dtypes: there already
  du -sh "$PEER_KIT" && ls "$PEER_KIT"
  exit 0
fi

mkdir -p "$OUTD"
exec > >(tee -a "$OUTD/gpu-check-log.txt") 2>&1
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

# The GPU kit's environment: its wheels in /tmp/site, OpenBLAS in /tmp/blas, MinkowskiEngine
# built in /tmp/MinkowskiEngine-0.5.4 (made by .gpu-kit/run.sh, once per machine).
BL=/tmp/blas/usr/lib/x86_64-linux-gnu/openblas-pthread
export LIBRARY_PATH="$BL:/tmp/blas/usr/lib/x86_64-linux-gnu"
export LD_LIBRARY_PATH="$BL:/tmp/blas/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export PYTHONPATH="/tmp/site:/tmp/MinkowskiEngine-0.5.4:$ROOT:$ROOT/client:$ROOT/tests"
export BIFUSION_DATA_DIR="$KIT/data" PYTHONUNBUFFERED=1
DATA="$KIT/data/tum_fr1_xyz"
me_imports() {
  (cd /tmp && python3 -c "import collections, collections.abc, torch; collections.Sequence = collections.abc.Sequence
import MinkowskiEngine as ME, sys; sys.exit(0 if ME.is_cuda_available() else 1)") >/dev/null 2>&1
}
if ! me_imports; then
  [ -f "$KIT/run.sh" ] || { log "no .gpu-kit here and MinkowskiEngine is not set up: carry .gpu-kit (call 1)"; exit 1; }
  log "setting up with .gpu-kit/run.sh"
  GPU_KIT_STEPS=setup-only OUT="$OUTD" bash "$KIT/run.sh" > /dev/null || { log "gpu-kit setup failed"; exit 1; }
  me_imports || { log "MinkowskiEngine does not import with CUDA"; exit 1; }
fi
[ -d "$DATA" ] || { log "no frames at $DATA (.gpu-kit/data)"; exit 1; }
log "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"

run_serve() {  # $1: instances
  log "bench/serve.py --device cuda --instances $1 ($SECONDS_PER_LEVEL s a level; $TRANSPORTS)"
  # shellcheck disable=SC2086
  timeout 480 python3 bench/serve.py --device cuda --data "$DATA" --concurrency 1 4 16 64 \
    --transports $TRANSPORTS --seconds-per-level "$SECONDS_PER_LEVEL" --max-batch-size "$MAX_BATCH" \
    --instances "$1" --note "bench/gpu_check.sh serve$1" --out "$OUTD/serve-cuda-${1}instance.json" > /dev/null \
    && log "written serve-cuda-${1}instance.json" || log "serve --instances $1 FAILED (rc $?)"
}

run_peers() {
  if [ -d "$PEER_KIT" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peer-site "$PEER_KIT"/*.whl \
      || { log "peer wheel install failed"; return 1; }
  fi
  [ -d /tmp/peer-site/pytriton ] || { log "no Triton: carry .peer-kit (bash bench/gpu_check.sh prepare)"; return 1; }
  # Triton's Python-backend stub embeds this Python: it needs its shared libpython.
  local libpython
  libpython="$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("INSTSONAME") or "")')"
  if ! ldconfig -p | grep -q "$libpython" \
    && [ ! -e "$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')/$libpython" ]; then
    log "this python3 has no shared $libpython: Triton's Python backend cannot run here"; return 1
  fi
  log "bench/peer_ray_serve.py --device cuda: ours vs Triton at 1/16/64 clients"
  PYTHONPATH="/tmp/peer-site:$PYTHONPATH" timeout 420 python3 bench/peer_ray_serve.py --device cuda \
    --data "$DATA" --concurrency 1 16 64 --contenders ours ours_shm triton_grpc triton_shm \
    --rounds 2 --frames-per-client 4 --min-frames 16 --max-batch-size "$MAX_BATCH" --instances 1 \
    --note "bench/gpu_check.sh peers" --out "$OUTD/peer-triton-cuda.json" > /dev/null \
    && log "written peer-triton-cuda.json" || log "peers FAILED (rc $?)"
}

for step in "$@"; do
  case "$step" in
    encoder)
      log "bench/encoder.py --device cuda"
      timeout 180 python3 bench/encoder.py --device cuda --data "$DATA" --batch-sizes 1 8 16 32 --repeats 5 \
        --profile > "$OUTD/encoder-cuda.json" && log "written encoder-cuda.json" || log "encoder FAILED" ;;
    determinism)
      log "bench/determinism.py --device cuda: the same batch of 16, 10 times"
      timeout 120 python3 bench/determinism.py --device cuda --data "$DATA" --batch-size 16 --repeats 10 \
        > "$OUTD/determinism-cuda.json" && log "written determinism-cuda.json" || log "determinism FAILED" ;;
    serve1) run_serve 1 ;;
    serve2) run_serve 2 ;;
    peers) run_peers ;;
    profile)
      log "bench/gpu_profile.py: batch-16 profile, GPU busy under 64 clients"
      timeout 240 python3 bench/gpu_profile.py --device cuda --data "$DATA" --batch-size 16 --clients 64 \
        --seconds 15 --max-batch-size "$MAX_BATCH" --out "$OUTD/gpu-profile-cuda.json" > /dev/null \
        && log "written gpu-profile-cuda.json" || log "profile FAILED" ;;
    *) log "unknown step $step" ;;
  esac
done
log "done"
