"""Load generator for any OpenAI-compatible server: streams requests and reports latency/throughput.

Example: python scripts/bench_serving.py --base-url http://127.0.0.1:8000 --num-prompts 64 \
    --concurrency 16 --dataset mixed --input-len 64 --output-len 64 --ignore-eos --out out/s.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

# Common English words for text prompts: roughly one token each in most BPE vocabularies.
WORDS = (
    "the of and to in is was for on that with as by at from his her an have not are be this "
    "which or had it but were they one all their there been has more when who will would "
    "other time can into some about than only new years then first also after two may could "
    "people city over many most such these where through water world state high during work "
    "long between house under while great school small number found part life music second"
).split()


@dataclass
class Prompt:
    """One request to send: a text or token-id prompt (or chat messages) and its output length."""

    prompt: str | list[int]
    output_len: int
    messages: list[dict[str, str]] | None = None

    @property
    def input_len(self) -> int | None:  # known exactly only for token-id prompts
        return len(self.prompt) if isinstance(self.prompt, list) else None


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    start_s: float = 0.0  # relative to the benchmark start
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)  # gaps between content chunks
    prompt_tokens: int | None = None
    output_tokens: int = 0
    num_chunks: int = 0  # content chunks; the token count when the server sends no usage
    text: str = ""


# ---- datasets ----------------------------------------------------------------------------
def synthetic_prompts(
    n: int,
    input_len: int,
    output_len: int,
    dataset: str,
    seed: int,
    token_ids: bool,
    vocab_size: int = 49152,
) -> list[Prompt]:
    """'fixed' lengths, or 'mixed': lognormal prompts, long-tailed (Pareto) outputs.

    Token-id prompts have exact lengths and are the very draws of
    `scripts/bench_offline.make_prompts` (same seed, same prompts); word prompts have the same
    lengths in words, for the chat endpoint or servers that take text only.
    """
    rng = np.random.default_rng(seed)
    if dataset == "fixed":
        ins, outs = [input_len] * n, [output_len] * n
    else:
        ins = np.clip(rng.lognormal(np.log(input_len), 0.6, n), 4, 4 * input_len).astype(int)
        outs = np.clip(rng.pareto(1.5, n) * output_len / 2 + 4, 4, 8 * output_len).astype(int)
    if token_ids:
        return [
            Prompt(rng.integers(100, vocab_size - 100, int(k)).tolist(), int(o))
            for k, o in zip(ins, outs, strict=True)
        ]
    words = random.Random(seed)
    prompts = []
    for k, o in zip(ins, outs, strict=True):
        text = " ".join(words.choice(WORDS) for _ in range(int(k)))
        prompts.append(Prompt(text, int(o), [{"role": "user", "content": text}]))
    return prompts


def jsonl_prompts(path: str, default_output_len: int) -> list[Prompt]:
    """Lines of {"prompt": str | [ids]} or {"messages": [...]}, optional "output_len"."""
    prompts = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        out = int(row.get("output_len", row.get("max_tokens", default_output_len)))
        messages = row.get("messages")
        prompt = row.get("prompt")
        if prompt is None and messages is None:
            raise ValueError(f"{path}:{i + 1}: needs 'prompt' or 'messages'")
        if prompt is None:
            prompt = "\n".join(m["content"] for m in messages)
        if messages is None and isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        prompts.append(Prompt(prompt, out, messages))
    return prompts


# ---- one streamed request ----------------------------------------------------------------
def request_body(
    p: Prompt, endpoint: str, model: str, ignore_eos: bool, temperature: float
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": p.output_len,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM, SGLang, llama.cpp and jaxserve all accept it
    if endpoint == "chat":
        if p.messages is None:
            raise ValueError("the chat endpoint needs text prompts (use --prompt-format text)")
        body["messages"] = p.messages
    else:
        body["prompt"] = p.prompt
    return body


async def send_one(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], t0: float
) -> RequestResult:
    res = RequestResult(start_s=time.perf_counter() - t0)
    start = time.perf_counter()
    last = start
    chat = "messages" in body
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")[:300]
                res.error = f"HTTP {resp.status_code}: {detail}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = json.dumps(chunk["error"])[:300]
                    return res
                now = time.perf_counter()
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    res.prompt_tokens = usage.get("prompt_tokens", res.prompt_tokens)
                    res.output_tokens = usage.get("completion_tokens") or res.output_tokens
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    text = delta.get("content") if chat else choice.get("text")
                    if not text:
                        continue  # role-only or finish-only chunk: no token arrived
                    if res.num_chunks == 0:
                        res.ttft_s = now - start
                    else:
                        res.itl_s.append(now - last)
                    last = now
                    res.num_chunks += 1
                    res.text += text
        res.e2e_s = time.perf_counter() - start
        res.output_tokens = res.output_tokens or res.num_chunks
        res.ok = res.num_chunks > 0 or res.output_tokens > 0
        if not res.ok:
            res.error = "no tokens in the stream"
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


# ---- the run -----------------------------------------------------------------------------
async def run_benchmark(
    base_url: str,
    prompts: list[Prompt],
    *,
    model: str | None = None,
    endpoint: str = "completions",
    concurrency: int | None = None,
    request_rate: float = float("inf"),
    ignore_eos: bool = False,
    temperature: float = 0.0,
    api_key: str | None = None,
    seed: int = 0,
    progress: bool = True,
    timeout_s: float = 3600.0,
) -> tuple[dict[str, Any], list[RequestResult]]:
    """Send every prompt (Poisson arrivals at `request_rate`, at most `concurrency` in flight)."""
    base = base_url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    concurrency = concurrency or len(prompts)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(timeout_s, connect=30.0)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        if model is None:
            models = (await client.get(f"{base}/models")).json()["data"]
            model = models[0]["id"]
        url = f"{base}/chat/completions" if endpoint == "chat" else f"{base}/completions"
        bodies = [request_body(p, endpoint, model, ignore_eos, temperature) for p in prompts]
        gate = asyncio.Semaphore(concurrency)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts), desc="requests", unit="req", file=sys.stderr)

        async def limited(body: dict[str, Any], t0: float) -> RequestResult:
            async with gate:
                r = await send_one(client, url, body, t0)
            if bar is not None:
                bar.update()
            return r

        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        tasks = []
        for body in bodies:
            tasks.append(asyncio.create_task(limited(body, t0)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / request_rate))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - t0
        if bar is not None:
            bar.close()
    for p, r in zip(prompts, results, strict=True):
        if r.ok and r.prompt_tokens is None:
            r.prompt_tokens = p.input_len
    summary = summarize(results, duration)
    summary.update(
        base_url=base_url,
        model=model,
        endpoint=endpoint,
        concurrency=concurrency,
        request_rate=request_rate if request_rate != float("inf") else "inf",
    )
    return summary, results


def _stats_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return dict.fromkeys(("mean", "median", "p90", "p99"), float("nan"))
    a = np.asarray(values) * 1e3
    return {
        "mean": float(a.mean()),
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
    }


def summarize(results: list[RequestResult], duration_s: float) -> dict[str, Any]:
    """Throughput over the whole run; TTFT/TPOT/ITL/E2E percentiles in milliseconds."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration_s,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "request_per_s": len(ok) / duration_s,
        "output_tok_per_s": out_tokens / duration_s,
        "total_tok_per_s": (in_tokens + out_tokens) / duration_s,
        "ttft_ms": _stats_ms([r.ttft_s for r in ok]),
        "tpot_ms": _stats_ms(tpot),
        "itl_ms": _stats_ms([x for r in ok for x in r.itl_s]),
        "e2e_ms": _stats_ms([r.e2e_s for r in ok]),
    }


def print_summary(s: dict[str, Any], title: str = "serving benchmark") -> None:
    print(f"==== {title} ====")
    print(f"completed / failed:   {s['completed']} / {s['failed']}")
    for err in s["errors"]:
        print(f"  error: {err}")
    print(f"duration:             {s['duration_s']:.2f} s")
    print(f"requests/s:           {s['request_per_s']:.2f}")
    print(f"output tok/s:         {s['output_tok_per_s']:.1f}")
    print(f"total tok/s:          {s['total_tok_per_s']:.1f}")
    print(f"{'ms':8s} {'mean':>9s} {'median':>9s} {'p90':>9s} {'p99':>9s}")
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        v = s[key]
        print(
            f"{key[:-3].upper():8s} {v['mean']:9.1f} {v['median']:9.1f} {v['p90']:9.1f} "
            f"{v['p99']:9.1f}"
        )


def load_prompts(args: argparse.Namespace) -> list[Prompt]:
    if args.dataset in ("fixed", "mixed"):
        token_ids = args.prompt_format == "tokens" or (
            args.prompt_format == "auto" and args.endpoint == "completions"
        )
        return synthetic_prompts(
            args.num_prompts,
            args.input_len,
            args.output_len,
            args.dataset,
            args.seed,
            token_ids,
        )
    prompts = jsonl_prompts(args.dataset, args.output_len)[: args.num_prompts]
    if args.max_tokens is not None:
        prompts = [Prompt(p.prompt, args.max_tokens, p.messages) for p in prompts]
    return prompts


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root or .../v1")
    ap.add_argument("--model", default=None, help="model name (default: the first /v1/models)")
    ap.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=None, help="max in flight (default all)")
    ap.add_argument(
        "--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second"
    )
    ap.add_argument(
        "--dataset", default="fixed", help="'fixed', 'mixed' (long-tailed) or a JSONL file path"
    )
    ap.add_argument("--input-len", type=int, default=64, help="synthetic prompt length (mean)")
    ap.add_argument("--output-len", type=int, default=64, help="output length (mean for mixed)")
    ap.add_argument("--max-tokens", type=int, default=None, help="override JSONL output lengths")
    ap.add_argument(
        "--prompt-format",
        choices=["auto", "tokens", "text"],
        default="auto",
        help="synthetic prompts as token ids (exact lengths; auto for completions) or words",
    )
    ap.add_argument("--ignore-eos", action="store_true", help="generate exactly max_tokens")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default=None, help="write the summary and per-request rows as JSON")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    prompts = load_prompts(args)
    summary, results = asyncio.run(
        run_benchmark(
            args.base_url,
            prompts,
            model=args.model,
            endpoint=args.endpoint,
            concurrency=args.concurrency,
            request_rate=args.request_rate,
            ignore_eos=args.ignore_eos,
            temperature=args.temperature,
            api_key=args.api_key,
            seed=args.seed,
            progress=not args.no_progress,
        )
    )
    print_summary(summary)
    if args.out:
        args_dict = {k: (v if v != float("inf") else "inf") for k, v in vars(args).items()}
        rows = [{k: v for k, v in asdict(r).items() if k not in ("text", "itl_s")} for r in results]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"args": args_dict, "summary": summary, "requests": rows}, indent=2)
        )
    return summary


if __name__ == "__main__":
    main()
