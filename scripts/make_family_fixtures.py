"""Tiny random Qwen2, Qwen3 and Gemma 3 models and transformers' outputs on them, as fixtures.

Run from the repo root: `python scripts/make_family_fixtures.py` (needs torch + transformers,
FACTS.md) -> tests/fixtures/families/{qwen2,qwen3,gemma3}/: a Hugging Face directory
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json, chat template) plus
expected.json with transformers' float32 greedy tokens and per-step top log-probs, and its
chat template renderings. tests/test_families.py compares jaxserve against them without torch.

Each tokenizer is a real byte-level BPE trained here by `tokenizers` on a few paragraphs (a
~400-token vocabulary keeps each fixture a few hundred KB in float32) with its family's special
tokens. The chat templates follow each family's published format (ChatML with a default system
prompt and tool block; Qwen3's reasoning blocks; Gemma's turns with the system prompt folded
into the first user turn); they are written for these fixtures, not copied from model repos.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures" / "families"
NEW_TOKENS = 32
TOP_K = 5
VOCAB = 400
SLIDING_WINDOW = 16  # Gemma 3 fixture: well below prompt + generated length
OUT_GAIN = {"qwen2": 4.0, "qwen3": 10.0, "gemma3": 3.0}  # scale of layer outputs, randomize()

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Photosynthesis turns light into chemical energy: chlorophyll absorbs blue and red light, "
    "water is split, oxygen is released, and the Calvin cycle fixes carbon dioxide into sugar.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "What is the capital of France? The capital of France is Paris. Berlin is in Germany.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his cat.",
    "You are a helpful assistant. Answer briefly and politely; think step by step when asked.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159. Café, naïve, Straße, 東京, 😀.",
    "Tools: get_weather(city) returns the weather; the function name and arguments are JSON.",
]

QWEN_SYSTEM = "You are a tiny test model. You are a helpful assistant."

QWEN2_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'QWEN_SYSTEM' }}
    {%- endif %}
    {{- '\n\n# Tools\n\nFunction signatures, one per line, in <tools></tools>:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\nCall a function with a JSON object in <tool_call></tool_call>.' }}
    {{- '<|im_end|>\n' }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nQWEN_SYSTEM<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == 'user') or (message.role == 'system' and not loop.first)
        or (message.role == 'assistant' and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
""".replace("QWEN_SYSTEM", QWEN_SYSTEM)

# Qwen3: no default system prompt; reasoning kept only after the last user query; a generation
# prompt may open an empty think block when enable_thinking is false.
QWEN3_TEMPLATE = r"""{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == 'user' and message.content is string
        and not(message.content.startswith('<tool_response>')
        and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n')
                .split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and reasoning_content %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' }}
            {{- reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""

GEMMA3_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/...') }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {%- for item in message['content'] if item['type'] == 'text' -%}
            {{ item['text'] | trim }}
        {%- endfor -%}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "Name three colors."},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about a fox."},
    ],
    [{"role": "user", "content": "Réponds: 12 × 34 = ? 東京 😀"}],
]
EXTRA_CHATS = {  # rendered only (no generation), family-specific features
    "qwen2": [
        {
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": TOOLS,
        },
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                    ],
                },
                {"role": "tool", "content": "sunny, 21 C"},
            ],
            "tools": TOOLS,
        },
    ],
    "qwen3": [
        {
            "messages": [
                {"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": "<think>\nsmall sum\n</think>\n\n4"},
                {"role": "user", "content": "And 3 + 3?"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": "<think>\nsmall sum\n</think>\n\n4"},
            ],
            "add_generation_prompt": False,
        },
    ],
    "gemma3": [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "  Hello there  "}]},
                {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": "Bye"},
            ]
        },
    ],
}

TEXTS = [
    "The quick brown fox",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    if n < 2:",
    "Photosynthesis turns light into chemical energy: chlorophyll absorbs blue and red light, "
    "water is split, oxygen is released, and the Calvin cycle fixes carbon dioxide into sugar. "
    "Almost all life on Earth depends on it, directly or indirectly.",
    "Numbers: 0 1 2 3 42 2024 3.14159",
]

FAMILIES = {
    "qwen2": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        added=["<tool_call>", "</tool_call>"],
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        template=QWEN2_TEMPLATE,
        gen_eos=["<|im_end|>", "<|endoftext|>"],
    ),
    "qwen3": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        added=["<think>", "</think>"],
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        template=QWEN3_TEMPLATE,
        gen_eos=["<|im_end|>", "<|endoftext|>"],
    ),
    "gemma3": dict(
        specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        added=[],
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        template=GEMMA3_TEMPLATE,
        gen_eos=["<eos>", "<end_of_turn>"],
    ),
}

QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_tokenizer(family: str):
    """A byte-level BPE like Qwen's (its split regex, NFC), trained on CORPUS."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    spec = FAMILIES[family]
    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - len(spec["added"]),
        special_tokens=spec["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS * 4, trainer)
    tk.add_tokens(spec["added"])
    if spec["bos"]:
        bos = spec["bos"]
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tk.token_to_id(bos))]
        )
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return tk


def model_config(family: str, tok) -> object:
    import transformers

    ids = lambda names: [tok.convert_tokens_to_ids(n) for n in names]  # noqa: E731
    spec = FAMILIES[family]
    common = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,  # H * D = 64 != hidden: o_proj and q_proj are not square
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        eos_token_id=ids([spec["eos"]])[0],
        pad_token_id=ids([spec["pad"]])[0],
        bos_token_id=ids([spec["bos"]])[0] if spec["bos"] else None,
    )
    if family == "qwen2":
        return transformers.Qwen2Config(
            num_hidden_layers=2, rope_theta=1e6, tie_word_embeddings=False, **common
        )
    if family == "qwen3":
        return transformers.Qwen3Config(
            num_hidden_layers=2, rope_theta=1e6, tie_word_embeddings=True, **common
        )
    return transformers.Gemma3TextConfig(
        num_hidden_layers=4,
        layer_types=[
            "sliding_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention",
        ],
        sliding_window=SLIDING_WINDOW,
        query_pre_attn_scalar=24,  # != head_dim: the scale must come from the config
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
        tie_word_embeddings=True,
        **common,
    )


def randomize(model, family: str, seed: int) -> None:
    """Weights with spread-out logits (fewer near-ties), and norms/biases far from neutral."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight"):
                base = 0.0 if family == "gemma3" else 1.0  # Gemma stores w - 1
                p.copy_(base + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.5 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise * (0.3 if family == "gemma3" else 1.0))  # Gemma scales by sqrt(32)
            elif name == "lm_head.weight":
                p.copy_(2.0 * noise / p.shape[1] ** 0.5)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                # Layer outputs well above the embedding in the residual stream: with tied
                # embeddings, a stream that is mostly its input token predicts that token forever.
                p.copy_(OUT_GAIN[family] * noise / p.shape[1] ** 0.5)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)
        if family == "gemma3":  # post-norms fix the layer outputs' scale: raise it there
            for layer in model.model.layers:
                layer.post_attention_layernorm.weight.add_(OUT_GAIN[family])
                layer.post_feedforward_layernorm.weight.add_(OUT_GAIN[family])


def render_cases(family: str, tok) -> list[dict]:
    cases = [{"messages": m} for m in CHATS] + EXTRA_CHATS[family]
    out = []
    for case in cases:
        add = case.get("add_generation_prompt", True)
        text = tok.apply_chat_template(
            case["messages"], tools=case.get("tools"), add_generation_prompt=add, tokenize=False
        )
        out.append({**case, "add_generation_prompt": add, "rendered": text})
    return out


def make(family: str) -> None:
    import torch
    import transformers

    out = OUT / family
    out.mkdir(parents=True, exist_ok=True)
    spec = FAMILIES[family]
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(family),
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        pad_token=spec["pad"],
        chat_template=spec["template"],
    )
    cfg = model_config(family, tok)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    randomize(model, family, seed=sum(map(ord, family)))
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids(t) for t in spec["gen_eos"]]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    model.generation_config.eos_token_id = None  # generate all NEW_TOKENS, past any EOS

    chats = render_cases(family, tok)
    prompts = [("chat", c["rendered"]) for c in chats[: len(CHATS)]]
    prompts += [("text", t) for t in TEXTS]
    cases = []
    for kind, text in prompts:
        ids = tok(text, add_special_tokens=kind == "text")["input_ids"]
        with torch.no_grad():
            res = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
                pad_token_id=tok.pad_token_id,
            )
        new_ids = res.sequences[0, len(ids) :].tolist()
        logits = torch.cat(res.logits).float()  # [NEW_TOKENS, V]
        logprobs = torch.log_softmax(logits, -1)
        top = torch.topk(logprobs, TOP_K)
        top2 = torch.topk(logits, 2).values
        cases.append(
            {
                "kind": kind,
                "prompt": text,
                "prompt_ids": ids,
                "new_ids": new_ids,
                "top_ids": top.indices.tolist(),  # [NEW_TOKENS, TOP_K] per step
                "top_logprobs": top.values.tolist(),
                "min_top2_margin": float((top2[:, 0] - top2[:, 1]).min()),
            }
        )
        print(
            f"{family} {kind} {len(ids):3d} tokens -> {len(set(new_ids))} distinct, "
            f"margin {cases[-1]['min_top2_margin']:.4f}: {new_ids[:8]}...",
            file=sys.stderr,
        )
    fixture = {
        "about": f"transformers float32 greedy on a tiny random {family}; "
        "scripts/make_family_fixtures.py",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "new_tokens": NEW_TOKENS,
        "cases": cases,
        "chat": chats,
        "tokenizer_cases": [
            {"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]}
            for t in [*TEXTS, *CORPUS, "<|im_start|>user\nhi<|im_end|>", "  two  spaces\n\n"]
        ],
    }
    (out / "expected.json").write_text(json.dumps(fixture, ensure_ascii=False, indent=0) + "\n")
    margins = min(c["min_top2_margin"] for c in cases)
    print(f"{family}: wrote {out} (smallest top-2 logit margin {margins:.4f})", file=sys.stderr)


def main() -> None:
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("USE_HUB_KERNELS", "0")
    import torch

    torch.set_num_threads(2)
    t0 = time.time()
    for family in sys.argv[1:] or list(FAMILIES):
        make(family)
    if "kernels" in sys.modules:  # should never happen with the repo off sys.path
        print(f"note: imported kernels from {sys.modules['kernels'].__file__}", file=sys.stderr)
    print(f"done in {time.time() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
