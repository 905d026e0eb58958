"""Served LoRA adapters by name: their buffer slots, the requests using them, safe load paths.

The runner owns the device buffers (`lora.LoraBank`); this is the bookkeeping around them. A
slot is reused only when no request holds it: unloading never changes a running request's model.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from jaxserve.config import ModelConfig
from jaxserve.errors import LoraAdapterError, LoraNotFoundError
from jaxserve.lora import CONFIG_FILE, WEIGHTS_FILE, LoraAdapter, LoraBank, read_adapter


@dataclass(frozen=True)
class ServedAdapter:
    name: str
    path: Path
    slot: int  # buffer slot, 1..max_loras (0 = no adapter)
    uid: int  # unique per load: cached KV of an unloaded adapter never matches a later one

    @property
    def cache_salt(self) -> bytes:
        """Prefix-cache namespace of this load (the base model's is b"")."""
        return b"lora%d" % self.uid


class AdapterRegistry:
    def __init__(self, max_loras: int):
        self.max_loras = max_loras
        self._by_name: dict[str, ServedAdapter] = {}
        self._users = [0] * (max_loras + 1)  # requests holding each slot
        self._uids = itertools.count(1)

    def names(self) -> list[str]:
        return list(self._by_name)

    def get(self, name: str) -> ServedAdapter:
        adapter = self._by_name.get(name)
        if adapter is None:
            raise LoraNotFoundError(f"LoRA adapter {name!r} is not loaded")
        return adapter

    def free_slot(self, name: str) -> int:
        """A slot a new adapter `name` may take; raises if the name is taken or none is free."""
        if name in self._by_name:
            raise LoraAdapterError(f"LoRA adapter {name!r} is already loaded")
        taken = {a.slot for a in self._by_name.values()}
        for slot in range(1, self.max_loras + 1):
            if slot not in taken and self._users[slot] == 0:
                return slot
        raise LoraAdapterError(
            f"all max_loras={self.max_loras} LoRA slots are in use; unload an adapter first"
        )

    def add(self, name: str, path: Path, slot: int) -> ServedAdapter:
        """Register an adapter whose weights are now in `slot` (from `free_slot`)."""
        adapter = ServedAdapter(name, path, slot, next(self._uids))
        self._by_name[name] = adapter
        return adapter

    def remove(self, name: str) -> ServedAdapter:
        """Stop serving `name`; its slot frees once the requests holding it finish."""
        adapter = self.get(name)
        del self._by_name[name]
        return adapter

    def acquire(self, name: str) -> ServedAdapter:
        adapter = self.get(name)
        self._users[adapter.slot] += 1
        return adapter

    def release(self, slot: int) -> None:
        if slot:
            self._users[slot] -= 1

    def users(self, slot: int) -> int:
        return self._users[slot]


def parse_lora_module(spec: str) -> tuple[str, str]:
    """`NAME=PATH` (`--lora`, vLLM's `--lora-modules`) -> (name, path)."""
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise LoraAdapterError(f"--lora {spec!r}: expected NAME=PATH")
    return name.strip(), path.strip()


def resolve_in_dir(lora_dir: str | None, path: str) -> Path:
    """An adapter directory a runtime load may read: inside `lora_dir` once every symlink is
    followed, its two files too (a link inside pointing out is refused like a path outside)."""
    if not lora_dir:
        raise LoraAdapterError("runtime LoRA loading needs lora_dir, the directory it reads from")
    try:
        root = Path(lora_dir).resolve(strict=True)
    except OSError as exc:
        raise LoraAdapterError(f"lora_dir {lora_dir!r}: {exc}") from exc
    if "\x00" in path:
        raise LoraAdapterError("lora_path contains a NUL byte")
    candidate = Path(path)
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    paths = [resolved, (resolved / CONFIG_FILE).resolve(), (resolved / WEIGHTS_FILE).resolve()]
    if not all(p.is_relative_to(root) for p in paths):
        raise LoraAdapterError(f"lora_path {path!r} is outside lora_dir")
    return resolved


class LoraServing:
    """The engine's LoRA side: load / unload by name into the runner's buffers, and which
    buffer slot each running request holds."""

    def __init__(self, bank: LoraBank, model_cfg: ModelConfig, max_rank: int):
        self.bank = bank
        self.model_cfg = model_cfg
        self.max_rank = max_rank
        self.registry = AdapterRegistry(bank.max_loras)
        self._held: dict[str, int] = {}  # request_id -> slot

    def read(self, path: str | Path) -> LoraAdapter:
        """Read and check an adapter (no engine state touched: any thread may call it)."""
        return read_adapter(path, self.model_cfg, self.max_rank)

    def load(
        self, name: str, path: str | Path, adapter: LoraAdapter | None = None
    ) -> ServedAdapter:
        """Serve `adapter` (read from `path` if None) as `name`: one buffer write."""
        slot = self.registry.free_slot(name)
        adapter = adapter if adapter is not None else self.read(path)
        self.bank.load(slot, adapter, where=name)
        return self.registry.add(name, Path(path), slot)

    def unload(self, name: str) -> None:
        self.registry.remove(name)

    def names(self) -> list[str]:
        return self.registry.names()

    def acquire(self, request_id: str, name: str) -> ServedAdapter:
        adapter = self.registry.acquire(name)
        self._held[request_id] = adapter.slot
        return adapter

    def release(self, request_id: str) -> None:
        """The request is done: its slot may go to another adapter (idempotent)."""
        slot = self._held.pop(request_id, 0)
        self.registry.release(slot)
