"""Sampling maths on hand-computable logits: penalties, top-k/top-p/min-p, seeds, greedy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxserve.sampling import SamplingRows, apply_penalties, filter_logits, sample

V = 6


def rows(n=1, **kw) -> SamplingRows:
    base = dict(
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        seed=0,
    )
    base.update(kw)
    arr = {
        k: jnp.full(
            (n,), v, jnp.uint32 if k == "seed" else (jnp.int32 if k == "top_k" else jnp.float32)
        )
        for k, v in base.items()
    }
    return SamplingRows(
        **arr, prompt_mask=jnp.zeros((n, V), bool), output_counts=jnp.zeros((n, V), jnp.int32)
    )


LOGITS = jnp.log(jnp.array([[0.4, 0.3, 0.15, 0.1, 0.05, 0.0 + 1e-9]], jnp.float32))


def kept(x) -> list[int]:
    return np.nonzero(np.isfinite(np.asarray(x[0])))[0].tolist()


def test_top_k_top_p_min_p():
    assert kept(filter_logits(LOGITS, rows(top_k=2))) == [0, 1]
    # cumulative mass before each token: 0, .4, .7, .85 -> top_p=.7 keeps the first two
    assert kept(filter_logits(LOGITS, rows(top_p=0.7))) == [0, 1]
    assert kept(filter_logits(LOGITS, rows(top_p=0.71))) == [0, 1, 2]
    assert kept(filter_logits(LOGITS, rows(top_p=0.01))) == [0]
    # min_p is relative to the top probability: .25 * .4 = .1 keeps 0..3
    assert kept(filter_logits(LOGITS, rows(min_p=0.25))) == [0, 1, 2, 3]
    # top-k first, then top-p over the renormalised top-k mass (.4/.7 = .57)
    assert kept(filter_logits(LOGITS, rows(top_k=2, top_p=0.5))) == [0]


def test_penalties():
    logits = jnp.array([[2.0, -2.0, 1.0, 0.5, 0.0, 3.0]])
    r = rows(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    r = r.replace(
        prompt_mask=r.prompt_mask.at[0, 0].set(True).at[0, 1].set(True),
        output_counts=r.output_counts.at[0, 5].set(2),
    )
    out = np.asarray(apply_penalties(logits, r))[0]
    # token 0: 2/2; token 1: -2*2; token 5: 3/2 - .5 - .25*2; others untouched
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0, 0.5, 0.0, 0.5])


def test_sampling_follows_the_filtered_distribution():
    n = 4000
    r = rows(n, top_k=3, seed=0).replace(seed=jnp.arange(n, dtype=jnp.uint32))
    toks = np.asarray(sample(jnp.repeat(LOGITS, n, 0), r, jnp.zeros((n,), jnp.int32)).tokens)
    freq = np.bincount(toks, minlength=V) / n
    np.testing.assert_allclose(freq[:3], np.array([0.4, 0.3, 0.15]) / 0.85, atol=0.03)
    assert freq[3:].sum() == 0


def test_seed_and_position_determine_the_draw():
    logits = jnp.zeros((3, V))
    r = rows(3).replace(seed=jnp.array([5, 5, 6], jnp.uint32))
    a = np.asarray(sample(logits, r, jnp.array([10, 10, 10])).tokens)
    b = np.asarray(sample(logits, r, jnp.array([10, 10, 10])).tokens)
    assert (a == b).all() and a[0] == a[1]
    draws = {int(sample(logits, r, jnp.array([p, p, p])).tokens[0]) for p in range(20)}
    assert len(draws) > 1  # the position moves the stream on


def test_greedy_rows_ignore_temperature_and_logprobs_are_raw():
    logits = jnp.array([[0.0, 1.0, 3.0, 2.0, 0.0, 0.0]] * 2)
    r = rows(2, temperature=0.0).replace(temperature=jnp.array([0.0, 0.0]))
    out = sample(logits, r, jnp.zeros((2,), jnp.int32))
    assert np.asarray(out.tokens).tolist() == [2, 2]
    want = np.asarray(logits[0]) - np.log(np.exp(np.asarray(logits[0])).sum())
    np.testing.assert_allclose(np.asarray(out.logprobs), [want[2]] * 2, rtol=1e-5)
    assert np.asarray(out.top_ids)[0, :3].tolist() == [2, 3, 1]


def reference_filter(x: np.ndarray, top_k: int, top_p: float, min_p: float) -> set[int]:
    """Textbook sort-based top-k -> top-p -> min-p (what the fast path must reproduce)."""
    order = np.argsort(-x, kind="stable")
    k = len(x) if top_k <= 0 else min(top_k, len(x))
    order = order[:k]
    p = np.exp(x[order] - x[order].max())
    p /= p.sum()
    before = np.cumsum(p) - p
    keep = (before < top_p) | (np.arange(k) == 0)
    keep &= p >= min_p * p[0]
    return set(order[keep].tolist())


def test_fast_filter_matches_sort_reference_incl_bisection_fallback():
    rng = np.random.default_rng(0)
    vocab, n = 500, 6
    x = rng.standard_normal((n, vocab)).astype(np.float32) * np.array(
        [[0.3], [3], [1], [8], [0.5], [2]]
    )
    cases = [
        (0, 0.9, 0.0),
        (40, 1.0, 0.0),
        (300, 0.95, 0.0),
        (0, 1.0, 0.05),
        (0, 0.5, 0.0),
        (7, 0.8, 0.1),
    ]
    r = rows(n).replace(
        top_k=jnp.array([c[0] for c in cases], jnp.int32),
        top_p=jnp.array([c[1] for c in cases], jnp.float32),
        min_p=jnp.array([c[2] for c in cases], jnp.float32),
    )
    for candidates in (16, 256):  # 16 forces the bisection path for the wide nuclei
        got = np.asarray(filter_logits(jnp.asarray(x), r, candidates=candidates))
        for i, (k, p, m) in enumerate(cases):
            assert set(np.nonzero(np.isfinite(got[i]))[0].tolist()) == reference_filter(
                x[i], k, p, m
            ), (candidates, cases[i])
