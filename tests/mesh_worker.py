"""Runs the tiny Llama on several device meshes and writes what it saw as JSON.

Started by tests/test_sharding.py in a fresh process whose XLA_FLAGS simulate 4 CPU devices
(the flag only counts before jax initialises its backend, and pytest may already have done
that). Usage: python -m tests.mesh_worker OUT.json
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from jaxserve.engine import Engine
from jaxserve.jaxutil import enable_compilation_cache
from jaxserve.llm import LLM
from jaxserve.models.llama import LlamaParams
from jaxserve.request import SamplingParams
from jaxserve.runner import Runner
from jaxserve.weights.safetensors_loader import (
    LazyTensor,
    hf_config,
    load_hf_params,
)
from tests.fake_model import FakeTokenizer
from tests.tiny_model import TINY, dense_logits, save_hf_dir, tiny_params

NUM_PAGES = 48  # per dp group
PAGE_SIZE = 4
SLOTS = 4  # per dp group
MESHES = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)]  # (tp, dp); tp=4 > 2 KV heads: replicated
COLLECTIVE = re.compile(
    r"= (\w+\[[\d,]*\])\S* (all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)"
)


def save_tiny_hf(path: Path) -> None:
    """The tiny model as a Hugging Face directory (weights [out, in], one safetensors file)."""
    save_hf_dir(path, TINY, tiny_params())


def make_llm(
    model_cfg: ModelConfig, params: LlamaParams, tp: int, dp: int, **kw
) -> tuple[LLM, float]:
    sched = dict(
        max_running_requests=SLOTS,
        max_prefill_tokens=32,  # 40-token prompts are chunked
        prefill_block=8,
        prefill_buckets=(32,),  # 4 programs: EXTEND, DECODE, MIXED, slot permute
        max_model_len=64,
        max_prefill_seqs=4,
    )
    sched |= kw.pop("scheduler", {})
    cfg = EngineConfig(
        cache=CacheConfig(page_size=PAGE_SIZE, num_pages=NUM_PAGES),
        scheduler=SchedulerConfig(**sched),
        tp=tp,
        dp=dp,
        **kw,
    )
    t0 = time.perf_counter()
    engine = Engine(cfg, model_cfg, FakeTokenizer(), Runner(model_cfg, params, cfg))
    engine.warmup()
    return LLM(engine=engine), time.perf_counter() - t0


def workload() -> tuple[list[list[int]], list[list[int]]]:
    """Two rounds: 10 prompts of 1-40 tokens, then prompts extending cached prefixes."""
    rng = np.random.default_rng(0)
    first = [rng.integers(0, 127, size=int(n)).tolist() for n in rng.integers(1, 41, size=10)]
    second = [first[1][:12] + [5, 6, 7], first[3] + [9] * 9, list(first[3])]
    return first, second


READS: list[tuple[str, list[int]]] = []  # (tensor name, shape of each slice read)


def _logged_getitem(getitem):
    def read(self: LazyTensor, idx):
        part = getitem(self, idx)
        READS.append((self.name, list(part.shape)))
        return part

    return read


class PageCheck:
    """After every schedule(): each running request's pages lie in its slot's dp group."""

    def __init__(self, engine: Engine):
        self.checked = self.violations = 0
        self.groups_used: set[int] = set()
        sched, schedule = engine.scheduler, engine.scheduler.schedule

        def checked_schedule():
            plan = schedule()
            for req in sched.running:
                group = req.slot // SLOTS
                self.groups_used.add(group)
                self.checked += len(req.pages)
                self.violations += sum(p // NUM_PAGES != group for p in req.pages)
            return plan

        sched.schedule = checked_schedule


def run_mesh(model_cfg: ModelConfig, params: LlamaParams, tp: int, dp: int) -> dict:
    READS.clear()
    llm, warmup_s = make_llm(model_cfg, params, tp, dp)
    wq_reads = [shape for name, shape in READS if name == "model.layers.0.self_attn.q_proj.weight"]
    runner = llm.engine.runner
    warm = runner.num_compiles
    pages = PageCheck(llm.engine)
    permutes = []  # slot compactions (moves stay within a dp group)
    permute = runner.permute_slots
    runner.permute_slots = lambda perm: (permutes.append(perm), permute(perm))
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=1)
    t0 = time.perf_counter()
    outs = [o for prompts in workload() for o in llm.generate_tokens(prompts, greedy)]
    sampled = SamplingParams(max_tokens=8, temperature=0.8, top_k=20, seed=3, ignore_eos=True)
    outs += llm.generate_tokens(workload()[0][:6], sampled)
    run_s = time.perf_counter() - t0
    k0 = runner.kv.k[0]
    result = {
        "tp": tp,
        "dp": dp,
        "warmup_compiles": warm,
        "compiles_after_warmup": runner.num_compiles - warm,
        "tokens": [o.token_ids for o in outs],
        "logprobs": [[t.logprob for t in o.logprobs] for o in outs if o.logprobs],
        "prefix_cache_hits": llm.engine.scheduler.prefix_cache.hits,
        "slot_permutes": len(permutes),
        "wq_reads": wq_reads,  # slices read from the safetensors file for layer 0's wq
        "pages_checked": pages.checked,
        "page_violations": pages.violations,
        "groups_used": sorted(pages.groups_used),
        "kv_shape": list(k0.shape),
        "kv_shard_shape": list(k0.addressable_shards[0].data.shape),
        "num_kv_heads": runner.model_cfg.num_kv_heads,
        "warmup_s": round(warmup_s, 1),
        "run_s": round(run_s, 1),
    }
    if runner.layout is not None:
        p = runner.param_sets["none"]
        result["wq_shard_shape"] = list(p.layers[0].wq.addressable_shards[0].data.shape)
        result["w_down_shard_shape"] = list(p.layers[0].w_down.addressable_shards[0].data.shape)
        result["embed_shard_shape"] = list(p.embed.addressable_shards[0].data.shape)
        counts = runner.slots.rows.output_counts  # [dp * B, V]
        result["token_counts_shard_shape"] = list(counts.addressable_shards[0].data.shape)
        result["collectives"] = step_collectives(llm.engine)  # traces once more: measured last
    return result


def step_collectives(engine: Engine) -> list[str]:
    """Result shapes of the collectives in the compiled MIXED step (decode + prefill)."""
    runner = engine.runner
    decode, prefill = engine.builder.warmup_batches()[-1]
    args = runner.layout.put_rows((decode, prefill))
    lowered = runner._step_fn.lower(
        runner.param_sets["none"], runner.kv, runner.slots, *args, runner._all_allowed
    )
    return [m.group(1) for m in COLLECTIVE.finditer(lowered.compile().as_text())]


def worst_logprob_error(llm: LLM, prompts: list[list[int]]) -> float:
    """Greedy run, teacher-forced against the float64 dense model on the tokens it chose: the
    largest |log-prob difference| of a chosen token over every step."""
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=1)
    worst = 0.0
    for prompt, out in zip(prompts, llm.generate_tokens(prompts, greedy), strict=True):
        seq = prompt + out.token_ids
        logits = dense_logits(tiny_params(), TINY, seq)[len(prompt) - 1 : -1]
        m = logits.max(-1, keepdims=True)
        want = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        got = np.array([t.logprob for t in out.logprobs])
        worst = max(worst, float(np.abs(got - want[np.arange(len(got)), out.token_ids]).max()))
    return worst


def run_bf16(model_cfg: ModelConfig, params: LlamaParams) -> dict:
    """bfloat16 weights, activations and KV cache on the 2x2 mesh."""
    llm, _ = make_llm(model_cfg, params, 2, 2, dtype="bfloat16")  # KV dtype "auto": bf16
    return {
        "kv_dtype": str(llm.engine.runner.kv.k[0].dtype),
        "weight_dtype": str(llm.engine.runner.param_sets["none"].layers[0].wq.dtype),
        "worst_logprob_error": worst_logprob_error(llm, workload()[0]),
    }


def run_int8(model_cfg: ModelConfig, params: LlamaParams) -> dict:
    """int8 weights (QuantizedWeight leaves, scales split with their columns) on the 2x2 mesh:
    int8 in the 4-row DECODE steps, bf16 in the 32+ row ones."""
    llm, _ = make_llm(model_cfg, params, 2, 2, quantization="int8")
    q = llm.engine.runner.param_sets["int8"].layers[0].wq
    return {
        "scale_shard_shape": list(q.scale.addressable_shards[0].data.shape),
        "worst_logprob_error": worst_logprob_error(llm, workload()[0]),
    }


def run_interpret(model_cfg: ModelConfig, params: LlamaParams) -> dict:
    """The Pallas kernels (interpret mode) per head shard on the 2x2 mesh."""
    llm, _ = make_llm(
        model_cfg,
        params,
        2,
        2,
        attention_impl="interpret",
        scheduler={"max_running_requests": 2},
    )
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    first, second = workload()
    prompts = first[:4] + second[:1]  # the last one extends a cached prefix
    return {"tokens": [o.token_ids for o in llm.generate_tokens(prompts, greedy)]}


def main(out: Path) -> None:
    if jax.device_count() < 4:
        raise SystemExit(f"needs 4 devices, got {jax.device_count()} (XLA_FLAGS unset?)")
    enable_compilation_cache()
    LazyTensor.__getitem__ = _logged_getitem(LazyTensor.__getitem__)
    with tempfile.TemporaryDirectory() as tmp:
        save_tiny_hf(Path(tmp))
        model_cfg = dataclasses.replace(hf_config(Path(tmp)), name="tiny")
        # Lazy: every runner reads its weights from the file, a mesh slice by slice.
        params = load_hf_params(Path(tmp), model_cfg, lazy=True)
        report: dict = {"meshes": [run_mesh(model_cfg, params, tp, dp) for tp, dp in MESHES]}
        report["bf16"] = run_bf16(model_cfg, params)
        report["interpret"] = run_interpret(model_cfg, params)
        report["int8"] = run_int8(model_cfg, params)
    out.write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
