"""What an operator sets on the command line reaches the server and the pipeline: `--log-level`
wins over `pipeline()`'s own default (and `pipeline(log_level=...)` still works from Python), the
reliability flags arrive (`--max-prompt-chars` for RELIABILITY L15/P20, `--shutdown-timeout` for
L10/L11, the connection caps for L16), and a server reachable from other machines without API keys
says so at start-up.

`pipeline()` runs for real down to its logging; the model load (`Pipeline`) and uvicorn are
replaced by test doubles."""

from __future__ import annotations

import io
import logging
import sys

import pytest
from fake_pipeline import FakePipeline

import vlmdeploy.frontend.pipeline as pipeline_module
import vlmdeploy.serve.server as server_module
from vlmdeploy.cli.main import main
from vlmdeploy.serve.config import ServerConfig
from vlmdeploy.serve.server import is_loopback, warn_if_exposed


@pytest.fixture
def restore_logging():
    logger = logging.getLogger("vlmdeploy")
    level = logger.level
    yield logger
    logger.setLevel(level)


@pytest.fixture
def launched(monkeypatch, restore_logging):
    """`main` down to the server start, through the real `pipeline()`; records the vlmdeploy
    logger's level when the server would start and what Pipeline was given."""
    seen: dict = {}

    def fake_pipeline_class(model_path, backend_config=None, **kwargs):
        seen.update(model=model_path, kwargs=kwargs)
        return FakePipeline()

    def fake_serve(pipe, config, media_policy=None):
        seen.update(config=config, level=logging.getLogger("vlmdeploy").getEffectiveLevel())
        return 0

    monkeypatch.setattr(pipeline_module, "Pipeline", fake_pipeline_class)
    monkeypatch.setattr(server_module, "serve", fake_serve)
    return seen


@pytest.mark.parametrize("level", ["DEBUG", "INFO", "ERROR"])
def test_log_level_flag_wins_over_the_pipeline_default(launched, level):
    assert main(["serve", "api_server", "/models/x", "--log-level", level]) == 0
    assert launched["level"] == getattr(logging, level)


def test_python_users_still_set_the_level_through_pipeline(monkeypatch, restore_logging):
    monkeypatch.setattr(pipeline_module, "Pipeline", lambda *a, **k: FakePipeline())
    pipeline_module.pipeline("/models/x", log_level="INFO")
    assert restore_logging.level == logging.INFO
    pipeline_module.pipeline("/models/x", log_level="ERROR")
    assert restore_logging.level == logging.ERROR


def test_chat_log_level_reaches_the_pipeline(monkeypatch, restore_logging):
    import vlmdeploy.cli.chat as chat_cli

    seen = {}

    def fake_pipeline(model, backend_config=None, log_level="WARNING", **kwargs):
        seen["log_level"] = log_level
        return FakePipeline()

    monkeypatch.setattr("vlmdeploy.pipeline", fake_pipeline, raising=False)
    monkeypatch.setattr(chat_cli, "chat_loop", lambda *a, **k: 0)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["chat", "/models/x", "--log-level", "debug"]) == 0
    assert seen["log_level"] == "DEBUG"


def test_reliability_flags_reach_the_server_and_the_pipeline(launched):
    assert main(["serve", "api_server", "/models/x", "--max-prompt-chars", "5000",
                 "--shutdown-timeout", "2.5", "--max-connections", "100",
                 "--max-connections-per-client", "10"]) == 0
    config: ServerConfig = launched["config"]
    assert (config.max_prompt_chars, config.shutdown_timeout) == (5000, 2.5)
    assert (config.max_connections, config.max_connections_per_client) == (100, 10)
    assert launched["kwargs"]["max_prompt_chars"] == 5000


def test_reliability_defaults(launched):
    assert main(["serve", "api_server", "/models/x"]) == 0
    config: ServerConfig = launched["config"]
    assert config.max_prompt_chars is None and config.shutdown_timeout == 30.0
    assert launched["kwargs"]["max_prompt_chars"] is None  # 16 x session_len, in the pipeline


@pytest.mark.parametrize("args", [["--shutdown-timeout", "-1"], ["--max-prompt-chars", "0"],
                                  ["--max-connections", "-5"]])
def test_bad_reliability_values_exit_2(launched, args):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "api_server", "/models/x", *args])
    assert exc.value.code == 2


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.0.0.5", False),
    ("example.com", False),
])
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) == loopback


@pytest.mark.parametrize("host,keys,warned", [
    ("0.0.0.0", None, True), ("10.0.0.5", None, True), ("::", None, True),
    ("0.0.0.0", ("sk-1",), False), ("127.0.0.1", None, False), ("localhost", None, False),
])
def test_a_server_open_to_the_network_without_keys_warns(caplog, host, keys, warned):
    caplog.set_level(logging.WARNING, logger="vlmdeploy.serve")
    warn_if_exposed(ServerConfig(server_name=host, api_keys=keys))
    assert ("without API keys" in caplog.text) == warned


def test_serve_warns_at_start_up(monkeypatch, caplog):
    import uvicorn

    caplog.set_level(logging.WARNING, logger="vlmdeploy.serve")
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)
    assert server_module.serve(FakePipeline(), ServerConfig(server_name="0.0.0.0")) == 0
    assert "without API keys" in caplog.text
