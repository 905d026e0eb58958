"""Hugging Face transformers static batching on the default GGUF: the peer baseline.

Example: python scripts/hf_static_baseline.py --datasets mixed fixed --num-prompts 64 \
    --batch-size 16 --out out/hf_static.json

Offline batches of `--batch-size` prompts in arrival order, left-padded; each batch runs
`generate` (greedy, float32, 2 threads, EOS ignored) until its longest member has all its
tokens, and only the tokens each request asked for count as output. Prompts are the token-id
prompts `bench_serving.py` sends for the same arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import synthetic_prompts  # noqa: E402  (numpy only, no jaxserve)


def gguf_path(model: str) -> Path:
    """Locate the GGUF with jaxserve in a child process, keeping jax out of this one."""
    if model.endswith(".gguf"):
        return Path(model)
    code = f"from jaxserve.weights import resolve_model_path as r; print(r({model!r}))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def load_model(path: Path):
    # The repo's own `kernels` package shares its import name with HF's `kernels` (FACTS.md).
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("USE_HUB_KERNELS", "0")
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    model.generation_config.eos_token_id = None  # run to max_new_tokens, as ignore_eos does
    return model


def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int) -> float:
    """One left-padded greedy batch; returns its wall time."""
    import torch

    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
    assert out.shape[1] == width + max_new_tokens, out.shape
    return time.perf_counter() - t0


def pick_threads(model, choices: list[int], pad_id: int) -> int:
    """The fastest torch thread count on a short batch.

    With other processes on a 2-core machine, OpenMP's 2-thread barriers can be 10-30x
    slower than 1 thread, so the baseline is not handicapped by a fixed choice.
    """
    import torch

    best, best_s = choices[0], float("inf")
    for n in choices:
        torch.set_num_threads(n)
        generate_batch(model, [[5] * 32] * 16, 2, pad_id)  # warm this thread count
        wall = generate_batch(model, [[5] * 32] * 16, 8, pad_id)
        print(f"  {n} thread(s): {wall:.2f}s for a 16 x 8 batch", flush=True)
        if wall < best_s:
            best, best_s = n, wall
    torch.set_num_threads(best)
    return best


def run_static(
    model, prompts: list[list[int]], out_lens: list[int], batch_size: int, pad_id: int
) -> dict[str, Any]:
    """Batches in order; a request's latency is its batch's end (all arrive at time 0)."""
    t, e2e, batches = 0.0, [], []
    for k in range(0, len(prompts), batch_size):
        outs = out_lens[k : k + batch_size]
        wall = generate_batch(model, prompts[k : k + batch_size], max(outs), pad_id)
        t += wall
        e2e += [t] * len(outs)
        batches.append({"size": len(outs), "max_new_tokens": max(outs), "wall_s": wall})
        print(
            f"  batch {len(batches)}: {len(outs)} x {max(outs)} tokens in {wall:.1f}s", flush=True
        )
    useful = sum(out_lens)
    generated = sum(b["size"] * b["max_new_tokens"] for b in batches)
    in_tokens = sum(map(len, prompts))
    return {
        "completed": len(prompts),
        "duration_s": t,
        "input_tokens": in_tokens,
        "output_tokens": useful,
        "generated_tokens": generated,  # including the padding tokens of finished members
        "request_per_s": len(prompts) / t,
        "output_tok_per_s": useful / t,
        "total_tok_per_s": (useful + in_tokens) / t,
        "e2e_ms": {
            "mean": 1e3 * sum(e2e) / len(e2e),
            "median": 1e3 * sorted(e2e)[len(e2e) // 2],
        },
        "batches": batches,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="preset name or .gguf path")
    ap.add_argument("--datasets", nargs="+", default=["mixed"], choices=["fixed", "mixed"])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="torch threads; the fastest wins"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    path = gguf_path(args.model)
    t0 = time.perf_counter()
    model = load_model(path)
    pad_id = 2  # <|im_end|>; masked out, so any id works
    print(f"transformers loaded {path.name} in {time.perf_counter() - t0:.1f}s", flush=True)
    threads = pick_threads(model, args.threads, pad_id)
    results = []
    for dataset in args.datasets:
        prompts = synthetic_prompts(
            args.num_prompts, args.input_len, args.output_len, dataset, args.seed, True
        )
        print(f"{dataset}: {len(prompts)} prompts, batches of {args.batch_size}", flush=True)
        r = run_static(
            model,
            [p.prompt for p in prompts],  # type: ignore[misc]
            [p.output_len for p in prompts],
            args.batch_size,
            pad_id,
        )
        r.update(dataset=dataset, batch_size=args.batch_size, threads=threads)
        print(f"{dataset}: {r['output_tok_per_s']:.1f} output tok/s", flush=True)
        results.append(r)
    if args.out:
        import torch
        import transformers

        meta = {"torch": torch.__version__, "transformers": transformers.__version__}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"args": vars(args), "versions": meta, "results": results}, indent=2)
        )
    return results


if __name__ == "__main__":
    main()
