"""Smoke tests of the benchmark scripts on tiny workloads: they run and report every field.

Benchmarks are not tests: nothing here asserts a speed. The session's warmed engine is reused;
bench_serving runs against a real in-thread server over it.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from jaxserve.config import ServerConfig
from jaxserve.server import Bridge, create_app
from tests.conftest import assert_engine_idle

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_batching  # noqa: E402
import bench_offline  # noqa: E402
import bench_peers  # noqa: E402
import bench_serving  # noqa: E402

LATENCY_KEYS = {"mean", "median", "p90", "p99"}


# ---- bench_serving: pure parts -----------------------------------------------------------
def test_synthetic_prompts_match_bench_offline():
    for dataset in ("fixed", "mixed"):
        ours = bench_serving.synthetic_prompts(12, 32, 16, dataset, 7, token_ids=True)
        ids, outs = bench_offline.make_prompts(12, 32, 16, dataset, 49152, 7)
        assert [p.prompt for p in ours] == ids
        assert [p.output_len for p in ours] == outs
    words = bench_serving.synthetic_prompts(3, 10, 5, "fixed", 0, token_ids=False)
    assert all(len(p.prompt.split()) == 10 and p.messages for p in words)


def test_jsonl_dataset(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "hello there", "output_len": 5},
        {"prompt": [1, 2, 3]},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts = bench_serving.jsonl_prompts(str(path), default_output_len=9)
    assert [p.output_len for p in prompts] == [5, 9, 7]
    assert prompts[1].input_len == 3 and prompts[0].messages[0]["content"] == "hello there"


def test_summarize_percentiles_and_failures():
    R = bench_serving.RequestResult
    results = [
        R(ok=True, ttft_s=0.1, e2e_s=1.1, itl_s=[0.1] * 10, prompt_tokens=4, output_tokens=11),
        R(ok=True, ttft_s=0.3, e2e_s=0.3, prompt_tokens=4, output_tokens=1),
        R(ok=False, error="HTTP 500: boom"),
    ]
    s = bench_serving.summarize(results, duration_s=2.0)
    assert (s["completed"], s["failed"], s["errors"]) == (2, 1, ["HTTP 500: boom"])
    assert s["output_tok_per_s"] == 6.0 and s["total_tok_per_s"] == 10.0
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert s["tpot_ms"]["mean"] == pytest.approx(100.0)  # (1.1 - 0.1) / 10; 1-token rows skip
    assert s["itl_ms"]["p99"] == pytest.approx(100.0)


# ---- bench_serving against the real server -----------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server_url(engine) -> Iterator[str]:
    """uvicorn in a thread over the session engine, as in test_server.py; idle afterwards."""
    bridge = Bridge(engine)
    bridge.start()
    port = _free_port()
    app = create_app(bridge, ServerConfig(), "smollm2-135m")
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        bridge.stop()
    assert_engine_idle(engine)


def test_bench_serving_completions_and_chat(server_url, tmp_path):
    out = tmp_path / "serving.json"
    argv = [
        "--base-url", server_url, "--num-prompts", "6", "--concurrency", "3",
        "--dataset", "mixed", "--input-len", "12", "--output-len", "4", "--ignore-eos",
        "--no-progress", "--out", str(out),
    ]  # fmt: skip
    summary = bench_serving.main(argv)
    report = json.loads(out.read_text())
    assert report["summary"] == json.loads(json.dumps(summary))
    want = bench_serving.synthetic_prompts(6, 12, 4, "mixed", 0, token_ids=True)
    assert (summary["completed"], summary["failed"]) == (6, 0)
    # ignore_eos: exactly the asked-for tokens, counted from the usage chunk.
    assert summary["output_tokens"] == sum(p.output_len for p in want)
    assert summary["input_tokens"] == sum(len(p.prompt) for p in want)
    assert [r["output_tokens"] for r in report["requests"]] == [p.output_len for p in want]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(summary[key]) == LATENCY_KEYS and summary[key]["mean"] > 0
    assert summary["model"] == "smollm2-135m" and summary["concurrency"] == 3
    for key in ("duration_s", "request_per_s", "output_tok_per_s", "total_tok_per_s"):
        assert summary[key] > 0

    chat = bench_serving.synthetic_prompts(3, 8, 3, "fixed", 1, token_ids=False)
    summary, results = asyncio.run(
        bench_serving.run_benchmark(
            server_url, chat, endpoint="chat", request_rate=20.0, ignore_eos=True, progress=False
        )
    )
    assert (summary["completed"], summary["output_tokens"]) == (3, 9)
    assert all(r.prompt_tokens > 8 and r.text for r in results)  # the chat template adds tokens


# ---- bench_offline and bench_batching in-process ------------------------------------------
def test_bench_offline_run_once(llm):
    prompts, outs = bench_offline.make_prompts(4, 8, 3, "mixed", 49152, 0)
    r = bench_offline.run_once(llm, prompts, outs)
    assert r["num_requests"] == 4 and r["output_tokens"] == sum(outs)
    assert 0 < r["slot_utilisation"] <= 1 and r["output_tok_per_s"] > 0
    assert set(r["breakdown_s"]) == {"schedule", "prefill_device", "decode_device", "postprocess"}
    assert_engine_idle(llm.engine)


def test_bench_batching_both_policies(engine, tmp_path):
    scenarios = [
        # More requests than the 32 slots, so static runs two batches.
        bench_batching.Scenario("uniform", "outputs in [2, 5]", 40, 8, 5, "uniform", min_output=2),
        bench_batching.Scenario("mixed", "long-tailed outputs", 10, 8, 2, "mixed"),
    ]
    before = engine.stats
    results = bench_batching.run_scenarios(engine, scenarios)
    assert engine.stats is before and engine.cfg.scheduler.policy == "continuous"
    # The twin shared the runner's KV pages: nothing may stay cached that it overwrote.
    cache = engine.scheduler.prefix_cache
    assert cache is None or cache.num_pages == 0
    assert_engine_idle(engine)
    # "Sustained" (while requests queued) needs more requests than slots; 10 all fit at once.
    assert results[0]["sustained_ratio"] > 0 and math.isnan(results[1]["sustained_ratio"])
    for res in results:
        assert res["ratio"] > 0
        for policy in ("static", "continuous"):
            run = res["runs"][policy]
            assert run["policy"] == policy
            assert run["output_tokens"] == res["output_tokens"]
            assert 0 < run["slot_utilisation"] <= run["row_utilisation"] <= 1
            assert run["compiles_during_run"] == 0
            assert run["steps"][0]["kind"] == "prefill"
            assert len(run["steps"][0]["slots"]) == run["num_slots"]
            shares = [b["time_share"] for b in run["decode_buckets"].values()]
            assert sum(shares) == pytest.approx(1.0)
    # Static admits a new batch only when the last one is done: never a prefill mid-batch.
    static = results[0]["runs"]["static"]
    starts = 0
    for prev, step in zip(static["steps"], static["steps"][1:], strict=False):
        if step["kind"] == "prefill" and prev["kind"] == "decode":
            assert not {r for r in prev["slots"] if r >= 0} & set(step["slots"])
            starts += 1
    assert starts == 1
    paths = bench_batching.write_outputs(results, tmp_path)
    assert [p.name for p in paths] == [
        "batching_timeline_uniform.png",
        "batching_timeline_mixed.png",
        "batching_summary.png",
    ]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_bench_peers_plot(tmp_path):
    row = {"output_tok_per_s": 10.0}
    results = {e: {"mixed": row, "fixed": row} for e in ("jaxserve", "llama.cpp")}
    bench_peers.plot(results, ["mixed", "fixed"], tmp_path / "peers.png")
    assert (tmp_path / "peers.png").stat().st_size > 10_000


def test_bench_batching_paired(engine, tmp_path):
    """--paired: static gets its own runner and the two runs interleave step by step."""
    from jaxserve.config import load_config
    from jaxserve.engine import Engine
    from tests.conftest import TEST_CONFIG

    static = Engine.from_config(load_config(TEST_CONFIG, scheduler={"policy": "static"}))
    sc = bench_batching.Scenario("mixed", "long-tailed outputs", 36, 8, 2, "mixed", seed=3)
    (res,) = bench_batching.run_scenarios(engine, [sc], static_engine=static)
    assert res["paired"]
    for policy, e in (("continuous", engine), ("static", static)):
        run = res["runs"][policy]
        assert run["output_tokens"] == res["output_tokens"] and run["compiles_during_run"] == 0
        # Each run's clock is its own steps back to back.
        ends = [st["end"] for st in run["steps"]]
        assert ends == sorted(ends) and run["wall_s"] == pytest.approx(ends[-1])
        assert_engine_idle(e)
    bench_batching.write_outputs([res], tmp_path, prefix="paired")
    assert (tmp_path / "paired_timeline_mixed.png").exists()


# ---- scripts/device_check.sh ------------------------------------------------------------
def test_device_check_dry_run_passes_on_cpu(tmp_path):
    """The accelerator check's own smoke run (`--dry-run`: tiny random model, interpret-mode
    kernels, small sizes; ~25 s): every step succeeds, the JSON reports parse, and the
    server's metrics say no kernel fell back."""
    import os
    import subprocess

    out = tmp_path / "check"
    env = {**os.environ, "PORT": str(_free_port())}
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "device_check.sh"), "--dry-run", "--out", str(out)],
        cwd=SCRIPTS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [line.split()[1].rstrip(":") for line in summary.splitlines() if line.startswith("==")]
    for name in ("kernel_tests", "bench_kernels", "bench_offline", "bench_serving"):
        assert name in steps, steps
    assert summary.count("rc=0") == len(steps) - 1  # every step; the last line is the result
    offline = json.loads((out / "bench_offline.json").read_text())["results"]
    assert offline and all(r["kernel_fallbacks"] == 0 for r in offline)
    assert json.loads((out / "bench_serving.json").read_text())
    assert "jaxserve_kernel_fallbacks_total 0.0" in (out / "metrics.txt").read_text()
