"""`jaxserve bench serve|offline|batching`: the scripts reached from the installed command,
arguments passed through, `--json` to a file or stdout; `serve` against a real server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from jaxserve import bench, cli
from jaxserve.config import ServerConfig
from jaxserve.server import Bridge
from tests.conftest import assert_engine_idle
from tests.http_server import run_server

FAKE_SCRIPT = """
import argparse, json, sys

def main({signature}):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args({argv})
    print(f"summary: n={{args.n}}")
    if args.out:
        open(args.out, "w").write(json.dumps({{"n": args.n, "argv": sys.argv[1:]}}))
"""


@pytest.fixture(params=["argv", "sys.argv"])
def fake_script(request, tmp_path) -> Path:
    """A script whose main takes argv, or (as bench_offline's) reads sys.argv."""
    takes_argv = request.param == "argv"
    path = tmp_path / f"fake_bench_{request.param.replace('.', '_')}.py"
    path.write_text(
        FAKE_SCRIPT.format(
            signature="argv=None" if takes_argv else "", argv="argv" if takes_argv else ""
        )
    )
    return path


def test_summary_then_json_to_a_file_or_stdout(fake_script, tmp_path, capsys):
    bench.run_script(fake_script, ["--n", "3"], None)
    assert capsys.readouterr().out == "summary: n=3\n"
    out = tmp_path / "r.json"
    bench.run_script(fake_script, ["--n", "4"], str(out))
    assert json.loads(out.read_text())["n"] == 4
    assert capsys.readouterr().out == "summary: n=4\n"
    bench.run_script(fake_script, ["--n", "5"], "-")
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n"] == 5  # stdout: the JSON alone
    assert "summary: n=5" in captured.err


def test_help_and_pass_through(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(kind in out for kind in ("serve", "offline", "batching"))
    with pytest.raises(SystemExit) as exc:  # the script's own --help
        cli.main(["bench", "offline", "--help"])
    assert exc.value.code == 0
    assert "--concurrency" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["serve", "--concurrency", "4"])  # other commands forward nothing


def test_missing_scripts_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "SCRIPTS_DIR", tmp_path)
    assert cli.main(["bench", "serve"]) == 2
    assert "needs the source tree" in capsys.readouterr().err


@pytest.fixture
def url(engine) -> Iterator[str]:
    bridge = Bridge(engine)
    bridge.start()
    try:
        with run_server(bridge, ServerConfig()) as url:
            yield url
    finally:
        bridge.stop()
    assert_engine_idle(engine)


def test_bench_serve_against_a_real_server(url, capsys):
    args = ["--base-url", url, "--num-prompts", "4", "--concurrency", "2", "--input-len", "8"]
    args += ["--output-len", "4", "--ignore-eos", "--no-progress"]
    assert cli.main(["bench", "serve", *args, "--json", "-"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["summary"]["completed"] == 4 and report["summary"]["output_tokens"] == 16
    assert "output tok/s" in captured.err  # the one-screen summary
