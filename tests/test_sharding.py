"""Tensor and data parallel over a device mesh (jaxserve/sharding.py).

Mesh runs need 4 devices, simulated on CPU by XLA_FLAGS before jax starts its backend, so
they run once in a subprocess (tests/mesh_worker.py) whose JSON report the tests below read.
The dp bookkeeping (slots, page ranges, rows) is also checked on the host with one fake
runner per dp group, each owning only its group's pages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from jaxserve.engine import Engine
from jaxserve.pages import PageAllocator
from jaxserve.prefix_cache import PrefixCache
from jaxserve.request import SamplingParams
from jaxserve.sharding import ShardingError, check_mesh, make_mesh, replicate_kv_heads, valid_tp
from jaxserve.weights.random_model import SHAPES
from tests.fake_model import expected_tokens
from tests.test_scheduler import make_engine
from tests.tiny_model import TINY, dense_logits, tiny_params

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = SHAPES["smollm2-135m"]  # the default model's heads: 9 query, 3 KV


# ---- head counts ---------------------------------------------------------------------------
def test_head_counts_that_do_not_divide_name_the_valid_tp_values():
    with pytest.raises(ShardingError) as e:
        check_mesh(SMOLLM2, tp=2, dp=1)
    msg = str(e.value)
    assert "tp=2" in msg and "9 query heads" in msg and "3 KV heads" in msg
    assert msg.endswith("valid tp values: 1, 3")  # 9 divides neither 1536 nor stays < 9
    check_mesh(SMOLLM2, tp=3, dp=4)
    assert valid_tp(TINY) == [1, 2, 4]  # tp=4 > 2 KV heads: each KV head on two devices
    with pytest.raises(ShardingError, match="dp=0"):
        check_mesh(TINY, tp=1, dp=0)


def test_replicated_kv_heads_compute_the_same_model():
    cfg4, params4 = replicate_kv_heads(TINY, tiny_params(), tp=4)
    assert cfg4.num_kv_heads == 4 and params4.layers[0].wk.shape == (32, 4 * 8)
    tokens = [3, 17, 99, 4, 4, 120, 7]
    np.testing.assert_allclose(
        dense_logits(params4, cfg4, tokens), dense_logits(tiny_params(), TINY, tokens), atol=1e-9
    )
    assert replicate_kv_heads(TINY, tiny_params(), tp=2)[0] is TINY  # 2 KV heads split as is


def test_a_mesh_larger_than_the_machine_says_how_to_simulate_devices():
    with pytest.raises(ShardingError, match="needs 4 devices; 1 visible.*device_count"):
        make_mesh(2, 2, devices=jax.devices("cpu")[:1])


def test_lazy_safetensors_tensors_read_the_slices_asked_for(tmp_path: Path):
    from jaxserve.weights.safetensors_loader import hf_config, load_hf_params
    from tests.mesh_worker import save_tiny_hf

    save_tiny_hf(tmp_path)
    cfg = hf_config(tmp_path)
    lazy, eager = load_hf_params(tmp_path, cfg, lazy=True), load_hf_params(tmp_path, cfg)
    for a, b in zip(jax.tree.leaves(lazy), jax.tree.leaves(eager), strict=True):
        assert a.shape == b.shape and np.array_equal(np.asarray(a), b)
    wq = lazy.layers[0].wq  # [in, out] of HF's [out, in] q_proj
    np.testing.assert_array_equal(wq[0:8, 16:32], eager.layers[0].wq[0:8, 16:32])


# ---- dp bookkeeping on the host --------------------------------------------------------------
def test_page_allocator_hands_out_each_groups_own_range():
    a = PageAllocator(8, num_groups=2)
    assert a.alloc(2, group=1) == [4, 5] and a.alloc(1) == [0]
    assert (a.num_free_in(0), a.num_free_in(1), a.num_free) == (3, 2, 5)
    a.free([5, 0])
    assert a.alloc(4, group=0) == [0, 1, 2, 3] and sorted(a._free) == [5, 6, 7]
    with pytest.raises(ValueError, match="does not split"):
        PageAllocator(9, num_groups=2)


def test_prefix_cache_matches_only_pages_of_the_asking_group():
    a = PageAllocator(8, num_groups=2)
    cache = PrefixCache(a, page_size=2)
    tokens = [1, 2, 3, 4, 5]
    cache.insert(tokens, a.alloc(2, group=1))
    assert cache.match(tokens, 2, group=0) == [] and cache.match(tokens, 2, group=1) == [4, 5]
    assert (cache.num_evictable(0), cache.num_evictable(1)) == (0, 0)  # a request holds them


def grouped_engine(dp: int, num_pages: int, **sched) -> Engine:
    return make_engine(num_pages=num_pages, dp=dp, **sched)


@pytest.mark.parametrize("num_pages", [64, 16], ids=["roomy", "retracting"])
def test_dp_groups_keep_their_pages_and_give_the_single_group_outputs(num_pages: int):
    engine = grouped_engine(dp=2, num_pages=num_pages)
    s = engine.scheduler
    rng = np.random.default_rng(4)
    prompts = [rng.integers(1, 97, size=int(n)).tolist() for n in rng.integers(1, 40, size=14)]
    prompts += [prompts[0] + [5, 6], prompts[2][:9]]  # prefix cache hits
    limits = [int(n) for n in rng.integers(1, 20, size=len(prompts))]
    for i, (p, n) in enumerate(zip(prompts, limits, strict=True)):
        engine.add_request(str(i), p, SamplingParams(max_tokens=n, temperature=0.0))
    out: dict[str, list[int]] = {}
    checked, groups = 0, set()
    while engine.has_work():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
        for req in s.running:  # no page of one group ever lands in another's table
            group = req.slot // 4
            groups.add(group)
            assert all(p // num_pages == group for p in req.pages), (req.slot, req.pages)
            checked += len(req.pages)
    assert checked > 0 and groups == {0, 1}
    for i, (p, n) in enumerate(zip(prompts, limits, strict=True)):
        assert out[str(i)] == expected_tokens(p, n), i
    assert s.allocator.num_used == s.prefix_cache.num_pages  # nothing leaked
    if num_pages == 16:
        assert s.num_retractions > 0
    assert s.prefix_cache.hits > 0


def test_each_dp_group_fills_its_own_prefill_budget():
    """A step's prefill budget (`max_prefill_tokens`, `max_prefill_seqs`, MIXED steps'
    `mixed_step_tokens`) is per dp group, as each group's devices run its part: with dp=2 one
    step prefills a full budget in each group, in the same compiled shape."""
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    engine = grouped_engine(dp=2, num_pages=64, max_prefill_seqs=2)
    s = engine.scheduler
    for i in range(6):
        engine.add_request(str(i), [i + 1] * 32, greedy)
    plan = s.schedule()  # EXTEND: 32 tokens in each group (one group's bucket, twice)
    assert [(s.group_of(c.request.slot), c.length) for c in plan.prefill] == [(0, 32), (1, 32)]
    assert engine.builder.prefill(plan.prefill).tokens.shape == (2 * 32,)
    s.update(plan, [7, 7])
    plan = s.schedule()  # MIXED: each group's decode row and a 32-token chunk beside it
    assert plan.mode.value == "mixed" and len(plan.decode) == 2
    assert [(s.group_of(c.request.slot), c.length) for c in plan.prefill] == [(0, 32), (1, 32)]

    engine = grouped_engine(dp=2, num_pages=64, max_prefill_seqs=2)
    for i in range(6):
        engine.add_request(str(i), [i + 1] * 4, greedy)
    plan = engine.scheduler.schedule()  # max_prefill_seqs = 2 per group: 4 sequences
    assert sorted(engine.scheduler.group_of(c.request.slot) for c in plan.prefill) == [0, 0, 1, 1]


@pytest.mark.parametrize(("balance", "want_group"), [(8, 1), (0, 0)])
def test_a_next_turn_goes_to_the_group_caching_its_history(balance: int, want_group: int):
    """dp=2: a chat's next turn is admitted to the group whose prefix cache holds its history
    (group 1 here), while that group has at most `dp_balance_slots` fewer free slots than the
    freest (group 0, one more free slot); with 0 the freest group takes it and recomputes."""
    engine = make_engine(dp=2, num_pages=64, dp_balance_slots=balance)
    s = engine.scheduler
    prompts = {"c": [5] * 6, "a": list(range(1, 13)), "d": [7] * 5}
    limits = {"c": 3, "a": 1, "d": 20}
    out: dict[str, list[int]] = {}

    def add(rid: str) -> None:
        engine.add_request(rid, prompts[rid], SamplingParams(max_tokens=limits[rid]))

    def step() -> None:
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)

    add("c")  # group 0
    add("a")  # group 1; done after its prefill, its 12 prompt tokens cached in group 1
    step()
    assert out["a"] and "a" not in engine.requests
    add("d")  # group 1 (the freest)
    while "c" in engine.requests:
        step()
    free = [s.slots[g * 4 : (g + 1) * 4].count(None) for g in (0, 1)]
    assert free == [4, 3]
    prompts["b"], limits["b"] = prompts["a"] + out["a"] + [40, 41, 42], 2  # the next turn
    add("b")
    step()
    b = engine.requests["b"]
    assert s.group_of(b.slot) == want_group
    assert b.num_cached == (12 if want_group == 1 else 0)
    while engine.has_work():
        step()
    for rid, prompt in prompts.items():
        assert out[rid] == expected_tokens(prompt, limits[rid]), rid


def test_a_request_the_preferred_group_has_no_pages_for_goes_to_another():
    """dp=2: group 0 (the preferred one: a tie on free slots) is short of pages for a
    30-token prompt, group 1 has them: the prompt starts in group 1 now instead of waiting
    for group 0's pages (head-of-line blocking across groups)."""
    engine = make_engine(dp=2, num_pages=16)  # 16 pages of 4 tokens per group
    s = engine.scheduler
    prompts = {"long": list(range(1, 41)), "x": [3, 1, 4, 1], "y": [9] * 30}
    limits = {"long": 12, "x": 12, "y": 2}
    out: dict[str, list[int]] = {}

    def step() -> None:
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)

    for rid in ("long", "x"):  # group 0 (10 of its 16 pages), group 1 (1 page)
        engine.add_request(rid, prompts[rid], SamplingParams(max_tokens=limits[rid]))
    step()
    assert [s.group_of(engine.requests[r].slot) for r in ("long", "x")] == [0, 1]
    engine.add_request("y", prompts["y"], SamplingParams(max_tokens=limits["y"]))
    step()
    y = engine.requests["y"]
    assert y.slot is not None and s.group_of(y.slot) == 1
    while engine.has_work():
        step()
    for rid, prompt in prompts.items():
        assert out[rid] == expected_tokens(prompt, limits[rid]), rid


def test_static_batching_batches_each_dp_group_on_its_own():
    """policy = "static" with dp=2: a group whose batch has finished starts the next batch
    while the other group still decodes its own (as two static engines would), instead of
    waiting for every group to drain."""
    engine = make_engine(dp=2, num_pages=64, policy="static")
    s = engine.scheduler
    prompts = {"a": [4, 2], "b": [8, 6, 7], "c": [5, 3, 9]}
    limits = {"a": 2, "b": 20, "c": 3}
    out: dict[str, list[int]] = {}

    def step() -> None:
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)

    for rid in ("a", "b"):  # one batch each: group 0, group 1
        engine.add_request(rid, prompts[rid], SamplingParams(max_tokens=limits[rid]))
    while "a" in engine.requests:
        step()
    assert "b" in engine.requests
    engine.add_request("c", prompts["c"], SamplingParams(max_tokens=limits["c"]))
    step()
    c = engine.requests["c"]
    assert c.slot is not None and s.group_of(c.slot) == 0 and "b" in engine.requests
    while engine.has_work():
        step()
    for rid, prompt in prompts.items():
        assert out[rid] == expected_tokens(prompt, limits[rid]), rid


# ---- on a mesh of 4 simulated devices (one subprocess) -------------------------------------
def run_worker(module: str, out: Path, devices: int, timeout_s: int) -> Any:
    """`python -m module out` with `devices` simulated CPU devices; its JSON report."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path.home() / ".cache/jaxserve/jax"))
    proc = subprocess.run(
        [sys.executable, "-m", module, str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def mesh_report(tmp_path_factory) -> dict:
    return run_worker("tests.mesh_worker", tmp_path_factory.mktemp("mesh") / "r.json", 4, 900)


def _mesh(report: dict, tp: int, dp: int) -> dict:
    return next(m for m in report["meshes"] if (m["tp"], m["dp"]) == (tp, dp))


MESHES = [(2, 1), (1, 2), (2, 2), (4, 1)]


@pytest.mark.parametrize(("tp", "dp"), MESHES, ids=lambda v: str(v))
def test_outputs_on_a_mesh_match_one_device(mesh_report: dict, tp: int, dp: int):
    """Greedy and seeded sampling, prefix-cache hits, chunked prefill and MIXED steps."""
    one, mesh = _mesh(mesh_report, 1, 1), _mesh(mesh_report, tp, dp)
    assert mesh["tokens"] == one["tokens"]
    for got, want in zip(mesh["logprobs"], one["logprobs"], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)  # only summation order differs
    assert mesh["prefix_cache_hits"] > 0 and mesh["slot_permutes"] > 0


def test_nothing_compiles_after_warmup_on_any_mesh(mesh_report: dict):
    for m in mesh_report["meshes"]:
        assert m["warmup_compiles"] == 4, m  # EXTEND, DECODE, MIXED, slot permute
        assert m["compiles_after_warmup"] == 0, m


@pytest.mark.parametrize(("tp", "dp"), [(1, 2), (2, 2)])
def test_dp_groups_use_only_their_own_pages(mesh_report: dict, tp: int, dp: int):
    m = _mesh(mesh_report, tp, dp)
    assert m["pages_checked"] > 0 and m["groups_used"] == [0, 1]
    assert m["page_violations"] == 0


def test_weights_and_kv_cache_are_split_over_the_mesh(mesh_report: dict):
    # tiny: Dm 32, 4 heads x 8, 2 KV heads, MLP 64, vocab 128; 48 pages of 4 per dp group.
    m = _mesh(mesh_report, 2, 2)
    assert m["kv_shape"] == [96, 4, 2, 8] and m["kv_shard_shape"] == [48, 4, 1, 8]
    assert m["wq_shard_shape"] == [32, 16] and m["w_down_shard_shape"] == [32, 32]
    assert m["embed_shard_shape"] == [64, 32]
    assert m["token_counts_shard_shape"] == [4, 64]  # per-slot [B, V] history: slots x vocab
    # Weights are read from the safetensors file slice by slice: one wq column half per device.
    assert m["wq_reads"] and all(shape == [32, 16] for shape in m["wq_reads"])
    assert _mesh(mesh_report, 1, 1)["wq_reads"] == [[32, 32]]  # one device: the whole tensor
    m = _mesh(mesh_report, 4, 1)  # 2 KV heads replicated to one per device
    assert m["num_kv_heads"] == 4 and m["kv_shard_shape"] == [48, 4, 1, 8]


@pytest.mark.parametrize(("tp", "dp"), MESHES, ids=lambda v: str(v))
def test_the_kv_cache_never_moves_between_devices(mesh_report: dict, tp: int, dp: int):
    """No collective in the compiled MIXED step has the shape of a KV cache (shard)."""
    m = _mesh(mesh_report, tp, dp)
    cache_shapes = {f"[{n},4," for n in (48, 96)}
    assert not [c for c in m["collectives"] if any(s in c for s in cache_shapes)]
    if tp > 1:
        assert any(c.startswith("f32[") for c in m["collectives"])  # tp all-reduces do exist


def test_bf16_weights_and_cache_on_a_mesh_stay_close_to_float(mesh_report: dict):
    bf16 = mesh_report["bf16"]
    assert bf16["kv_dtype"] == bf16["weight_dtype"] == "bfloat16"
    # Measured 0.045 (log-prob units) over the tiny model's 100 teacher-forced steps.
    assert 0 < bf16["worst_logprob_error"] < 0.1


def test_pallas_kernels_run_per_head_shard(mesh_report: dict):
    """impl="interpret" (kernels.gpu in interpret mode) inside shard_map over tp, on 2x2."""
    one = _mesh(mesh_report, 1, 1)["tokens"]
    want = [t[:6] for t in one[:4]] + [one[10][:6]]  # the second round's first prompt
    assert mesh_report["interpret"]["tokens"] == want


def test_int8_weights_split_like_their_float_weights(mesh_report: dict):
    """Not token-exact: tp changes float summation order, and int8 rounding of activations
    can flip on that; held to the single-device int8 tolerance of tests/test_model.py."""
    int8 = mesh_report["int8"]
    assert int8["scale_shard_shape"] == [16]  # wq's 32 column scales, half per tp device
    assert 0 < int8["worst_logprob_error"] < 0.2


@pytest.mark.slow
def test_dp2_on_the_default_model_gives_the_one_device_tokens(tmp_path):
    """The default model, greedy, a batch of 8 prompts: dp=2 over 2 simulated devices gives
    the tokens of one device, compiles nothing after warm-up, and no request's pages leave
    its slot's group. `slow`: two default-model warm-ups in a subprocess (minutes)."""
    one, two = run_worker("tests.default_dp_worker", tmp_path / "dp.json", 2, 1800)
    assert two["tokens"] == one["tokens"]
    assert all(len(t) == 24 for t in one["tokens"])
    assert one["compiles_after_warmup"] == two["compiles_after_warmup"] == 0
    assert two["requests_with_pages_in_another_group"] == []
    assert two["groups_used"] == [0, 1]  # both groups served requests
