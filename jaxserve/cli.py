"""Command line: `jaxserve serve` (OpenAI-compatible HTTP), `generate`, `chat`, `bench`, `finetune`.

Every config key is also a flag (`jaxserve/flags.py`): flag > environment > TOML > defaults.
Environment variables are read here only: JAXSERVE_API_KEY, JAXSERVE_CACHE (model cache dir),
JAXSERVE_COORDINATOR, JAXSERVE_NUM_PROCESSES, JAXSERVE_PROCESS_ID (multi-host `serve`).
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys
import threading
from collections.abc import Sequence

from jaxserve.bench import BenchError, add_bench_parser
from jaxserve.config import EngineConfig, ServerConfig, dump_toml, load_config, replace
from jaxserve.errors import JaxserveError, ModelNotFoundError, UnsupportedModelError
from jaxserve.flags import add_config_flags, apply_overrides, given_flags
from jaxserve.request import SamplingParams

EXIT_USAGE = 2  # bad model, config or parameters
# Multi-host `serve`: a launcher sets one variable per process (flags still win).
DISTRIBUTED_ENV = {
    "JAXSERVE_COORDINATOR": ("distributed.coordinator", str),
    "JAXSERVE_NUM_PROCESSES": ("distributed.num_processes", int),
    "JAXSERVE_PROCESS_ID": ("distributed.process_id", int),
}
_request_ids = itertools.count()


class UserError(Exception):
    """One line for stderr, then exit 2."""


# ---- shared set-up -----------------------------------------------------------------------
def _engine_config(args: argparse.Namespace) -> tuple[EngineConfig, str]:
    """The TOML file, then the environment, then the flags given; and the model's name."""
    try:
        cfg = load_config(args.config)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"cannot read config {args.config!r}: {exc}") from exc
    env = {}
    if os.environ.get("JAXSERVE_CACHE"):  # where presets are fetched to and read from
        env["cache_dir"] = os.environ["JAXSERVE_CACHE"]
    if os.environ.get("JAXSERVE_API_KEY"):
        env["server.api_key"] = os.environ["JAXSERVE_API_KEY"]
    for name, (key, kind) in DISTRIBUTED_ENV.items():
        if os.environ.get(name):
            try:
                env[key] = kind(os.environ[name])
            except ValueError as exc:
                raise UserError(f"{name}={os.environ[name]!r}: {exc}") from exc
    try:
        cfg = apply_overrides(cfg, env | dict(given_flags(args)))
    except (ValueError, TypeError) as exc:
        raise UserError(f"bad configuration: {exc}") from exc
    return cfg, cfg.model


def _load_engine(cfg: EngineConfig, warmup: bool):
    from jaxserve.engine import Engine
    from jaxserve.jaxutil import enable_compilation_cache

    enable_compilation_cache()
    print(f"loading model {cfg.model} ...", file=sys.stderr, flush=True)
    return Engine.from_config(cfg, warmup=warmup)


def warmup_with_progress(engine) -> None:
    """Engine.warmup with a progress bar: one compiled function per bucket."""
    from tqdm import tqdm

    with tqdm(desc="compiling", unit="fn") as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        engine.warmup(progress)


def _stream_print(engine, prompt_ids: list[int], params: SamplingParams) -> str:
    """Run one request to the end, printing text as it comes; returns the whole text."""
    request_id = f"cli-{next(_request_ids)}"
    engine.add_request(request_id, prompt_ids, params)
    text = []
    try:
        while engine.has_work():
            for out in engine.step():
                if out.request_id != request_id:
                    continue
                print(out.new_text, end="", flush=True)
                text.append(out.new_text)
                if out.error:
                    raise UserError(f"generation failed: {out.error}")
    finally:
        engine.abort(request_id)
    print(flush=True)
    return "".join(text)


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )


def server_config(args: argparse.Namespace, cfg: EngineConfig) -> ServerConfig:
    """`cfg`'s [server] table with the [server] flags, the API key also by JAXSERVE_API_KEY."""
    server_flags = {k: v for k, v in given_flags(args) if k.startswith("server.")}
    if os.environ.get("JAXSERVE_API_KEY") and "server.api_key" not in server_flags:
        server_flags["server.api_key"] = os.environ["JAXSERVE_API_KEY"]
    return apply_overrides(cfg, server_flags).server


# ---- commands ----------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from jaxserve import faults, multihost
    from jaxserve.server import Bridge, create_app
    from jaxserve.server.connection import ServeConfig
    from jaxserve.server.shutdown import GracefulServer

    cfg, spec = _engine_config(args)
    dist = cfg.distributed
    if dist.num_processes > 1 or dist.coordinator == multihost.AUTO:  # docs/scaling.md
        dist = multihost.initialize(dist)  # before anything asks JAX for its devices
        cfg = replace(cfg, distributed=dist)
    if dist.num_processes > 1:
        multihost.check_mesh_spans_processes(cfg)
        if dist.process_id > 0:  # no HTTP here: step with process 0 until it stops
            if code := multihost.follow(cfg):  # process 0 is gone: skip jax's exit barrier
                sys.stderr.flush()
                os._exit(code)
            return 0
    server_cfg = cfg.server
    fault_every = faults.from_env()
    engine = _load_engine(cfg, warmup=False)
    leader = None
    if dist.num_processes > 1:  # every device call of the engine goes to all processes
        leader = multihost.Leader(engine.runner, dist)
        leader.send_config()
        engine.runner = leader
    bridge = Bridge(engine)
    app = create_app(bridge, server_cfg, spec)
    config = ServeConfig(app, server_cfg, log_level=args.log_level)
    server = GracefulServer(config, bridge, server_cfg.shutdown_timeout_s)

    def crashed(why: str) -> None:
        print(f"error: {why}; stopping the server", file=sys.stderr, flush=True)
        server.should_exit = True

    bridge.on_crash = crashed
    if leader is not None:

        def process_lost(why: str) -> None:  # from any thread, once; the Leader logged it
            multihost.fail_server(bridge, why)
            server.should_exit = True  # the engine thread then ends: on_crash, exit 1

        leader.on_failure = process_lost
    warmup_error: list[Exception] = []

    def warm() -> None:
        try:
            warmup_with_progress(engine)
        except Exception as exc:  # noqa: BLE001 - reported, then the server stops
            print(f"error: warm-up failed: {exc}", file=sys.stderr, flush=True)
            warmup_error.append(exc)
            server.should_exit = True
            return
        if every := fault_every:  # test-only: make every n-th step fail (scripts/soak.py)
            engine.runner = faults.FaultInjector(engine.runner, every)
            print(f"warning: injecting a fault every {every} steps", file=sys.stderr, flush=True)
        bridge.start()
        if leader is not None:
            leader.watch()
        print(f"ready: http://{server_cfg.host}:{server_cfg.port}/v1", file=sys.stderr, flush=True)

    warmer = threading.Thread(target=warm, name="jaxserve-warmup", daemon=True)
    warmer.start()
    # uvicorn re-raises the signal it caught once it is done; these handlers swallow it,
    # so a graceful shutdown on SIGTERM (or Ctrl+C) exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    bridge.stop()
    if warmer.is_alive():  # shut down mid-compile: nothing left worth waiting for
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    if leader is not None:
        leader.stop()  # followers exit 0
        if leader.failure:  # a thread may still block in a collective: skip jax's exit barrier
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
    return 1 if warmup_error or bridge.failure else 0


def cmd_generate(args: argparse.Namespace) -> int:
    cfg, _ = _engine_config(args)
    engine = _load_engine(cfg, warmup=False)  # compile only the shapes this prompt needs
    # Plain text gets the model's BOS if its tokenizer adds one (Gemma, Llama 3), as HF does.
    prompt = engine.tokenizer.encode(args.prompt, add_special_tokens=True)
    _stream_print(engine, prompt, _sampling(args))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    cfg, _ = _engine_config(args)
    engine = _load_engine(cfg, warmup=False)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    params = _sampling(args)
    interactive = args.message is None
    while True:
        if interactive:
            try:
                line = input("> ")
            except EOFError:
                print()
                return 0
            if line.strip() in ("/exit", "/quit"):
                return 0
        else:
            line = args.message
        messages.append({"role": "user", "content": line})
        prompt = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages))
        reply = _stream_print(engine, prompt, params)
        messages.append({"role": "assistant", "content": reply})
        if not interactive:
            return 0


# ---- argument parsing --------------------------------------------------------------------
SAMPLING_FLAGS = frozenset({"--max-tokens", "--temperature", "--top-p", "--seed", "--stop"})


def _common(
    p: argparse.ArgumentParser, tables: tuple[str, ...], reserved: frozenset[str] = frozenset()
) -> None:
    p.add_argument("--config", help="TOML config (default configs/smollm2-135m.toml)")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the merged config (file + environment + flags) as TOML and exit",
    )
    add_config_flags(p, tables, reserved)


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help="(default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.7, help="(default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, help="(default: %(default)s)")
    g.add_argument("--seed", type=int, help="sampling seed (default: drawn)")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    engine_tables = ("", "cache", "scheduler")

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _common(serve, (*engine_tables, "server", "distributed"))
    serve.add_argument("--log-level", default="info", help="uvicorn's (default: %(default)s)")
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="complete one prompt and print it")
    gen.add_argument("prompt")
    _sampling_args(gen, max_tokens=64)
    _common(gen, engine_tables, SAMPLING_FLAGS)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="chat on stdin (or one --message)")
    chat.add_argument("--message", help="send one message, print the reply, exit")
    chat.add_argument("--system", help="system prompt")
    _sampling_args(chat, max_tokens=256)
    _common(chat, engine_tables, SAMPLING_FLAGS)
    chat.set_defaults(func=cmd_chat)

    add_bench_parser(sub)
    from jaxserve.finetune import add_finetune_parser  # imports jax: only while parsing

    add_finetune_parser(sub)
    sim = sub.add_parser(
        "simulate",
        help="the real scheduler with a step-cost model instead of a device",
        add_help=False,  # `jaxserve simulate --help` is the simulator's own
    )
    sim.set_defaults(func=cmd_simulate, pass_through=True)
    return parser


def cmd_simulate(args: argparse.Namespace) -> int:
    from jaxserve.simulate.cli import main as simulate_main

    return simulate_main(list(args.extra))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "pass_through", False):  # only `bench` forwards arguments
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        if getattr(args, "print_config", False):
            print(dump_toml(_engine_config(args)[0]), end="")
            return 0
        return args.func(args)
    except (ModelNotFoundError, UnsupportedModelError, JaxserveError, UserError, BenchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
