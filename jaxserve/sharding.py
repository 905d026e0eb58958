"""Device mesh and partition specs: tensor parallel (`tp`) over heads, MLP and vocab; data
parallel (`dp`) over slots and their KV pages. One SPMD program per step over the whole mesh.

The step is a `shard_map` over `dp`: each dp group runs the single-device step on its own
`B` slots and its own `num_pages` pages (page ids and slots are local inside). `tp` stays an
automatic axis: XLA's partitioner splits every matmul by the weights' specs (Megatron-style
column then row parallel), and attention runs per head shard in a nested `shard_map`, so the
Pallas kernels see ordinary local arrays and the KV cache never moves between devices.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxserve.config import ModelConfig
from jaxserve.errors import JaxserveError
from jaxserve.models.llama import LayerParams, LlamaParams
from jaxserve.quant import QuantizedWeight, Weight

log = logging.getLogger("jaxserve")

DP, TP = "dp", "tp"
KV_SPEC = P(DP, None, TP, None)  # [num_pages, page_size, KVH, D]: page ranges x heads
ROWS_SPEC = P(DP)  # slot state, step batches and results: dp groups along the first axis
HEADS_SPEC = P(None, TP, None)  # q / attention output [N, H, D] inside a dp group
COLUMN, ROW = P(None, TP), P(TP, None)  # [in, out] weights: split outputs / split inputs


class ShardingError(JaxserveError, ValueError):
    """A mesh that the model or the machine cannot take (names the valid values)."""


def tp_fits(cfg: ModelConfig, tp: int) -> bool:
    """tp divides the query heads and the MLP hidden size, and divides the KV heads or is a
    multiple of them (then each KV head is replicated on tp / KVH devices)."""
    kvh = cfg.num_kv_heads
    return (
        cfg.num_heads % tp == 0
        and cfg.intermediate_size % tp == 0
        and (kvh % tp == 0 or tp % kvh == 0)
    )


def kv_heads_per_device(cfg: ModelConfig, tp: int) -> int:
    """KV heads one device caches: its share of them, or one when tp is a multiple of them
    (`replicate_kv_heads`); a tp that fits neither is refused by `check_mesh`."""
    kvh = cfg.num_kv_heads
    if kvh % tp == 0:
        return kvh // tp
    return 1 if tp % kvh == 0 else kvh


def valid_tp(cfg: ModelConfig) -> list[int]:
    return [t for t in range(1, cfg.num_heads + 1) if tp_fits(cfg, t)]


def check_mesh(cfg: ModelConfig, tp: int, dp: int) -> None:
    if tp < 1 or dp < 1:
        raise ShardingError(f"tp={tp}, dp={dp}: both must be >= 1")
    if not tp_fits(cfg, tp):
        raise ShardingError(
            f"tp={tp} does not split {cfg.name} ({cfg.num_heads} query heads, "
            f"{cfg.num_kv_heads} KV heads, MLP hidden size {cfg.intermediate_size}): tp must "
            f"divide the query heads and the MLP hidden size, and divide the KV heads or be a "
            f"multiple of them; valid tp values: {', '.join(map(str, valid_tp(cfg)))}"
        )


def make_mesh(tp: int, dp: int, devices: list[jax.Device] | None = None) -> Mesh:
    """A ("dp", "tp") mesh over the first dp * tp devices; tp is the inner (fastest) axis."""
    devices = list(jax.devices() if devices is None else devices)
    need = tp * dp
    if len(devices) < need:
        hint = ""
        if devices and devices[0].platform == "cpu":
            hint = "; on CPU, simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N"
        raise ShardingError(f"tp={tp} x dp={dp} needs {need} devices; {len(devices)} visible{hint}")
    return jax.make_mesh((dp, tp), (DP, TP), (AxisType.Auto, AxisType.Auto), devices=devices[:need])


def replicate_kv_heads(
    cfg: ModelConfig, params: LlamaParams, tp: int
) -> tuple[ModelConfig, LlamaParams]:
    """With fewer KV heads than tp, give each device its own copy of its KV head (as vLLM does).

    wk / wv columns are repeated so the model has tp KV heads: query head h still meets the
    same K/V values (head h // (H / tp) is a copy of original head h // (H / KVH)), and every
    device computes and caches only its one KV head. Exact: the copies are the same numbers.
    """
    kvh = cfg.num_kv_heads
    if tp <= kvh:
        return cfg, params
    copies = tp // kvh
    log.info(
        "tp=%d > %d KV heads: each KV head is replicated on %d devices (1 KV head per device)",
        tp,
        kvh,
        copies,
    )

    def repeat(w: Any) -> np.ndarray:  # [Dm, KVH * D] -> [Dm, tp * D]
        w = np.asarray(w)
        dm = w.shape[0]
        return np.repeat(w.reshape(dm, kvh, cfg.head_dim), copies, axis=1).reshape(dm, -1)

    def repeat_bias(b: Any) -> np.ndarray | None:  # [KVH * D] -> [tp * D]
        return None if b is None else repeat(np.asarray(b)[None, :])[0]

    layers = tuple(
        lp.replace(wk=repeat(lp.wk), wv=repeat(lp.wv), bk=repeat_bias(lp.bk), bv=repeat_bias(lp.bv))
        for lp in params.layers
    )
    return dataclasses.replace(cfg, num_kv_heads=tp), params.replace(layers=layers)


class MeshLayout:
    """Where every device array of the runner lives on the mesh, and the compiled wrappers."""

    def __init__(self, mesh: Mesh, model_cfg: ModelConfig):
        self.mesh = mesh
        self.tp = mesh.shape[TP]
        self.dp = mesh.shape[DP]
        # A vocab that tp does not divide stays whole on every device (memory, not numerics).
        self.shard_vocab = model_cfg.vocab_size % self.tp == 0
        self.kv_sharding = self.named(KV_SPEC)
        self.rows_sharding = self.named(ROWS_SPEC)

    def named(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    # ---- parameters ------------------------------------------------------------------------
    def _weight(self, w: Weight, spec: P) -> Weight | NamedSharding:
        if isinstance(w, QuantizedWeight):  # per-output-column scales follow the columns
            columns = P(spec[1]) if len(spec) > 1 and spec[1] else P()
            return QuantizedWeight(q=self.named(spec), scale=self.named(columns))
        return self.named(spec)

    def param_shardings(self, params: LlamaParams) -> LlamaParams:
        """A LlamaParams of NamedShardings (QuantizedWeight leaves included)."""
        rep = self.named(P())
        vocab_col = COLUMN if self.shard_vocab else P()

        def layer(lp: LayerParams) -> LayerParams:
            maybe = lambda a, spec: None if a is None else self.named(spec)  # noqa: E731
            return LayerParams(
                attn_norm=rep,
                wq=self._weight(lp.wq, COLUMN),
                wk=self._weight(lp.wk, COLUMN),
                wv=self._weight(lp.wv, COLUMN),
                wo=self._weight(lp.wo, ROW),
                mlp_norm=rep,
                w_gate=self._weight(lp.w_gate, COLUMN),
                w_up=self._weight(lp.w_up, COLUMN),
                w_down=self._weight(lp.w_down, ROW),
                # q/k/v biases split with their heads; per-head and output norms replicated.
                bq=maybe(lp.bq, P(TP)),
                bk=maybe(lp.bk, P(TP)),
                bv=maybe(lp.bv, P(TP)),
                q_norm=maybe(lp.q_norm, P()),
                k_norm=maybe(lp.k_norm, P()),
                post_attn_norm=maybe(lp.post_attn_norm, P()),
                post_mlp_norm=maybe(lp.post_mlp_norm, P()),
            )

        head = params.lm_head
        return LlamaParams(
            embed=self.named(ROW if self.shard_vocab else P()),  # [V, Dm]
            layers=tuple(layer(lp) for lp in params.layers),
            final_norm=rep,
            lm_head=None if head is None else self._weight(head, vocab_col),
        )

    def place_params(self, params: LlamaParams, dtype: Any) -> LlamaParams:
        """Host (numpy) or device params -> arrays laid out in their shards, cast to dtype.

        Each device receives only its own slice (cast on the host, slice by slice), so no
        device ever holds a whole weight that is meant to be split.
        """
        np_dtype = np.dtype(dtype)

        def put(a: Any, sharding: NamedSharding) -> jax.Array:
            if isinstance(a, jax.Array):
                return jax.device_put(a.astype(dtype), sharding)
            return jax.make_array_from_callback(
                tuple(a.shape), sharding, lambda idx: np.asarray(a[idx], np_dtype)
            )

        return jax.tree.map(put, params, self.param_shardings(params))

    def reshard_params(self, params: LlamaParams) -> LlamaParams:
        """Params computed on device (e.g. quantized) -> exactly their specs (stable jit inputs)."""
        return jax.device_put(params, self.param_shardings(params))

    # ---- state and batches -----------------------------------------------------------------
    def zeros(self, init: Callable[[], Any], sharding: NamedSharding) -> Any:
        """Build a pytree of arrays directly in its shards (never whole on one device)."""
        return jax.jit(init, out_shardings=sharding)()

    def slot_shardings(self, slots: Any) -> Any:
        """Per-slot state: slots split over dp; [B, V] token histories also over tp by vocab,
        like the logits they penalise (a replicated copy was re-gathered in every prefill)."""
        by_vocab = self.named(P(DP, TP) if self.shard_vocab else ROWS_SPEC)
        return jax.tree.map(lambda a: by_vocab if a.ndim == 2 else self.rows_sharding, slots)

    def put_rows(self, tree: Any) -> Any:
        """Host batches (dp groups concatenated along the first axis) -> one slice per group.

        Multi-host (`jaxserve/multihost.py`): every process holds the same host arrays, and
        each places its own devices' slices; device_put would compare them across processes
        first, one collective per array and step.
        """
        if self.rows_sharding.is_fully_addressable:
            return jax.device_put(tree, self.rows_sharding)

        def put(a: Any) -> jax.Array:
            a = np.asarray(a)
            return jax.make_array_from_callback(a.shape, self.rows_sharding, lambda i: a[i])

        return jax.tree.map(put, tree)

    # ---- compiled programs -----------------------------------------------------------------
    def over_dp(self, fn: Callable, in_specs: tuple, out_specs: Any) -> Callable:
        """fn runs once per dp group on its local slice; tp stays automatic inside."""
        return jax.shard_map(
            fn,
            mesh=self.mesh,
            in_specs=in_specs,
            out_specs=out_specs,
            axis_names={DP},
            check_vma=False,  # pallas_call outputs carry no varying-axes annotation
        )

    def jit_step(self, step: Callable, slot_shardings: Any) -> Callable:
        """step(params, kv, slots, decode, prefill, allowed) -> (kv, slots, out), kv and slots
        donated.

        Outputs keep exactly the input shardings, so the donated buffers never drift (a
        drifted sharding would be a new jit signature: a recompile on the next step).
        """
        rows = ROWS_SPEC
        mapped = self.over_dp(step, (P(), rows, rows, rows, rows, rows), (rows, rows, rows))
        # The sampled rows (a few numbers per row) come out whole on every device: process 0
        # reads every dp group's tokens, also those of groups on other hosts' devices.
        out_shardings = (self.kv_sharding, slot_shardings, self.named(P()))
        return jax.jit(mapped, donate_argnums=(1, 2), out_shardings=out_shardings)

    def jit_permute(self, permute: Callable, slot_shardings: Any) -> Callable:
        """permute(slots, local_perm) -> slots, per dp group; slots donated."""
        mapped = self.over_dp(permute, (ROWS_SPEC, ROWS_SPEC), ROWS_SPEC)
        return jax.jit(mapped, donate_argnums=(0,), out_shardings=slot_shardings)

    def shard_heads(self, attend: functools.partial) -> Callable:
        """An attention op (a partial of a `kernels` entry point) run per tp shard of the heads.

        Must be called inside `over_dp`: the mesh comes from that context. The op's array
        arguments (page tables, lengths, positions) are the same on every head shard.
        """
        arrays = {k: v for k, v in attend.keywords.items() if isinstance(v, jax.Array)}
        static = {k: v for k, v in attend.keywords.items() if k not in arrays}
        kv = P(None, None, TP, None)

        def run(q, k_pages, v_pages, **overrides):  # overrides: a layer's sliding_window
            def local(q, k_pages, v_pages, arrays):
                return attend.func(q, k_pages, v_pages, **arrays, **(static | overrides))

            mapped = jax.shard_map(
                local,
                in_specs=(HEADS_SPEC, kv, kv, P()),
                out_specs=HEADS_SPEC,
                axis_names={TP},
                check_vma=False,
            )
            return mapped(q, k_pages, v_pages, arrays)

        return run
