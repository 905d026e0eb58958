"""`jaxserve generate` / `chat` as real subprocesses, and the CLI's error paths.

The `serve` subprocess (SIGTERM, graceful shutdown) is exercised in tests/test_server.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jaxserve.cli import build_parser, main
from jaxserve.flags import given_flags
from jaxserve.request import SamplingParams
from tests.conftest import TEST_CONFIG

ROOT = Path(__file__).resolve().parent.parent


def jaxserve(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "jaxserve.cli", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_generate_prints_the_greedy_completion(llm):
    prompt = "The capital of France is"
    want = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0))[0].text
    r = jaxserve(
        "generate", prompt, "--config", str(TEST_CONFIG), "--max-tokens", "12", "--temperature", "0"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"


def test_chat_interactive_two_turns(llm):
    first = [{"role": "user", "content": "Hi! What is 2 + 2?"}]
    params = SamplingParams(max_tokens=10, temperature=0.0)
    reply = llm.chat(first, params)[0].text
    second = [
        *first,
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    reply2 = llm.chat(second, params)[0].text
    r = jaxserve(
        "chat",
        "--config",
        str(TEST_CONFIG),
        "--max-tokens",
        "10",
        "--temperature",
        "0",
        stdin="Hi! What is 2 + 2?\nAnd 3 + 3?\n",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"> {reply}\n> {reply2}\n> \n"


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_missing_model_is_one_line_and_exit_2(command, capsys):
    args = [command, "--model", "/no/such/model.gguf"]
    args += ["hello"] if command == "generate" else []
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: model '/no/such/model.gguf'")


def test_corrupt_model_file_exit_2(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    r = jaxserve("generate", "hi", "--model", str(bad))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in r.stderr


def test_bad_config_and_parameters_exit_2(tmp_path, capsys):
    assert main(["generate", "hi", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read config" in capsys.readouterr().err


def test_serve_arguments():
    args = build_parser().parse_args(
        [
            "serve",
            "--port",
            "9000",
            "--api-key",
            "k",
            "--served-model-name",
            "m",
            "--max-waiting",
            "5",
            "--shutdown-timeout",
            "2.5",
        ]
    )
    flags = dict(given_flags(args))
    assert (flags["server.port"], flags["server.api_key"]) == (9000, "k")
    assert flags["server.served_model_name"] == "m"
    assert (flags["scheduler.max_waiting"], flags["server.shutdown_timeout_s"]) == (5, 2.5)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--port", "many"])


def test_server_config_flags_and_env(monkeypatch):
    from jaxserve.cli import server_config
    from jaxserve.config import load_config

    cfg = load_config(TEST_CONFIG)
    parse = build_parser().parse_args
    monkeypatch.setenv("JAXSERVE_API_KEY", "from-env")
    s = server_config(parse(["serve", "--port", "1234", "--shutdown-timeout", "0"]), cfg)
    assert (s.port, s.api_key, s.shutdown_timeout_s, s.host) == (1234, "from-env", 0.0, "127.0.0.1")
    s = server_config(parse(["serve", "--api-key", "flag", "--served-model-name", "m"]), cfg)
    assert (s.api_key, s.served_model_name, s.port) == ("flag", "m", cfg.server.port)
    monkeypatch.delenv("JAXSERVE_API_KEY")
    assert server_config(parse(["serve"]), cfg).api_key is None


def test_jaxserve_cache_env_and_max_waiting(monkeypatch, tmp_path):
    from jaxserve.cli import _engine_config

    monkeypatch.setenv("JAXSERVE_CACHE", str(tmp_path))
    args = build_parser().parse_args(["serve", "--config", str(TEST_CONFIG), "--max-waiting", "7"])
    cfg, name = _engine_config(args)
    assert (cfg.cache_dir, name, cfg.scheduler.max_waiting) == (str(tmp_path), "smollm2-135m", 7)
    args = build_parser().parse_args(["generate", "x", "--model", "/m.gguf"])
    assert _engine_config(args)[0].model == "/m.gguf"


def test_simulate_subcommand_runs_the_simulator(capsys):
    from jaxserve.cli import main

    assert main(["simulate", "--scenario", "mixed", "--scale", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "continuous / static" in out and "out tok/s" in out
