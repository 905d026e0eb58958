"""`jaxserve bench serve|offline|batching`: the benchmark scripts of `scripts/`, from the command.

The scripts stay where they are (they are edited and run on their own too) and are imported by
path; every argument after the kind goes to the script. `--json PATH` ('-' = stdout) asks for
the results as JSON, whichever spelling the script has for it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

SCRIPTS_DIR = Path(__file__).resolve().parent.parent / "scripts"
BENCHMARKS = {
    "serve": ("bench_serving.py", "load generator against a running OpenAI-compatible server"),
    "offline": ("bench_offline.py", "engine throughput without HTTP, with a step-time breakdown"),
    "batching": ("bench_batching.py", "static vs continuous batching on one engine"),
}
JSON_FLAG = "--out"  # what every script calls its JSON output


class BenchError(Exception):
    """The scripts are not here (an install without the source tree)."""


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """`jaxserve bench KIND [--json PATH] [script arguments ...]`."""
    bench = sub.add_parser(
        "bench",
        help="run a benchmark script (serve, offline, batching)",
        description=__doc__.splitlines()[0] + " `jaxserve bench KIND --help` shows its flags.",
    )
    kinds = bench.add_subparsers(dest="bench", required=True, metavar="KIND")
    for kind, (script, about) in BENCHMARKS.items():
        p = kinds.add_parser(kind, help=f"{about} (scripts/{script})", add_help=False)
        p.add_argument("--json", metavar="PATH", help="results as JSON to PATH ('-' = stdout)")
        p.set_defaults(func=cmd_bench, pass_through=True)


def cmd_bench(args: argparse.Namespace) -> int:
    script, _ = BENCHMARKS[args.bench]
    run_script(SCRIPTS_DIR / script, list(args.extra), args.json)
    return 0


def load_script(path: Path) -> ModuleType:
    """Import a script by path; its folder goes on sys.path, as when run as `python path`."""
    if not path.is_file():
        raise BenchError(
            f"{path} not found: `jaxserve bench` needs the source tree (pip install -e .)"
        )
    loaded = sys.modules.get(path.stem)
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() == path.resolve():
        return loaded  # imported already (by another script, or by tests)
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses and pickling look their module up by name
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = [saved[0], *argv]
    try:
        yield
    finally:
        sys.argv = saved


def call_main(module: ModuleType, argv: Sequence[str]) -> None:
    """`module.main(argv)`, or `main()` over a patched sys.argv for scripts that take none."""
    if inspect.signature(module.main).parameters:
        module.main(list(argv))
        return
    with _argv(list(argv)):
        module.main()


def run_script(path: Path, argv: list[str], json_path: str | None) -> None:
    """Run one script; with `json_path` '-' its summary goes to stderr and its JSON to stdout."""
    module = load_script(path)
    if json_path is None:
        call_main(module, argv)
    elif json_path != "-":
        call_main(module, [*argv, JSON_FLAG, json_path])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "results.json"
            with contextlib.redirect_stdout(sys.stderr):
                call_main(module, [*argv, JSON_FLAG, str(out)])
            sys.stdout.write(out.read_text())
            sys.stdout.write("\n")
