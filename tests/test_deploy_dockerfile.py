"""docker/Dockerfile: parsed with BuildKit's own parser, linted with hadolint, and every file
it copies present in the build context (the repository root) and not excluded by its
.dockerignore. tests/test_deploy_stack.py builds and runs it."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
import subprocess
from pathlib import Path

import dockerfile
import pytest
from deploy_tools import DOCKER, ROOT, tool

from bifusion_server.config import ServerConfig, env_name

DOCKERFILE = DOCKER / "Dockerfile"
IGNORE_FILE = DOCKER / "Dockerfile.dockerignore"


@dataclasses.dataclass
class Stage:
    name: str
    base: str
    commands: list


def stages() -> list[Stage]:
    found: list[Stage] = []
    for cmd in dockerfile.parse_file(str(DOCKERFILE)):
        if cmd.cmd == "FROM":
            words = list(cmd.value)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            found.append(Stage(name=name, base=words[0], commands=[]))
        elif found:
            found[-1].commands.append(cmd)
    return found


def stage(name: str) -> Stage:
    return next(s for s in stages() if s.name == name)


def last(stage_: Stage, instruction: str):
    matches = [c for c in stage_.commands if c.cmd == instruction]
    return matches[-1] if matches else None


def global_args() -> dict[str, str]:
    """ARGs before the first FROM, with their defaults."""
    args = {}
    for cmd in dockerfile.parse_file(str(DOCKERFILE)):
        if cmd.cmd == "FROM":
            break
        if cmd.cmd == "ARG":
            name, _, default = cmd.value[0].partition("=")
            args[name] = default.strip('"')
    return args


def _glob_regex(pattern: str) -> re.Pattern:
    """Docker's pattern syntax: ``**`` spans folders, ``*`` and ``?`` stay within one."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] in "*?":
            out.append("[^/]*" if pattern[i] == "*" else "[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def ignored(relative: str, patterns: list[str]) -> bool:
    """.dockerignore semantics: the last matching pattern wins, '!' re-includes, and a
    pattern matching a folder covers what is inside it."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            result = not negate
    return result


def ignore_patterns() -> list[str]:
    lines = (line.strip() for line in IGNORE_FILE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def copy_sources(cmd) -> list[str]:
    if any(flag.startswith("--from") for flag in cmd.flags):
        return []
    return [src for src in cmd.value[:-1] if not src.startswith(("http://", "https://"))]


def test_parses_into_the_expected_stages():
    names = [s.name for s in stages()]
    for expected in (
        "build-base-cuda",
        "build-base-cpu",
        "runtime-base-cuda",
        "runtime-base-cpu",
        "build",
        "runtime",
    ):
        assert expected in names
    assert names[-1] == "runtime", "the runtime image must be the final (default) target"
    assert stage("build").base == "build-base-${VARIANT}"
    assert stage("runtime").base == "runtime-base-${VARIANT}"
    assert global_args()["VARIANT"] == "cuda"


def test_both_variants_build_and_run_on_debian_12():
    assert global_args()["BASE_IMAGE"] == "debian:bookworm-slim"
    for name in ("build-base-cuda", "build-base-cpu", "runtime-base-cuda", "runtime-base-cpu"):
        assert stage(name).base == "${BASE_IMAGE}", name
    text = "\n".join(c.original for c in stage("build").commands)
    assert "python3.11-dev" in text  # Debian 12's own Python 3.11


def test_cuda_toolkit_matches_the_cuda_release_of_torch():
    """nvcc & co (PyPI's cuda-toolkit) must be the release torch's wheels were built with."""
    args = global_args()
    major, minor = args["CUDA_TOOLKIT_VERSION"].split(".")[:2]
    assert args["TORCH_CUDA_INDEX_URL"].endswith(f"/cu{major}{minor}")
    env = " ".join(c.original for c in stage("build-base-cuda").commands if c.cmd == "ENV")
    assert 'CUDA_TOOLKIT_PIP="cuda-toolkit[nvcc,cccl]==${CUDA_TOOLKIT_VERSION}"' in env
    assert any(
        c.cmd == "ARG" and "TORCH_CUDA_ARCH_LIST" in c.value[0] for c in stage("build-base-cuda").commands
    )
    pinned = next(
        c.value[0]
        for c in stage("build").commands
        if c.cmd == "ARG" and c.value[0].startswith("TORCH_VERSION=")
    )
    try:
        installed = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("torch is not installed here")
    if installed != pinned.split("=")[1]:
        pytest.skip(f"torch {installed} here, not the image's PyPI torch {pinned}")
    toolkit = next(
        (r for r in importlib.metadata.requires("torch") or [] if r.startswith("cuda-toolkit")), ""
    )
    assert f"=={args['CUDA_TOOLKIT_VERSION']};" in toolkit.replace(" ", ""), toolkit


def test_builds_offline_with_the_builtin_frontend():
    """No `# syntax=` (it pulls a frontend image) and no ADD --checksum (the built-in frontend
    of Docker 20.10 does not know it); RUN --mount is what it does know."""
    first = DOCKERFILE.read_text().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first)
    assert not any(c.cmd == "ADD" for s in stages() for c in s.commands)


def test_downloads_mount_the_optional_ca_secret_and_never_copy_it():
    downloads = [
        c
        for c in stage("build").commands
        if c.cmd == "RUN" and ("pip install" in c.original or "urlretrieve" in c.original)
    ]
    assert len(downloads) >= 3
    for cmd in downloads:
        assert "--mount=type=secret,id=cacert,required=false" in cmd.original, cmd.original
        assert ". /etc/profile.d/pip_ca.sh" in cmd.original
    copied = " ".join(c.original for s in stages() for c in s.commands if c.cmd in ("COPY", "ADD"))
    assert "cert" not in copied and ".crt" not in copied


def test_minkowski_engine_build_steps():
    build = stage("build")
    text = "\n".join(c.original for c in build.commands)
    args = dict(c.value[0].split("=", 1) for c in build.commands if c.cmd == "ARG" and "=" in c.value[0])
    assert args["MINKOWSKI_SDIST_URL"].endswith("MinkowskiEngine-0.5.4.tar.gz")
    assert re.fullmatch(r"[0-9a-f]{64}", args["MINKOWSKI_SDIST_SHA256"]), "the sdist must be pinned by hash"
    assert 'echo "${MINKOWSKI_SDIST_SHA256}  MinkowskiEngine-0.5.4.tar.gz" | sha256sum -c -' in text
    assert text.index("sha256sum -c") < text.index("tar xzf MinkowskiEngine-0.5.4.tar.gz")
    for patch in ("patch_cuda_sources.py", "patch_canonical_maps.py", "patch_deterministic_convolution.py"):
        assert f"python /tmp/{patch} /tmp/MinkowskiEngine-0.5.4" in text, patch
    assert re.search(r"setuptools==6\d\.", text), "MinkowskiEngine's setup.py needs setuptools < 70"
    assert "--blas=openblas" in text and "${ME_BUILD_FLAG}" in text
    env = " ".join(c.original for c in stage("build-base-cuda").commands if c.cmd == "ENV")
    assert "ME_BUILD_FLAG=--force_cuda" in env
    env = " ".join(c.original for c in stage("build-base-cpu").commands if c.cmd == "ENV")
    assert "ME_BUILD_FLAG=--cpu_only" in env
    # The toolkit leaves again after the build: the runtime copies /opt/venv.
    assert "xargs pip uninstall -y" in text and "nv_fatbin" in text


def test_final_stage_runs_as_non_root_with_healthcheck_ports_and_entrypoint():
    runtime = stage("runtime")
    user = last(runtime, "USER")
    assert user is not None and user.value[0].split(":")[0] not in ("root", "0")
    health = last(runtime, "HEALTHCHECK")
    assert health is not None and "bifusion-healthcheck" in health.original
    assert "--start-period" in health.original
    exposed = {p for c in runtime.commands if c.cmd == "EXPOSE" for p in c.value}
    assert {"50051", "9100"} <= exposed
    assert last(runtime, "STOPSIGNAL").value == ("SIGTERM",)
    entry = last(runtime, "ENTRYPOINT")
    assert entry.json and entry.value == ("bifusion-server",)


def test_env_settings_are_real_server_settings():
    known = {env_name(f.name) for f in dataclasses.fields(ServerConfig)}
    for cmd in dockerfile.parse_file(str(DOCKERFILE)):
        if cmd.cmd == "ENV":
            names = {cmd.value[i] for i in range(0, len(cmd.value), 2)}
            bifusion = {n for n in names if n.startswith("BIFUSION_")}
            assert bifusion <= known | {"BIFUSION_CACHE_DIR"}, sorted(bifusion - known)


def test_every_copied_file_is_in_the_build_context_and_not_ignored():
    patterns = ignore_patterns()
    sources = [
        src for s in stages() for c in s.commands if c.cmd in ("COPY", "ADD") for src in copy_sources(c)
    ]
    assert sources, "no COPY found: the parser or this test is broken"
    for src in sources:
        path = ROOT / src
        assert path.exists(), f"COPY source {src} does not exist in the build context"
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        kept = [p for p in files if not ignored(p.relative_to(ROOT).as_posix(), patterns)]
        assert kept, f"COPY source {src} is excluded by {IGNORE_FILE.name}"


def test_dockerignore_matcher_is_not_vacuous():
    patterns = ignore_patterns()
    assert ignored("tests/test_encoder.py", patterns)
    assert ignored("bifusion/__pycache__/x.pyc", patterns)
    assert not ignored("bifusion/encoder.py", patterns)
    assert not ignored("docker/healthcheck.sh", patterns)


def test_hadolint_passes():
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_not_vacuous(tmp_path: Path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /tmp && apt-get install curl\n")
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and "DL3007" in result.stdout


@pytest.mark.parametrize("script", ["healthcheck.sh"])
def test_shell_scripts_parse(script):
    subprocess.run(["sh", "-n", str(DOCKER / script)], check=True, timeout=30)
    assert (DOCKER / script).stat().st_mode & 0o111, f"{script} must be executable"
