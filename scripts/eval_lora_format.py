"""Count held-out chat prompts whose greedy reply follows the format a LoRA adapter was taught.

    python scripts/eval_lora_format.py --adapter /tmp/lora/format            # served adapter
    python scripts/eval_lora_format.py --adapter /tmp/lora/format --merged   # merged weights

Runs every prompt of `examples/lora_format_eval.jsonl` on the base model and on the adapter
(served through the engine's LoRA buffers, or merged into the weights), one engine, greedy.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxserve.config import load_config, replace  # noqa: E402
from jaxserve.llm import LLM  # noqa: E402
from jaxserve.request import SamplingParams  # noqa: E402

FORMAT = re.compile(r"ANSWER: [^\n]+")


def follows(out) -> bool:
    """One line `ANSWER: <x>`, ended by the model itself (EOS), as in the training data."""
    return FORMAT.fullmatch(out.text.strip()) is not None and out.finish_reason == "stop"


def merged_llm(cfg, adapter: str) -> LLM:
    """The base model with the adapter merged into its weights, in an engine without LoRA."""
    from jaxserve.engine import Engine
    from jaxserve.lora import merge_into, read_adapter
    from jaxserve.runner import Runner
    from jaxserve.weights import load_model

    loaded = load_model(cfg.model)
    merged = merge_into(loaded.params, read_adapter(adapter, loaded.config))
    engine = Engine(cfg, loaded.config, loaded.tokenizer, Runner(loaded.config, merged, cfg))
    engine.warmup()
    return LLM(engine=engine)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", required=True, help="PEFT adapter directory")
    p.add_argument("--data", default=str(ROOT / "examples/lora_format_eval.jsonl"))
    p.add_argument("--merged", action="store_true", help="merge into the weights, not served")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--out", help="results as JSON")
    args = p.parse_args(argv)
    from jaxserve.jaxutil import enable_compilation_cache

    enable_compilation_cache()
    convs = [json.loads(line)["messages"] for line in Path(args.data).read_text().splitlines()]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    cfg = replace(load_config(ROOT / "configs/test.toml"), scheduler={"max_running_requests": 32})
    results = {}
    if args.merged:
        base = LLM(config=cfg)
        results["base"] = base.chat(convs, params)
        del base
        results["merged"] = merged_llm(cfg, args.adapter).chat(convs, params)
    else:
        llm = LLM(config=replace(cfg, lora_modules=(f"fmt={args.adapter}",)))
        results["base"] = llm.chat(convs, params)
        lora_params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, lora="fmt")
        results["adapter"] = llm.chat(convs, lora_params)
    summary = {}
    for name, outs in results.items():
        n = sum(map(follows, outs))
        summary[name] = {"follow": n, "of": len(outs), "replies": [o.text for o in outs]}
        print(f"{name}: {n}/{len(outs)} follow the format")
        for conv, out in zip(convs, outs, strict=True):
            print(f"  {'+' if follows(out) else '-'} {conv[-1]['content']!r} -> {out.text!r}")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
