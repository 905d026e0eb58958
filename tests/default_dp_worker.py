"""The default model (configs/test.toml) on one device and with dp=2 over 2 simulated CPU
devices: greedy tokens of a mixed batch, compiles after warm-up, and where each request's
pages lived. Writes JSON. Started by tests/test_sharding.py in a fresh process (XLA_FLAGS
must be set before jax starts). Usage: python -m tests.default_dp_worker OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jaxserve.config import load_config, replace
from jaxserve.engine import Engine
from jaxserve.jaxutil import enable_compilation_cache
from jaxserve.llm import LLM
from jaxserve.request import SamplingParams
from tests.conftest import TEST_CONFIG

PROMPTS = [
    "The capital of France is",
    "List three rivers of Europe:",
    "def fibonacci(n):",
    "Photosynthesis turns light into",
    "The quick brown fox " * 12,
    "In 1905 Albert Einstein published",
    "A haiku about winter:",
    "Water boils at",
]


def run(dp: int) -> dict:
    cfg = replace(load_config(TEST_CONFIG), dp=dp)
    engine = Engine.from_config(cfg)
    warm = engine.runner.num_compiles
    slot_group: dict[str, int] = {}
    page_groups: dict[str, set[int]] = {}
    step = engine.step

    def watched_step():  # each running request's dp group, and the groups of its pages
        outs = step()
        s = engine.scheduler
        for r in s.running:
            slot_group[r.request_id] = s.group_of(r.slot)
            page_groups.setdefault(r.request_id, set()).update(map(s.allocator.group_of, r.pages))
        return outs

    engine.step = watched_step  # type: ignore[method-assign]
    llm = LLM(engine=engine)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0))
    strays = [rid for rid, g in page_groups.items() if g - {slot_group[rid]}]
    return {
        "dp": dp,
        "tokens": [o.token_ids for o in outs],
        "compiles_after_warmup": engine.runner.num_compiles - warm,
        "step_functions": engine.num_step_functions,
        "requests_with_pages_in_another_group": strays,
        "groups_used": sorted(set(slot_group.values())),
    }


def main(out: Path) -> None:
    enable_compilation_cache()
    out.write_text(json.dumps([run(1), run(2)]))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
