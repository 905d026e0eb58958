"""Cheaper matmul forms for CPU buckets: int8 (per-channel weights, per-row activations), bf16.

`dense(x, w)` is the one matmul the model calls; the weight's type picks the form, so one
`forward` runs float32, int8 or bfloat16 params (or a mix, e.g. a bf16 body with an int8 head).

Speed (scripts/bench_matmul.py, 2-core AVX-512 VNNI+BF16 EPYC, jax 0.10.2): XLA:CPU hands
s8 x s8 -> s32 and bf16 x bf16 -> f32 dots to YNNPACK. All matmuls of one step: int8 is fastest
at 1-16 rows (~1.5x float32), bf16 from ~32 rows (~1.9x float32, 1.3-1.5x int8 at 128-512).
Int8 weights dequantized inside the jit are not fused into the dot (slower than float32,
FACTS.md), so activations are quantized too, per row and symmetric. YNNPACK refuses
matrix-vector dots (XLA then widens the whole weight: 50-70 ms for the LM head), so one row is
padded to two. Machines differ (AVX2 has no bf16 dot instruction): measure before choosing.

Accuracy (SmolLM2-135M, tests/test_quant.py, 480 teacher-forced greedy tokens of HF's fixture):
bf16 keeps 480 (logits within 0.9%); int8 keeps 434 (logits within ~13%: per-row activation
scales lose the small channels next to fixed outlier channels; int8 weights alone keep 464).
llama.cpp's Q8 activations use a scale per 32 values, not per row, which is why they hold up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import flax.struct
import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from jaxserve.models.llama import LlamaParams

Kind = Literal["float32", "int8", "bf16"]
QMAX = 127  # symmetric: -128 is never produced
WEIGHT_NAMES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
_DOT = (((1,), (0,)), ((), ()))  # [R, K] . [K, N]


@flax.struct.dataclass
class QuantizedWeight:
    q: jax.Array  # [in, out] int8
    scale: jax.Array  # [out] float32; w ~= q * scale

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape


Weight = jax.Array | QuantizedWeight


def _symmetric_scale(absmax: jax.Array) -> jax.Array:
    # An all-zero channel or row gets scale 1: it quantizes to 0 without dividing by zero.
    return jnp.where(absmax > 0, absmax / QMAX, 1.0)


def quantize_weight(w: jax.Array) -> QuantizedWeight:
    """w [in, out] float -> int8 with one symmetric scale per output column."""
    wf = jnp.asarray(w, jnp.float32)
    scale = _symmetric_scale(jnp.max(jnp.abs(wf), axis=0))  # [out]
    q = jnp.clip(jnp.round(wf / scale), -QMAX, QMAX).astype(jnp.int8)
    return QuantizedWeight(q=q, scale=scale)


def dequantize_weight(w: QuantizedWeight) -> jax.Array:  # [in, out] float32
    return w.q.astype(jnp.float32) * w.scale


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., K] float -> (int8 [..., K], float32 scale [..., 1]): one scale per row."""
    xf = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
    inv = QMAX / jnp.maximum(absmax, jnp.finfo(jnp.float32).tiny)  # zero rows stay zero
    xq = jnp.clip(jnp.round(xf * inv), -QMAX, QMAX).astype(jnp.int8)
    return xq, _symmetric_scale(absmax)


def _rows_dot(a: jax.Array, b: jax.Array, acc_dtype, pad_one_row: bool) -> jax.Array:
    """a [R, K] . b [K, N] -> [R, N] acc_dtype; one row goes in padded to two (YNNPACK)."""
    rows = a.shape[0]
    if pad_one_row and rows == 1:
        a = jnp.pad(a, ((0, 1), (0, 0)))  # the spare row costs nothing next to the weights
    return jax.lax.dot_general(a, b, _DOT, preferred_element_type=acc_dtype)[:rows]


def dense(x: jax.Array, w: Weight, *, pad_one_row: bool = True) -> jax.Array:
    """x [..., K] @ w [K, N] -> [..., N] in x's dtype.

    float w (same dtype as x): exactly `x @ w`. QuantizedWeight: x quantized per row, int8 dot
    accumulated in int32, rescaled. bfloat16 w under wider x: x rounded to bf16, float32
    accumulation (without this jnp would widen the whole weight to float32 on every call).
    """
    k, n = w.shape
    lead = x.shape[:-1]
    if isinstance(w, QuantizedWeight):
        xq, x_scale = quantize_rows(x.reshape(-1, k))  # [R, K] int8, [R, 1] float32
        acc = _rows_dot(xq, w.q, jnp.int32, pad_one_row)  # [R, N] int32
        out = acc.astype(jnp.float32) * x_scale * w.scale
    elif w.dtype == jnp.bfloat16 and x.dtype != jnp.bfloat16:
        xb = x.reshape(-1, k).astype(jnp.bfloat16)
        out = _rows_dot(xb, w, jnp.float32, pad_one_row)  # [R, N] float32
    else:
        return x @ w  # the float path: the same jaxpr as before this module existed
    return out.reshape(*lead, n).astype(x.dtype)


def convert_weight(w: jax.Array, kind: Kind) -> Weight:
    if kind == "int8":
        return quantize_weight(w)
    if kind == "bf16":
        return jnp.asarray(w, jnp.bfloat16)
    if kind == "float32":
        return jnp.asarray(w, jnp.float32)
    raise ValueError(f"unknown weight kind {kind!r}; expected float32, int8 or bf16")


def quantize_params(
    params: LlamaParams, kind: Kind = "int8", lm_head_kind: Kind | None = None
) -> LlamaParams:
    """Every projection weight to `kind`, the LM head to `lm_head_kind` (default: `kind`).

    Embeddings and norms stay as they are (the lookup needs the float [V, Dm] table), so tied
    embeddings get their own [Dm, V] converted copy: the result always has an explicit LM head.
    """
    layers = tuple(
        layer.replace(**{name: convert_weight(getattr(layer, name), kind) for name in WEIGHT_NAMES})
        for layer in params.layers
    )
    head = params.lm_head if params.lm_head is not None else jnp.asarray(params.embed).T
    return params.replace(layers=layers, lm_head=convert_weight(head, lm_head_kind or kind))


QUANTIZATIONS = ("none", "bf16", "int8")


@dataclass(frozen=True)
class QuantPlan:
    """Which weight form each compiled step uses, by its row count (decode rows + prefill tokens).

    "none": float (the model dtype) everywhere, exact. "bf16": bf16 weights everywhere.
    "int8": int8 body in steps of at most `int8_max_rows` rows (where int8 dots are fastest),
    bf16 above; the LM head (a few sampled rows in every step) int8 throughout.
    Each bucket is its own compiled function, so the choice costs no extra compilation.
    """

    quantization: str = "none"
    int8_max_rows: int = 16

    @staticmethod
    def from_config(quantization: str, int8_max_rows: int) -> QuantPlan:
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization={quantization!r}; expected one of {QUANTIZATIONS}")
        return QuantPlan(quantization, int8_max_rows)

    def kind_for(self, rows: int) -> str:
        if self.quantization == "int8":
            return "int8" if rows <= self.int8_max_rows else "bf16"
        return self.quantization

    def build(self, params: LlamaParams) -> dict[str, LlamaParams]:
        """The param sets this plan uses, keyed by `kind_for`'s answers."""
        if self.quantization == "none":
            return {"none": params}
        if self.quantization == "bf16":
            return {"bf16": quantize_params(params, "bf16")}
        return {
            "int8": quantize_params(params, "int8"),
            "bf16": quantize_params(params, "bf16", lm_head_kind="int8"),
        }
