"""Soak a jaxserve server under overload with faults, and check that nothing is lost or leaks.

Example (20 minutes at 4x what the server serves, a failing step every 500 steps):

    python scripts/soak.py --minutes 20 --overload 4 --fault-every 500 \
        --out out/soak.json --plot docs/img/soak.png

It starts `jaxserve serve` itself (with `JAXSERVE_INJECT_FAULT_EVERY`, a test-only hook that
makes every n-th device step fail, see jaxserve/faults.py), or drives a running server
(`--base-url`, and `--pid` for its memory). First it measures what the server serves
(requests/s at a full batch), then sends Poisson arrivals at `--overload` times that rate:
streamed and plain completions and chats with random lengths, `n`, stop strings and seeds;
clients that disconnect mid-stream; malformed or out-of-range requests. It reports

- 5xx answers other than the injected faults (must be 0),
- requests lost: sent minus answered (an answer is any HTTP status, a stream's end or error
  event, or our own disconnect),
- RSS and KV pages over time (RSS growth after warm-up: last window vs first),
- TTFT and ITL per minute (drift),
- and, after the load stops and the server drains, that no request holds a slot or a page
  (`kv_cache_usage_ratio == 0`, every used page is a prefix-cache page).

A script for people (minutes to hours), not for CI; `tests/test_soak.py` runs it for seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

WORDS = (
    "the of and to in is was for on that with as by at from his her an have not are be this "
    "which or had it but were they one all their there been has more when who will would "
    "river mountain letter garden music engine window story silver market winter doctor"
).split()
BAD_BODIES: list[tuple[str, Any]] = [
    ("completions", "{not json"),
    ("completions", {"prompt": 5}),
    ("completions", {"prompt": "hi", "max_tokens": "lots"}),
    ("completions", {"prompt": "hi", "n": 100000}),
    ("completions", {"prompt": "hi", "temperature": -3}),
    ("completions", {"prompt": "hi", "model": "no-such-model"}),
    ("completions", {"prompt": [[1, 2], "mixed"]}),
    ("completions", {"prompt": "hi", "max_tokens": 10**9}),
    ("chat/completions", {"messages": []}),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}),
    ("chat/completions", {"messages": "hello"}),
    ("completions", {"prompt": "hi", "stop": ["x" * 100000]}),
]


KINDS = ("ok", "stream", "disconnect", "bad")


@dataclass
class Outcome:
    kind: str  # "ok", "stream", "disconnect", "bad"
    start_s: float
    status: int | None = None  # None: no HTTP answer (lost), unless we disconnected
    answered: bool = False
    injected: bool = False  # a 500 (or stream error event) from the fault hook
    error: str = ""
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_request(rng: random.Random, model: str, max_tokens: int) -> tuple[str, str, Any]:
    """(kind, path, body) of one random request."""
    r = rng.random()
    if r < 0.12:
        path, body = rng.choice(BAD_BODIES)
        return "bad", path, body
    chat = rng.random() < 0.5
    long_prompt = rng.random() < 0.1
    n_words = rng.randint(300, 900) if long_prompt else rng.randint(4, 120)
    text = ("Shared system preamble for the soak. " if rng.random() < 0.3 else "") + _words(
        rng, n_words
    )
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": rng.randint(1, max_tokens),
        "temperature": rng.choice([0.0, 0.7, 1.0]),
        "seed": rng.randint(0, 1000),
        "n": rng.choice([1, 1, 1, 2, 3]),
    }
    if rng.random() < 0.3:
        body["stop"] = rng.sample(WORDS, rng.randint(1, 3))
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    path = "chat/completions" if chat else "completions"
    kind = "ok"
    if rng.random() < 0.6:
        body["stream"] = True
        kind = "disconnect" if rng.random() < 0.25 else "stream"
    return kind, path, body


def _is_injected(text: str) -> bool:
    return "InjectedFault" in text or "injected fault" in text


async def send(
    client: httpx.AsyncClient, base: str, kind: str, path: str, body: Any, t0: float, rng
) -> Outcome:
    out = Outcome(kind, time.perf_counter() - t0)
    url = f"{base}/v1/{path}"
    kw = {"content": body} if isinstance(body, str) else {"json": body}
    start = time.perf_counter()
    try:
        if kind in ("stream", "disconnect"):
            leave_after = rng.randint(0, 4) if kind == "disconnect" else None
            async with client.stream("POST", url, **kw) as resp:
                out.status = resp.status_code
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    out.answered, out.error = True, text[:200]
                    out.injected = resp.status_code == 500 and _is_injected(text)
                    return out
                chunks, last = 0, start
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        out.answered = True
                        break
                    if '"error"' in data and data.startswith('{"error"'):
                        out.answered, out.error = True, data[:200]
                        out.injected = _is_injected(data)
                        if not out.injected:
                            out.status = 500  # an error event mid-stream
                        break
                    now = time.perf_counter()
                    if out.ttft_s is None:
                        out.ttft_s = now - start
                    else:
                        out.itl_s.append(now - last)
                    last = now
                    chunks += 1
                    if leave_after is not None and chunks > leave_after:
                        out.answered = True  # we left; the server must free everything
                        break
            return out
        resp = await client.post(url, **kw)
        out.status, out.answered = resp.status_code, True
        if resp.status_code >= 400:
            out.error = resp.text[:200]
            out.injected = resp.status_code == 500 and _is_injected(resp.text)
        else:
            out.ttft_s = time.perf_counter() - start  # whole response: an upper bound
    except (httpx.HTTPError, OSError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    return out


def scrape(base: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith("jaxserve_") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    import psutil

    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20
    except psutil.Error:
        return None


async def closed_loop_rate(base: str, model: str, concurrency: int, seconds: float) -> float:
    """Requests/s the server completes with `concurrency` plain requests always in flight."""
    rng = random.Random(1)
    done = 0
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() - t0 < seconds:
                body = {"model": model, "prompt": _words(rng, rng.randint(4, 120))}
                body["max_tokens"] = rng.randint(1, 64)
                r = await client.post(f"{base}/v1/completions", json=body)
                done += r.status_code == 200

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - t0)


async def soak(args: argparse.Namespace, base: str, pid: int | None) -> dict[str, Any]:
    model = args.model_name
    if args.rate:
        capacity = args.rate / args.overload
    else:
        capacity = await closed_loop_rate(base, model, args.calibrate_concurrency, args.calibrate_s)
    rate = capacity * args.overload
    print(f"capacity ~{capacity:.2f} req/s -> sending {rate:.2f} req/s", flush=True)
    rng = random.Random(args.seed)
    outcomes: list[Outcome] = []
    samples: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    duration = args.minutes * 60
    limits = httpx.Limits(max_connections=args.max_connections)
    async with httpx.AsyncClient(timeout=args.request_timeout_s, limits=limits) as client:
        tasks: set[asyncio.Task] = set()

        async def sampler() -> None:
            while time.perf_counter() - t0 < duration:
                m = await asyncio.to_thread(scrape, base)
                samples.append(
                    {
                        "t_s": time.perf_counter() - t0,
                        "rss_mb": rss_mb(pid),
                        "kv_pages_used": m.get("jaxserve_kv_pages_used"),
                        "kv_pages_cached": m.get("jaxserve_kv_pages_cached"),
                        "running": m.get("jaxserve_num_requests_running"),
                        "waiting": m.get("jaxserve_num_requests_waiting"),
                    }
                )
                await asyncio.sleep(args.sample_every_s)

        sampling = asyncio.create_task(sampler())
        while (now := time.perf_counter() - t0) < duration:
            kind, path, body = make_request(rng, model, args.max_tokens)

            async def one(kind=kind, path=path, body=body) -> None:
                outcomes.append(await send(client, base, kind, path, body, t0, rng))

            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(rng.expovariate(rate))
        print(f"load stopped after {now:.0f} s; waiting for {len(tasks)} requests", flush=True)
        if tasks:
            await asyncio.wait(tasks, timeout=args.request_timeout_s)
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
    return finish(args, base, pid, outcomes, samples, capacity, rate)


def finish(args, base, pid, outcomes, samples, capacity, rate) -> dict[str, Any]:
    # Drain: nothing running or waiting, then every used page must be a prefix-cache page.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        m = scrape(base)
        if m["jaxserve_num_requests_running"] == 0 and m["jaxserve_num_requests_waiting"] == 0:
            break
        time.sleep(0.5)
    time.sleep(1.0)
    m = scrape(base)
    leaked_pages = m["jaxserve_kv_pages_used"] - m["jaxserve_kv_pages_cached"]
    sent = len(outcomes)
    answered = sum(o.answered for o in outcomes)
    server_errors = [o for o in outcomes if (o.status or 0) >= 500 and not o.injected]
    by_minute: dict[int, list[Outcome]] = {}
    for o in outcomes:
        by_minute.setdefault(int(o.start_s // 60), []).append(o)

    def pct(xs: list[float], q: float) -> float | None:
        return round(float(np.percentile(xs, q)) * 1000, 1) if xs else None

    minutes = []
    for minute, os_ in sorted(by_minute.items()):
        ttft = [o.ttft_s for o in os_ if o.ttft_s is not None and o.kind != "ok"]
        itl = [x for o in os_ for x in o.itl_s]
        minutes.append(
            {
                "minute": minute,
                "sent": len(os_),
                "ttft_p50_ms": pct(ttft, 50),
                "ttft_p99_ms": pct(ttft, 99),
                "itl_p50_ms": pct(itl, 50),
                "itl_p99_ms": pct(itl, 99),
            }
        )
    rss = [(s["t_s"], s["rss_mb"]) for s in samples if s["rss_mb"] is not None]
    warm = [v for t, v in rss if args.warmup_s <= t < args.warmup_s + args.rss_window_s]
    last = [v for t, v in rss if t >= rss[-1][0] - args.rss_window_s] if rss else []
    growth = (np.mean(last) / np.mean(warm) - 1) if warm and last else None
    statuses: dict[str, int] = {}
    for o in outcomes:
        key = str(o.status) if o.status is not None else "none"
        statuses[key] = statuses.get(key, 0) + 1
    report = {
        "minutes": args.minutes,
        "overload": args.overload,
        "capacity_req_per_s": round(capacity, 3),
        "rate_req_per_s": round(rate, 3),
        "fault_every": args.fault_every,
        "sent": sent,
        "answered": answered,
        "lost": sent - answered,
        "by_kind": {
            k: sum(o.kind == k for o in outcomes) for k in ("ok", "stream", "disconnect", "bad")
        },
        "statuses": statuses,
        "injected_faults_seen": sum(o.injected for o in outcomes),
        "server_errors_not_injected": len(server_errors),
        "server_error_examples": [o.error for o in server_errors[:5]],
        "lost_examples": [o.error for o in outcomes if not o.answered][:5],
        "bad_not_4xx": sum(o.kind == "bad" and not 400 <= (o.status or 0) < 500 for o in outcomes),
        "rss_growth_after_warmup": None if growth is None else round(float(growth), 4),
        "end": {
            "running": m["jaxserve_num_requests_running"],
            "waiting": m["jaxserve_num_requests_waiting"],
            "kv_pages_used": m["jaxserve_kv_pages_used"],
            "kv_pages_cached": m["jaxserve_kv_pages_cached"],
            "kv_usage_ratio": m["jaxserve_kv_cache_usage_ratio"],
            "pages_held_by_requests": leaked_pages,
        },
        "per_minute": minutes,
        "samples": samples,
    }
    report["passed"] = bool(
        report["server_errors_not_injected"] == 0
        and report["lost"] == 0
        and report["bad_not_4xx"] == 0
        and leaked_pages == 0
        and m["jaxserve_num_requests_running"] == 0
        and (growth is None or growth < args.max_rss_growth)
    )
    return report


def print_report(r: dict[str, Any]) -> None:
    print(f"sent {r['sent']}  answered {r['answered']}  lost {r['lost']}  by kind {r['by_kind']}")
    print(f"statuses {r['statuses']}")
    print(
        f"injected faults seen {r['injected_faults_seen']}  other 5xx "
        f"{r['server_errors_not_injected']}  bad requests not 4xx {r['bad_not_4xx']}"
    )
    print(f"RSS growth after warm-up {r['rss_growth_after_warmup']}  end state {r['end']}")
    for m in r["per_minute"]:
        print(
            f"  minute {m['minute']:3d}: sent {m['sent']:5d}  TTFT p50/p99 {m['ttft_p50_ms']}/"
            f"{m['ttft_p99_ms']} ms  ITL p50/p99 {m['itl_p50_ms']}/{m['itl_p99_ms']} ms"
        )
    print("PASSED" if r["passed"] else "FAILED")


def plot(r: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = r["samples"]
    t = [x["t_s"] / 60 for x in s]
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    axes[0].plot(t, [x["rss_mb"] for x in s])
    axes[0].set_ylabel("server RSS (MB)")
    axes[1].plot(t, [x["kv_pages_used"] for x in s], label="used")
    axes[1].plot(t, [x["kv_pages_cached"] for x in s], label="prefix cache")
    axes[1].set_ylabel("KV pages")
    axes[1].legend()
    pm = r["per_minute"]
    x = [m["minute"] + 0.5 for m in pm]
    for key, label in (("ttft_p50_ms", "TTFT p50"), ("ttft_p99_ms", "TTFT p99")):
        axes[2].plot(x, [m[key] for m in pm], label=label)
    for key, label in (("itl_p50_ms", "ITL p50"), ("itl_p99_ms", "ITL p99")):
        axes[2].plot(x, [m[key] for m in pm], "--", label=label)
    axes[2].set_yscale("log")  # admitted at once vs queued: TTFT is bimodal under overload
    axes[2].set_ylabel("ms, by arrival minute")
    axes[2].set_xlabel("minutes")
    axes[2].legend()
    fig.suptitle(
        f"soak: {r['overload']}x overload, fault every {r['fault_every']} steps, "
        f"{r['sent']} requests, lost {r['lost']}, other 5xx {r['server_errors_not_injected']}"
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


@contextlib.contextmanager
def launched_server(args: argparse.Namespace):
    """`jaxserve serve` with the fault hook; yields (base URL, pid)."""
    env = dict(os.environ)
    if args.fault_every:
        env["JAXSERVE_INJECT_FAULT_EVERY"] = str(args.fault_every)
    cmd = [sys.executable, "-m", "jaxserve.cli", "serve", "--port", str(args.port)]
    cmd += ["--config", args.config] if args.config else []
    cmd += args.serve_args
    log = open(args.server_log, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.monotonic() + args.startup_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}); see {args.server_log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        else:
            raise RuntimeError(f"the server was not ready in {args.startup_timeout_s} s")
        yield base, proc.pid
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--overload", type=float, default=4.0, help="times the measured capacity")
    p.add_argument("--rate", type=float, default=0.0, help="requests/s; skips the calibration")
    p.add_argument("--fault-every", type=int, default=500, help="fail every n-th step; 0 = none")
    p.add_argument("--base-url", help="drive this running server instead of starting one")
    p.add_argument("--pid", type=int, help="the running server's pid, for RSS")
    p.add_argument("--config", help="config file for the started server")
    p.add_argument("--port", type=int, default=8799)
    p.add_argument("--model-name", default="smollm2-135m")
    p.add_argument("--max-tokens", type=int, default=64, help="per request, drawn 1..this")
    p.add_argument("--calibrate-concurrency", type=int, default=32)
    p.add_argument("--calibrate-s", type=float, default=60.0)
    # Above the server's max_waiting + slots, so overload meets its 429, not our own queue.
    p.add_argument("--max-connections", type=int, default=1536)
    p.add_argument("--request-timeout-s", type=float, default=3600.0)
    p.add_argument("--sample-every-s", type=float, default=10.0)
    p.add_argument("--warmup-s", type=float, default=120.0, help="RSS baseline starts here")
    p.add_argument("--rss-window-s", type=float, default=120.0)
    p.add_argument("--max-rss-growth", type=float, default=0.05)
    p.add_argument("--startup-timeout-s", type=float, default=1800.0)
    p.add_argument("--server-log", default="out/soak_server.log")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON report")
    p.add_argument("--plot", help="PNG of RSS, KV pages and latency over time")
    p.add_argument("--replot", help="redraw --plot from a JSON report of --out, and exit")
    p.add_argument("serve_args", nargs="*", help="extra `jaxserve serve` flags (after --)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.replot:
        report = json.loads(Path(args.replot).read_text())
        plot(report, args.plot)
        return report
    Path(args.server_log).parent.mkdir(parents=True, exist_ok=True)
    if args.base_url:
        report = asyncio.run(soak(args, args.base_url.rstrip("/"), args.pid))
    else:
        with launched_server(args) as (base, pid):
            report = asyncio.run(soak(args, base, pid))
    print_report(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**report, "args": vars(args)}, indent=1))
    if args.plot:
        plot(report, args.plot)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
