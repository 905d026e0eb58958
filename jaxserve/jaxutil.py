"""Process-wide JAX set-up: the persistent compilation cache.

Called by the CLI and the tests before anything compiles.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax


def enable_compilation_cache(path: str | Path | None = None) -> Path:
    """Cache compiled executables on disk so a second start skips XLA compilation."""
    path = Path(
        path or os.environ.get("JAX_COMPILATION_CACHE_DIR") or Path.home() / ".cache/jaxserve/jax"
    )
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
