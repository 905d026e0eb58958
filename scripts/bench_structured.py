"""Structured output: validity at temperature 1 (constrained vs not) and its throughput cost.

Validity: N samples over 12 JSON schemas (nested objects, bounded arrays, enums, integer
ranges, required and optional fields, patterned strings), each parsed and checked with
`jsonschema`; the same prompts unconstrained for contrast. Throughput: output tok/s with all
slots busy, every request constrained vs none, on equal work (max_tokens each, the grammar
long enough never to finish first, ignore_eos when unconstrained).

Example: python scripts/bench_structured.py --samples 200 --out out/structured.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jsonschema

from jaxserve.config import load_config, replace
from jaxserve.engine import EngineStats
from jaxserve.jaxutil import enable_compilation_cache
from jaxserve.llm import LLM
from jaxserve.request import GrammarSpec, SamplingParams

NAME = {"type": "string", "pattern": "^[A-Z][a-z]{1,12}$"}
SCHEMAS: dict[str, dict] = {
    "person": {
        "type": "object",
        "properties": {
            "name": NAME,
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "address": {
        "type": "object",
        "properties": {
            "street": {"type": "string", "maxLength": 40},
            "city": NAME,
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            "country": {"enum": ["US", "FR", "DE", "JP"]},
        },
        "required": ["street", "city", "zip", "country"],
        "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1000, "maximum": 9999},
            "status": {"enum": ["open", "paid", "shipped", "cancelled"]},
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 4,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    },
                    "required": ["sku", "qty"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["id", "status", "items"],
        "additionalProperties": False,
    },
    "point": {
        "type": "object",
        "properties": {
            "x": {"type": "integer", "minimum": -100, "maximum": 100},
            "y": {"type": "integer", "minimum": -100, "maximum": 100},
            "label": {"type": "string", "maxLength": 12},
        },
        "required": ["x", "y"],
        "additionalProperties": False,
    },
    "event": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 30},
            "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
            "attendees": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3},
            "online": {"type": "boolean"},
        },
        "required": ["title", "date", "attendees", "online"],
        "additionalProperties": False,
    },
    "product": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "price_cents": {"type": "integer", "minimum": 1, "maximum": 100000},
            "tags": {
                "type": "array",
                "items": {"enum": ["new", "sale", "eco", "premium"]},
                "maxItems": 3,
            },
            "stock": {"type": "integer", "minimum": 0, "maximum": 500},
        },
        "required": ["name", "price_cents"],
        "additionalProperties": False,
    },
    "company": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "ceo": {
                "type": "object",
                "properties": {"name": NAME, "age": {"type": "integer", "minimum": 25}},
                "required": ["name"],
                "additionalProperties": False,
            },
            "employees": {"type": "integer", "minimum": 1, "maximum": 1000000},
        },
        "required": ["name", "ceo"],
        "additionalProperties": False,
    },
    "matrix": {
        "type": "object",
        "properties": {
            "rows": {
                "type": "array",
                "minItems": 2,
                "maxItems": 2,
                "items": {
                    "type": "array",
                    "minItems": 2,
                    "maxItems": 2,
                    "items": {"type": "integer", "minimum": 0, "maximum": 9},
                },
            }
        },
        "required": ["rows"],
        "additionalProperties": False,
    },
    "review": {
        "type": "object",
        "properties": {
            "stars": {"type": "integer", "minimum": 1, "maximum": 5},
            "sentiment": {"enum": ["positive", "neutral", "negative"]},
            "summary": {"type": "string", "maxLength": 50},
        },
        "required": ["stars", "sentiment"],
        "additionalProperties": False,
    },
    "color": {
        "type": "object",
        "properties": {
            "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"},
            "name": {"type": "string", "maxLength": 16},
        },
        "required": ["hex"],
        "additionalProperties": False,
    },
    "flight": {
        "type": "object",
        "properties": {
            "from": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "to": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "seats": {"type": "integer", "minimum": 1, "maximum": 9},
            "class": {"enum": ["economy", "business", "first"]},
        },
        "required": ["from", "to", "seats"],
        "additionalProperties": False,
    },
    "settings": {
        "type": "object",
        "properties": {
            "theme": {"enum": ["dark", "light"]},
            "font_size": {"type": "integer", "minimum": 8, "maximum": 32},
            "notifications": {
                "type": "object",
                "properties": {"email": {"type": "boolean"}, "sms": {"type": "boolean"}},
                "required": ["email"],
                "additionalProperties": False,
            },
        },
        "required": ["theme", "notifications"],
        "additionalProperties": False,
    },
}
# The throughput run's grammar: long enough that every request runs to max_tokens.
LONG = {"type": "array", "minItems": 200, "items": SCHEMAS["point"]}


def prompt_ids(llm: LLM, name: str, schema: dict) -> list[int]:
    text = (
        f"Reply with one JSON object, a {name}, matching this JSON schema and nothing else:\n"
        + json.dumps(schema)
    )
    messages = [{"role": "user", "content": text}]
    return llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages))


def check(text: str, schema: dict) -> tuple[bool, bool]:
    """(parses as JSON, validates against the schema), on the whole output."""
    try:
        value = json.loads(text)
    except ValueError:
        return False, False
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return True, False
    return True, True


def validity(llm: LLM, samples: int, max_tokens: int, constrained: bool) -> dict:
    names = list(SCHEMAS)
    jobs = [names[i % len(names)] for i in range(samples)]
    prompts = [prompt_ids(llm, n, SCHEMAS[n]) for n in jobs]
    params = [
        SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0,
            seed=i,
            grammar=GrammarSpec("json_schema", json.dumps(SCHEMAS[n])) if constrained else None,
        )
        for i, n in enumerate(jobs)
    ]
    t0 = time.perf_counter()
    outs = llm.generate_tokens(prompts, params)
    wall = time.perf_counter() - t0
    per_schema = {n: {"n": 0, "parsed": 0, "valid": 0} for n in names}
    failures = []
    for n, out in zip(jobs, outs, strict=True):
        parsed, valid = check(out.text, SCHEMAS[n])
        row = per_schema[n]
        row["n"] += 1
        row["parsed"] += parsed
        row["valid"] += valid
        if not valid and len(failures) < 5:
            failures.append({"schema": n, "finish": str(out.finish_reason), "text": out.text[:300]})
    num_valid = sum(r["valid"] for r in per_schema.values())
    return {
        "constrained": constrained,
        "samples": samples,
        "num_schemas": len(names),
        "valid": num_valid,
        "valid_fraction": num_valid / samples,
        "parsed_fraction": sum(r["parsed"] for r in per_schema.values()) / samples,
        "output_tokens": sum(len(o.token_ids) for o in outs),
        "wall_s": wall,
        "per_schema": per_schema,
        "example_failures": failures,
    }


def throughput(llm: LLM, num_requests: int, max_tokens: int, constrained: bool) -> dict:
    engine = llm.engine
    engine.stats = EngineStats()
    grammar = GrammarSpec("json_schema", json.dumps(LONG))
    prompts = [prompt_ids(llm, "list of points", LONG)] * num_requests
    params = [
        SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0,
            seed=i,
            ignore_eos=not constrained,
            grammar=grammar if constrained else None,
        )
        for i in range(num_requests)
    ]
    compiles = engine.runner.num_compiles
    t0 = time.perf_counter()
    outs = llm.generate_tokens(prompts, params)
    wall = time.perf_counter() - t0
    s = engine.stats
    n_out = sum(len(o.token_ids) for o in outs)
    return {
        "constrained": constrained,
        "num_requests": num_requests,
        "output_tokens": n_out,
        "all_ran_to_max_tokens": all(len(o.token_ids) == max_tokens for o in outs),
        "wall_s": wall,
        "output_tok_per_s": n_out / wall,
        "decode_steps": s.num_decode_steps,
        "mean_decode_step_ms": 1e3 * s.decode_device_s / max(s.num_decode_steps, 1),
        "mask_fill_s": s.mask_s,
        "mask_fill_ms_per_step": 1e3 * s.mask_s / max(s.num_steps, 1),
        "compiles_during_run": engine.runner.num_compiles - compiles,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=None, help="TOML (default: the shipped smollm2 one)")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=32, help="slots, all busy")
    ap.add_argument("--throughput-requests", type=int, default=64)
    ap.add_argument("--throughput-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="none/all alternated; best of each")
    ap.add_argument(
        "--parts", nargs="+", choices=["validity", "throughput"], default=["validity", "throughput"]
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    enable_compilation_cache()
    cfg = load_config(args.config)
    cfg = replace(cfg, scheduler={"max_running_requests": args.concurrency})
    llm = LLM(config=cfg)
    compiles = llm.engine.runner.num_compiles
    result: dict = {"config": args.config, "concurrency": args.concurrency}
    if "validity" in args.parts:
        result["constrained"] = validity(llm, args.samples, args.max_tokens, True)
        result["unconstrained"] = validity(llm, args.samples, args.max_tokens, False)
    if "throughput" in args.parts:
        n, m = args.throughput_requests, args.throughput_tokens
        # Alternated rounds, best of each: on a shared machine the others' load comes and goes.
        runs = [throughput(llm, n, m, c) for _ in range(args.rounds) for c in (False, True)]
        off, on = (
            max((r for r in runs if r["constrained"] is c), key=lambda r: r["output_tok_per_s"])
            for c in (False, True)
        )
        result["throughput"] = {
            "none_constrained": off,
            "all_constrained": on,
            "slowdown": 1 - on["output_tok_per_s"] / off["output_tok_per_s"],
            "rounds": runs,
        }
    result["compiles_after_warmup"] = llm.engine.runner.num_compiles - compiles
    result["grammars_compiled"] = llm.engine.grammars.num_compiled
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if "validity" in args.parts:
        c, u = result["constrained"], result["unconstrained"]
        print(f"constrained:   {c['valid']}/{c['samples']} valid over {c['num_schemas']} schemas")
        print(
            f"unconstrained: {u['valid']}/{u['samples']} valid ({u['parsed_fraction']:.0%} parse)"
        )
    if "throughput" in result:
        t = result["throughput"]
        off, on = (t[k]["output_tok_per_s"] for k in ("none_constrained", "all_constrained"))
        print(
            f"output tok/s at {args.concurrency} concurrent: none constrained {off:.1f}, "
            f"all constrained {on:.1f} ({t['slowdown']:+.1%} slower)"
        )
    print(f"compiles after warm-up: {result['compiles_after_warmup']}")


if __name__ == "__main__":
    main()
