"""`jaxserve finetune DATA.jsonl --out DIR`: train a LoRA adapter with optax, write it as PEFT does.

The model is `models/llama.forward` itself over a [B, T] batch that is its own KV cache (one
page per sequence), so training runs the projections and family switches serving runs; only
attention is a plain dense causal softmax. Loss on completion tokens only.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.errors import InvalidRequestError
from jaxserve.lora import TARGETS, LoraAdapter, LoraConfig, LoraFn, dense_delta_fn, target_shape
from jaxserve.models import llama

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class FinetuneConfig:
    """Adapter shape and optimizer settings; every field is a flag of `jaxserve finetune`."""

    rank: int = 8  # LoRA rank r
    alpha: float = 16.0  # lora_alpha; the delta is scaled by alpha / r
    targets: tuple[str, ...] = DEFAULT_TARGETS  # PEFT module names
    epochs: int = 5  # passes over the data set
    batch_size: int = 8  # examples per optimizer step
    learning_rate: float = 2e-3  # peak, after a linear warm-up; cosine decay to 10% of it
    warmup_steps: int = 5  # optimizer steps of linear warm-up from 0
    weight_decay: float = 0.0  # AdamW's, on A and B
    clip_norm: float = 1.0  # global gradient norm clip
    max_len: int = 128  # tokens per example (prompt + completion); longer ones are cut
    seed: int = 0


@dataclass(frozen=True)
class Example:
    prompt: list[int]
    completion: list[int]


# ---- data ---------------------------------------------------------------------------------
def load_examples(path: Path, tokenizer, max_len: int) -> list[Example]:
    """JSONL of {"messages": [..., {"role": "assistant", ...}]} or {"prompt", "completion"}.

    Chat examples: the prompt is the chat template up to the last (assistant) message, the
    completion the rest of the rendered conversation (its content and end-of-turn token).
    """
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{path}:{n}: {exc}") from exc
        if "messages" in row:
            msgs = row["messages"]
            if not msgs or msgs[-1].get("role") != "assistant":
                raise InvalidRequestError(f"{path}:{n}: the last message must be the assistant's")
            prompt = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True)
            full = tokenizer.apply_chat_template(msgs, add_generation_prompt=False)
            if not full.startswith(prompt):
                raise InvalidRequestError(f"{path}:{n}: the chat template does not extend")
            completion = full[len(prompt) :]
        elif "prompt" in row and "completion" in row:
            prompt, completion = row["prompt"], row["completion"]
        else:
            raise InvalidRequestError(f"{path}:{n}: expected 'messages' or 'prompt'+'completion'")
        p_ids = tokenizer.encode(prompt)
        c_ids = tokenizer.encode(completion)
        if "prompt" in row and tokenizer.eos_token_ids:
            c_ids = [*c_ids, tokenizer.eos_token_ids[0]]
        if len(p_ids) >= max_len:
            raise InvalidRequestError(f"{path}:{n}: prompt has {len(p_ids)} >= {max_len} tokens")
        out.append(Example(p_ids, c_ids[: max_len - len(p_ids)]))
    if not out:
        raise InvalidRequestError(f"{path}: no examples")
    return out


def make_batch(examples: list[Example], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens [B, T] int32 (0-padded) and loss_mask [B, T] float32: 1 where token t+1 is a
    completion token, i.e. where the logits at t are scored."""
    tokens = np.zeros((len(examples), seq_len), np.int32)
    mask = np.zeros((len(examples), seq_len), np.float32)
    for i, ex in enumerate(examples):
        seq = ex.prompt + ex.completion
        tokens[i, : len(seq)] = seq
        mask[i, len(ex.prompt) - 1 : len(seq) - 1] = 1.0
    return tokens, mask


# ---- the dense training forward --------------------------------------------------------------
def _causal_attend(q, k_pages, v_pages, *, scale: float, sliding_window: int | None = None):
    """q [B*T, H, D]; pages [B, T, KVH, D] (page b = sequence b) -> [B*T, H, D]."""
    b, t, kvh, d = k_pages.shape
    h = q.shape[1]
    qg = q.reshape(b, t, kvh, h // kvh, d).astype(jnp.float32)
    s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k_pages.astype(jnp.float32)) * scale
    i = jnp.arange(t)
    mask = i[None, :] <= i[:, None]  # [q, s]
    if sliding_window is not None:
        mask &= i[:, None] - i[None, :] < sliding_window
    s = jnp.where(mask, s, -1e30)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgqs,bskd->bqkgd", p, v_pages.astype(jnp.float32))
    return o.reshape(b * t, h, d).astype(q.dtype)


def dense_logits(
    params: llama.LlamaParams, cfg: ModelConfig, tokens: jax.Array, lora: LoraFn | None = None
) -> jax.Array:  # [B, T, V] float32
    """Causal logits of every position of B sequences of T tokens (no padding mask needed:
    padding only ever follows a sequence's real tokens)."""
    b, t = tokens.shape
    kv = llama.init_kv_cache(cfg, b, t, params.final_norm.dtype)  # one page per sequence
    positions = jnp.tile(jnp.arange(t, dtype=jnp.int32), b)
    slot_mapping = jnp.arange(b * t, dtype=jnp.int32)
    attend = functools.partial(_causal_attend, scale=llama.softmax_scale(cfg))
    hidden, _ = llama.forward(
        params, cfg, kv, tokens.reshape(-1), positions, slot_mapping, attend, lora
    )
    return llama.lm_head(params, hidden).reshape(b, t, -1)


def init_lora_params(cfg: ModelConfig, ft: FinetuneConfig) -> dict[str, dict[str, jax.Array]]:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform), B = 0: training starts at the
    base model."""
    key = jax.random.key(ft.seed)
    params = {}
    for layer in range(cfg.num_layers):
        for target in ft.targets:
            fan_in, fan_out = target_shape(cfg, target)
            key, sub = jax.random.split(key)
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(sub, (fan_in, ft.rank), jnp.float32, -bound, bound)
            params[f"{layer}.{target}"] = {"a": a, "b": jnp.zeros((ft.rank, fan_out), jnp.float32)}
    return params


def loss_fn(lora_params, base, cfg: ModelConfig, scale: float, tokens, mask) -> jax.Array:
    logits = dense_logits(base, cfg, tokens, dense_delta_fn(lora_params, scale))
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    m = mask[:, :-1]
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


def make_optimizer(ft: FinetuneConfig, total_steps: int):
    import optax

    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=ft.learning_rate,
        warmup_steps=min(ft.warmup_steps, max(total_steps - 1, 0)),
        decay_steps=max(total_steps, 1),
        end_value=ft.learning_rate * 0.1,
    )
    return optax.chain(
        optax.clip_by_global_norm(ft.clip_norm),
        optax.adamw(schedule, weight_decay=ft.weight_decay),
    )


def train(
    base: llama.LlamaParams,
    cfg: ModelConfig,
    examples: list[Example],
    ft: FinetuneConfig,
    progress: bool = True,
) -> tuple[LoraAdapter, list[float]]:
    """Train; returns the adapter and the loss of every step."""
    import optax
    from tqdm import tqdm

    unknown = [t for t in ft.targets if t not in TARGETS]
    if unknown:
        raise InvalidRequestError(f"targets {unknown} unknown; expected some of {list(TARGETS)}")
    scale = ft.alpha / ft.rank
    # One shape for every step (one compilation): the longest example, in blocks of 16.
    seq_len = -(-max(len(e.prompt) + len(e.completion) for e in examples) // 16) * 16
    steps_per_epoch = -(-len(examples) // ft.batch_size)
    total = steps_per_epoch * ft.epochs
    opt = make_optimizer(ft, total)
    lora_params = init_lora_params(cfg, ft)
    opt_state = opt.init(lora_params)

    base = jax.tree.map(jnp.asarray, base)  # an argument, not a constant baked into the program

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(lora_params, opt_state, base, tokens, mask):
        loss, grads = jax.value_and_grad(loss_fn)(lora_params, base, cfg, scale, tokens, mask)
        updates, opt_state = opt.update(grads, opt_state, lora_params)
        return optax.apply_updates(lora_params, updates), opt_state, loss

    rng = np.random.default_rng(ft.seed)
    losses: list[float] = []
    bar = tqdm(total=total, desc="finetune", unit="step", disable=not progress)
    for _ in range(ft.epochs):
        order = rng.permutation(len(examples))
        for s in range(steps_per_epoch):
            idx = order[s * ft.batch_size : (s + 1) * ft.batch_size]
            if len(idx) < ft.batch_size:  # a full batch keeps one shape: wrap around
                idx = np.concatenate([idx, order[: ft.batch_size - len(idx)]])
            tokens, mask = make_batch([examples[i] for i in idx], seq_len)
            lora_params, opt_state, loss = step(lora_params, opt_state, base, tokens, mask)
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update(1)
    bar.close()
    weights = {
        (int(k.split(".")[0]), k.split(".")[1]): (np.asarray(p["a"]), np.asarray(p["b"]))
        for k, p in lora_params.items()
    }
    config = LoraConfig(r=ft.rank, lora_alpha=ft.alpha, target_modules=tuple(ft.targets))
    return LoraAdapter(config, weights), losses


# ---- command line ---------------------------------------------------------------------------
def add_finetune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="train a LoRA adapter (PEFT layout) on a JSONL data set",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("data", help="JSONL: {'messages': [...]} or {'prompt', 'completion'} per line")
    p.add_argument("--out", required=True, help="adapter directory to write")
    p.add_argument("--model", default="smollm2-135m", help="base model (default: %(default)s)")
    p.add_argument("--cache-dir", help="where presets are fetched to")
    from jaxserve.flags import _comments  # the fields' comments are their help, as for serve

    defaults, docs = FinetuneConfig(), _comments(FinetuneConfig)
    for f in dataclasses.fields(FinetuneConfig):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        doc = docs.get(f.name, "").replace("%", "%%")
        if isinstance(value, tuple):
            shown = " ".join(value)
            p.add_argument(flag, nargs="+", default=list(value), help=f"{doc} (default: {shown})")
        else:
            p.add_argument(flag, type=type(value), default=value, help=f"{doc} (default: {value})")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    from jaxserve.jaxutil import enable_compilation_cache
    from jaxserve.lora import write_adapter
    from jaxserve.weights import load_model

    enable_compilation_cache()
    ft = FinetuneConfig(
        **{
            f.name: tuple(getattr(args, f.name)) if f.name == "targets" else getattr(args, f.name)
            for f in dataclasses.fields(FinetuneConfig)
        }
    )
    print(f"loading model {args.model} ...", file=sys.stderr, flush=True)
    loaded = load_model(args.model, Path(args.cache_dir) if args.cache_dir else None)
    base = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), loaded.params)
    examples = load_examples(Path(args.data), loaded.tokenizer, ft.max_len)
    print(f"{len(examples)} examples, {ft.epochs} epochs", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    adapter, losses = train(base, loaded.config, examples, ft)
    config = dataclasses.replace(adapter.config, base_model_name_or_path=args.model)
    out = write_adapter(args.out, LoraAdapter(config, adapter.weights))
    log = {"losses": losses, "seconds": time.perf_counter() - t0, "config": dataclasses.asdict(ft)}
    (out / "training_log.json").write_text(json.dumps(log) + "\n", encoding="utf-8")
    print(
        f"wrote {out} ({len(losses)} steps in {log['seconds']:.0f} s; loss "
        f"{losses[0]:.3f} -> {losses[-1]:.3f})",
        file=sys.stderr,
    )
    return 0
