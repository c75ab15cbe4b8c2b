"""docker/healthcheck.sh, the image's HEALTHCHECK, run against live servers the way Docker
runs it: with the container's BIFUSION_* settings in the environment and nothing else."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_tools import DOCKER
from serving_harness import free_port, running_server

SCRIPT = DOCKER / "healthcheck.sh"
SELF_SIGNED = (
    "openssl req -x509 -newkey rsa:2048 -nodes -keyout key.pem -out cert.pem -days 1 "
    "-subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1"
)


def healthcheck(**settings: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIFUSION_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # bifusion-client
    env.update({f"BIFUSION_{k.upper()}": v for k, v in settings.items()})
    return subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


def port_of(live) -> str:
    return live.address.rsplit(":", 1)[1]


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost: the simplest TLS deployment."""
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        shlex.split(SELF_SIGNED),
        cwd=d,
        check=True,
        capture_output=True,
    )
    return d / "cert.pem", d / "key.pem"


def test_healthy_when_serving_and_not_when_nothing_listens(encoder):
    with running_server(encoder) as live:
        result = healthcheck(port=port_of(live))
        assert result.returncode == 0, result.stdout + result.stderr
    result = healthcheck(port=str(free_port()), healthcheck_timeout="2")
    assert result.returncode != 0


def test_unhealthy_while_draining(encoder):
    from serving_harness import _LoopThread

    with running_server(encoder) as live:
        port = port_of(live)
        assert healthcheck(port=port).returncode == 0
        _LoopThread.get().run(live.server.drain())
        assert healthcheck(port=port, healthcheck_timeout="2").returncode != 0


def test_tls_and_mtls_use_the_servers_own_settings(encoder, self_signed):
    cert, key = self_signed
    with running_server(encoder, tls_cert=str(cert), tls_key=str(key)) as live:
        result = healthcheck(port=port_of(live), tls_cert=str(cert), tls_key=str(key))
        assert result.returncode == 0, result.stdout + result.stderr
        # Plaintext against a TLS port fails: the script really follows the settings.
        assert healthcheck(port=port_of(live), healthcheck_timeout="2").returncode != 0
    with running_server(encoder, tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(cert)) as live:
        result = healthcheck(
            port=port_of(live), tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(cert)
        )
        assert result.returncode == 0, result.stdout + result.stderr
