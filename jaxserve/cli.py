"""Command line: `jaxserve serve` (OpenAI-compatible HTTP server), `generate` and `chat`.

Environment variables are read here only: JAXSERVE_API_KEY, JAXSERVE_CACHE (model cache dir).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import TypeVar

from jaxserve.config import EngineConfig, ServerConfig, load_config, replace
from jaxserve.errors import JaxserveError, ModelNotFoundError, UnsupportedModelError
from jaxserve.request import SamplingParams

EXIT_USAGE = 2  # bad model, config or parameters
T = TypeVar("T")
_request_ids = itertools.count()


class UserError(Exception):
    """One line for stderr, then exit 2."""


# ---- shared set-up -----------------------------------------------------------------------
def _engine_config(args: argparse.Namespace) -> tuple[EngineConfig, str]:
    """The config with CLI overrides, and the model's display name."""
    try:
        cfg = load_config(args.config)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"cannot read config {args.config!r}: {exc}") from exc
    if args.model:
        cfg = replace(cfg, model=args.model)
    if os.environ.get("JAXSERVE_CACHE"):  # where presets are fetched to and read from
        cfg = replace(cfg, cache_dir=os.environ["JAXSERVE_CACHE"])
    if getattr(args, "max_waiting", None) is not None:
        cfg = replace(cfg, scheduler={"max_waiting": args.max_waiting})
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


def _flag(value: T | None, default: T) -> T:
    return default if value is None else value


def server_config(args: argparse.Namespace, cfg: EngineConfig) -> ServerConfig:
    """The TOML's [server] table overridden by flags, the API key also by JAXSERVE_API_KEY."""
    s = cfg.server
    return dataclasses.replace(
        s,
        host=args.host or s.host,
        port=_flag(args.port, s.port),
        api_key=args.api_key or os.environ.get("JAXSERVE_API_KEY") or s.api_key,
        served_model_name=args.served_model_name or s.served_model_name,
        shutdown_timeout_s=_flag(args.shutdown_timeout, s.shutdown_timeout_s),
        max_request_body_bytes=_flag(args.max_request_body_bytes, s.max_request_body_bytes),
        max_prompt_chars=_flag(args.max_prompt_chars, s.max_prompt_chars),
        max_connections=_flag(args.max_connections, s.max_connections),
        keep_alive_timeout_s=_flag(args.keep_alive_timeout, s.keep_alive_timeout_s),
    )


# ---- commands ----------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from jaxserve.server import Bridge, create_app
    from jaxserve.server.connection import ServeConfig
    from jaxserve.server.shutdown import GracefulServer

    cfg, spec = _engine_config(args)
    server_cfg = server_config(args, cfg)
    engine = _load_engine(cfg, warmup=False)
    bridge = Bridge(engine)
    app = create_app(bridge, server_cfg, spec)
    config = ServeConfig(app, server_cfg, log_level=args.log_level)
    server = GracefulServer(config, bridge, server_cfg.shutdown_timeout_s)
    warmup_error: list[Exception] = []

    def warm() -> None:
        try:
            warmup_with_progress(engine)
        except Exception as exc:  # noqa: BLE001 - reported, then the server stops
            print(f"error: warm-up failed: {exc}", file=sys.stderr, flush=True)
            warmup_error.append(exc)
            server.should_exit = True
            return
        bridge.start()
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
    return 1 if warmup_error else 0


def cmd_generate(args: argparse.Namespace) -> int:
    cfg, _ = _engine_config(args)
    engine = _load_engine(cfg, warmup=False)  # compile only the shapes this prompt needs
    _stream_print(engine, engine.tokenizer.encode(args.prompt), _sampling(args))
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
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="preset name, .gguf file or Hugging Face directory")
    p.add_argument("--config", help="TOML config (default configs/smollm2-135m.toml)")


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _common(serve)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on /v1 routes (default $JAXSERVE_API_KEY)",
    )
    serve.add_argument("--served-model-name", help="model name clients use (default --model)")
    serve.add_argument("--max-waiting", type=int, help="waiting queue bound; beyond it, 429")
    serve.add_argument(
        "--shutdown-timeout", type=float, help="seconds in-flight requests get after SIGTERM"
    )
    serve.add_argument("--max-request-body-bytes", type=int, help="larger bodies get 413")
    serve.add_argument(
        "--max-prompt-chars", type=int, help="prompt characters per request; beyond, 400"
    )
    serve.add_argument("--max-connections", type=int, help="open connections; beyond, 503")
    serve.add_argument(
        "--keep-alive-timeout", type=float, help="seconds an idle connection is kept open"
    )
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="complete one prompt and print it")
    gen.add_argument("prompt")
    _common(gen)
    _sampling_args(gen, max_tokens=64)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="chat on stdin (or one --message)")
    _common(chat)
    chat.add_argument("--message", help="send one message, print the reply, exit")
    chat.add_argument("--system", help="system prompt")
    _sampling_args(chat, max_tokens=256)
    chat.set_defaults(func=cmd_chat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ModelNotFoundError, UnsupportedModelError, JaxserveError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
