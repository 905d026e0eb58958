"""Pallas kernels (kernels.gpu: Triton, kernels.tpu: Mosaic) against kernels.reference on CPU.

Everything runs in interpret mode; tolerances: float32 atol = rtol = 1e-5, bfloat16 2e-2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

import kernels
from kernels import gpu, reference, tpu

BACKENDS = {"gpu": gpu, "tpu": tpu}
# float32: only summation order differs. bfloat16: inputs are the same bf16 values, but the
# kernels round softmax weights to bf16 for P @ V and round the output to bf16.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# Small K/V tiles so short test sequences still take several loop steps (and, on GPU, splits).
SMALL_TILES = {"gpu": {"block_kv": 32}, "tpu": {"block_kv": 32}}
STALE_PAGE = 10**6  # page-table entries past a sequence's last page: must never be read


@dataclasses.dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    head_dim: int
    page_size: int
    dtype: type = jnp.float32
    sliding_window: int | None = None
    soft_cap: float | None = None

    @property
    def attn_kwargs(self) -> dict:
        scale = self.head_dim**-0.5
        return dict(scale=scale, sliding_window=self.sliding_window, soft_cap=self.soft_cap)


def _page_table(rng, seq_tokens: list[int], page_size: int) -> tuple[np.ndarray, int]:
    """Distinct random pages per sequence, one spare column, stale entries past each end."""
    used = [-(-n // page_size) for n in seq_tokens]
    width = max(used) + 1
    num_pages = len(seq_tokens) * width + 3
    table = rng.permutation(num_pages)[: len(seq_tokens) * width].reshape(-1, width)
    for row, n in enumerate(used):
        table[row, n:] = STALE_PAGE
    return table.astype(np.int32), num_pages


def _kv(rng, shape: Shape, num_pages: int):
    dims = (num_pages, shape.page_size, shape.kv_heads, shape.head_dim)
    return [jnp.asarray(rng.standard_normal(dims), shape.dtype) for _ in range(2)]


def _check(out, ref, shape: Shape, zero_rows) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    out32 = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out32).all()
    assert (out32[zero_rows] == 0.0).all(), "padding must give exact zeros"
    tol = TOLERANCE[shape.dtype]
    np.testing.assert_allclose(out32, np.asarray(ref.astype(jnp.float32)), atol=tol, rtol=tol)


def _decode_inputs(shape: Shape, lengths: list[int], seed: int = 0):
    rng = np.random.default_rng(seed)
    table, num_pages = _page_table(rng, lengths, shape.page_size)
    q = jnp.asarray(rng.standard_normal((len(lengths), shape.heads, shape.head_dim)), shape.dtype)
    k, v = _kv(rng, shape, num_pages)
    return q, k, v, jnp.asarray(table), jnp.asarray(lengths, jnp.int32)


def _run_decode(backend: str, shape: Shape, lengths: list[int], **tiles) -> None:
    args = _decode_inputs(shape, lengths)
    # The reference gathers every table entry, stale ones included (jnp clamps the index).
    ref = reference.paged_attention(*args, **shape.attn_kwargs)
    out = BACKENDS[backend].paged_attention(*args, interpret=True, **shape.attn_kwargs, **tiles)
    _check(out, ref, shape, np.asarray(lengths) == 0)


DECODE_CASES = {
    # id: (shape, lengths); lengths cover 1, exact pages, partial last pages and empty slots.
    "mha-d64-p16-f32": (Shape(4, 4, 64, 16), [1]),
    "gqa3-d64-p16-f32": (Shape(9, 3, 64, 16), [0, 17, 80, 33]),
    "gqa4-d128-p64-bf16": (Shape(8, 2, 128, 64, jnp.bfloat16), [130, 0, 64, 1]),
    "gqa4-d64-p16-window": (Shape(8, 2, 64, 16, sliding_window=24), [100, 5, 0, 24, 25]),
    "gqa3-d128-p16-softcap-bf16": (Shape(6, 2, 128, 16, jnp.bfloat16, soft_cap=5.0), [47, 3]),
    "mha-d64-p64-window-softcap": (Shape(2, 2, 64, 64, sliding_window=70, soft_cap=8.0), [200, 69]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_matches_reference(backend: str, case: str) -> None:
    shape, lengths = DECODE_CASES[case]
    _run_decode(backend, shape, lengths, **SMALL_TILES[backend])


DEFAULT_DECODE = (Shape(9, 3, 64, 16), [0, 1, 16, 75])  # SmolLM2 heads, default tiles


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_default_tiles(backend: str) -> None:
    _run_decode(backend, *DEFAULT_DECODE)


def test_gpu_decode_split_merge() -> None:
    """Flash-decoding: splits that hold no visible page must drop out of the merge."""
    for splits in (1, 3, 7):
        _run_decode("gpu", Shape(8, 2, 64, 16), [0, 9, 150, 31], block_kv=16, num_splits=splits)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_batch16_long_context_llama_shape(backend: str, dtype) -> None:
    """Up to 2k tokens (128 pages) per slot at the default tiles: many blocks and splits."""
    lengths = [0, 1, 2048, 16, *np.random.default_rng(1).integers(1, 2049, 12)]
    _run_decode(backend, Shape(32, 8, 128, 16, dtype, soft_cap=30.0), lengths)


def _extend_inputs(shape: Shape, seqs: list[tuple[int, int]], block_q: int, seed: int = 0):
    """seqs: (new tokens, tokens already cached) per sequence; plus one all-padding block."""
    rng = np.random.default_rng(seed)
    table, num_pages = _page_table(rng, [new + old for new, old in seqs], shape.page_size)
    positions, block_seq = [], []
    for row, (new, old) in enumerate(seqs):
        blocks = -(-new // block_q)
        pos = np.full(blocks * block_q, -1)
        pos[:new] = np.arange(old, old + new)
        positions.append(pos)
        block_seq += [row] * blocks
    positions.append(np.full(block_q, -1))
    block_seq.append(len(seqs) - 1)
    pos = np.concatenate(positions).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((len(pos), shape.heads, shape.head_dim)), shape.dtype)
    k, v = _kv(rng, shape, num_pages)
    return (q, k, v, jnp.asarray(table), jnp.asarray(block_seq, jnp.int32), jnp.asarray(pos))


def _run_extend(backend, shape: Shape, seqs, block_q: int, **tiles) -> None:
    args = _extend_inputs(shape, seqs, block_q)
    kw = dict(block_q=block_q, **shape.attn_kwargs)
    ref = reference.extend_attention(*args, **kw)
    out = BACKENDS[backend].extend_attention(*args, interpret=True, **kw, **tiles)
    _check(out, ref, shape, np.asarray(args[-1]) < 0)


EXTEND_CASES = {
    # id: (shape, [(new, cached)], block_q): fresh prefills, chunked extends, partial blocks.
    "mha-d64-p16-f32": (Shape(2, 2, 64, 16), [(20, 0)], 8),
    "gqa3-d64-p16-f32": (Shape(9, 3, 64, 16), [(20, 0), (5, 30), (40, 3)], 16),
    "gqa4-d128-p64-bf16": (Shape(8, 2, 128, 64, jnp.bfloat16), [(33, 64), (16, 0)], 16),
    "gqa4-d64-p16-window": (Shape(4, 1, 64, 16, sliding_window=10), [(40, 3), (7, 50)], 16),
    "gqa3-d128-p16-softcap-bf16": (
        Shape(3, 1, 128, 16, jnp.bfloat16, soft_cap=5.0),
        [(9, 0), (16, 16)],
        8,
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", EXTEND_CASES)
def test_extend_matches_reference(backend: str, case: str) -> None:
    shape, seqs, block_q = EXTEND_CASES[case]
    _run_extend(backend, shape, seqs, block_q, **SMALL_TILES[backend])


DEFAULT_EXTEND = (Shape(9, 3, 64, 16), [(30, 2), (3, 0)], 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extend_default_tiles(backend: str) -> None:
    _run_extend(backend, *DEFAULT_EXTEND)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_extend_long_prefill_llama_shape(backend: str) -> None:
    shape = Shape(32, 8, 128, 64, jnp.bfloat16, sliding_window=300)
    _run_extend(backend, shape, [(700, 0), (128, 1000), (1, 7)], 64)


def _dense_oracle(q, k_pages, v_pages, table, q_seq, q_pos, scale) -> np.ndarray:
    """Textbook attention in numpy: query i sees keys 0..q_pos[i] of page-table row q_seq[i]."""
    q, k_pages, v_pages = (np.asarray(a, np.float64) for a in (q, k_pages, v_pages))
    ps, kvh = k_pages.shape[1], k_pages.shape[2]
    group = q.shape[1] // kvh
    out = np.zeros_like(q)
    for i, (row, pos) in enumerate(zip(q_seq, q_pos, strict=True)):
        if pos < 0:
            continue
        keys = np.arange(pos + 1)
        pages = np.asarray(table)[row, keys // ps]
        k, v = k_pages[pages, keys % ps], v_pages[pages, keys % ps]  # [S, KVH, D]
        for h in range(q.shape[1]):
            s = k[:, h // group] @ q[i, h] * scale
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v[:, h // group]
    return out


@pytest.mark.parametrize(
    "impl,platform", [("reference", None), ("interpret", "gpu"), ("interpret", "tpu")]
)
def test_mixed_attention_decode_rows_and_prefill_segments(impl: str, platform) -> None:
    """One MIXED call: 3 decode rows (one empty) and two extend segments (one over a cached
    prefix) against a dense oracle, on every implementation."""
    shape, block_q = Shape(9, 3, 64, 16), 16
    decode_lengths, seqs = [0, 17, 40], [(20, 0), (5, 30)]
    rng = np.random.default_rng(3)
    table, num_pages = _page_table(rng, decode_lengths + [n + c for n, c in seqs], 16)
    positions, block_seq = [], []
    for i, (new, cached) in enumerate(seqs):
        pos = np.full(-(-new // block_q) * block_q, -1)
        pos[:new] = np.arange(cached, cached + new)
        positions.append(pos)
        block_seq += [i] * (len(pos) // block_q)
    positions = np.concatenate(positions).astype(np.int32)
    n, t = len(decode_lengths), len(positions)
    q = jnp.asarray(rng.standard_normal((n + t, shape.heads, shape.head_dim)), jnp.float32)
    k, v = _kv(rng, shape, num_pages)
    out = kernels.mixed_attention(
        q,
        k,
        v,
        jnp.asarray(table[:n]),
        jnp.asarray(decode_lengths, jnp.int32),
        jnp.asarray(table[n:]),
        jnp.asarray(block_seq, jnp.int32),
        jnp.asarray(positions),
        block_q=block_q,
        impl=impl,
        platform=platform,
        **shape.attn_kwargs,
    )
    seg = np.asarray(block_seq).repeat(block_q)
    q_seq = np.concatenate([np.arange(n), n + seg])
    q_pos = np.concatenate([np.asarray(decode_lengths) - 1, positions])
    want = _dense_oracle(q, k, v, table, q_seq, q_pos, shape.head_dim**-0.5)
    assert out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5, rtol=1e-5)
    assert (np.asarray(out)[q_pos < 0] == 0).all()


def _numpy(args) -> list:
    return [np.asarray(a) for a in args]


@pytest.mark.parametrize(
    "impl,platform", [("reference", None), ("interpret", "gpu"), ("interpret", "tpu")]
)
def test_public_ops_accept_numpy(impl: str, platform) -> None:
    """Called eagerly with numpy arrays (as a user would), every public op gives what it
    gives for jax arrays; numpy indexing by a traced loop index used to raise."""
    shape = Shape(9, 3, 64, 16)
    kw = dict(impl=impl, platform=platform, **shape.attn_kwargs)
    args = _decode_inputs(shape, [5, 17, 0])
    want = kernels.paged_attention(*args, **kw)
    got = kernels.paged_attention(*_numpy(args), **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    args = _extend_inputs(shape, [(20, 0), (5, 30)], 16)
    want = kernels.extend_attention(*args, block_q=16, **kw)
    got = kernels.extend_attention(*_numpy(args), block_q=16, **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    q, k, v, table, block_seq, pos = _numpy(args)
    q_mixed = np.concatenate([q[:1], q])  # one decode row, then the extend tokens
    got = kernels.mixed_attention(
        q_mixed, k, v, table[:1], np.array([3], np.int32), table, block_seq, pos, block_q=16, **kw
    )
    np.testing.assert_allclose(np.asarray(got)[1:], np.asarray(want), atol=1e-6)
    new = np.ones((2, shape.kv_heads, shape.head_dim), np.float32)
    k2, v2 = kernels.write_kv(k, v, new, 2 * new, np.array([0, -1], np.int32))
    assert (np.asarray(k2)[0, 0] == 1).all() and (np.asarray(v2)[0, 0] == 2).all()
    np.testing.assert_array_equal(np.asarray(k2)[1:], k[1:])


LOWERING = {"gpu": ("cuda", "xla.gpu.triton"), "tpu": ("tpu", "tpu_custom_call")}
LOWERING_SHAPES = [
    Shape(9, 3, 64, 16),
    Shape(32, 8, 128, 16, jnp.bfloat16, sliding_window=64, soft_cap=30.0),
    Shape(8, 2, 128, 64, jnp.bfloat16),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", LOWERING_SHAPES, ids=lambda s: f"h{s.heads}-kv{s.kv_heads}")
def test_lowers_for_device(backend: str, shape: Shape) -> None:
    """Compile-free check that Triton / Mosaic lowering accepts every op (shapes, dtypes).

    Only JAX's own lowering runs here; ptxas and Mosaic's layout passes in libtpu do not.
    """
    mod = BACKENDS[backend]
    decode = functools.partial(mod.paged_attention, **shape.attn_kwargs)
    extend = functools.partial(mod.extend_attention, block_q=16, **shape.attn_kwargs)
    cases = [
        (decode, _decode_inputs(shape, [0, 40, 7])),
        (extend, _extend_inputs(shape, [(20, 0), (5, 30)], 16)),
    ]
    # Mosaic asks the "current device" for its TPU generation: name one through a mesh.
    device = AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    mesh = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,), abstract_device=device)
    platform, marker = LOWERING[backend]
    with use_abstract_mesh(mesh) if backend == "tpu" else contextlib.nullcontext():
        for fn, args in cases:
            lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))
            assert marker in lowered.as_text()


@pytest.mark.parametrize("op", ["paged_attention", "extend_attention"])
@pytest.mark.parametrize("platform,module", [(None, gpu), ("gpu", gpu), ("tpu", tpu)])
def test_dispatch_routes_interpret(monkeypatch, op: str, platform: str | None, module) -> None:
    """impl="interpret" reaches the platform's kernel module (gpu on CPU) with interpret=True."""
    calls = []
    kernel = getattr(module, op)

    def spy(*args, **kwargs):
        calls.append(kwargs["interpret"])
        return kernel(*args, **kwargs)

    monkeypatch.setattr(module, op, spy)
    if op == "paged_attention":
        shape, lengths = DEFAULT_DECODE  # same shapes as above: the jit cache is reused
        args, kw, zero_rows = _decode_inputs(shape, lengths), {}, np.asarray(lengths) == 0
    else:
        shape, seqs, block_q = DEFAULT_EXTEND
        args, kw = _extend_inputs(shape, seqs, block_q), {"block_q": block_q}
        zero_rows = np.asarray(args[-1]) < 0
    kw.update(shape.attn_kwargs)
    out = getattr(kernels, op)(*args, impl="interpret", platform=platform, **kw)
    assert calls == [True]
    _check(out, getattr(reference, op)(*args, **kw), shape, zero_rows)


def test_kernels_do_not_import_jaxserve() -> None:
    code = "import kernels, sys; assert not any(m.startswith('jaxserve') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
