"""Multi-host serving with `jax.distributed`: process 0 schedules, every process steps.

Process 0 owns HTTP, the scheduler and the batches. Before each device call it broadcasts
what the call is and its host arguments; every other process runs `follow()`, which makes
the same call on the same inputs, so all processes run one jitted program over a mesh that
spans their devices. A follower that dies (or stops answering) ends the server, non-zero.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import pickle
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxserve.config import DistributedConfig, EngineConfig, replace
from jaxserve.errors import JaxserveError

if TYPE_CHECKING:
    from jaxserve.server.bridge import Bridge

log = logging.getLogger("jaxserve")

FRAME_BYTES = 16 * 1024  # one broadcast per message up to this (decode steps of ~64 slots)
WATCH_PERIOD_S = 0.25  # how often the watchdog looks at the step in flight
HEARTBEAT_TIMEOUT_S = 100  # jax.distributed's default: keep step_timeout_s below it


class Op(enum.IntEnum):
    """What a broadcast message asks the followers to do."""

    CONFIG = 0  # the EngineConfig process 0's Runner was built with
    RUN = 1  # runner.run(*args, **kwargs)
    PERMUTE = 2  # runner.permute_slots(*args)
    PING = 3  # nothing: a keepalive that finds a dead follower while the server idles
    STOP = 4  # the server stopped: followers exit 0


METHODS = {Op.RUN: "run", Op.PERMUTE: "permute_slots"}


class MultihostError(JaxserveError, RuntimeError):
    """A process of a multi-host job died, stopped answering, or was set up wrong."""


AUTO = "auto"  # --coordinator auto: jax finds the cluster (Cloud TPU, SLURM, Open MPI, k8s)


def initialize(cfg: DistributedConfig) -> DistributedConfig:
    """`jax.distributed.initialize`; call before anything asks JAX for its devices.

    With `coordinator = "auto"` jax reads the coordinator, the process count and this
    process's id from the cluster it runs in (a TPU pod slice's metadata, SLURM's or Open
    MPI's environment, ...); the returned config carries what it found.
    """
    auto = cfg.coordinator == AUTO
    if not cfg.coordinator:
        raise MultihostError(
            f"num_processes={cfg.num_processes} needs a coordinator "
            f"(--coordinator HOST:PORT, or {AUTO} on a TPU pod slice or a SLURM / MPI job)"
        )
    if not auto and not 0 <= cfg.process_id < cfg.num_processes:
        raise MultihostError(
            f"process_id={cfg.process_id} is not in [0, num_processes={cfg.num_processes})"
        )
    # Real cross-process collectives on CPU (the default since jax 0.5.1; said explicitly).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # jax's preemption service would catch SIGTERM (and carry on); here a follower that is
    # told to stop stops, and process 0 reports it like any other lost process.
    jax.config.update("jax_enable_preemption_service", False)
    # jax's coordination service aborts every process once one has missed heartbeats for
    # HEARTBEAT_TIMEOUT_S; the Leader reports a lost process well before. (Turning that off,
    # `jax_enable_recoverability`, would also drop the shutdown barrier that lets followers
    # disconnect before process 0's coordinator goes away.)
    if auto:
        try:
            jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
        except ValueError as exc:  # jax found no cluster to read the settings from
            raise MultihostError(
                f"--coordinator {AUTO}: no cluster jax can detect (Cloud TPU, SLURM, Open MPI, "
                f"Kubernetes) here; give --coordinator HOST:PORT and the ids ({exc})"
            ) from None
        cfg = dataclasses.replace(
            cfg, num_processes=jax.process_count(), process_id=jax.process_index()
        )
    else:
        jax.distributed.initialize(
            cfg.coordinator,
            cfg.num_processes,
            cfg.process_id,
            heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
        )
    log.info(
        "process %d of %d: %d local of %d devices",
        cfg.process_id,
        cfg.num_processes,
        jax.local_device_count(),
        jax.device_count(),
    )
    return cfg


def check_mesh_spans_processes(cfg: EngineConfig) -> None:
    """One mesh over every process's devices (the step's sampled rows come out replicated,
    so process 0 reads every dp group's, wherever the group's devices are)."""
    if cfg.tp * cfg.dp != jax.device_count():
        raise MultihostError(
            f"tp={cfg.tp} x dp={cfg.dp} must use all {jax.device_count()} devices of the "
            f"{jax.process_count()} processes ({jax.local_device_count()} here)"
        )
    # Adapter loads write device buffers outside runner.run: not broadcast (yet).
    if getattr(cfg, "lora_enabled", False):
        raise MultihostError("LoRA adapters are not served multi-host yet")


class Channel:
    """Process 0 -> every process, over the devices' own collectives (gloo on CPU).

    A message is one fixed-size frame (header + the first bytes of the payload); a payload
    that does not fit adds one broadcast of the rest, padded to a power of two, so only a few
    shapes are ever compiled. A broadcast is a sum over processes where only process 0's
    row is non-zero (as `multihost_utils.broadcast_one_to_all`, with the mesh and the jitted
    sum built once: about a third of its time per call).
    """

    HEADER = np.dtype([("op", "<i8"), ("length", "<i8"), ("seq", "<i8")])

    def __init__(self, frame_bytes: int = FRAME_BYTES) -> None:
        self.is_source = jax.process_index() == 0
        self.seq = 0
        self.frame_bytes = frame_bytes
        self.inline = frame_bytes - self.HEADER.itemsize
        devices = np.array(jax.devices()).reshape(jax.process_count(), jax.local_device_count())
        mesh = Mesh(devices, ("processes", "local"))
        self._rows = NamedSharding(mesh, P("processes"))  # [num_processes, n], one row each
        self._sum = jax.jit(
            lambda rows: jnp.sum(rows, axis=0, dtype=rows.dtype),
            out_shardings=NamedSharding(mesh, P()),
        )

    def _broadcast(self, data: np.ndarray) -> np.ndarray:
        row = (data if self.is_source else np.zeros_like(data))[None]
        rows = jax.make_array_from_process_local_data(self._rows, row)
        return np.asarray(self._sum(rows).addressable_data(0))

    def send(self, op: Op, payload: bytes = b"") -> None:
        assert self.is_source, "only process 0 sends"
        frame = np.zeros(self.frame_bytes, np.uint8)
        header = np.array([(op, len(payload), self.seq)], self.HEADER)
        frame[: self.HEADER.itemsize] = header.view(np.uint8)
        head, rest = payload[: self.inline], payload[self.inline :]
        frame[self.HEADER.itemsize : self.HEADER.itemsize + len(head)] = np.frombuffer(
            head, np.uint8
        )
        self._broadcast(frame)
        if rest:
            buf = np.zeros(_padded(len(rest)), np.uint8)
            buf[: len(rest)] = np.frombuffer(rest, np.uint8)
            self._broadcast(buf)
        self.seq += 1

    def receive(self) -> tuple[Op, bytes]:
        frame = self._broadcast(np.zeros(self.frame_bytes, np.uint8))
        header = frame[: self.HEADER.itemsize].view(self.HEADER)[0]
        op, length, seq = int(header["op"]), int(header["length"]), int(header["seq"])
        if seq != self.seq:
            raise MultihostError(f"message {seq} from process 0, expected {self.seq}")
        self.seq += 1
        payload = frame[self.HEADER.itemsize :][: min(length, self.inline)].tobytes()
        if length > self.inline:
            rest = length - self.inline
            payload += self._broadcast(np.zeros(_padded(rest), np.uint8))[:rest].tobytes()
        return Op(op), payload


def _padded(n: int) -> int:
    return max(1024, 1 << (n - 1).bit_length())


class Leader:
    """Process 0's runner: each call goes to the followers first, then runs here.

    Any failed call is fatal (the processes' device states may have diverged): it is
    reported once through `on_failure` and every later call raises `MultihostError`.
    After warm-up, `watch()` pings idle followers every `keepalive_s` (a dead one fails the
    ping at once) and reports a call that has not finished within `step_timeout_s` (a
    stopped or cut-off process can leave a collective waiting for ever).
    """

    def __init__(self, runner: Any, cfg: DistributedConfig, channel: Channel | None = None):
        self.runner = runner
        self.cfg = cfg
        self.channel = channel or Channel()
        self.on_failure: Callable[[str], None] | None = None
        self.failure: str | None = None
        self._lock = threading.Lock()  # one message + call at a time, in one order
        self._fail_lock = threading.Lock()
        self._busy_since: float | None = None
        self._last_call = time.monotonic()
        self._stopped = threading.Event()

    # ---- the runner's public calls -------------------------------------------------------
    def send_config(self) -> None:
        """Followers build their Runner from the config process 0's Runner was built with."""
        self._call(Op.CONFIG, self.runner.cfg)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(Op.RUN, (args, kwargs))

    def permute_slots(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(Op.PERMUTE, (args, kwargs))

    def reset_if_invalid(self) -> bool:
        # After a failed call the job is over: touching the device would only block.
        reset = None if self.failure else getattr(self.runner, "reset_if_invalid", None)
        return bool(reset is not None and reset())

    def __getattr__(self, name: str) -> Any:
        """The runner's attributes (num_compiles, platform, cfg, ...), but not its other
        methods: a device call made on process 0 alone would leave the processes' states
        apart (or the next collective waiting), so each needs its Op first."""
        value = getattr(self.runner, name)
        if callable(value):
            raise MultihostError(f"runner.{name}() is not broadcast to the other processes")
        return value

    def _call(self, op: Op, message: Any) -> Any:
        with self._lock:
            if self.failure:
                raise MultihostError(self.failure)
            self._busy_since = time.monotonic()
            try:
                self.channel.send(op, pickle.dumps(message, pickle.HIGHEST_PROTOCOL))
                if op not in METHODS:
                    return None
                args, kwargs = message
                return getattr(self.runner, METHODS[op])(*args, **kwargs)
            except Exception as exc:
                self.fail(f"multi-host {op.name} failed: {type(exc).__name__}: {exc}")
                raise MultihostError(self.failure) from exc
            finally:
                self._busy_since = None
                self._last_call = time.monotonic()

    # ---- liveness --------------------------------------------------------------------------
    def fail(self, why: str) -> None:
        """Report the job lost (once): log it and tell `on_failure`."""
        with self._fail_lock:
            if self.failure:
                return
            self.failure = why
        log.error("%s; the other processes are unusable, stopping", why)
        if self.on_failure is not None:
            self.on_failure(why)

    def watch(self) -> None:
        """Start the keepalive and deadline threads (after warm-up: compiling is not hanging).

        Two threads, so a ping that hangs on a stopped process still meets the deadline.
        """
        for target in (self._keep_alive, self._check_deadline):
            name = f"jaxserve-multihost{target.__name__}"
            threading.Thread(target=target, name=name, daemon=True).start()

    def _keep_alive(self) -> None:
        while not self._stopped.wait(self.cfg.keepalive_s / 2) and not self.failure:
            idle_s = time.monotonic() - self._last_call
            if self._busy_since is None and idle_s >= self.cfg.keepalive_s:
                try:
                    self._call(Op.PING, None)
                except Exception:  # noqa: BLE001 - reported by _call
                    return

    def _check_deadline(self) -> None:
        while not self._stopped.wait(WATCH_PERIOD_S) and not self.failure:
            since = self._busy_since
            if since is not None and time.monotonic() - since > self.cfg.step_timeout_s:
                self.fail(
                    f"a device call has not finished in step_timeout_s="
                    f"{self.cfg.step_timeout_s:g} s: a process stopped answering"
                )

    def stop(self) -> None:
        """The server is done: followers exit 0 (unless the job is lost already).

        Bounded by step_timeout_s: a call still in flight ends first, then STOP goes out;
        a follower that never takes it is reported like any other lost process.
        """
        self._stopped.set()
        if self.failure:  # a thread may be blocked in a collective for good: leave it
            return
        sender = threading.Thread(target=self._send_stop, name="jaxserve-stop", daemon=True)
        sender.start()
        sender.join(self.cfg.step_timeout_s)
        if sender.is_alive():
            self.fail(
                f"the followers did not take STOP in step_timeout_s={self.cfg.step_timeout_s:g} s"
            )

    def _send_stop(self) -> None:
        try:
            self._call(Op.STOP, None)
        except Exception:  # noqa: BLE001 - reported by _call
            pass


def fail_server(bridge: Bridge, why: str) -> None:
    """Process 0 lost another process: /health answers 500, new requests 503, and the
    requests in flight end with an error (the caller then stops the server, exit 1)."""
    bridge.failure = why
    bridge.draining = True
    bridge.fail_all(why)


def follow(cfg: EngineConfig) -> int:
    """A follower process: build the Runner process 0 describes, then make its calls.

    Its engine settings are process 0's (the KV pages it sized, every bucket), so the
    programs match; of its own config only `cache_dir` and `[distributed]` count.
    Returns the exit code: 0 when process 0 says stop, 1 when it is gone.
    """
    from jaxserve.runner import Runner
    from jaxserve.weights import load_model

    channel = Channel()
    pid = jax.process_index()
    try:
        op, payload = channel.receive()
        if op is not Op.CONFIG:
            raise MultihostError(f"first message from process 0 is {op.name}, not CONFIG")
        # Process 0's engine settings (num_pages resolved), this process's own paths.
        leader_cfg: EngineConfig = pickle.loads(payload)
        cfg = replace(leader_cfg, cache_dir=cfg.cache_dir, distributed=cfg.distributed)
        check_mesh_spans_processes(cfg)
        print(f"follower {pid}: loading model {cfg.model} ...", file=sys.stderr, flush=True)
        loaded = load_model(cfg.model, Path(cfg.cache_dir) if cfg.cache_dir else None, lazy=True)
        runner = Runner(loaded.config, loaded.params, cfg)
        print(f"follower {pid}: stepping with process 0", file=sys.stderr, flush=True)
        while True:
            op, payload = channel.receive()
            if op is Op.STOP:
                print(f"follower {pid}: process 0 stopped; exiting", file=sys.stderr, flush=True)
                return 0
            if op in METHODS:
                args, kwargs = pickle.loads(payload)
                getattr(runner, METHODS[op])(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - process 0 (or the link to it) is gone
        log.error("follower %d: %s: %s; exiting", pid, type(exc).__name__, exc)
        return 1
