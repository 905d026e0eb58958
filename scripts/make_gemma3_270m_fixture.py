"""Record transformers' float32 greedy outputs on the `gemma3-270m` preset (a real Gemma 3).

Run from the repo root: `python scripts/make_gemma3_270m_fixture.py` (needs torch +
transformers, FACTS.md) -> tests/fixtures/gemma3_270m_greedy.json. transformers reads the same
GGUF (Q4_K_M, dequantised to float32) and rebuilds its tokenizer from the file, as jaxserve does.
One prompt is longer than the model's 512-token sliding window.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures" / "gemma3_270m_greedy.json"
NEW_TOKENS = 32
TOP_K = 5

PARAGRAPH = (
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light "
    "into chemical energy. In the chloroplasts, chlorophyll absorbs mostly blue and red light. "
    "The light-dependent reactions split water molecules, releasing oxygen as a by-product and "
    "producing ATP and NADPH. These energy carriers then power the Calvin cycle, in which the "
    "enzyme RuBisCO fixes carbon dioxide from the air into three-carbon sugars. "
)
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Q: What is the boiling point of water at sea level?\nA:",
    "In 2024 there were 366 days; π ≈ 3.14159. Café, naïve, 東京, Straße → 😀",
    # ~700 tokens: past the 512-token window of the local layers.
    "Summarise the following notes.\n\n" + PARAGRAPH * 9 + "\nSummary:",
]
TOKENIZER_CASES = [
    "",
    " ",
    "  two  spaces\n\n\nthree newlines\ttab",
    "1234567890 12,345.678 -0.5e-10 0x1F",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "emoji 👩‍💻🇫🇷 and accents: àéîõü ÀÉÎÕÜ",
    "中文，日本語、한국어。Ελληνικά кириллица العربية",
    "    indented code\n\tif x:\n\t\treturn y  # comment",
]


def model_path() -> Path:
    """Fetch/locate the preset with jaxserve itself, in a child process (the repo stays off
    this process's sys.path: FACTS.md, Naming)."""
    code = "from jaxserve.weights.fetch import resolve_model_path as r; print(r('gemma3-270m'))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def main() -> None:
    gguf = model_path()
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("USE_HUB_KERNELS", "0")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    model.generation_config.eos_token_id = None  # generate all NEW_TOKENS, past any EOS
    print(f"loaded in {time.time() - t0:.1f}s", file=sys.stderr)
    cfg = model.config
    cases = []
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
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
        logits = torch.cat(res.logits).float()
        top = torch.topk(torch.log_softmax(logits, -1), TOP_K)
        top2 = torch.topk(logits, 2).values
        cases.append(
            {
                "prompt": text,
                "prompt_ids": ids,
                "new_ids": new_ids,
                "new_text": tok.decode(new_ids),
                "top_ids": top.indices.tolist(),
                "top_logprobs": top.values.tolist(),
                "top2_margins": [round(m, 5) for m in (top2[:, 0] - top2[:, 1]).tolist()],
            }
        )
        print(f"{len(ids):4d} tokens -> {cases[-1]['new_text'][:60]!r}", file=sys.stderr)
    fixture = {
        "about": "transformers float32 greedy on the gemma3-270m preset's GGUF; "
        "scripts/make_gemma3_270m_fixture.py",
        "model_file": gguf.name,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "new_tokens": NEW_TOKENS,
        "sliding_window": cfg.sliding_window,
        "layer_types": cfg.layer_types,
        "cases": cases,
        "tokenizer_cases": [{"text": s, "ids": tok(s)["input_ids"]} for s in TOKENIZER_CASES],
    }
    if "kernels" in sys.modules:  # should never happen with the repo off sys.path
        print(f"note: imported kernels from {sys.modules['kernels'].__file__}", file=sys.stderr)
    OUT.write_text(json.dumps(fixture, ensure_ascii=False, indent=0) + "\n")
    print(f"wrote {OUT} in {time.time() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
