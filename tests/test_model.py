"""The paged prefill/decode path against a dense causal forward, on a tiny random Llama."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.config import CacheConfig, EngineConfig, SchedulerConfig
from jaxserve.engine import Engine
from jaxserve.llm import LLM
from jaxserve.request import SamplingParams
from jaxserve.runner import Runner
from tests.fake_model import FakeTokenizer
from tests.tiny_model import TINY, dense_logits, tiny_params


def tiny_llm(quantization: str = "none", **sched) -> LLM:
    sched = {
        "max_running_requests": 4,
        "max_prefill_tokens": 64,
        "prefill_block": 8,
        "prefill_buckets": (16, 64),
        "max_model_len": 64,
        "max_prefill_seqs": 4,
        **sched,
    }
    cfg = EngineConfig(
        cache=CacheConfig(page_size=4, num_pages=64),
        scheduler=SchedulerConfig(**sched),
        quantization=quantization,
    )
    params = tiny_params()
    engine = Engine(cfg, TINY, FakeTokenizer(), Runner(TINY, params, cfg))
    engine.warmup()
    return LLM(engine=engine)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llm()


PROMPTS = [[5, 9, 13], list(range(1, 30)), [7] * 11, [100, 3, 64, 2, 9, 33, 17]]


def greedy_dense(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(dense_logits(tiny_params(), TINY, seq)[-1])))
    return seq[len(prompt) :]


def test_greedy_matches_dense_reference(tiny):
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=5)
    outs = tiny.generate_tokens(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == greedy_dense(prompt, 20)
        # Logprobs of every step (prefill and decode) agree with the dense model.
        seq = prompt + out.token_ids
        logits = dense_logits(tiny_params(), TINY, seq)[len(prompt) - 1 : -1]
        lp = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        got = np.array([t.logprob for t in out.logprobs])
        want = lp[np.arange(len(got)), out.token_ids]
        np.testing.assert_allclose(got, want, atol=2e-4)


def test_no_compilation_after_warmup(tiny):
    before = tiny.engine.runner.num_compiles
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 127, size=int(rng.integers(1, 50))).tolist() for _ in range(30)]
    params = [
        SamplingParams(
            max_tokens=int(rng.integers(1, 14)),
            temperature=float(i % 3) * 0.5,
            top_k=int(i % 4) * 5,
            top_p=0.9,
            seed=i,
        )
        for i in range(30)
    ]
    tiny.generate_tokens(prompts, params)
    assert tiny.engine.runner.num_compiles == before


def test_chunked_prefill_and_batch_invariance(tiny):
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    alone = [tiny.generate_tokens([p], params)[0].token_ids for p in PROMPTS]
    tiny.engine.scheduler.prefix_cache.clear()  # "together" prefills every prompt in full
    together = [o.token_ids for o in tiny.generate_tokens(PROMPTS * 3, params)]
    assert together == alone * 3
    chunked = tiny_llm(max_prefill_tokens=16, prefill_buckets=(16,))
    assert [o.token_ids for o in chunked.generate_tokens(PROMPTS, params)] == alone


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny):
    p = SamplingParams(max_tokens=12, temperature=1.0, seed=42, ignore_eos=True)
    a = tiny.generate_tokens([PROMPTS[0]], p)[0].token_ids
    mixed = [SamplingParams(max_tokens=12, temperature=0.7, seed=i) for i in range(3)] + [p]
    b = tiny.generate_tokens(PROMPTS[1:] + [PROMPTS[0]], mixed)[-1].token_ids
    c = tiny.generate_tokens(
        [PROMPTS[0]], SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    )[0].token_ids
    assert a == b
    assert a != c


def test_pallas_kernels_in_interpret_mode_give_the_same_greedy_output(tiny):
    """The model's attention through kernels/gpu (interpreted) vs the jnp reference."""
    import dataclasses

    from jaxserve.engine import Engine

    ref = tiny.engine
    cfg = dataclasses.replace(ref.cfg, attention_impl="interpret")
    engine = Engine(cfg, TINY, FakeTokenizer(), Runner(TINY, tiny_params(), cfg))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    later = [PROMPTS[1] + [1, 2, 3, 4, 5, 6, 7, 8, 9]]  # extends a cached prefix
    want = [o.token_ids for p in (PROMPTS, later) for o in tiny.generate_tokens(p, params)]
    llm = LLM(engine=engine)
    got = [o.token_ids for p in (PROMPTS, later) for o in llm.generate_tokens(p, params)]
    assert engine.scheduler.prefix_cache.hits > 0
    assert got == want


def dense_logprobs(seq: list[int], start: int) -> np.ndarray:
    """Float log-softmax of the dense model at positions start-1 .. len(seq)-2."""
    logits = dense_logits(tiny_params(), TINY, seq)[start - 1 : -1]
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


@pytest.mark.parametrize(("quantization", "tol"), [("bf16", 0.05), ("int8", 0.2)])
def test_quantized_weights_stay_close_to_the_dense_float_model(quantization, tol):
    """bf16 / int8 matmuls (an option, never the default): every step's logprobs within a
    measured tolerance of the float model on the same tokens; int8 runs int8 in small steps
    and bf16 in large ones; nothing compiles after warm-up."""
    llm = tiny_llm(quantization=quantization)
    runner = llm.engine.runner
    assert set(runner.param_sets) == ({"int8", "bf16"} if quantization == "int8" else {"bf16"})
    before = runner.num_compiles
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)
    outs = llm.generate_tokens(PROMPTS, params)
    assert runner.num_compiles == before
    worst = 0.0
    for prompt, out in zip(PROMPTS, outs, strict=True):
        want = dense_logprobs(prompt + out.token_ids, len(prompt))
        got = np.array([t.logprob for t in out.logprobs])
        worst = max(worst, float(np.abs(got - want[np.arange(len(got)), out.token_ids]).max()))
    assert 0 < worst < tol  # approximate, yet close
    if quantization == "int8":
        assert runner.quant.kind_for(4) == "int8" and runner.quant.kind_for(64) == "bf16"


def _failing_kernel(*args, **kwargs):
    raise NotImplementedError("Mosaic failed to lower: unsupported shape (forced by the test)")


def test_a_kernel_that_fails_to_build_falls_back_to_the_reference(tiny, monkeypatch, caplog):
    """A Pallas kernel the device's compiler rejects: the step is rebuilt on the jnp reference
    attention with one warning line and a /metrics counter, the server keeps serving the
    same greedy tokens, and nothing more compiles once warm."""
    import dataclasses
    import logging

    import httpx

    import kernels.gpu
    from jaxserve.config import ServerConfig
    from jaxserve.server import Bridge
    from tests.http_server import run_server

    for op in ("paged_attention", "extend_attention"):  # MIXED runs both
        monkeypatch.setattr(kernels.gpu, op, _failing_kernel)
    cfg = dataclasses.replace(tiny.engine.cfg, attention_impl="interpret")
    runner = Runner(TINY, tiny_params(), cfg)
    engine = Engine(cfg, TINY, FakeTokenizer(), runner)
    with caplog.at_level(logging.WARNING, logger="jaxserve.runner"):
        engine.warmup()
    warnings = [r.getMessage() for r in caplog.records if r.name == "jaxserve.runner"]
    assert len(warnings) == 1 and "falling back to the jnp reference" in warnings[0]
    assert "Mosaic failed to lower" in warnings[0]
    assert runner.impl == "reference" and runner.num_kernel_fallbacks == 1
    assert runner.num_compiles == engine.num_step_functions  # the failed build is no program
    warm = runner.num_compiles
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    got = [o.token_ids for o in LLM(engine=engine).generate_tokens(PROMPTS, params)]
    assert got == [o.token_ids for o in tiny.generate_tokens(PROMPTS, params)]
    assert runner.num_compiles == warm and engine.stats.num_failed == 0
    bridge = Bridge(engine)
    bridge.start()
    try:
        with run_server(bridge, ServerConfig()) as url:
            metrics = httpx.get(f"{url}/metrics", timeout=30).text
    finally:
        bridge.stop()
    assert "\njaxserve_kernel_fallbacks_total 1.0\n" in metrics


def test_a_failure_that_is_not_the_kernels_is_not_hidden_by_the_fallback(tiny, monkeypatch):
    """When the reference build fails too, the error is the step's (its requests fail as
    before) and the runner keeps the kernels it was asked for."""
    import dataclasses

    from jaxserve import runner as runner_mod

    def broken_forward(*args, **kwargs):
        raise RuntimeError("broken model (forced by the test)")

    cfg = dataclasses.replace(tiny.engine.cfg, attention_impl="interpret")
    runner = Runner(TINY, tiny_params(), cfg)
    engine = Engine(cfg, TINY, FakeTokenizer(), runner)
    monkeypatch.setattr(runner_mod.llama, "forward", broken_forward)
    out = LLM(engine=engine).generate_tokens([PROMPTS[0]], SamplingParams(max_tokens=2))[0]
    assert out.finish_reason.value == "error"
    assert runner.impl == "interpret" and runner.num_kernel_fallbacks == 0
