"""LoRA adapters: the PEFT files on disk, the stacked device buffers, the batched delta.

An adapter adds `x @ A @ B * scale` to a projection. Many adapters are served at once from
fixed buffers (sglang-jax, Punica): per layer and target, A `[in, L + 1, R]` and B
`[L + 1, R, out]`, slot 0 all zeros (= no adapter), ranks zero-padded to `R = max_lora_rank`.
Loading an adapter writes one slot (a donated, jitted update: no compilation per adapter);
each token row names its slot and the model adds its row's delta (`delta_fn`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.errors import LoraAdapterError

# PEFT module name -> (parent module in HF's Llama, LayerParams field).
TARGETS: dict[str, tuple[str, str]] = {
    "q_proj": ("self_attn", "wq"),
    "k_proj": ("self_attn", "wk"),
    "v_proj": ("self_attn", "wv"),
    "o_proj": ("self_attn", "wo"),
    "gate_proj": ("mlp", "w_gate"),
    "up_proj": ("mlp", "w_up"),
    "down_proj": ("mlp", "w_down"),
}
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT names; older versions keep the adapter name (".default") before ".weight".
_TENSOR = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?"
    r"\.weight"
)
# adapter_config.json keys that change the math in ways served adapters do not support.
_UNSUPPORTED = {
    "use_dora": lambda v: bool(v),
    "rank_pattern": lambda v: bool(v),
    "alpha_pattern": lambda v: bool(v),
    "layers_to_transform": lambda v: v is not None,
    "modules_to_save": lambda v: bool(v),
    "bias": lambda v: v not in (None, "none"),
}


def target_shape(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """(in, out) of a target's base weight, `x [.., in] @ w [in, out]`."""
    dm, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "q_proj": (dm, q),
        "k_proj": (dm, kv),
        "v_proj": (dm, kv),
        "o_proj": (q, dm),
        "gate_proj": (dm, f),
        "up_proj": (dm, f),
        "down_proj": (f, dm),
    }[target]


@dataclass(frozen=True)
class LoraConfig:
    """The parts of PEFT's `adapter_config.json` that define the math."""

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False
    base_model_name_or_path: str | None = None

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_json(self) -> dict:
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": list(self.target_modules),
            "use_rslora": self.use_rslora,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "base_model_name_or_path": self.base_model_name_or_path,
        }


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter in this codebase's layout: per (layer, target), A [in, r] and B [r, out]."""

    config: LoraConfig
    weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = field(repr=False)

    def delta(self, layer: int, target: str) -> np.ndarray | None:
        """The merged update `A @ B * scale` [in, out] (None where the adapter has none)."""
        if (layer, target) not in self.weights:
            return None
        a, b = self.weights[layer, target]
        return (a.astype(np.float64) @ b.astype(np.float64) * self.config.scale).astype(np.float32)


# ---- PEFT files ----------------------------------------------------------------------------
def _parse_config(data: dict, where: Path) -> LoraConfig:
    if data.get("peft_type", "LORA") != "LORA":
        raise LoraAdapterError(f"{where}: peft_type={data['peft_type']!r}; expected 'LORA'")
    for key, bad in _UNSUPPORTED.items():
        if bad(data.get(key)):
            raise LoraAdapterError(f"{where}: {key}={data[key]!r} is not supported")
    r, alpha = data.get("r"), data.get("lora_alpha", data.get("r"))
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise LoraAdapterError(f"{where}: r={r!r} must be an integer >= 1")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise LoraAdapterError(f"{where}: lora_alpha={alpha!r} must be a number")
    targets = data.get("target_modules")
    if isinstance(targets, str):  # PEFT: a regex over module names, or one name
        targets = [targets]
    if not isinstance(targets, list) or not targets:
        raise LoraAdapterError(f"{where}: target_modules={targets!r} must be a list of names")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise LoraAdapterError(
            f"{where}: target_modules {unknown} do not exist in this model; "
            f"expected some of {list(TARGETS)}"
        )
    return LoraConfig(
        r=r,
        lora_alpha=float(alpha),
        target_modules=tuple(dict.fromkeys(targets)),
        use_rslora=bool(data.get("use_rslora", False)),
        base_model_name_or_path=data.get("base_model_name_or_path"),
    )


def read_adapter(
    path: str | Path, model_cfg: ModelConfig, max_rank: int | None = None
) -> LoraAdapter:
    """Read a PEFT adapter directory, checked against the base model (and the buffers' rank)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise LoraAdapterError(
            f"{path}: not a LoRA adapter (needs {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    try:
        data = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraAdapterError(f"{path / CONFIG_FILE}: {exc}") from exc
    if not isinstance(data, dict):
        raise LoraAdapterError(f"{path / CONFIG_FILE}: not a JSON object")
    config = _parse_config(data, path / CONFIG_FILE)
    if max_rank is not None and config.r > max_rank:
        raise LoraAdapterError(f"{path}: rank r={config.r} exceeds max_lora_rank={max_rank}")
    try:
        tensors = load_file(path / WEIGHTS_FILE)
    except (OSError, SafetensorError, ValueError) as exc:
        raise LoraAdapterError(f"{path / WEIGHTS_FILE}: {exc}") from exc
    parts: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, t in tensors.items():
        m = _TENSOR.fullmatch(name)
        if m is None:
            raise LoraAdapterError(f"{path / WEIGHTS_FILE}: unexpected tensor {name!r}")
        layer, parent, module, ab = int(m[1]), m[2], m[3], m[4]
        if module not in config.target_modules or TARGETS[module][0] != parent:
            raise LoraAdapterError(f"{path}: tensor {name!r} is not among target_modules")
        if layer >= model_cfg.num_layers:
            raise LoraAdapterError(
                f"{path}: tensor {name!r} names layer {layer}; the base model has "
                f"{model_cfg.num_layers} layers"
            )
        fan_in, fan_out = target_shape(model_cfg, module)
        want = (config.r, fan_in) if ab == "A" else (fan_out, config.r)  # PEFT: [r, in], [out, r]
        if tuple(t.shape) != want:
            raise LoraAdapterError(
                f"{path}: {name} has shape {tuple(t.shape)}; the base model needs {want} "
                f"(adapter for a different base model?)"
            )
        parts.setdefault((layer, module), {})[ab] = t
    weights = {}
    for key, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise LoraAdapterError(f"{path}: layer {key[0]} {key[1]} lacks lora_A or lora_B")
        a = np.ascontiguousarray(ab["A"].astype(np.float32).T)  # [in, r]
        b = np.ascontiguousarray(ab["B"].astype(np.float32).T)  # [r, out]
        weights[key] = (a, b)
    if not weights:
        raise LoraAdapterError(f"{path / WEIGHTS_FILE}: no lora_A / lora_B tensors")
    return LoraAdapter(config, weights)


def peft_name(layer: int, target: str, ab: str) -> str:
    parent = TARGETS[target][0]
    return f"base_model.model.model.layers.{layer}.{parent}.{target}.lora_{ab}.weight"


def write_adapter(path: str | Path, adapter: LoraAdapter) -> Path:
    """Write `adapter` as PEFT does: adapter_config.json + adapter_model.safetensors."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (layer, target), (a, b) in sorted(adapter.weights.items()):
        tensors[peft_name(layer, target, "A")] = np.ascontiguousarray(np.asarray(a, np.float32).T)
        tensors[peft_name(layer, target, "B")] = np.ascontiguousarray(np.asarray(b, np.float32).T)
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    text = json.dumps(adapter.config.to_json(), indent=2) + "\n"
    (path / CONFIG_FILE).write_text(text, encoding="utf-8")
    return path


def merge_into(params, adapter: LoraAdapter):
    """Base params with the adapter merged into their weights (float; a test reference)."""
    layers = []
    for i, lp in enumerate(params.layers):
        updates = {}
        for target, (_, fieldname) in TARGETS.items():
            d = adapter.delta(i, target)
            if d is not None:
                w = getattr(lp, fieldname)
                updates[fieldname] = (np.asarray(w, np.float32) + d).astype(np.asarray(w).dtype)
        layers.append(lp.replace(**updates))
    return params.replace(layers=tuple(layers))


# ---- stacked device buffers --------------------------------------------------------------
@flax.struct.dataclass
class LoraLayer:
    # A slot-major in the middle so that A.reshape(in, (L + 1) * R) and B.reshape((L + 1) * R,
    # out) are free: the decode delta is two plain matmuls over every slot (`delta_fn`).
    a: dict[str, jax.Array]  # target -> [in, L + 1, R]
    b: dict[str, jax.Array]  # target -> [L + 1, R, out]


@flax.struct.dataclass
class LoraWeights:
    """Every served adapter's A and B, stacked; slot 0 is zeros (no adapter)."""

    layers: tuple[LoraLayer, ...]
    scale: jax.Array  # [L + 1] float32, lora_alpha / r of each slot's adapter (0: empty)

    @property
    def num_slots(self) -> int:
        return int(self.scale.shape[0])


def init_lora_weights(
    cfg: ModelConfig, max_loras: int, max_rank: int, targets: tuple[str, ...], dtype
) -> LoraWeights:
    slots = max_loras + 1

    def layer() -> LoraLayer:
        shapes = {t: target_shape(cfg, t) for t in targets}
        return LoraLayer(
            a={t: jnp.zeros((i, slots, max_rank), dtype) for t, (i, _) in shapes.items()},
            b={t: jnp.zeros((slots, max_rank, o), dtype) for t, (_, o) in shapes.items()},
        )

    return LoraWeights(
        tuple(layer() for _ in range(cfg.num_layers)), jnp.zeros((slots,), jnp.float32)
    )


def slot_arrays(
    adapter: LoraAdapter | None, like: LoraWeights
) -> tuple[tuple[LoraLayer, ...], np.float32]:
    """One slot's contents, zero-padded to the buffers' rank: (A/B per layer, scale)."""
    layers = []
    for i, lw in enumerate(like.layers):
        a_out, b_out = {}, {}
        for t in lw.a:
            a = np.zeros((lw.a[t].shape[0], lw.a[t].shape[2]), np.float32)  # [in, R]
            b = np.zeros(lw.b[t].shape[1:], np.float32)  # [R, out]
            if adapter is not None and (i, t) in adapter.weights:
                aw, bw = adapter.weights[i, t]
                a[:, : aw.shape[1]] = aw
                b[: bw.shape[0], :] = bw
            a_out[t], b_out[t] = a, b
        layers.append(LoraLayer(a_out, b_out))
    return tuple(layers), np.float32(0.0 if adapter is None else adapter.config.scale)


def check_fits(adapter: LoraAdapter, weights: LoraWeights, where: str) -> None:
    """Raise unless the buffers have the adapter's targets and rank."""
    buffered = set(weights.layers[0].a) if weights.layers else set()
    missing = [t for t in adapter.config.target_modules if t not in buffered]
    if missing:
        raise LoraAdapterError(
            f"{where}: targets {missing} have no LoRA buffers; lora_target_modules is "
            f"{sorted(buffered)}"
        )
    rank = next(iter(weights.layers[0].a.values())).shape[-1]
    if adapter.config.r > rank:
        raise LoraAdapterError(f"{where}: rank r={adapter.config.r} exceeds max_lora_rank={rank}")


def write_slot(weights: LoraWeights, slot: jax.Array, layers, scale: jax.Array) -> LoraWeights:
    """`weights` with slot `slot` replaced (jit it with `weights` donated: in place)."""
    new_layers = tuple(
        LoraLayer(
            a={t: lw.a[t].at[:, slot].set(nl.a[t].astype(lw.a[t].dtype)) for t in lw.a},
            b={t: lw.b[t].at[slot].set(nl.b[t].astype(lw.b[t].dtype)) for t in lw.b},
        )
        for lw, nl in zip(weights.layers, layers, strict=True)
    )
    return LoraWeights(new_layers, weights.scale.at[slot].set(scale))


class LoraBank:
    """The stacked buffers on the device and their one compiled write (a slot's A, B, scale).

    `on_trace` is called each time the write is traced, so the runner counts it among its
    compilations (once, at warm-up: every load after it reuses the same program).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        max_loras: int,
        max_rank: int,
        targets: tuple[str, ...],
        dtype,
        on_trace: Callable[[], None] = lambda: None,
    ):
        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            raise LoraAdapterError(
                f"lora_target_modules {unknown} unknown; expected some of {list(TARGETS)}"
            )
        if max_loras < 1 or max_rank < 1:
            raise LoraAdapterError(f"max_loras={max_loras}, max_lora_rank={max_rank}: need >= 1")
        self.max_loras = max_loras
        self.weights = init_lora_weights(cfg, max_loras, max_rank, targets, dtype)
        self._on_trace = on_trace
        self._write = jax.jit(self._traced_write, donate_argnums=0)

    def _traced_write(self, weights, slot, layers, scale):
        self._on_trace()
        return write_slot(weights, slot, layers, scale)

    def load(self, slot: int, adapter: LoraAdapter | None, where: str = "adapter") -> None:
        """Write `adapter` (None: zeros) into buffer slot 1..max_loras."""
        if not 1 <= slot <= self.max_loras:
            raise ValueError(f"LoRA slot {slot} not in [1, {self.max_loras}]")
        if adapter is not None:
            check_fits(adapter, self.weights, where)
        layers, scale = slot_arrays(adapter, self.weights)
        self.weights = self._write(self.weights, jnp.int32(slot), layers, scale)

    def warmup(self) -> None:
        """Compile the write by writing slot 0's zeros again (loaded adapters stay)."""
        layers, scale = slot_arrays(None, self.weights)
        self.weights = self._write(self.weights, jnp.int32(0), layers, scale)


# ---- the batched delta -------------------------------------------------------------------
# delta(y [N, in], layer, target) -> [N, out], or None where the target has no adapter buffers
LoraFn = Callable[[jax.Array, int, str], jax.Array | None]


@flax.struct.dataclass
class LoraRows:
    """Which adapter each of a step's N = G + T token rows uses, in two forms.

    The first G rows (decode, one per sequence, any mix of adapters) contract with every slot
    and keep their own through a [G, (L + 1) * R] mask: two plain matmuls per projection, whose
    cost is fixed by max_loras * rank. A per-row gather of A and B (Punica's BGMV) reads fewer
    bytes when few adapters run, but on XLA:CPU its copies and batched matrix-vector products
    cost twice as much at 32 rows on 32 adapters (rank 8, q/k/v/o of 30 layers: +70 ms vs
    +33 ms over 25 ms of base projections). The last T rows (prefill: many tokens of at most
    S sequences) gather their S sequences' adapters and contract with those only (inner size
    S * R), as T is often far larger than L + 1.
    """

    row_slot: jax.Array  # [G] int32, adapter slot of each decode row
    seq_slot: jax.Array  # [S] int32, adapter slot of each prefill sequence
    token_seq: jax.Array  # [T] int32, sequence of each prefill token (S = padding)


def _slot_mask(slots: jax.Array, row_of: jax.Array, scale: jax.Array, r: int) -> jax.Array:
    """[N, K * R] float32: `scale[slots[k]]` where row n uses column block k (row_of[n] == k)."""
    k = slots.shape[0]
    own = row_of[:, None] == jnp.arange(k)[None, :]  # [N, K]
    return jnp.repeat(jnp.where(own, scale[slots][None, :], 0.0), r, axis=1)


def delta_fn(weights: LoraWeights, rows: LoraRows) -> LoraFn:
    g = rows.row_slot.shape[0]
    s = rows.seq_slot.shape[0]
    num_slots = weights.num_slots
    r = next(iter(weights.layers[0].a.values())).shape[-1] if weights.layers else 0
    # Built once per step, shared by every layer and target.
    all_slots = jnp.arange(num_slots, dtype=jnp.int32)
    decode_mask = _slot_mask(all_slots, rows.row_slot, weights.scale, r)  # [G, (L + 1) * R]
    prefill_mask = _slot_mask(rows.seq_slot, rows.token_seq, weights.scale, r)  # [T, S * R]
    # A step whose rows all run the base model skips every delta.
    active = jnp.any(rows.row_slot > 0) | jnp.any(rows.seq_slot > 0)

    def delta(y: jax.Array, layer: int, target: str) -> jax.Array | None:
        lw = weights.layers[layer]
        if target not in lw.a:
            return None
        a, b = lw.a[target], lw.b[target]  # [in, L + 1, R], [L + 1, R, out]
        zeros = lambda: jnp.zeros((y.shape[0], b.shape[-1]), y.dtype)  # noqa: E731
        return jax.lax.cond(active, lambda: rows_delta(y, a, b), zeros)

    def rows_delta(y: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        fan_in, fan_out = a.shape[0], b.shape[-1]
        out = []
        if g:
            shrunk = (y[:g] @ a.reshape(fan_in, num_slots * r)) * decode_mask
            out.append(shrunk.astype(y.dtype) @ b.reshape(num_slots * r, fan_out))
        if y.shape[0] > g:
            a_seq = a[:, rows.seq_slot].reshape(fan_in, s * r)  # the S sequences' adapters
            shrunk = (y[g:] @ a_seq) * prefill_mask
            out.append(shrunk.astype(y.dtype) @ b[rows.seq_slot].reshape(s * r, fan_out))
        return out[0] if len(out) == 1 else jnp.concatenate(out)

    return delta


def dense_delta_fn(params: dict[str, dict[str, jax.Array]], scale: float) -> LoraFn:
    """One adapter for every row (training): params["{layer}.{target}"] = {"a", "b"}."""

    def delta(y: jax.Array, layer: int, target: str) -> jax.Array | None:
        p = params.get(f"{layer}.{target}")
        if p is None:
            return None
        return ((y @ p["a"]) * scale) @ p["b"]

    return delta
