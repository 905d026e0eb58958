"""Multi-host serving (jaxserve/multihost.py): two real `jaxserve serve` processes joined by
jax.distributed (gloo on CPU, coordinator on localhost), tp=2 across them, one device each.

Process 0 serves HTTP; its greedy tokens must be those of one process on one device, nothing
may compile after warm-up, and a follower killed mid-request must end process 0 non-zero
within a bounded time. The Leader's failure paths are also checked in-process on fakes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from jaxserve import cli
from jaxserve.config import DistributedConfig, EngineConfig, ModelConfig
from jaxserve.multihost import Channel, Leader, MultihostError, Op, check_mesh_spans_processes
from jaxserve.weights.random_model import byte_tokenizer
from tests.http_server import free_port
from tests.tiny_model import save_hf_dir, tiny_params

REPO = Path(__file__).resolve().parents[1]
# 4 query / 2 KV heads: tp=2 splits both. 257 byte tokens + EOS fit the vocab.
MODEL = ModelConfig(
    vocab_size=320,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    eos_token_ids=(256,),
)
ENGINE_FLAGS = [
    "--num-pages", "160", "--page-size", "4", "--max-running-requests", "4",
    "--max-prefill-tokens", "32", "--prefill-block", "8", "--prefill-buckets", "32",
    "--decode-batch-buckets", "4", "--max-prefill-seqs", "4", "--max-model-len", "512",
    "--mixed-step-tokens", "16",
]  # fmt: skip
PROMPTS = [[72, 101, 108, 108, 111], list(range(40, 80)), [7] * 3]  # 40 tokens: chunked
MAX_TOKENS = 24
START_TIMEOUT_S = 90.0
EXIT_TIMEOUT_S = 20.0  # a killed follower -> process 0 gone within this


def save_model(path: Path) -> Path:
    """The tiny Llama as a Hugging Face directory: config, safetensors, byte tokenizer."""
    save_hf_dir(path, MODEL, tiny_params(MODEL, seed=1))
    (path / "tokenizer.json").write_text(byte_tokenizer().backend.to_str())
    return path


# ---- flags and environment -----------------------------------------------------------------
def test_distributed_flags_and_environment(monkeypatch):
    parse = cli.build_parser().parse_args
    monkeypatch.setenv("JAXSERVE_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("JAXSERVE_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAXSERVE_PROCESS_ID", "3")
    cfg, _ = cli._engine_config(parse(["serve"]))
    assert cfg.distributed == DistributedConfig("10.0.0.1:1234", 4, 3)
    flags = ["serve", "--coordinator", "h:9", "--num-processes", "2", "--process-id", "1"]
    cfg, _ = cli._engine_config(parse([*flags, "--keepalive-s", "0.5", "--step-timeout-s", "9"]))
    assert cfg.distributed == DistributedConfig("h:9", 2, 1, 0.5, 9.0)  # flags beat the env
    monkeypatch.setenv("JAXSERVE_PROCESS_ID", "one")
    with pytest.raises(cli.UserError, match="JAXSERVE_PROCESS_ID='one'"):
        cli._engine_config(parse(["serve"]))


def test_the_mesh_must_span_every_process():
    check_mesh_spans_processes(EngineConfig())  # one device here: tp = dp = 1 spans it
    with pytest.raises(MultihostError, match=r"tp=2 x dp=1 must use all 1 devices of the 1 "):
        check_mesh_spans_processes(EngineConfig(tp=2))


# ---- the Leader on fakes (no second process) -------------------------------------------------
def test_channel_frames_round_trip_inline_and_overflowing():
    """Process 0's broadcasts (real, over a one-process mesh) replayed to a follower."""
    sender, receiver = Channel(frame_bytes=64), Channel(frame_bytes=64)
    receiver.is_source = False
    wire: list[np.ndarray] = []
    broadcast = sender._broadcast
    sender._broadcast = lambda data: wire.append(broadcast(data)) or wire[-1]  # type: ignore

    def replay(zeros: np.ndarray) -> np.ndarray:
        got = wire.pop(0)
        assert got.shape == zeros.shape and got.dtype == zeros.dtype
        return got

    receiver._broadcast = replay  # type: ignore[method-assign]
    for op, payload in [(Op.PING, b""), (Op.RUN, b"x" * 40), (Op.RUN, bytes(range(256)) * 9)]:
        sender.send(op, payload)
        assert len(wire) == (2 if len(payload) > 40 else 1)  # 64-byte frame: 40 inline
        assert receiver.receive() == (op, payload) and not wire
    sender.seq += 1  # a lost message is an error, not a silent mix-up
    sender.send(Op.PING)
    with pytest.raises(MultihostError, match="message 4 from process 0, expected 3"):
        receiver.receive()


class FakeChannel:
    def __init__(self, fail_at: int | None = None):
        self.sent: list[Op] = []
        self.fail_at = fail_at

    def send(self, op: Op, payload: bytes = b"") -> None:
        if len(self.sent) == self.fail_at:
            raise ValueError("Gloo all-reduce failed: Connection closed by peer")
        self.sent.append(op)


@dataclass
class FakeRunner:
    cfg: EngineConfig = EngineConfig()
    num_compiles: int = 3
    step_s: float = 0.0

    def run(self, decode, prefill, allowed=None):
        time.sleep(self.step_s)
        return ("ran", decode, prefill, allowed)

    def permute_slots(self, perm):
        return None

    def reset_if_invalid(self) -> bool:
        raise AssertionError("no device work after the job is lost")


def leader(channel: FakeChannel, runner: FakeRunner, **cfg) -> tuple[Leader, list[str]]:
    lost: list[str] = []
    lead = Leader(runner, DistributedConfig("h:1", 2, 0, **cfg), channel)  # type: ignore[arg-type]
    lead.on_failure = lost.append
    return lead, lost


def test_a_failed_broadcast_is_reported_once_and_ends_the_job():
    channel = FakeChannel(fail_at=2)
    lead, lost = leader(channel, FakeRunner())
    lead.send_config()
    assert lead.run("d", None) == ("ran", "d", None, None)
    assert lead.num_compiles == 3  # the runner's attributes, but not its other methods:
    with pytest.raises(MultihostError, match=r"runner.reset_if_invalid\(\) is not broadcast"):
        lead.__getattr__("reset_if_invalid")
    with pytest.raises(MultihostError, match="RUN failed: ValueError: .*Connection closed"):
        lead.run("d", "p", allowed="m")
    assert lost == ["multi-host RUN failed: ValueError: Gloo all-reduce failed: Connection "
                    "closed by peer"]  # fmt: skip
    with pytest.raises(MultihostError, match="RUN failed"):
        lead.permute_slots(np.arange(4))
    assert lead.reset_if_invalid() is False
    lead.stop()  # no STOP to the followers of a lost job
    assert channel.sent == [Op.CONFIG, Op.RUN] and len(lost) == 1


def test_idle_followers_are_pinged_and_a_stuck_step_is_reported():
    channel = FakeChannel()
    lead, lost = leader(channel, FakeRunner(step_s=1.0), keepalive_s=0.1, step_timeout_s=0.5)
    lead.watch()
    time.sleep(0.8)
    assert channel.sent.count(Op.PING) >= 2 and not lost
    lead.run(None, "p")  # the watchdog sees it in flight past step_timeout_s
    assert lost and "has not finished in step_timeout_s=0.5 s" in lost[0]
    lead.stop()
    assert Op.STOP not in channel.sent


def test_stop_tells_the_followers():
    channel = FakeChannel()
    lead, lost = leader(channel, FakeRunner())
    lead.watch()
    lead.stop()
    assert channel.sent[-1] is Op.STOP and not lost


# ---- two real processes ----------------------------------------------------------------------
@dataclass
class Job:
    url: str
    procs: list[subprocess.Popen]
    logs: list[Path]

    def log(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("multihost") / "model")


@contextmanager
def two_processes(
    model: Path, tmp_path: Path, *flags: str, mesh: tuple[str, ...] = ("--tp", "2")
) -> Iterator[Job]:
    port, coord = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1", "PYTHONUNBUFFERED": "1"}
    procs, logs = [], []
    for pid in range(2):
        logs.append(tmp_path / f"process{pid}.log")
        args = [
            sys.executable, "-m", "jaxserve.cli", "serve", "--model", str(model), *mesh,
            *ENGINE_FLAGS, "--port", str(port), "--log-level", "warning",
            "--served-model-name", "m", "--coordinator", f"127.0.0.1:{coord}",
            "--num-processes", "2", "--process-id", str(pid), "--keepalive-s", "0.5", *flags,
        ]  # fmt: skip
        with logs[-1].open("w") as out:
            procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=out))
    job = Job(f"http://127.0.0.1:{port}", procs, logs)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), job.log(0) + job.log(1)
            try:
                if httpx.get(job.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        else:
            pytest.fail("not ready in time:\n" + job.log(0) + job.log(1))
        yield job
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)


def complete(url: str, prompt: list[int]) -> dict:
    body = {"model": "m", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "logprobs": 1, "ignore_eos": True}  # fmt: skip
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def reference(model: Path) -> list[tuple[str, list[float]]]:
    """One process, one device: the same engine settings, tp=1."""
    from jaxserve.engine import Engine
    from jaxserve.jaxutil import enable_compilation_cache
    from jaxserve.llm import LLM
    from jaxserve.request import SamplingParams

    args = cli.build_parser().parse_args(["serve", "--model", str(model), *ENGINE_FLAGS])
    cfg, _ = cli._engine_config(args)
    enable_compilation_cache()
    llm = LLM(engine=Engine.from_config(cfg))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    return [(o.text, [lp.logprob for lp in o.logprobs or []]) for o in outs]


@pytest.fixture(scope="module")
def want(model: Path) -> list[tuple[str, list[float]]]:
    return reference(model)


def assert_serves_the_reference(job: Job, want: list[tuple[str, list[float]]]) -> None:
    """Concurrent greedy requests (prefill chunks, decode and, timing allowing, MIXED steps)
    give one process's text and logprobs, and nothing compiles after warm-up."""
    compiled = metric(job.url, "jaxserve_compiles_total")
    assert compiled == metric(job.url, "jaxserve_step_functions")
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(lambda prompt: complete(job.url, prompt), PROMPTS))
    for (text, logprobs), choice in zip(want, got, strict=True):
        assert choice["text"] == text
        np.testing.assert_allclose(choice["logprobs"]["token_logprobs"], logprobs, atol=1e-4)
    assert metric(job.url, "jaxserve_compiles_total") == compiled  # nothing after warm-up
    for mode in ("extend", "decode"):
        assert metric(job.url, f'jaxserve_forward_steps_total{{mode="{mode}"}}') > 0


def test_two_processes_serve_one_process_tokens_and_die_together(model, want, tmp_path):
    with two_processes(model, tmp_path) as job:
        assert_serves_the_reference(job, want)

        # The follower dies mid-request: the request fails, process 0 exits non-zero.
        body = {"model": "m", "prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0.0,
                "ignore_eos": True, "stream": True}  # fmt: skip
        with httpx.stream("POST", job.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # streaming
            job.procs[1].send_signal(signal.SIGKILL)
            t0 = time.monotonic()
            rest = "\n".join(lines)
        assert '"error"' in rest and "multi-host RUN failed" in rest, rest[-500:]
        rc = job.procs[0].wait(EXIT_TIMEOUT_S)
        took = time.monotonic() - t0
        assert rc == 1, job.log(0)
        log0 = job.log(0)
        assert "multi-host RUN failed" in log0 and "stopping the server" in log0, log0
        print(f"process 0 exited {rc} {took:.1f} s after the follower was killed")


def test_a_stopped_follower_is_reported_after_step_timeout(model: Path, tmp_path: Path):
    """SIGSTOP: the follower's sockets stay open, so process 0's next ping waits for ever;
    the deadline thread reports it and process 0 exits although a thread is still blocked.
    Then SIGCONT: the follower finds process 0 gone and exits non-zero."""
    with two_processes(model, tmp_path, "--step-timeout-s", "3") as job:
        job.procs[1].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        rc = job.procs[0].wait(EXIT_TIMEOUT_S)
        took = time.monotonic() - t0
        assert rc == 1, job.log(0)
        assert 3 <= took < 3 + EXIT_TIMEOUT_S / 2, took
        assert "has not finished in step_timeout_s=3 s" in job.log(0), job.log(0)
        # Resumed, the follower finds process 0 gone and exits non-zero by itself.
        job.procs[1].send_signal(signal.SIGCONT)
        assert job.procs[1].wait(EXIT_TIMEOUT_S) != 0, job.log(1)


def test_dp_across_processes_serves_one_process_tokens_and_sigterm_stops_both(
    model, want, tmp_path
):
    """dp=2 with one group on each process: each group's sampled tokens come back to process
    0 (the step's outputs are replicated), the text is one device's; SIGTERM on process 0
    then ends both processes with exit 0."""
    with two_processes(model, tmp_path, mesh=("--dp", "2")) as job:
        assert_serves_the_reference(job, want)
        job.procs[0].send_signal(signal.SIGTERM)
        assert job.procs[0].wait(EXIT_TIMEOUT_S) == 0, job.log(0)
        assert job.procs[1].wait(EXIT_TIMEOUT_S) == 0, job.log(1)


def test_process_0_fails_requests_and_health_when_a_follower_is_lost():
    """The whole process-0 path in-process: engine, Leader, Bridge and HTTP, with a channel
    whose third broadcast fails as gloo does when a follower is gone."""
    from jaxserve.config import CacheConfig, SchedulerConfig, ServerConfig
    from jaxserve.engine import Engine
    from jaxserve.multihost import fail_server
    from jaxserve.server import Bridge
    from tests.fake_model import FAKE_MODEL, FakeTokenizer
    from tests.fake_model import FakeRunner as HostRunner
    from tests.http_server import MODEL as SERVED
    from tests.http_server import run_server

    sched = SchedulerConfig(
        max_running_requests=4,
        max_prefill_tokens=32,
        prefill_buckets=(32,),
        decode_batch_buckets=(4,),
        max_model_len=64,
    )
    cfg = EngineConfig(cache=CacheConfig(page_size=4, num_pages=64), scheduler=sched)
    lead = Leader(HostRunner(64, 4, 4), DistributedConfig("h:1", 2, 0), FakeChannel(fail_at=3))
    engine = Engine(cfg, FAKE_MODEL, FakeTokenizer(), lead)  # type: ignore[arg-type]
    bridge = Bridge(engine)
    lead.on_failure = lambda why: fail_server(bridge, why)
    bridge.start()
    body = {"model": SERVED, "prompt": [1, 2, 3], "max_tokens": 20, "ignore_eos": True}
    try:
        with run_server(bridge, ServerConfig()) as url:
            r = httpx.post(url + "/v1/completions", json=body, timeout=30)
            assert r.status_code == 500 and "RUN failed" in r.text, r.text
            health = httpx.get(url + "/health", timeout=10)
            assert health.status_code == 500 and "Connection closed" in health.json()["error"]
            again = httpx.post(url + "/v1/completions", json=body, timeout=30)
            assert again.status_code == 503, again.text
    finally:
        bridge.stop()


# ---- --coordinator auto: the cluster's settings, read by jax -------------------------------
AUTO_WORKER = """
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from jaxserve.config import DistributedConfig
from jaxserve.multihost import initialize
cfg = initialize(DistributedConfig(coordinator="auto"))
total = multihost_utils.process_allgather(jnp.asarray([cfg.process_id + 1]))  # a real collective
print("RESULT", cfg.process_id, cfg.num_processes, jax.device_count(), int(np.sum(total)))
"""


def slurm_env(job_id: int, ntasks: int, procid: int) -> dict[str, str]:
    """What `srun` sets for one task of a one-node job (what jax's SlurmCluster reads)."""
    return {
        "SLURM_JOB_ID": str(job_id),
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid),
        "SLURM_STEP_NUM_NODES": "1",
    }


def test_coordinator_auto_reads_the_cluster_and_joins_its_processes():
    """Two processes under a SLURM job's environment, `coordinator = "auto"`: each learns its
    id and the count from the cluster, and a cross-process collective sums over both."""
    # jax picks the port from the job id (in 61440-65535): one that is free now.
    job_id = next(j for j in range(4096) if _port_free(61440 + j)) + 4096 * 7
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "XLA_FLAGS"))}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", AUTO_WORKER],
            env={**env, **slurm_env(job_id, 2, i), "JAX_PLATFORMS": "cpu"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    lines = [line.split() for out, _ in outs for line in out.splitlines()]
    results = sorted(words[1:] for words in lines if words[:1] == ["RESULT"])
    assert results == [["0", "2", "2", "3"], ["1", "2", "2", "3"]]


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_coordinator_auto_outside_a_cluster_is_a_clear_error():
    code = (
        "from jaxserve.config import DistributedConfig\n"
        "from jaxserve.multihost import initialize\n"
        "initialize(DistributedConfig(coordinator='auto'))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_"))}
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert r.returncode != 0
    assert "--coordinator auto: no cluster jax can detect" in r.stderr, r.stderr[-2000:]
