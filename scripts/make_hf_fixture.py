"""Record Hugging Face transformers' reference outputs for the default model into a JSON fixture.

Run from the repo root: `python scripts/make_hf_fixture.py` -> tests/fixtures/hf_greedy.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures" / "hf_greedy.json"
NEW_TOKENS = 40
TOP_K = 5

LONG_TEXT = (
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light "
    "into chemical energy. In the chloroplasts, chlorophyll absorbs mostly blue and red light. "
    "The light-dependent reactions split water molecules, releasing oxygen as a by-product and "
    "producing ATP and NADPH. These energy carriers then power the Calvin cycle, in which the "
    "enzyme RuBisCO fixes carbon dioxide from the air into three-carbon sugars. Those sugars are "
    "used to build glucose, starch and cellulose, which the plant uses for growth and storage. "
    "Almost all life on Earth depends on this process, either directly or indirectly, because it "
    "provides both the oxygen we breathe and the organic matter at the base of nearly every food "
    "chain."
)

CHATS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant. Answer in one line."},
        {"role": "user", "content": "Name three primary colors."},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "Tell me a short joke about computers."},
    ],
    [
        {
            "role": "user",
            "content": "Is 12 × 34 = 408 correct? Réponds en français, s'il te plaît 🙂 (東京)",
        }
    ],
    [{"role": "user", "content": "Summarise this in two sentences:\n\n" + LONG_TEXT}],
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
]

TEXTS: list[str] = [
    "The quick brown fox jumps",
    "Once upon a time, in a small village by the sea,",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "In 2024 there were 366 days; π ≈ 3.14159, e ≈ 2.71828. Café, naïve, 東京, Straße → 😀 #42",
    LONG_TEXT,
    "Q: What is the boiling point of water at sea level?\nA:",
]

# Extra strings for tokenizer-only comparisons (no generation).
TOKENIZER_CASES: list[str] = [
    "",
    " ",
    "  two  spaces\n\n\nthree newlines\ttab",
    "1234567890 12,345.678 -0.5e-10 0x1F",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "emoji 👩‍💻🇫🇷 and accents: àéîõü ÀÉÎÕÜ",
    "中文，日本語、한국어。Ελληνικά кириллица العربية",
    "don't won't it's we'll I'd they're",
    "    indented code\n\tif x:\n\t\treturn y  # comment",
    "https://example.com/path?query=1&b=two#frag",
]


def model_path() -> Path:
    """Fetch/locate the default GGUF with jaxserve itself, in a child process.

    The child has the repo on sys.path; this process keeps it off, so that transformers'
    probing of an optional `kernels` package can never find ours (FACTS.md, Naming).
    """
    code = "from jaxserve.weights.fetch import resolve_model_path as r; print(r('smollm2-135m', C))"
    cache = os.environ.get("JAXSERVE_CACHE")
    code = code.replace("C", repr(cache) if cache else "None")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def main() -> None:
    gguf = model_path()
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    os.environ.setdefault("USE_HUB_KERNELS", "0")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    model.generation_config.eos_token_id = None  # generate all NEW_TOKENS, past any EOS
    print(f"loaded in {time.time() - t0:.1f}s", file=sys.stderr)
    eos = tok.eos_token_id

    render = lambda m: tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)  # noqa: E731
    prompts = [("chat", m, render(m)) for m in CHATS] + [("text", None, t) for t in TEXTS]
    cases = []
    for kind, messages, text in prompts:
        ids = tok(text, add_special_tokens=kind == "text")["input_ids"]
        if kind == "chat":
            direct = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            direct = direct["input_ids"] if hasattr(direct, "keys") else direct
            assert list(direct) == ids, "apply_chat_template(tokenize=True) disagrees"
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
                pad_token_id=eos,
            )
        new_ids = out.sequences[0, len(ids) :].tolist()
        top = torch.topk(out.logits[0][0].float(), TOP_K)
        # top1 - top2 logit per step: where it is tiny, float error may flip a greedy token.
        top2 = torch.topk(torch.cat(out.logits).float(), 2).values
        cases.append(
            {
                "kind": kind,
                "messages": messages,
                "prompt": text,
                "prompt_ids": ids,
                "new_ids": new_ids,
                "new_text": tok.decode(new_ids, skip_special_tokens=False),
                "first_eos_index": new_ids.index(eos) if eos in new_ids else None,
                "top5_ids": top.indices.tolist(),
                "top5_logits": top.values.tolist(),
                "top2_margins": [round(m, 5) for m in (top2[:, 0] - top2[:, 1]).tolist()],
            }
        )
        print(f"{kind} {len(ids):4d} tokens -> {cases[-1]['new_text'][:60]!r}", file=sys.stderr)

    attn = model.model.layers[0].self_attn
    fixture = {
        "about": "HF transformers float32 greedy on the default GGUF; scripts/make_hf_fixture.py",
        "model_file": gguf.name,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "new_tokens": NEW_TOKENS,
        "eos_token_id": eos,
        # Layer 0 q/k row sums in HF layout: a permutation slip in the GGUF loader shows here.
        "layer0_q_row_sums": attn.q_proj.weight.sum(dim=1).tolist(),
        "layer0_k_row_sums": attn.k_proj.weight.sum(dim=1).tolist(),
        "cases": cases,
        "tokenizer_cases": [
            {"text": s, "ids": tok(s, add_special_tokens=False)["input_ids"]}
            for s in TOKENIZER_CASES
        ],
    }
    if "kernels" in sys.modules:  # should never happen with the repo off sys.path
        print(f"note: imported kernels from {sys.modules['kernels'].__file__}", file=sys.stderr)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {OUT} ({len(cases)} cases) in {time.time() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
