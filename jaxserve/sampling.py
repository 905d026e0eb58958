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


def unpack_token_mask(words: jax.Array, vocab: int) -> jax.Array:  # [R, V] bool
    """[R, ceil(V / 32)] int32 packed masks -> [R, V]: token t is bit t % 32 of word t // 32."""
    shifts = jnp.arange(32, dtype=jnp.uint32)
    bits = jax.lax.shift_right_logical(words.astype(jnp.uint32)[:, :, None], shifts[None, None]) & 1
    return bits.reshape(words.shape[0], -1)[:, :vocab].astype(jnp.bool_)


def apply_token_mask(logits: jax.Array, words: jax.Array) -> jax.Array:
    """Disallowed tokens to -inf. A row of all ones (-1) is unconstrained: when every row is,
    the unpacking is skipped (cond runs one branch) and the logits pass through untouched."""
    return jax.lax.cond(
        jnp.any(words != -1),
        lambda x: jnp.where(unpack_token_mask(words, x.shape[-1]), x, -jnp.inf),
        lambda x: x,
        logits,
    )


CANDIDATES = 256  # top_k over the vocab is cheap on CPU; a full sort was ~300 ms at 32 x 49k


def _threshold_by_bisection(x: jax.Array, rows: SamplingRows) -> jax.Array:  # [R, 1]
    """Exact-to-float-precision threshold when the kept set is larger than the candidates."""
    vocab = x.shape[-1]
    k = jnp.where(rows.top_k > 0, jnp.minimum(rows.top_k, vocab), vocab)[:, None]

    def bisect(lo, hi, ok_fn, iters=40):
        def body(_, c):
            lo, hi = c
            mid = (lo + hi) / 2
            ok = ok_fn(mid)
            return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

        return jax.lax.fori_loop(0, iters, body, (lo, hi))[0]

    # Largest tau with at least k values >= tau: the k-th largest value.
    tau_k = bisect(
        x.min(-1, keepdims=True),
        x.max(-1, keepdims=True) + 1e-6,
        lambda t: jnp.sum(x >= t, -1, keepdims=True) >= k,
    )
    xk = jnp.where(x >= tau_k, x, -jnp.inf)
    probs = jax.nn.softmax(xk, axis=-1)
    pmax = probs.max(-1, keepdims=True)
    # Largest p with mass(probs >= p) >= top_p: the smallest prob in the nucleus.
    tau_p = bisect(
        jnp.zeros_like(pmax),
        pmax + 1e-12,
        lambda t: (
            jnp.sum(jnp.where(probs >= t, probs, 0.0), -1, keepdims=True) >= rows.top_p[:, None]
        ),
    )
    keep = (probs >= tau_p) & (probs >= rows.min_p[:, None] * pmax) & (x >= tau_k)
    return jnp.min(jnp.where(keep, x, jnp.inf), axis=-1, keepdims=True)


def filter_logits(x: jax.Array, rows: SamplingRows, candidates: int = CANDIDATES) -> jax.Array:
    """Mask (to -inf) tokens outside top-k, then top-p, then min-p, of temperature-scaled x.

    The kept set is a prefix of the sorted logits; it is read off the top `candidates` values
    when it ends inside them (the usual case) and found by bisection otherwise.
    """
    vocab = x.shape[-1]
    n = min(candidates, vocab)
    vals = jax.lax.top_k(x, n)[0]  # [R, n] descending
    k = jnp.where(rows.top_k > 0, jnp.minimum(rows.top_k, vocab), vocab)
    idx = jnp.arange(n)[None, :]
    cand = jnp.where(idx < k[:, None], vals, -jnp.inf)
    # top-p/min-p act on the distribution renormalised over the top-k set.
    log_z = jnp.where(
        (k <= n)[:, None],
        jax.nn.logsumexp(cand, axis=-1, keepdims=True),
        jax.nn.logsumexp(x, axis=-1, keepdims=True),  # exact only for k == vocab (off)
    )
    probs = jnp.exp(cand - log_z)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each sorted token
    keep = (before < rows.top_p[:, None]) | (idx == 0)
    keep &= (probs >= rows.min_p[:, None] * probs[:, :1]) & (idx < k[:, None])
    n_keep = jnp.sum(keep, axis=-1)
    no_filter = (k == vocab) & (rows.top_p >= 1.0) & (rows.min_p <= 0.0)
    exact = no_filter | (k <= n) | ((k == vocab) & (n_keep < n))
    threshold = jnp.where(
        no_filter[:, None], -jnp.inf, jnp.take_along_axis(vals, (n_keep - 1)[:, None], axis=-1)
    )
    threshold = jax.lax.cond(
        jnp.all(exact),
        lambda: threshold,
        lambda: jnp.where(exact[:, None], threshold, _threshold_by_bisection(x, rows)),
    )
    return jnp.where(x >= threshold, x, -jnp.inf)


def sample(
    logits: jax.Array,
    rows: SamplingRows,
    positions: jax.Array,
    allowed: jax.Array | None = None,
) -> SampleOutput:
    """logits: [R, V] float32; positions: [R] int32, the position of the token being sampled;
    allowed: [R, ceil(V / 32)] int32 packed token masks (structured output), None = all.

    Logprobs stay those of the raw model, before penalties and masks (vLLM's default).
    """
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1)
    x = apply_penalties(logits, rows)
    if allowed is not None:
        x = apply_token_mask(x, allowed)
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
