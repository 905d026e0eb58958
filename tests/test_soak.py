"""scripts/soak.py for seconds against a real in-thread server with the fault hook on: the
injected step failures come back as 500s, nothing else does, nothing is lost or leaks."""

from __future__ import annotations

import sys
from pathlib import Path

from jaxserve.config import ServerConfig
from jaxserve.faults import FaultInjector, InjectedFault
from jaxserve.server import Bridge
from tests.conftest import assert_engine_idle
from tests.http_server import run_server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import soak  # noqa: E402


def test_fault_injector_fails_every_nth_run():
    class Runner:
        num_compiles = 3

        def run(self, *args):
            return args

    f = FaultInjector(Runner(), every=3)
    assert f.run(1) == (1,) and f.run(2) == (2,) and f.num_compiles == 3
    try:
        f.run(3)
    except InjectedFault as exc:
        assert "#1" in str(exc)
    else:
        raise AssertionError("the third run did not fail")
    assert f.run(4) == (4,) and f.num_injected == 1


def test_short_soak_with_faults_loses_nothing(engine, tmp_path):
    injector = FaultInjector(engine.runner, every=5)
    engine.runner = injector
    bridge = Bridge(engine)
    bridge.start()
    try:
        with run_server(bridge, ServerConfig()) as url:
            report = soak.main(
                ["--base-url", url, "--rate", "4", "--overload", "1", "--minutes", "0.25"]
                + ["--max-tokens", "12", "--sample-every-s", "1", "--seed", "3"]
                + ["--out", str(tmp_path / "soak.json")]
            )
    finally:
        bridge.stop()
        engine.runner = injector.runner
    assert_engine_idle(engine)
    assert report["passed"], {k: v for k, v in report.items() if k != "samples"}
    assert report["sent"] >= 20 and report["lost"] == 0
    assert injector.num_injected > 0 and report["injected_faults_seen"] > 0
    assert all(report["by_kind"][k] > 0 for k in soak.KINDS)
    assert report["end"]["pages_held_by_requests"] == 0
