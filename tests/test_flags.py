"""Flags generated from the config dataclasses: every key has one, it reaches the config the
commands hand the engine, `--print-config` round-trips, and the KV-cache sizing arithmetic.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

from jaxserve import cli
from jaxserve.config import (
    HOST_KV_CACHE_MAX_BYTES,
    TABLES,
    EngineConfig,
    dump_toml,
    literal_choices,
    load_config,
    parse_config,
    replace,
    resolve_num_pages,
)
from jaxserve.flags import ALIASES, ConfigField, config_fields, flag_name
from tests.conftest import TEST_CONFIG

ROOT = Path(__file__).resolve().parent.parent
ENGINE_TABLES = ("", "cache", "scheduler")  # generate and chat; serve adds "server"
# and "distributed", whose flags start jax.distributed before the engine loads: they are
# checked by tests/test_multihost.py and the round trip below, not by running `serve`.
SERVE_TABLES = (*ENGINE_TABLES, "server", "distributed")


def value_of(cfg: EngineConfig, f: ConfigField) -> Any:
    return getattr(getattr(cfg, f.table) if f.table else cfg, f.name)


def other_value(f: ConfigField, current: Any) -> tuple[Any, list[str]]:
    """A value unlike `current` (the file's) and unlike the default, and its flag arguments."""
    hint = f.hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    inner = args[0] if type(None) in typing.get_args(hint) and len(args) == 1 else hint
    choices = literal_choices(inner)
    if choices:
        value = next(c for c in choices if c != current)
    elif inner is bool:
        return (not current), [("--no-" if current else "--") + flag_name(f).removeprefix("--")]
    elif inner is int:
        value = (current or 0) + 7
    elif inner is float:
        value = (current or 0.0) * 0.5 + 0.125
    elif inner is str:
        value = f"x-{f.name}"
    elif typing.get_origin(inner) is tuple:
        value = tuple(map(typing.get_args(inner)[0], (3, 5, 7, 11)))  # ints, or their strings
        return value, [flag_name(f), *map(str, value)]
    else:
        raise AssertionError(f"{f.key}: the test has no value for {hint!r}")
    return value, [flag_name(f), str(value)]


def every_flag(tables: tuple[str, ...], reserved: frozenset[str] = frozenset()):
    """argv setting every field of `tables` to a fresh value, and the values by key."""
    base = load_config(TEST_CONFIG)
    argv, want = [], {}
    for f in config_fields():
        if f.table in tables:
            value, args = other_value(f, value_of(base, f))
            assert value != value_of(EngineConfig(), f), f.key
            flag = flag_name(f, reserved)
            argv += [flag if a == flag_name(f) else a for a in args]
            want[f.key] = value
    return argv, want


def test_the_fields_are_the_dataclasses_fields():
    keys = {f.key for f in config_fields()}
    assert "scheduler.max_running_requests" in keys and "cache.num_pages" in keys
    assert "server.max_request_body_bytes" in keys and "model" in keys
    assert not {"cache", "scheduler", "server"} & keys  # tables are not leaves
    assert set(ALIASES) <= keys
    names = [flag_name(f) for f in config_fields()]
    assert len(names) == len(set(names)), "two fields share a flag"


@pytest.mark.parametrize("command", ["serve", "generate", "chat"])
def test_every_field_has_a_flag_that_reaches_the_engine_config(command, monkeypatch):
    tables = (*ENGINE_TABLES, "server") if command == "serve" else ENGINE_TABLES
    reserved = frozenset() if command == "serve" else cli.SAMPLING_FLAGS
    argv, want = every_flag(tables, reserved)
    given: list[EngineConfig] = []

    class Loaded(Exception):
        pass

    def fake_load(cfg: EngineConfig, warmup: bool):
        given.append(cfg)
        raise Loaded

    monkeypatch.delenv("JAXSERVE_CACHE", raising=False)
    monkeypatch.delenv("JAXSERVE_API_KEY", raising=False)
    monkeypatch.setattr(cli, "_load_engine", fake_load)
    prompt = ["hello"] if command == "generate" else []
    with pytest.raises(Loaded):
        cli.main([command, *prompt, "--config", str(TEST_CONFIG), *argv])
    (cfg,) = given
    fields = [f for f in config_fields() if f.table in tables]
    # counted straight from the dataclasses, so a field the generator skipped shows up here
    top = [f for f in dataclasses.fields(EngineConfig) if f.name not in TABLES]
    assert (
        len(want)
        == len(fields)
        == len(top) + sum(len(dataclasses.fields(TABLES[t])) for t in tables if t)
    )
    for f in fields:
        assert value_of(cfg, f) == want[f.key], f.key


def test_print_config_round_trips(capsys, monkeypatch):
    monkeypatch.delenv("JAXSERVE_CACHE", raising=False)
    monkeypatch.delenv("JAXSERVE_API_KEY", raising=False)
    argv, want = every_flag(SERVE_TABLES)
    args = ["serve", "--config", str(TEST_CONFIG), *argv]
    cfg, _ = cli._engine_config(cli.build_parser().parse_args(args))
    assert cli.main([*args, "--print-config"]) == 0
    text = capsys.readouterr().out
    assert parse_config(text) == cfg
    assert all(value_of(cfg, f) == want[f.key] for f in config_fields())
    # and without flags: the file as it loads, unset keys shown as comments
    assert cli.main(["serve", "--config", str(TEST_CONFIG), "--print-config"]) == 0
    text = capsys.readouterr().out
    assert parse_config(text) == load_config(TEST_CONFIG)
    assert "# api_key = (unset)" in text and "[scheduler]" in text


def test_print_config_subprocess_with_vllm_names():
    r = subprocess.run(
        [sys.executable, "-m", "jaxserve.cli", "serve", "--print-config"]
        + ["--max-num-seqs", "64", "--max-model-len", "4096", "--policy", "static"]
        + ["--no-enable-prefix-caching", "--block-size", "32", "--max-num-batched-tokens", "256"]
        + ["--gpu-memory-utilization", "0.5", "--num-pages", "0", "--kv-cache-dtype", "bfloat16"]
        + ["--port", "9001", "--shutdown-timeout", "3", "--prefill-buckets", "64", "256"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    assert r.returncode == 0, r.stderr
    cfg = parse_config(r.stdout)
    s, c = cfg.scheduler, cfg.cache
    assert (s.max_running_requests, s.max_model_len, s.policy) == (64, 4096, "static")
    assert (s.enable_prefix_cache, s.mixed_step_tokens, s.prefill_buckets) == (
        False,
        256,
        (64, 256),
    )
    assert (c.page_size, c.num_pages, c.kv_cache_memory_fraction, c.dtype) == (
        32,
        0,
        0.5,
        "bfloat16",
    )
    assert (cfg.server.port, cfg.server.shutdown_timeout_s) == (9001, 3.0)
    assert s.max_prefill_seqs == load_config().scheduler.max_prefill_seqs  # the file's


def test_flag_beats_environment_beats_file_beats_default(tmp_path, monkeypatch):
    toml = tmp_path / "c.toml"
    toml.write_text('cache_dir = "/from/file"\n[scheduler]\nmax_model_len = 1024\n')
    parse = cli.build_parser().parse_args
    monkeypatch.delenv("JAXSERVE_CACHE", raising=False)
    cfg, _ = cli._engine_config(parse(["serve", "--config", str(toml)]))
    assert (cfg.cache_dir, cfg.scheduler.max_model_len) == ("/from/file", 1024)
    assert cfg.scheduler.max_running_requests == EngineConfig().scheduler.max_running_requests
    monkeypatch.setenv("JAXSERVE_CACHE", "/from/env")
    cfg, _ = cli._engine_config(parse(["serve", "--config", str(toml), "--max-model-len", "8"]))
    assert (cfg.cache_dir, cfg.scheduler.max_model_len) == ("/from/env", 8)
    cfg, _ = cli._engine_config(parse(["serve", "--config", str(toml), "--cache-dir", "/flag"]))
    assert cfg.cache_dir == "/flag"


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    defaults = load_config()
    for f in config_fields():
        assert flag_name(f) in out, f.key
        assert f"TOML {f.key})" in out, f.key
    assert "--max-num-seqs N" in out and "--no-enable-prefix-caching" in out
    assert f"(default: {defaults.scheduler.max_model_len}; TOML scheduler.max_model_len)" in out
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "--engine-seed" in out and "--max-request-body-bytes" not in out  # [server]: serve's


def test_bad_values_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--policy", "dynamic"])
    assert exc.value.code == 2
    bad = tmp_path / "bad.toml"
    bad.write_text('[scheduler]\nschedule_order = "random"\n')
    assert cli.main(["serve", "--config", str(bad), "--print-config"]) == 2
    assert "schedule_order" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["serve", "--no-such-flag"])


@pytest.mark.parametrize(
    "overrides",
    [
        {"model": 'a "quoted" path\\with\nnewline and ünïcödé', "seed": 2**62},
        {"server": {"api_key": "k#1", "shutdown_timeout_s": float("inf")}},
        {"scheduler": {"prefill_buckets": (16,), "new_token_ratio_decay": 1e-9}},
    ],
)
def test_toml_round_trip_of_awkward_values(overrides):
    cfg = replace(load_config(TEST_CONFIG), **overrides)
    assert parse_config(dump_toml(cfg)) == cfg


# ---- sizing the KV cache from memory (num_pages = 0) ---------------------------------------
def sized(num_pages=0, fraction=0.9, max_model_len=2048, page_size=16) -> EngineConfig:
    return replace(
        EngineConfig(),
        cache={
            "num_pages": num_pages,
            "kv_cache_memory_fraction": fraction,
            "page_size": page_size,
        },
        scheduler={"max_model_len": max_model_len},
    )


def test_num_pages_from_free_device_memory():
    gib = 2**30
    cache = resolve_num_pages(
        sized(), page_bytes=2**20, free_bytes=10 * gib, host_available_bytes=0
    )
    assert cache.num_pages == int(10 * gib * 0.9) // 2**20 == 9216
    cache = resolve_num_pages(sized(fraction=0.5), 2**20, 10 * gib, 0, weight_bytes=2 * gib)
    assert cache.num_pages == 4 * 1024  # half of what the weights leave
    assert resolve_num_pages(sized(num_pages=77), 2**20, 0, 0).num_pages == 77  # given: kept


def test_num_pages_on_cpu_is_capped_host_memory():
    page = 737_280  # SmolLM2-135M, float32, 16 tokens
    cache = resolve_num_pages(sized(), page, None, host_available_bytes=64 * 2**30)
    assert cache.num_pages == HOST_KV_CACHE_MAX_BYTES // page
    cache = resolve_num_pages(sized(fraction=0.5), page, None, host_available_bytes=2**30)
    assert cache.num_pages == 2**29 // page


def test_num_pages_too_small_or_bad_fraction_raise():
    with pytest.raises(ValueError, match="max_model_len=2048 needs 128"):
        resolve_num_pages(sized(), page_bytes=2**20, free_bytes=100 * 2**20, host_available_bytes=0)
    with pytest.raises(ValueError, match="kv_cache_memory_fraction"):
        resolve_num_pages(sized(fraction=1.5), 2**20, 2**40, 0)


def test_size_kv_cache_with_the_real_page_size():
    from jaxserve.config import ModelConfig
    from jaxserve.memory import kv_page_bytes, size_kv_cache

    model = ModelConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16,
    )  # fmt: skip
    import jax.numpy as jnp

    assert kv_page_bytes(model, 16, jnp.float32) == 2 * 2 * 16 * 2 * 16 * 4
    cfg = size_kv_cache(sized(max_model_len=64), model, params={})
    assert cfg.cache.num_pages >= 4  # CPU: host memory, capped
    assert cfg.cache.num_pages * kv_page_bytes(model, 16, jnp.float32) <= HOST_KV_CACHE_MAX_BYTES


def test_kv_heads_per_device_under_tensor_parallel():
    """A device caches its share of the KV heads, or one replicated head when tp > KV heads
    (Llama-3-8B's 8 KV heads on a 16-chip slice: one each, not all 8)."""
    from jaxserve.config import ModelConfig
    from jaxserve.sharding import kv_heads_per_device

    model = ModelConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=16,
        num_kv_heads=8, head_dim=4,
    )  # fmt: skip
    assert [kv_heads_per_device(model, tp) for tp in (1, 2, 4, 8, 16)] == [8, 4, 2, 1, 1]
