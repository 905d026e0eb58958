"""Vectorised on-device sampling: penalties, temperature, top-k, top-p, min-p, per-request seeds.

Every setting is an array value, never a static argument, so no request can cause a recompile.
Randomness is `fold_in(key(seed), position)`: the same seed gives the same tokens whatever
else is in the batch.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxserve.request import MAX_TOP_LOGPROBS


@flax.struct.dataclass
class SamplingRows:
    """Per-row sampling settings and token history, gathered for the rows being sampled."""

    temperature: jax.Array  # [R] float32, 0 = greedy
    top_k: jax.Array  # [R] int32, <= 0 = off
    top_p: jax.Array  # [R] float32
    min_p: jax.Array  # [R] float32
    repetition_penalty: jax.Array  # [R] float32
    presence_penalty: jax.Array  # [R] float32
    frequency_penalty: jax.Array  # [R] float32
    seed: jax.Array  # [R] uint32
    prompt_mask: jax.Array  # [R, V] bool, token occurs in the prompt
    output_counts: jax.Array  # [R, V] int32, occurrences in the output so far


@flax.struct.dataclass
class SampleOutput:
    tokens: jax.Array  # [R] int32
    logprobs: jax.Array  # [R] float32, log-prob of the chosen token under the raw model
    top_ids: jax.Array  # [R, K] int32
    top_logprobs: jax.Array  # [R, K] float32


def apply_penalties(logits: jax.Array, rows: SamplingRows) -> jax.Array:
    """HF repetition penalty over prompt+output; OpenAI presence/frequency over output."""
    seen = rows.prompt_mask | (rows.output_counts > 0)
    rp = rows.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rp, logits * rp), logits)
    counts = rows.output_counts.astype(jnp.float32)
    logits = logits - rows.presence_penalty[:, None] * (counts > 0)
    return logits - rows.frequency_penalty[:, None] * counts


def filter_logits(x: jax.Array, rows: SamplingRows) -> jax.Array:
    """Mask (to -inf) tokens outside top-k, then top-p, then min-p, of temperature-scaled x."""
    vocab = x.shape[-1]
    srt = jnp.sort(x, axis=-1)[:, ::-1]  # [R, V] descending
    k = jnp.where(rows.top_k > 0, jnp.minimum(rows.top_k, vocab), vocab)
    idx = jnp.arange(vocab)[None, :]
    srt = jnp.where(idx < k[:, None], srt, -jnp.inf)
    probs = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each sorted token
    keep = (before < rows.top_p[:, None]) | (idx == 0)
    keep &= probs >= rows.min_p[:, None] * probs[:, :1]
    # The smallest kept value is the threshold; ties at it are kept too.
    threshold = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(x >= threshold, x, -jnp.inf)


def sample(logits: jax.Array, rows: SamplingRows, positions: jax.Array) -> SampleOutput:
    """logits: [R, V] float32; positions: [R] int32, the position of the token being sampled."""
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1)
    x = apply_penalties(logits, rows)
    greedy_tokens = jnp.argmax(x, axis=-1).astype(jnp.int32)
    is_greedy = (rows.temperature <= 0.0) | (rows.top_k == 1)

    def draw(x):
        x = x / jnp.where(is_greedy, 1.0, rows.temperature)[:, None]
        x = filter_logits(x, rows)

        def gumbel(seed, pos):
            key = jax.random.fold_in(jax.random.key(seed), pos)
            return jax.random.gumbel(key, (x.shape[-1],), jnp.float32)

        noise = jax.vmap(gumbel)(rows.seed, positions)
        return jnp.argmax(x + noise, axis=-1).astype(jnp.int32)

    # An all-greedy batch skips the sort and the noise entirely (cond runs one branch).
    sampled = jax.lax.cond(jnp.all(is_greedy), lambda x: greedy_tokens, draw, x)
    tokens = jnp.where(is_greedy, greedy_tokens, sampled)
    top_logprobs, top_ids = jax.lax.top_k(raw_logprobs, min(MAX_TOP_LOGPROBS, logits.shape[-1]))
    chosen = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
    return SampleOutput(tokens, chosen, top_ids.astype(jnp.int32), top_logprobs)
