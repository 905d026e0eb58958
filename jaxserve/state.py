"""Per-step input batches (host-built numpy, fixed shapes) and the per-slot device state.

Every field is an array of a fixed shape: no None/array switching, no per-request statics.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.sampling import SamplingRows


def neutral_sampling(n: int, xp) -> dict:
    """Settings that change nothing (greedy, no filters, no penalties) for n rows; xp = np/jnp."""
    f = lambda v: xp.full((n,), v, xp.float32)  # noqa: E731
    return dict(
        temperature=f(0.0),
        top_k=xp.zeros((n,), xp.int32),
        top_p=f(1.0),
        min_p=f(0.0),
        repetition_penalty=f(1.0),
        presence_penalty=f(0.0),
        frequency_penalty=f(0.0),
        seed=xp.zeros((n,), xp.uint32),
    )


SEQ_SAMPLING_FIELDS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
)


@flax.struct.dataclass
class SeqSampling:
    """Sampling settings of the sequences being prefilled, written into their slots."""

    temperature: np.ndarray  # [S] float32
    top_k: np.ndarray  # [S] int32
    top_p: np.ndarray  # [S] float32
    min_p: np.ndarray  # [S] float32
    repetition_penalty: np.ndarray  # [S] float32
    presence_penalty: np.ndarray  # [S] float32
    frequency_penalty: np.ndarray  # [S] float32
    seed: np.ndarray  # [S] uint32

    @staticmethod
    def empty(s: int) -> SeqSampling:
        return SeqSampling(**neutral_sampling(s, np))


@flax.struct.dataclass
class PrefillBatch:
    """T packed prompt tokens of up to S sequences; each sequence starts a new query block."""

    tokens: np.ndarray  # [T] int32
    positions: np.ndarray  # [T] int32, -1 = padding
    token_seq: np.ndarray  # [T] int32, sequence index of each token (S = padding)
    is_output: np.ndarray  # [T] bool, token was generated earlier (resumed after retraction)
    page_table: np.ndarray  # [S, P] int32, pages of each sequence
    block_seq: np.ndarray  # [T // block] int32, sequence of each query block
    last_idx: np.ndarray  # [S] int32, index in T of each sequence's last token
    seq_slot: np.ndarray  # [S] int32, slot of each sequence (B = padding)
    is_first: np.ndarray  # [S] bool, first chunk: reset the slot's sampling state
    do_sample: np.ndarray  # [S] bool, last chunk: sample the next token
    sampling: SeqSampling
    seq_lora: np.ndarray | None = None  # [S] int32, LoRA buffer slot per sequence; None: off


@flax.struct.dataclass
class DecodeBatch:
    """One decode step over all B slots; the input tokens already live in SlotState.tokens."""

    positions: np.ndarray  # [B] int32, position of each slot's input token, -1 = inactive
    page_table: np.ndarray  # [B, P_bucket] int32
    lora_slot: np.ndarray | None = None  # [B] int32, LoRA buffer slot per row; None: LoRA off


@flax.struct.dataclass
class SlotState:
    """Device-resident, donated through every step."""

    tokens: jax.Array  # [B] int32, last sampled token = next decode input
    rows: SamplingRows  # per-slot settings and token history, [B] / [B, V]


def init_slot_state(num_slots: int, vocab_size: int) -> SlotState:
    b = num_slots
    rows = SamplingRows(
        **neutral_sampling(b, jnp),
        prompt_mask=jnp.zeros((b, vocab_size), jnp.bool_),
        output_counts=jnp.zeros((b, vocab_size), jnp.int32),
    )
    return SlotState(tokens=jnp.zeros((b,), jnp.int32), rows=rows)
