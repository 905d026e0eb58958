"""Command-line flags generated from the config dataclasses: one flag per field, no hand-kept list.

Each field of `EngineConfig` and of its tables (`[cache]`, `[scheduler]`, `[server]`) becomes
`--field-name`, typed from its annotation and documented by its comment in `config.py`; a flag
given overrides the TOML file, which overrides the dataclass defaults.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

from jaxserve.config import TABLES, EngineConfig, literal_choices, load_config, replace

# vLLM's names for the same settings (and the pre-generated jaxserve spellings), as aliases.
# `--gpu-memory-utilization` differs a little: vLLM's is a share of all device memory for
# the whole instance, ours a share of the free memory after the weights, for the KV cache.
ALIASES: dict[str, tuple[str, ...]] = {
    "tp": ("--tensor-parallel-size",),
    "dp": ("--data-parallel-size",),
    "scheduler.max_running_requests": ("--max-num-seqs",),
    "scheduler.enable_prefix_cache": ("--enable-prefix-caching",),
    "scheduler.mixed_step_tokens": ("--max-num-batched-tokens",),
    "scheduler.chunked_prefill": ("--enable-chunked-prefill",),
    "cache.kv_cache_memory_fraction": ("--gpu-memory-utilization",),
    "cache.num_pages": ("--num-gpu-blocks-override",),
    "cache.page_size": ("--block-size",),
    "cache.dtype": ("--kv-cache-dtype",),
    "server.shutdown_timeout_s": ("--shutdown-timeout",),
    "server.keep_alive_timeout_s": ("--keep-alive-timeout",),
    "lora_modules": ("--lora",),
}
DEST_PREFIX = "config:"  # argparse dest of a config flag: "config:scheduler.max_model_len"


@dataclass(frozen=True)
class ConfigField:
    """One config key: `table` is "" for EngineConfig's own fields."""

    table: str
    name: str
    hint: Any
    doc: str

    @property
    def key(self) -> str:
        return f"{self.table}.{self.name}" if self.table else self.name

    @property
    def dest(self) -> str:
        return DEST_PREFIX + self.key


def _comments(cls: type) -> dict[str, str]:
    """Each field's comment in the class source: its own line's, else the block just above."""
    source = textwrap.dedent(inspect.getsource(cls))
    by_line: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            by_line[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    docs = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, row = [], node.lineno - 1
        while row >= 1 and lines[row - 1].strip().startswith("#"):
            above.insert(0, by_line[row])
            row -= 1
        own = by_line.get(node.end_lineno or node.lineno, "")
        docs[node.target.id] = own or " ".join(above)
    return docs


@cache
def config_fields() -> tuple[ConfigField, ...]:
    """Every leaf field of EngineConfig, tables flattened, in declaration order."""
    out = []
    for table, cls in [("", EngineConfig), *TABLES.items()]:
        hints, docs = typing.get_type_hints(cls), _comments(cls)
        for f in dataclasses.fields(cls):
            if not (table == "" and f.name in TABLES):
                out.append(ConfigField(table, f.name, hints[f.name], docs.get(f.name, "")))
    return tuple(out)


def flag_name(f: ConfigField, reserved: frozenset[str] = frozenset()) -> str:
    """`--name`; a table's field whose name another field has too gets its table as prefix
    (`--cache-dtype`), and a name the command uses itself (generate's `--seed`) `--engine-`."""
    names = [g.name for g in config_fields()]
    name = f.name if f.table == "" or names.count(f.name) == 1 else f"{f.table}_{f.name}"
    flag = "--" + name.replace("_", "-")
    if flag in reserved:
        flag = f"--{f.table or 'engine'}-{f.name.replace('_', '-')}"
    return flag


def _unwrap_optional(hint: Any) -> Any:
    args = typing.get_args(hint)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def _argument_kwargs(f: ConfigField) -> dict[str, Any]:
    """How argparse reads this field: bools as --x/--no-x, tuples as lists, Literals as choices."""
    hint = _unwrap_optional(f.hint)
    choices = literal_choices(hint)
    if choices:
        return {"type": type(choices[0]), "choices": choices}
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        # Repeating the flag adds to the list (`--lora a=PATH --lora b=PATH`).
        return {
            "type": item,
            "nargs": "+",
            "action": "extend",
            "metavar": item.__name__.upper()[0],
        }
    if hint in (int, float, str):
        return {"type": hint, "metavar": {int: "N", float: "X", str: "S"}[hint]}
    raise TypeError(f"config field {f.key}: no flag for type {f.hint!r}")


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


def _defaults() -> EngineConfig:
    """What a run without --config starts from (the default TOML over the dataclasses)."""
    try:
        return load_config()
    except (OSError, ValueError):  # no configs/ next to the package: the dataclasses alone
        return EngineConfig()


def add_config_flags(
    parser: argparse.ArgumentParser,
    tables: tuple[str, ...] = ("", "cache", "scheduler", "server"),
    reserved: frozenset[str] = frozenset(),
) -> None:
    """One flag per field of the given tables ("" = EngineConfig's own), grouped by table."""
    defaults = _defaults()
    groups = {}
    for table in tables:
        cls = TABLES.get(table, EngineConfig)
        title = f"[{table}] in the TOML" if table else "engine (top of the TOML)"
        groups[table] = parser.add_argument_group(title, (cls.__doc__ or "").splitlines()[0])
    for f in config_fields():
        if f.table not in groups:
            continue
        default = getattr(getattr(defaults, f.table) if f.table else defaults, f.name)
        names = [flag_name(f, reserved), *ALIASES.get(f.key, ())]
        doc = f.doc.replace("%", "%%")
        help_text = f"{doc} (default: {_shown(default)}; TOML {f.key})".lstrip()
        groups[f.table].add_argument(
            *names,
            dest=f.dest,
            default=argparse.SUPPRESS,  # absent unless given: the file's value stays
            help=help_text,
            **_argument_kwargs(f),
        )


def given_flags(args: argparse.Namespace) -> Iterator[tuple[str, Any]]:
    """(key, value) of each config flag on the command line."""
    for dest, value in vars(args).items():
        if dest.startswith(DEST_PREFIX):
            yield dest.removeprefix(DEST_PREFIX), value


def apply_overrides(cfg: EngineConfig, overrides: dict[str, Any]) -> EngineConfig:
    """`cfg` with {"model": ..., "scheduler.max_model_len": ...} applied."""
    top: dict[str, Any] = {}
    for key, value in overrides.items():
        table, _, name = key.rpartition(".")
        value = tuple(value) if isinstance(value, list) else value
        if table:
            top.setdefault(table, {})[name] = value
        else:
            top[name] = value
    return replace(cfg, **top)
