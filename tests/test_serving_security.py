"""Bearer token, TLS and mTLS. Certificates are made for the test with the openssl CLI."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from serving_harness import ROOT, health_status, running_server, server_process

from bifusion_client.api import BiFusionClient
from bifusion_client.request import request_from_folder_frame
from bifusion_wire import SERVICE_NAME

TOKEN = "s3cret-T0ken"


def openssl(command: str, cwd) -> None:
    subprocess.run(["openssl", *command.split()], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A throwaway CA, a server certificate for localhost/127.0.0.1 and a client certificate,
    plus a rogue self-signed certificate nobody trusts."""
    d = tmp_path_factory.mktemp("pki")
    new_key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    ca_ext = "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign"
    openssl(f"req -x509 {new_key} -keyout ca.key -out ca.pem -days 1 -subj /CN=TestCA {ca_ext}", d)
    openssl(f"req -x509 {new_key} -keyout rogue.key -out rogue.pem -days 1 -subj /CN=Rogue", d)
    for name, usage, san in (
        ("server", "serverAuth", "DNS:localhost,IP:127.0.0.1"),
        ("client", "clientAuth", "DNS:robot-1"),
    ):
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n")
        openssl(f"req {new_key} -keyout {name}.key -out {name}.csr -subj /CN={name}", d)
        openssl(
            f"x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out {name}.pem "
            f"-days 1 -extfile {name}.ext",
            d,
        )
    return d


def small_request(frame):
    return request_from_folder_frame(frame, max_points=300)


def expect_code(code, fn, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as caught:
        fn(*args, **kwargs)
    assert caught.value.code() == code, caught.value.details()
    return caught.value


def test_token_guards_encoder_rpcs_but_not_health_or_reflection(encoder, tum_folder_frames, caplog):
    frame = tum_folder_frames[0]
    with (
        caplog.at_level(logging.INFO, logger="bifusion.server"),
        running_server(encoder, token=TOKEN) as live,
    ):
        unauthenticated = grpc.StatusCode.UNAUTHENTICATED
        with BiFusionClient(live.address) as anonymous:
            error = expect_code(unauthenticated, anonymous.encode_request, small_request(frame))
            assert "missing 'authorization: Bearer <token>'" in error.details()
            expect_code(unauthenticated, anonymous.model_info)
            expect_code(unauthenticated, lambda: list(anonymous.encode_stream([small_request(frame)])))
            # Probes carry no token: health and reflection answer anyway.
            assert anonymous.health() == "SERVING"
            assert health_status(live.address, SERVICE_NAME) == "SERVING"
        with grpc.insecure_channel(live.address) as channel:
            assert SERVICE_NAME in ProtoReflectionDescriptorDatabase(channel).get_services()
        with BiFusionClient(live.address, token="wrong") as impostor:
            error = expect_code(unauthenticated, impostor.encode_request, small_request(frame))
            assert error.details() == "invalid bearer token"
        with BiFusionClient(live.address, token=TOKEN) as robot:
            assert robot.model_info().feature_dim == 256
            assert robot.encode_request(small_request(frame)).num_points == 300
            assert [r.num_points for r in robot.encode_stream([small_request(frame)])] == [300]
        assert live.metric("bifusion_requests_total", rpc="EncodeFrame", code="UNAUTHENTICATED") == 2
    config_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("effective config: ")]
    assert config_lines, "the server did not log its effective config"
    logged = json.loads(config_lines[-1].removeprefix("effective config: "))
    assert logged["token"] == "<set>" and logged["max_batch_size"] == 8
    assert TOKEN not in caplog.text


@pytest.mark.parametrize(
    "host, token, warned", [("0.0.0.0", None, True), ("0.0.0.0", TOKEN, False), ("127.0.0.1", None, False)]
)
def test_listening_beyond_loopback_without_a_token_is_warned_about(encoder, caplog, host, token, warned):
    with (
        caplog.at_level(logging.WARNING, logger="bifusion.server"),
        running_server(encoder, host=host, token=token),
    ):
        pass
    assert ("SECURITY: listening on 0.0.0.0 without a bearer token" in caplog.text) is warned


def peak_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def test_an_anonymous_large_request_is_refused_before_its_body_is_read():
    """Four anonymous 100 MiB requests: refused from their metadata, the server's peak memory
    does not grow by their size (before the check moved ahead of the body: about +570 MB)."""
    body = bytes(100 * 1024 * 1024)
    flags = ("--token", TOKEN, "--warmup-frames", "0", "--max-message-bytes", str(128 << 20))
    with server_process(*flags) as live:
        peak_before = peak_rss_bytes(live.process.pid)
        with grpc.insecure_channel(live.address, options=[("grpc.max_send_message_length", -1)]) as channel:
            call = channel.unary_unary(f"/{SERVICE_NAME}/EncodeFrame")  # bytes in, bytes out
            futures = [call.future(body, timeout=60) for _ in range(4)]
            for future in futures:
                assert future.exception().code() == grpc.StatusCode.UNAUTHENTICATED
        growth = peak_rss_bytes(live.process.pid) - peak_before
        assert growth < 64 * 1024 * 1024, f"peak memory grew by {growth / 2**20:.0f} MiB"
        assert live.metric("bifusion_requests_total", rpc="EncodeFrame", code="UNAUTHENTICATED") == 4


def test_token_from_a_file(encoder, tum_folder_frames, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with running_server(encoder, token_file=str(token_file)) as live:
        with BiFusionClient(live.address, token=TOKEN) as robot:
            assert robot.model_info().feature_dim == 256
        with BiFusionClient(live.address) as anonymous:
            expect_code(grpc.StatusCode.UNAUTHENTICATED, anonymous.model_info)


def test_tls(encoder, tum_folder_frames, pki):
    frame = tum_folder_frames[0]
    tls = {"tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "server.key")}
    with running_server(encoder, **tls) as live:
        port = live.address.rsplit(":", 1)[1]
        with BiFusionClient(live.address, tls_ca=pki / "ca.pem") as robot:
            assert robot.health() == "SERVING"
            assert robot.encode_request(small_request(frame)).num_points == 300
        with BiFusionClient(f"localhost:{port}", tls_ca=pki / "ca.pem") as by_name:
            assert by_name.model_info().feature_dim == 256
        with BiFusionClient(live.address, tls_ca=pki / "rogue.pem", timeout=5) as wrong_ca:
            expect_code(grpc.StatusCode.UNAVAILABLE, wrong_ca.model_info)
        with BiFusionClient(live.address, timeout=5) as plaintext:
            expect_code(grpc.StatusCode.UNAVAILABLE, plaintext.model_info)
        # The Docker health check's command line, with the CA.
        command = [
            sys.executable,
            "-m",
            "bifusion_client",
            "health",
            "--address",
            live.address,
            "--tls-ca",
            str(pki / "ca.pem"),
        ]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout.strip()) == (0, "SERVING"), done.stderr


def test_mutual_tls(encoder, pki):
    tls = {
        "tls_cert": str(pki / "server.pem"),
        "tls_key": str(pki / "server.key"),
        "tls_client_ca": str(pki / "ca.pem"),
    }
    with running_server(encoder, **tls) as live:
        client_cert = {"tls_cert": pki / "client.pem", "tls_key": pki / "client.key"}
        with BiFusionClient(live.address, tls_ca=pki / "ca.pem", **client_cert) as robot:
            assert robot.model_info().feature_dim == 256
        with BiFusionClient(live.address, tls_ca=pki / "ca.pem", timeout=5) as no_cert:
            expect_code(grpc.StatusCode.UNAVAILABLE, no_cert.model_info)
        rogue = {"tls_cert": pki / "rogue.pem", "tls_key": pki / "rogue.key"}
        with BiFusionClient(live.address, tls_ca=pki / "ca.pem", timeout=5, **rogue) as impostor:
            expect_code(grpc.StatusCode.UNAVAILABLE, impostor.model_info)
