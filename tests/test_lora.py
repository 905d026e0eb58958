"""LoRA: PEFT files, stacked buffers and the batched delta against merged weights, fine-tuning.

Model-level cases run a tiny random Llama in float32; the served path is in the engine tests
further down.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import lora
from jaxserve.config import CacheConfig, EngineConfig, SchedulerConfig
from jaxserve.engine import Engine
from jaxserve.errors import LoraAdapterError, LoraNotFoundError
from jaxserve.finetune import Example, FinetuneConfig, dense_logits, train
from jaxserve.llm import LLM
from jaxserve.request import SamplingParams
from jaxserve.runner import Runner
from tests.conftest import assert_engine_idle
from tests.fake_model import FakeTokenizer
from tests.tiny_model import TINY, tiny_params
from tests.tiny_model import dense_logits as reference_logits

ALL_TARGETS = tuple(lora.TARGETS)


def random_adapter(
    seed: int, rank: int, targets=ALL_TARGETS, alpha: float = 16.0, cfg=TINY, size: float = 0.3
) -> lora.LoraAdapter:
    """Weights big enough to move the tiny model's greedy tokens."""
    rng = np.random.default_rng(seed)
    weights = {}
    for layer in range(cfg.num_layers):
        for t in targets:
            fan_in, fan_out = lora.target_shape(cfg, t)
            a = rng.standard_normal((fan_in, rank)).astype(np.float32) / np.sqrt(fan_in)
            b = size * rng.standard_normal((rank, fan_out)).astype(np.float32) / np.sqrt(rank)
            weights[layer, t] = (a.astype(np.float32), b.astype(np.float32))
    return lora.LoraAdapter(lora.LoraConfig(rank, alpha, tuple(targets)), weights)


def bank(adapters: list[lora.LoraAdapter], max_rank: int = 8, targets=ALL_TARGETS):
    """Stacked buffers with adapters[i] in slot i + 1, written as the runner does."""
    weights = lora.init_lora_weights(TINY, len(adapters) + 1, max_rank, targets, jnp.float32)
    write = jax.jit(lora.write_slot, donate_argnums=0)
    for i, adapter in enumerate(adapters, 1):
        lora.check_fits(adapter, weights, f"adapter {i}")
        layers, scale = lora.slot_arrays(adapter, weights)
        weights = write(weights, jnp.int32(i), layers, scale)
    assert write._cache_size() == 1  # every adapter is the same buffer write
    return weights


def test_dense_training_forward_matches_reference():
    tokens = np.array([[5, 9, 13, 100, 3, 7, 64, 2], [1, 2, 3, 4, 5, 6, 7, 8]], np.int32)
    got = dense_logits(tiny_params(), TINY, jnp.asarray(tokens))
    for b in range(2):
        np.testing.assert_allclose(
            got[b], reference_logits(tiny_params(), TINY, tokens[b].tolist()), atol=2e-4
        )


@pytest.mark.parametrize("layout", ["decode", "prefill", "both"])
def test_batched_delta_equals_merged_weights(layout):
    """Each sequence on its own adapter (or none), in one forward: the logits of the base
    model with that adapter merged into its weights."""
    adapters = [
        random_adapter(1, 8),
        random_adapter(2, 4, ("q_proj", "v_proj"), alpha=8.0),
        random_adapter(3, 2, ("down_proj", "o_proj", "up_proj")),
    ]
    weights = bank(adapters)
    params = tiny_params()
    seq_slot = np.array([2, 0, 1, 3, 1], np.int32)  # sequences' adapter slots
    b, t = len(seq_slot), 12
    tokens = np.random.default_rng(0).integers(0, 127, size=(b, t)).astype(np.int32)
    per_token = np.repeat(seq_slot, t)
    g = {"decode": b * t, "prefill": 0, "both": 2 * t + 5}[layout]
    token_seq = np.repeat(np.arange(b), t)[g:]
    rows = lora.LoraRows(jnp.asarray(per_token[:g]), jnp.asarray(seq_slot), jnp.asarray(token_seq))
    got = dense_logits(params, TINY, jnp.asarray(tokens), lora.delta_fn(weights, rows))
    for i, slot in enumerate(seq_slot):
        merged = params if slot == 0 else lora.merge_into(params, adapters[slot - 1])
        want = dense_logits(merged, TINY, jnp.asarray(tokens[i : i + 1]))[0]
        np.testing.assert_allclose(got[i], want, atol=1e-4, rtol=1e-4)
        if slot:  # the adapter changes the model
            base = dense_logits(params, TINY, jnp.asarray(tokens[i : i + 1]))[0]
            assert np.abs(np.asarray(want - base)).max() > 0.1


def test_peft_round_trip(tmp_path):
    adapter = random_adapter(4, 4, ("q_proj", "gate_proj"), alpha=32.0)
    lora.write_adapter(tmp_path, adapter)
    config = json.loads((tmp_path / lora.CONFIG_FILE).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 32.0 and config["peft_type"] == "LORA"
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / lora.WEIGHTS_FILE)
    name = "base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight"
    assert tensors[name].shape == (4, TINY.hidden_size)  # PEFT's [r, in]
    assert tensors[name.replace("lora_A", "lora_B")].shape == (TINY.intermediate_size, 4)
    back = lora.read_adapter(tmp_path, TINY, max_rank=8)
    assert back.config == adapter.config and back.config.scale == 8.0
    assert back.weights.keys() == adapter.weights.keys()
    for key, (a, b) in adapter.weights.items():
        np.testing.assert_array_equal(back.weights[key][0], a)
        np.testing.assert_array_equal(back.weights[key][1], b)


def test_rslora_scale():
    assert lora.LoraConfig(16, 32.0, ("q_proj",), use_rslora=True).scale == 8.0


def _edit(path, **changes):
    cfg = json.loads((path / lora.CONFIG_FILE).read_text())
    cfg.update(changes)
    (path / lora.CONFIG_FILE).write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "case, match",
    [
        ("rank", "exceeds max_lora_rank=8"),
        ("target", r"target_modules \['lm_head'\] do not exist"),
        ("shape", "the base model needs"),
        ("layers", "the base model has 2 layers"),
        ("missing", "not a LoRA adapter"),
        ("dora", "use_dora"),
        ("json", "adapter_config.json"),
        ("tensor", "unexpected tensor"),
    ],
)
def test_bad_adapters_are_clear_errors(tmp_path, case, match):
    if case == "rank":
        lora.write_adapter(tmp_path, random_adapter(0, 16))
    elif case == "shape":  # an adapter of a wider model
        wide = TINY.__class__(**{**TINY.__dict__, "hidden_size": 48})
        lora.write_adapter(tmp_path, random_adapter(0, 4, ("q_proj",), cfg=wide))
    elif case == "layers":
        deep = TINY.__class__(**{**TINY.__dict__, "num_layers": 3})
        lora.write_adapter(tmp_path, random_adapter(0, 4, ("q_proj",), cfg=deep))
    else:
        lora.write_adapter(tmp_path, random_adapter(0, 4, ("q_proj",)))
    if case == "target":
        _edit(tmp_path, target_modules=["q_proj", "lm_head"])
    elif case == "missing":
        (tmp_path / lora.WEIGHTS_FILE).unlink()
    elif case == "dora":
        _edit(tmp_path, use_dora=True)
    elif case == "json":
        (tmp_path / lora.CONFIG_FILE).write_text("{not json")
    elif case == "tensor":
        from safetensors.numpy import load_file, save_file

        tensors = load_file(tmp_path / lora.WEIGHTS_FILE)
        tensors["base_model.model.lm_head.weight"] = np.zeros((2, 2), np.float32)
        save_file(tensors, str(tmp_path / lora.WEIGHTS_FILE))
    with pytest.raises(LoraAdapterError, match=match):
        lora.read_adapter(tmp_path, TINY, max_rank=8)


def test_adapter_must_fit_the_buffers():
    weights = lora.init_lora_weights(TINY, 2, 4, ("q_proj", "v_proj"), jnp.float32)
    with pytest.raises(LoraAdapterError, match=r"targets \['o_proj'\] have no LoRA buffers"):
        lora.check_fits(random_adapter(0, 4, ("q_proj", "o_proj")), weights, "a")
    with pytest.raises(LoraAdapterError, match="exceeds max_lora_rank=4"):
        lora.check_fits(random_adapter(0, 8, ("q_proj",)), weights, "a")


def test_finetune_learns_a_completion():
    """A few optax steps on the tiny model: the loss on completion tokens falls, and the
    trained adapter (read back from PEFT files) makes the completion the greedy choice."""
    examples = [Example([5, 9, 13], [40, 41, 42]), Example([7, 7, 2, 3], [40, 41, 42])]
    ft = FinetuneConfig(
        rank=4, alpha=8.0, epochs=40, batch_size=2, learning_rate=2e-2, warmup_steps=2
    )
    adapter, losses = train(tiny_params(), TINY, examples, ft, progress=False)
    assert losses[-1] < 0.1 * losses[0]
    merged = lora.merge_into(tiny_params(), adapter)
    for ex in examples:
        seq = ex.prompt + ex.completion
        logits = dense_logits(merged, TINY, jnp.asarray([seq]))[0]
        greedy = np.argmax(np.asarray(logits[len(ex.prompt) - 1 : -1]), axis=-1)
        assert greedy.tolist() == ex.completion


# ---- served adapters: registry and runtime-load paths ---------------------------------------
def test_registry_reuses_a_slot_only_when_free():
    from jaxserve.adapters import AdapterRegistry
    from jaxserve.errors import LoraNotFoundError

    reg = AdapterRegistry(max_loras=2)
    a = reg.add("a", Path("a"), reg.free_slot("a"))
    b = reg.add("b", Path("b"), reg.free_slot("b"))
    assert (a.slot, b.slot) == (1, 2) and a.cache_salt != b.cache_salt
    with pytest.raises(LoraAdapterError, match="already loaded"):
        reg.free_slot("a")
    with pytest.raises(LoraAdapterError, match="all max_loras=2 LoRA slots are in use"):
        reg.free_slot("c")
    reg.acquire("a")  # a running request holds slot 1
    reg.remove("a")
    with pytest.raises(LoraNotFoundError):
        reg.acquire("a")
    with pytest.raises(LoraAdapterError, match="in use"):
        reg.free_slot("c")  # slot 1 still serves the running request
    reg.release(1)
    c = reg.add("a", Path("a2"), reg.free_slot("a"))
    assert c.slot == 1 and c.uid != a.uid  # same name and slot, new prefix-cache namespace


def test_runtime_paths_stay_inside_lora_dir(tmp_path):
    from jaxserve.adapters import resolve_in_dir

    root, outside = tmp_path / "loras", tmp_path / "elsewhere"
    lora.write_adapter(root / "good", random_adapter(0, 4, ("q_proj",)))
    lora.write_adapter(outside / "evil", random_adapter(0, 4, ("q_proj",)))
    assert resolve_in_dir(str(root), "good") == (root / "good").resolve()
    assert resolve_in_dir(str(root), str(root / "good")) == (root / "good").resolve()
    (root / "link").symlink_to(outside / "evil")  # a directory link out
    (root / "half").mkdir()  # a directory inside whose weights link out
    (root / "half" / lora.CONFIG_FILE).write_text((root / "good" / lora.CONFIG_FILE).read_text())
    (root / "half" / lora.WEIGHTS_FILE).symlink_to(outside / "evil" / lora.WEIGHTS_FILE)
    for bad in [
        "../elsewhere/evil",
        str(outside / "evil"),
        "link",
        "half",
        "good/../../elsewhere/evil",
    ]:
        with pytest.raises(LoraAdapterError, match="outside lora_dir"):
            resolve_in_dir(str(root), bad)
    with pytest.raises(LoraAdapterError, match="needs lora_dir"):
        resolve_in_dir(None, "good")


def test_parse_lora_module():
    from jaxserve.adapters import parse_lora_module

    assert parse_lora_module("fmt=/tmp/a=b") == ("fmt", "/tmp/a=b")
    with pytest.raises(LoraAdapterError, match="NAME=PATH"):
        parse_lora_module("/tmp/a")


# ---- served through the engine (tiny model) ---------------------------------------------------
PROMPTS = [[5, 9, 13], list(range(1, 30)), [7] * 11, [100, 3, 64, 2, 9, 33, 17], [42] * 21]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def tiny_engine(params=None, num_pages: int = 128, **lora_cfg) -> Engine:
    cfg = EngineConfig(
        cache=CacheConfig(page_size=4, num_pages=num_pages),
        scheduler=SchedulerConfig(
            max_running_requests=8,
            max_prefill_tokens=64,
            prefill_block=8,
            prefill_buckets=(16, 64),
            decode_batch_buckets=(4,),
            mixed_step_tokens=24,
            max_model_len=64,
            max_prefill_seqs=4,
        ),
        **lora_cfg,
    )
    params = tiny_params() if params is None else params
    engine = Engine(cfg, TINY, FakeTokenizer(), Runner(TINY, params, cfg))
    engine.warmup()
    return engine


ADAPTERS = {
    "a": random_adapter(11, 8),
    "b": random_adapter(12, 4, ("q_proj", "v_proj", "gate_proj"), alpha=8.0, size=0.6),
    "c": random_adapter(13, 2, ("o_proj", "down_proj", "k_proj", "up_proj"), size=0.6),
}


@pytest.fixture(scope="module")
def served():
    engine = tiny_engine(enable_lora=True, max_loras=4, max_lora_rank=8)
    for name, adapter in ADAPTERS.items():
        engine.lora.load(name, Path(name), adapter)
    return LLM(engine=engine)


def lora_params(name: str | None, **kw) -> SamplingParams:
    return dataclasses.replace(GREEDY, lora=name, **kw)


def test_served_adapter_equals_merged_weights(served):
    """Greedy tokens of a served adapter == the base model with the adapter merged, and differ
    from the base model's."""
    base = [o.token_ids for o in LLM(engine=tiny_engine()).generate_tokens(PROMPTS, GREEDY)]
    for name, adapter in ADAPTERS.items():
        merged = LLM(engine=tiny_engine(lora.merge_into(tiny_params(), adapter)))
        want = [o.token_ids for o in merged.generate_tokens(PROMPTS, GREEDY)]
        got = [o.token_ids for o in served.generate_tokens(PROMPTS, lora_params(name))]
        assert got == want, name
        assert got != base, name
    assert [o.token_ids for o in served.generate_tokens(PROMPTS, GREEDY)] == base


def test_batch_interleaving_adapters_equals_each_alone(served):
    """Base and 3 adapters interleaved in one batch (prefill, MIXED and decode steps, slots
    reused): the same greedy tokens as every request alone; nothing compiles."""
    engine = served.engine
    assert engine.runner.num_compiles == engine.num_step_functions
    names = [None, "a", "b", "c"]
    jobs = [(p, names[i % 4]) for i, p in enumerate(PROMPTS * 3)]
    alone = [served.generate_tokens([p], lora_params(n))[0].token_ids for p, n in jobs]
    batched = served.generate_tokens([p for p, _ in jobs], [lora_params(n) for _, n in jobs])
    assert [o.token_ids for o in batched] == alone
    assert engine.stats.num_mixed_steps > 0
    assert engine.runner.num_compiles == engine.num_step_functions


def test_load_unload_at_run_time_compiles_nothing(served, tmp_path):
    engine = served.engine
    before = engine.runner.num_compiles
    lora.write_adapter(tmp_path / "d", random_adapter(14, 6, size=0.6))
    engine.lora.load("d", tmp_path / "d")
    want = LLM(
        engine=tiny_engine(lora.merge_into(tiny_params(), lora.read_adapter(tmp_path / "d", TINY)))
    )
    want_ids = [o.token_ids for o in want.generate_tokens(PROMPTS[:2], GREEDY)]
    assert [o.token_ids for o in served.generate_tokens(PROMPTS[:2], lora_params("d"))] == want_ids
    with pytest.raises(LoraAdapterError, match="all max_loras=4 LoRA slots are in use"):
        engine.lora.load("e", tmp_path / "d")
    engine.lora.unload("d")
    with pytest.raises(LoraNotFoundError):
        served.generate_tokens(PROMPTS[:1], lora_params("d"))
    # The freed slot takes a new adapter: its outputs are the new adapter's.
    engine.lora.load("e", Path("e"), ADAPTERS["a"])
    got = served.generate_tokens(PROMPTS[:2], lora_params("e"))
    assert [o.token_ids for o in got] == [
        o.token_ids for o in served.generate_tokens(PROMPTS[:2], lora_params("a"))
    ]
    engine.lora.unload("e")
    assert engine.runner.num_compiles == before
    assert_engine_idle(engine)


def test_unload_waits_for_running_requests(served):
    engine = served.engine
    engine.lora.load("f", Path("f"), ADAPTERS["b"])
    engine.add_request("r1", PROMPTS[1], lora_params("f", max_tokens=8))
    tokens = [t for o in engine.step() for t in o.new_token_ids]
    engine.lora.unload("f")
    with pytest.raises(LoraAdapterError, match="in use"):  # "f"'s slot still serves r1
        engine.lora.load("g", Path("g"), ADAPTERS["c"])
    while engine.has_work():
        tokens += [t for o in engine.step() for t in o.new_token_ids]
    assert (
        tokens == served.generate_tokens([PROMPTS[1]], lora_params("b", max_tokens=8))[0].token_ids
    )
    engine.lora.load("g", Path("g"), ADAPTERS["c"])  # free now
    engine.lora.unload("g")
    assert_engine_idle(engine)


def test_prefix_cache_is_keyed_by_adapter(served):
    engine = served.engine
    prompt = list(range(1, 40))
    base = served.generate_tokens([prompt], GREEDY)[0]
    first = served.generate_tokens([prompt], lora_params("a"))[0]
    again = served.generate_tokens([prompt], lora_params("a"))[0]
    cached = [
        engine.scheduler.prefix_cache.peek(prompt, 9, 0, s)
        for s in (b"", engine.lora.registry.get("a").cache_salt)
    ]
    assert cached == [9, 9]  # both namespaces hold the prompt's pages
    assert first.token_ids == again.token_ids != base.token_ids
    alone = served.generate_tokens([prompt], lora_params("b"))[0]  # no pages of a or base
    assert (
        alone.token_ids
        == LLM(engine=tiny_engine(lora.merge_into(tiny_params(), ADAPTERS["b"])))
        .generate_tokens([prompt], GREEDY)[0]
        .token_ids
    )


def test_retracted_requests_keep_their_adapter(served):
    """Too few KV pages: requests are retracted and recomputed, on their own adapters."""
    small = tiny_engine(enable_lora=True, max_loras=4, max_lora_rank=8, num_pages=28)
    for name, adapter in ADAPTERS.items():
        small.lora.load(name, Path(name), adapter)
    names = [None, "a", "b", "c"]
    jobs = [(p, names[i % 4]) for i, p in enumerate(PROMPTS * 2)]
    params = [lora_params(n, max_tokens=24) for _, n in jobs]
    out = LLM(engine=small).generate_tokens([p for p, _ in jobs], params)
    alone = served.generate_tokens([p for p, _ in jobs], params)
    assert [o.token_ids for o in out] == [o.token_ids for o in alone]
    assert small.scheduler.num_retractions > 0


def test_unknown_adapter_and_lora_off():
    engine = tiny_engine()
    assert engine.lora is None
    with pytest.raises(LoraNotFoundError, match="LoRA off"):
        engine.add_request("x", [1, 2], lora_params("a"))
    assert_engine_idle(engine)


def test_finetune_command_writes_a_peft_adapter(tmp_path):
    """`jaxserve finetune` end to end on a random tiny model: chat and prompt/completion
    lines, a progress bar, a PEFT directory that reads back, a loss log."""
    from jaxserve.cli import main
    from jaxserve.weights.random_model import SHAPES

    data = tmp_path / "data.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A: 1"}]},
        {"prompt": "2+2=", "completion": " 4"},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "adapter"
    argv = ["finetune", str(data), "--out", str(out), "--model", "random:tiny", "--epochs", "3"]
    assert (
        main([*argv, "--rank", "2", "--batch-size", "2", "--targets", "q_proj", "down_proj"]) == 0
    )
    adapter = lora.read_adapter(out, SHAPES["tiny"])
    assert adapter.config.r == 2 and adapter.config.target_modules == ("q_proj", "down_proj")
    assert adapter.config.base_model_name_or_path == "random:tiny"
    assert len(json.loads((out / "training_log.json").read_text())["losses"]) == 3


# ---- the real default model (slow: two engines and their compilations) --------------------
@pytest.mark.slow
def test_real_model_served_adapters_equal_merged_weights_and_batch_alone(tmp_path):
    """SmolLM2-135M, the HF fixture prompts: each of 3 served adapters gives the greedy
    tokens of the base model with it merged; base and the 3 adapters interleaved in one batch
    give what each request gives alone; loading and unloading compiles nothing."""
    import os

    from jaxserve.config import load_config, replace
    from jaxserve.weights import load_model
    from tests.conftest import TEST_CONFIG
    from tests.test_engine import FIXTURE

    cases = json.loads(FIXTURE.read_text())["cases"]
    cfg = load_config(TEST_CONFIG)
    loaded = load_model(cfg.model)
    trained = os.environ.get("JAXSERVE_TEST_LORA")  # e.g. a `jaxserve finetune` output
    adapters = {f"r{i}": random_adapter(50 + i, 8, cfg=loaded.config, size=0.05) for i in range(3)}
    if trained:
        adapters["r0"] = lora.read_adapter(trained, loaded.config)
    for name, adapter in adapters.items():
        lora.write_adapter(tmp_path / name, adapter)
    modules = tuple(f"{n}={tmp_path / n}" for n in adapters)
    served = LLM(engine=Engine.from_config(replace(cfg, lora_modules=modules, max_loras=4)))
    tok = served.tokenizer
    prompts = [
        tok.encode(tok.apply_chat_template(c["messages"]) if c.get("messages") else c["prompt"])
        for c in cases
    ]
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    engine = served.engine
    assert engine.runner.num_compiles == engine.num_step_functions
    got = {
        n: [o.token_ids for o in served.generate_tokens(prompts, lora_params_of(greedy, n))]
        for n in (None, *adapters)
    }
    engine.lora.unload("r2")
    engine.lora.load("r2", tmp_path / "r2")
    jobs = [(p, [None, *adapters][i % 4]) for i, p in enumerate(prompts)]
    batched = served.generate_tokens(
        [p for p, _ in jobs], [lora_params_of(greedy, n) for _, n in jobs]
    )
    for (p, n), out in zip(jobs, batched, strict=True):
        assert out.token_ids == got[n][prompts.index(p)], n
    assert engine.runner.num_compiles == engine.num_step_functions
    del served, engine
    for name, adapter in adapters.items():
        merged = lora.merge_into(loaded.params, adapter)
        m = Engine(cfg, loaded.config, loaded.tokenizer, Runner(loaded.config, merged, cfg))
        m.warmup()
        want = [o.token_ids for o in LLM(engine=m).generate_tokens(prompts, greedy)]
        assert got[name] == want, name
        assert got[name] != got[None], name
        del m


def lora_params_of(params: SamplingParams, name: str | None) -> SamplingParams:
    return dataclasses.replace(params, lora=name)
