"""Server flags and their BIFUSION_* environment variables."""

from __future__ import annotations

import pytest

from bifusion_server.config import MIB, ServerConfig, load_config


def test_defaults_match_the_documented_interface():
    config = load_config([], env={})
    assert config == ServerConfig()
    assert (config.host, config.port, config.metrics_port) == ("0.0.0.0", 50051, 9100)
    assert (config.max_batch_size, config.max_batch_delay_ms, config.max_queue) == ("auto", 5.0, 64)
    assert config.max_message_bytes == 64 * MIB
    assert (config.warmup_frames, config.drain_seconds, config.log_level) == (1, 30.0, "INFO")
    assert config.checkpoint is None and config.device == "auto" and config.amp is False


def test_environment_sets_and_flags_win():
    env = {
        "BIFUSION_MAX_BATCH_SIZE": "4",
        "BIFUSION_PORT": "6000",
        "BIFUSION_AMP": "true",
        "BIFUSION_MAX_BATCH_DELAY_MS": "2.5",
        "BIFUSION_CHECKPOINT": "/models/a.safetensors",
        "BIFUSION_LOG_LEVEL": "debug",
    }
    config = load_config(["--port", "7000", "--no-amp"], env=env)
    assert config.port == 7000 and config.amp is False  # flags win
    assert config.max_batch_size == 4 and config.max_batch_delay_ms == 2.5  # environment fills the rest
    assert config.checkpoint == "/models/a.safetensors" and config.log_level == "DEBUG"


def test_instances_from_flag_or_environment_and_auto_per_device():
    from bifusion_server.instances import resolve_instances

    assert load_config([], env={}).instances == "auto"
    assert load_config([], env={"BIFUSION_INSTANCES": "3"}).instances == "3"
    assert load_config(["--instances", "2"], env={"BIFUSION_INSTANCES": "3"}).instances == "2"
    assert (resolve_instances("auto", "cpu"), resolve_instances("auto", "cuda")) == (1, 1)
    assert resolve_instances("3", "cpu") == 3


def test_hardening_settings_from_the_environment():
    env = {
        "BIFUSION_MAX_REQUEST_PIXELS": "307200",
        "BIFUSION_MAX_QUEUED_POINTS": "500000",
        "BIFUSION_MAX_CONNECTIONS": "16",
        "BIFUSION_CONNECTION_IDLE_SECONDS": "60",
        "BIFUSION_LOG_FORMAT": "json",
        "BIFUSION_ACCESS_LOG": "false",
        "BIFUSION_METRICS_HOST": "127.0.0.1",
    }
    config = load_config([], env=env)
    assert (config.max_request_pixels, config.max_queued_points, config.max_connections) == (
        307200,
        500000,
        16,
    )
    assert config.connection_idle_seconds == 60.0 and config.log_format == "json"
    assert config.access_log is False
    assert (config.host, config.effective_metrics_host) == ("0.0.0.0", "127.0.0.1")
    assert load_config([], env={}).effective_metrics_host == "0.0.0.0"  # default: the gRPC host


def test_empty_environment_values_are_ignored():
    assert load_config([], env={"BIFUSION_PORT": ""}).port == 50051


@pytest.mark.parametrize(
    "argv, env, words",
    [
        (["--max-batch-size", "0"], {}, "--max-batch-size must be auto or a whole number ≥ 1, not '0'"),
        ([], {"BIFUSION_MAX_QUEUE": "many"}, "BIFUSION_MAX_QUEUE='many'"),
        ([], {"BIFUSION_AMP": "perhaps"}, "BIFUSION_AMP='perhaps'"),
        (["--device", "gpu"], {}, "--device must be auto, cpu, cuda or cuda:N"),
        (["--tls-cert", "c.pem"], {}, "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "ca.pem"], {}, "needs --tls-cert"),
        (["--token", "a", "--token-file", "f"], {}, "not both"),
        (["--max-message-bytes", "1000"], {}, "at least 1 MiB"),
        (["--port", "70000"], {}, "--port must be within 0..65535"),
        (["--instances", "0"], {}, "--instances must be auto or 1..16, not '0'"),
        ([], {"BIFUSION_INSTANCES": "two"}, "--instances must be auto or 1..16, not 'two'"),
        (["--instances", "17"], {}, "--instances must be auto or 1..16"),
        (["--log-format", "xml"], {}, "--log-format must be one of text, json"),
        (["--max-concurrent-streams", "0"], {}, "--max-concurrent-streams must be ≥ 1"),
        (["--connection-idle-seconds", "-1"], {}, "--connection-idle-seconds must be ≥ 0"),
        (["--max-request-pixels", "100", "--max-queued-pixels", "50"], {}, "at least --max-request-pixels"),
    ],
)
def test_bad_settings_are_refused_with_a_message(argv, env, words, capsys):
    with pytest.raises(SystemExit) as caught:
        load_config(argv, env=env)
    assert caught.value.code == 2
    assert words in capsys.readouterr().err


def test_token_never_appears_in_the_logged_config(tmp_path):
    config = load_config(["--token", "hunter2"], env={})
    assert "hunter2" not in str(config.redacted())
    assert config.bearer_token() == "hunter2"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert load_config([], env={"BIFUSION_TOKEN_FILE": str(token_file)}).bearer_token() == "from-file"


def test_help_shows_every_default():
    """--help names each default beside its flag; the parser's own defaults stay None, so an
    unset flag still leaves the BIFUSION_* variable in charge."""
    from bifusion_server.config import build_parser

    text = " ".join(build_parser().format_help().split())
    for words in (
        "(default: 0.0.0.0) [env BIFUSION_HOST]",
        "(default: 50051) [env BIFUSION_PORT]",
        "(default: 9100) [env BIFUSION_METRICS_PORT]",
        "(default: 64) [env BIFUSION_MAX_QUEUE]",
        "(default: 30.0) [env BIFUSION_DRAIN_SECONDS]",
        "(default: off) [env BIFUSION_AMP]",
        "(default: on) [env BIFUSION_ACCESS_LOG]",
    ):
        assert words in text, words
    assert "(default: None)" not in text
    assert load_config([], env={"BIFUSION_PORT": "6000"}).port == 6000
