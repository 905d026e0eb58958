"""`--model random:SHAPE`: a Llama of a named shape with random weights and a byte tokenizer.

For benchmarks and device checks on machines that cannot fetch a checkpoint: the speed of a
Llama-3-8B step does not depend on its weights. Weights are drawn on the default device with
jax.random (bf16 off CPU, where the runner uses bf16 anyway), not on the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from jaxserve.config import ModelConfig, RopeScaling
from jaxserve.errors import ModelNotFoundError
from jaxserve.models.llama import LayerParams, LlamaParams
from jaxserve.weights.tokenizer import Tokenizer, _bytes_to_unicode

PREFIX = "random:"
SHAPES = {
    "llama3-8b": ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        max_position=131072,
        tie_embeddings=False,
        rope_scaling=RopeScaling(),
        name="random-llama3-8b",
    ),
    "smollm2-135m": ModelConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        max_position=8192,
        name="random-smollm2-135m",
    ),
    # CPU smoke runs (scripts/device_check.sh --dry-run); heads split for tp up to 4.
    "tiny": ModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position=4096,
        name="random-tiny",
    ),
}
EOS_TOKEN = "<|end_of_text|>"  # id 256, after the 256 byte tokens
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def is_random_spec(spec: str) -> bool:
    return spec.startswith(PREFIX)


def byte_tokenizer() -> Tokenizer:
    """One token per byte (GPT-2's byte alphabet, no merges) and an end-of-text token."""
    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    vocab[EOS_TOKEN] = len(vocab)
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()  # ids beyond the vocab decode to nothing
    backend.add_special_tokens([EOS_TOKEN])
    return Tokenizer(
        backend, bos_token_id=None, eos_token_ids=[vocab[EOS_TOKEN]], chat_template=CHAT_TEMPLATE
    )


def random_config(spec: str) -> ModelConfig:
    shape = spec.removeprefix(PREFIX)
    if shape not in SHAPES:
        raise ModelNotFoundError(f"--model {spec}: unknown shape; expected one of {sorted(SHAPES)}")
    return SHAPES[shape]


def random_params(cfg: ModelConfig, seed: int = 0) -> LlamaParams:
    """Weights ~ N(0, 1/fan_in), norms 1, as device arrays in the backend's default dtype."""
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    keys = iter(jax.random.split(jax.random.key(seed), 8 * cfg.num_layers + 2))
    dm, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

    def w(*shape: int) -> jax.Array:
        return (jax.random.normal(next(keys), shape, dtype) / shape[0] ** 0.5).astype(dtype)

    ones = jnp.ones((dm,), dtype)
    layers = tuple(
        LayerParams(
            ones, w(dm, q), w(dm, kv), w(dm, kv), w(q, dm), ones, w(dm, f), w(dm, f), w(f, dm)
        )
        for _ in range(cfg.num_layers)
    )
    head = None if cfg.tie_embeddings else w(dm, cfg.vocab_size)
    embed = jax.random.normal(next(keys), (cfg.vocab_size, dm), dtype)
    return LlamaParams(embed=embed, layers=layers, final_norm=ones, lm_head=head)
