"""``fedtier bench large-model``: a large model through the real daemons; runs tiers as processes.

``run_large_model_bench`` starts Mosquitto and nats-server with their size
limits raised as an operator would for a large model (Mosquitto's
``max_packet_size`` to carry one device update; nats-server keeps its
``max_payload`` and partials above it go as numbered parts), writes keys,
registries, version 0 of a two-layer MLP whose hidden width gives about
``--params`` parameters and the configs of one ``fedtier central``, one
``fedtier regional`` and one ``fedtier edge``, starts them as separate
processes, then runs the devices (``simulations.bench._large_device``):
``--updates`` signed updates of that layout go into the edge's one buffer,
the edge cuts one partial, the regional one, the central publishes version 1,
and the edge relays it to the devices, as retained parts when the blob is above
the broker's packet limit. The run ends once the real client device has
joined, verified and loaded version 1 (or at a deadline).

It reports the peak RSS of every daemon and broker (``VmHWM`` from
``/proc/<pid>/status``, read before they stop), each divided by the model's
float32 bytes, and the wall time of each leg from the daemons' span files.
With ``--compare-updates 2,8`` it runs twice and prints both: a daemon whose
memory grew with the inputs of a buffer would show it there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import trio

from fedtier.protocol.errors import BenchError, FedtierError
from fedtier.simulations.bench._large_device import DeviceSpec
from fedtier.simulations.mesh import new_identity, write_registry, write_toml
from fedtier.simulations.processes import (
    Child,
    ProcessGroup,
    open_process_group,
    sigterm_as_interrupt,
    stop_on_signals,
)
from fedtier.simulations.testing import MALLOC_ENV, MosquittoProcess, NatsServerProcess

__all__ = ["LargeModelPlan", "hidden_for", "main", "run_large_model_bench"]

FLEET: Final = "large"
REGION: Final = "north"
SITE: Final = "harbour"
NUM_FEATURES: Final = 64
NUM_CLASSES: Final = 10
MAX_PARAMS: Final = 256 * 1024 * 1024
MAX_UPDATES: Final = 64
# MQTT's own ceiling on one packet (the remaining-length field), in bytes.
MQTT_MAX_PACKET: Final = 268_435_455
_SERVING: Final = r"serving \(epoch \d+, model v\d+\)"
_HEADER_ROOM: Final = 8 * 1024 * 1024
_AUTOSAVE_S: Final = 30


def hidden_for(params: int) -> int:
    """The hidden width of a 64 -> h -> 10 MLP with about ``params`` parameters."""
    # 64h + h (first layer) + 10h + 10 (second layer) = 75h + 10.
    return max(1, round((params - NUM_CLASSES) / (NUM_FEATURES + 1 + NUM_CLASSES)))


def _tensors(hidden: int) -> list[tuple[str, list[int]]]:
    return [
        ("0.weight", [hidden, NUM_FEATURES]),
        ("0.bias", [hidden]),
        ("2.weight", [NUM_CLASSES, hidden]),
        ("2.bias", [NUM_CLASSES]),
    ]


@dataclass(frozen=True, slots=True)
class LargeModelPlan:
    """One run's settings.

    Attributes:
        params: parameters asked for (the model has the nearest MLP count).
        codec: the devices' update codec.
        updates: device updates that go into the edge's one buffer.
        partial_codec: the codec of the edge's and the regional's partials.
        mqtt_max_packet: Mosquitto's ``max_packet_size``; None: raised to
            carry one update (what an operator sets for this model).
        nats_max_payload: nats-server's ``max_payload``.
        deadline_s: the whole run, start to the device's load of version 1.
        seed: weights and deltas.
    """

    params: int = 100_000_000
    codec: str = "i8"
    updates: int = 4
    partial_codec: str = "f32"
    mqtt_max_packet: int | None = None
    nats_max_payload: int = 8 * 1024 * 1024
    deadline_s: float = 1800.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1_000 <= self.params <= MAX_PARAMS:
            raise FedtierError(f"--params {self.params} is not in 1000..{MAX_PARAMS}")
        if not 1 <= self.updates <= MAX_UPDATES:
            raise FedtierError(f"--updates {self.updates} is not in 1..{MAX_UPDATES}")
        if self.codec not in ("i8", "f16", "f32"):
            raise FedtierError(f"--codec {self.codec!r}: i8, f16 or f32")

    @property
    def hidden(self) -> int:
        """The MLP's hidden width."""
        return hidden_for(self.params)

    @property
    def num_params(self) -> int:
        """The model's exact parameter count."""
        return (NUM_FEATURES + 1 + NUM_CLASSES) * self.hidden + NUM_CLASSES

    @property
    def model_bytes(self) -> int:
        """The model as float32."""
        return 4 * self.num_params

    def packet_limit(self) -> int:
        """Mosquitto's ``max_packet_size`` for this run."""
        if self.mqtt_max_packet is not None:
            return self.mqtt_max_packet
        width = {"i8": 1, "f16": 2, "f32": 4}[self.codec]
        # One update and its header; model blobs above it go as retained parts.
        return min(MQTT_MAX_PACKET, width * self.num_params + _HEADER_ROOM)


# -- files --------------------------------------------------------------------------


_HEADER = "Written by fedtier bench large-model for one run; see deploy/*.example.toml."


def _write_toml(path: Path, body: dict[str, object]) -> Path:
    return write_toml(path, _HEADER, body)


def _write_model(path: Path, plan: LargeModelPlan) -> None:
    """Version 0: small random weights, written tensor by tensor (no float64 copy)."""
    rng = np.random.default_rng(plan.seed)
    arrays: dict[str, np.ndarray[Any, np.dtype[np.float32]]] = {}
    for name, shape in _tensors(plan.hidden):
        array = np.empty(shape, np.float32)
        rng.standard_normal(array.shape, dtype=np.float32, out=array)
        array *= np.float32(0.01)
        arrays[name] = array
    np.savez(path, **arrays)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class _Files:
    central: Path
    regional: Path
    edge: Path
    device_keys: list[str]
    edge_pub: Path
    central_pub: Path
    trace_dir: Path


def _write_files(plan: LargeModelPlan, work: Path, mqtt: MosquittoProcess, nats: str) -> _Files:
    keys = work / "keys"
    (keys / "devices").mkdir(parents=True)
    trace_dir = work / "traces"
    new_identity(keys, "central")
    regional = new_identity(keys, f"regional-{REGION}")
    edge = new_identity(keys, f"edge-{SITE}")
    devices = {
        f"dev-{i:02d}": new_identity(keys / "devices", f"dev-{i:02d}") for i in range(plan.updates)
    }
    model = work / "initial.npz"
    _write_model(model, plan)
    # Every envelope a daemon decodes: the widest partial (float32) plus room for its header.
    limits = {
        "max_params": plan.num_params,
        "max_envelope_bytes": plan.model_bytes + _HEADER_ROOM,
    }

    def common(name: str, senders: Path, inputs: int) -> dict[str, object]:
        return {
            "fleet": FLEET,
            "identity_key": keys / f"{name}.key",
            "state_dir": work / "state" / name,
            "intake_capacity": 8,
            "shutdown_timeout_s": 60.0,
            "keys": {"senders": [str(senders)], "central": keys / "central.pub"},
            "nats": {"servers": [nats], "require_sync_always": False},
            # One buffer of exactly the bench's inputs, cut as soon as it is full.
            "flush": {"max_inputs": inputs, "max_age_s": 3600.0},
            "limits": limits,
            "telemetry": {"jsonl_dir": trace_dir},
        }

    config = work / "config"
    config.mkdir()
    return _Files(
        central=_write_toml(
            config / "central.toml",
            {
                **common(
                    "central",
                    write_registry(keys / "regionals.toml", {f"regional-{REGION}": regional}),
                    1,
                ),
                "model": {"initial": model},
                "optimizer": {"name": "fedavg", "lr": 1.0},
            },
        ),
        regional=_write_toml(
            config / "regional.toml",
            {
                "region": REGION,
                **common(
                    f"regional-{REGION}",
                    write_registry(keys / "edges.toml", {f"edge-{SITE}": edge}),
                    1,
                ),
                "partial": {"codec": plan.partial_codec},
            },
        ),
        edge=_write_toml(
            config / "edge.toml",
            {
                "site": SITE,
                "region": REGION,
                **common(
                    f"edge-{SITE}", write_registry(keys / "devices.toml", devices), plan.updates
                ),
                "mqtt": {
                    "host": mqtt.host,
                    "port": mqtt.tier_port,
                    "client_id": f"edge-{SITE}",
                    "keepalive_s": 120,
                },
                "partial": {"codec": plan.partial_codec},
            },
        ),
        device_keys=[str(keys / "devices" / f"{n}.key") for n in devices],
        edge_pub=keys / f"edge-{SITE}.pub",
        central_pub=keys / "central.pub",
        trace_dir=trace_dir,
    )


# -- brokers ------------------------------------------------------------------------


def _start_mosquitto(work: Path, max_packet: int) -> MosquittoProcess:
    """Mosquitto with ``max_packet_size`` set for the run (the shipped config says 16 MiB).

    And ``autosave_interval`` at 30 s instead of 1: Mosquitto rewrites its whole
    persistence file at each save, retained blob parts included, and while it
    writes 400 MB it answers no CONNECT (an edge's connect then times out and
    the edge exits). docs/operations.md tells an operator to do the same.
    """
    broker = MosquittoProcess.start(work / "mosquitto")
    text = broker.config_path.read_text()
    replaced = {
        "max_packet_size": f"max_packet_size {max_packet}",
        "autosave_interval": f"autosave_interval {_AUTOSAVE_S}",
    }
    lines = [replaced.get(line.split(" ", 1)[0], line) for line in text.splitlines()]
    broker.config_path.write_text("\n".join(lines) + "\n")
    broker.restart()
    return broker


def _start_nats(work: Path, max_payload: int) -> NatsServerProcess:
    """nats-server with JetStream; ``max_payload`` set (a later key wins in its config)."""
    return NatsServerProcess.start(
        work / "nats", sync_always=True, extra_config=f"max_payload: {max_payload}\n"
    )


def _nats_pid(server: NatsServerProcess) -> int | None:
    # The server names its ports file after its pid.
    for ports in server.workdir.glob("nats-server_*.ports"):
        stem = ports.stem.rpartition("_")[2]
        if stem.isdigit():
            return int(stem)
    return None


def peak_rss_bytes(pid: int | None) -> int | None:
    """``VmHWM`` of a running process, in bytes; None if it is gone or not Linux."""
    if pid is None:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


# -- spans --------------------------------------------------------------------------


def _spans(trace_dir: Path) -> list[dict[str, Any]]:
    spans = []
    for path in sorted(trace_dir.glob("*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                span = json.loads(line)
            except ValueError:
                continue
            if isinstance(span, dict):
                spans.append(span)
    return spans


def _ns(span: Mapping[str, Any], key: str) -> int | None:
    value = span.get(key)
    return int(value) if isinstance(value, int | float) else None


def leg_times(trace_dir: Path, device_times: Mapping[str, float]) -> dict[str, float | None]:
    """Seconds of each leg, from the span files and the device's clock (one machine).

    device -> edge: first publish to the last receipt; edge -> regional: the
    edge's send of its partial; regional -> central: from the regional's
    processing of it to the end of its send; central: from its processing of
    the regional's partial to the end of its publish; central -> device: from
    then until the device loaded the new version.
    """
    by_name: dict[str, list[dict[str, Any]]] = {}
    for span in _spans(trace_dir):
        by_name.setdefault(str(span.get("name", "")), []).append(span)

    def first(name: str, key: str) -> int | None:
        values = [v for s in by_name.get(name, []) if (v := _ns(s, key)) is not None]
        return min(values) if values else None

    def last(name: str, key: str) -> int | None:
        values = [v for s in by_name.get(name, []) if (v := _ns(s, key)) is not None]
        return max(values) if values else None

    def seconds(start: float | None, end: float | None) -> float | None:
        if start is None or end is None:
            return None
        return round(end - start, 3)

    def s(ns: int | None) -> float | None:
        return None if ns is None else ns / 1e9

    # The version the device waits for is the first one published after the
    # central took a partial in (v0 goes out at start; a later one may follow
    # while the device is still loading). Its publish span's start: the span
    # ends after the announcement, which a device can outrun through the edge.
    took_in = first("central process", "start_unix_ns")
    publish_starts = [
        v
        for span in by_name.get("central publish model", [])
        if (v := _ns(span, "start_unix_ns")) is not None and (took_in is None or v >= took_in)
    ]
    published = s(min(publish_starts)) if publish_starts else None
    return {
        "device_to_edge_s": seconds(
            device_times.get("first_publish"), device_times.get("last_receipt")
        ),
        "edge_cut_and_send_s": seconds(
            s(first("edge aggregate", "start_unix_ns")), s(last("edge send", "end_unix_ns"))
        ),
        "regional_s": seconds(
            s(first("regional process", "start_unix_ns")), s(last("regional send", "end_unix_ns"))
        ),
        "central_s": seconds(s(first("central process", "start_unix_ns")), published),
        "central_to_device_s": seconds(published, device_times.get("model_new_loaded")),
        "total_s": seconds(device_times.get("first_publish"), device_times.get("model_new_loaded")),
    }


# -- running ------------------------------------------------------------------------


def _daemon(kind: str, config: Path) -> list[str]:
    return [sys.executable, "-m", "fedtier", kind, "--config", str(config)]


@dataclass
class _DeviceResult:
    value: dict[str, Any] | None = None

    def take(self, line: str) -> None:
        try:
            parsed = json.loads(line)
        except ValueError:
            return
        if isinstance(parsed, dict):
            self.value = parsed


async def _run_once(plan: LargeModelPlan, work: Path) -> dict[str, Any]:
    mosquitto = await trio.to_thread.run_sync(_start_mosquitto, work, plan.packet_limit())
    try:
        nats = await trio.to_thread.run_sync(_start_nats, work, plan.nats_max_payload)
        try:
            return await _run_daemons(plan, work, mosquitto, nats)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(nats.stop)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(mosquitto.stop)


async def _run_daemons(
    plan: LargeModelPlan, work: Path, mosquitto: MosquittoProcess, nats: NatsServerProcess
) -> dict[str, Any]:
    files = await trio.to_thread.run_sync(_write_files, plan, work, mosquitto, nats.url)
    env = {**os.environ, **MALLOC_ENV, "OTEL_TRACES_EXPORTER": "jsonl"}
    env.pop("OTEL_SDK_DISABLED", None)
    started = time.monotonic()
    device = _DeviceResult()
    async with open_process_group(work / "logs", env=env, stop_grace_s=120.0) as group:
        with trio.fail_after(plan.deadline_s):
            central = await group.start(
                "central", _daemon("central", files.central), ready_pattern=_SERVING
            )
            await _ready(group, [central])
            regional = await group.start(
                "regional", _daemon("regional", files.regional), ready_pattern=_SERVING
            )
            edge = await group.start("edge", _daemon("edge", files.edge), ready_pattern=_SERVING)
            await _ready(group, [regional, edge])
            (work / "state" / "devices").mkdir(parents=True, exist_ok=True)
            spec = DeviceSpec(
                fleet=FLEET,
                site=SITE,
                host=mosquitto.host,
                port=mosquitto.port,
                tensors=_tensors(plan.hidden),
                codec=plan.codec,
                device_keys=files.device_keys,
                edge_key=str(files.edge_pub),
                central_key=str(files.central_pub),
                state_dir=str(work / "state" / "devices"),
                deadline_s=max(1.0, plan.deadline_s - (time.monotonic() - started)),
                seed=plan.seed,
            )
            devices = await group.start(
                "devices",
                [sys.executable, "-m", "fedtier.simulations.bench._large_device", spec.to_json()],
                on_stdout_line=device.take,
            )
            devices.stopping = True  # it exits once it holds the new version
            daemons = {"central": central, "regional": regional, "edge": edge}
            async with trio.open_nursery() as watch:
                watch.start_soon(_fail_on_exit, group, list(daemons.values()))
                await devices.exited.wait()
                watch.cancel_scope.cancel()
            await devices.stderr_done.wait()
            if devices.returncode != 0 or device.value is None:
                raise BenchError(devices.describe_exit())
            # Peaks before anything stops: a clean stop may flush, never grow the peak.
            rss = {name: peak_rss_bytes(child.process.pid) for name, child in daemons.items()}
            rss["mosquitto"] = peak_rss_bytes(mosquitto.pid)
            rss["nats_server"] = peak_rss_bytes(_nats_pid(nats))
            rss["devices"] = device.value.get("peak_rss_bytes")
    legs = leg_times(files.trace_dir, device.value["times"])
    model_bytes = plan.model_bytes
    return {
        "updates": plan.updates,
        "codec": plan.codec,
        "partial_codec": plan.partial_codec,
        "hidden": plan.hidden,
        "updates_delivered": device.value["updates"],
        "model_version_before": device.value["model_version_before"],
        "model_version_after": device.value["model_version_after"],
        "update_envelope_bytes": device.value["update_envelope_bytes"],
        "update_bytes_on_wire": device.value["update_bytes_on_wire"],
        "mqtt_max_packet_bytes": plan.packet_limit(),
        "nats_max_payload_bytes": plan.nats_max_payload,
        "legs_s": legs,
        "peak_rss_bytes": rss,
        "peak_rss_per_model_bytes": {
            name: None if value is None else round(value / model_bytes, 3)
            for name, value in rss.items()
        },
    }


async def _ready(group: ProcessGroup, children: Sequence[Child]) -> None:
    await group.wait_ready(children, timeout_s=600.0)


async def _fail_on_exit(group: ProcessGroup, daemons: Sequence[Child]) -> None:
    while True:
        for child in daemons:
            if child.exited.is_set():
                raise BenchError(f"daemon {child.describe_exit()}")
        await group.changed()


async def run_large_model_bench(
    plan: LargeModelPlan,
    *,
    compare_updates: Sequence[int] = (),
    workdir: Path | None = None,
    keep: bool = False,
) -> dict[str, Any]:
    """Run the bench (once per ``compare_updates`` entry, or once); returns the JSON result.

    ``keep`` leaves the run's folder (configs, logs, span files, state) in place
    and names it in the result, for a look at where a phase spent its memory.
    """
    counts = list(compare_updates) or [plan.updates]
    runs = []
    with contextlib.ExitStack() as stack:
        if keep:
            tmp = tempfile.mkdtemp(prefix="fedtier-large-", dir=workdir)
        else:
            tmp = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="fedtier-large-", dir=workdir)
            )
        for n, updates in enumerate(counts):
            one = LargeModelPlan(
                params=plan.params,
                codec=plan.codec,
                updates=updates,
                partial_codec=plan.partial_codec,
                mqtt_max_packet=plan.mqtt_max_packet,
                nats_max_payload=plan.nats_max_payload,
                deadline_s=plan.deadline_s,
                seed=plan.seed,
            )
            work = Path(tmp) / f"run-{n}"
            work.mkdir()
            runs.append(await _run_once(one, work))
    return {
        "bench": "large-model",
        **({"kept": tmp} if keep else {}),
        "parameters": plan.num_params,
        "model_bytes": plan.model_bytes,
        "machine": {"cpus": os.cpu_count(), "memory_bytes": _memory_bytes()},
        "runs": runs,
    }


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# -- command ------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtier bench large-model",
        description="one large model device -> edge -> regional -> central -> device on "
        "loopback through the real daemons; peak RSS of each (JSON)",
    )
    parser.add_argument("--params", type=int, default=100_000_000, help="model parameters")
    parser.add_argument("--codec", choices=("i8", "f16", "f32"), default="i8")
    parser.add_argument("--updates", type=int, default=4, help="device updates in one buffer")
    parser.add_argument(
        "--compare-updates",
        default="",
        metavar="N,M",
        help="run once per count (e.g. 2,8) to show memory does not grow with inputs",
    )
    parser.add_argument("--partial-codec", choices=("f32", "f16"), default="f32")
    parser.add_argument(
        "--mqtt-max-packet",
        type=int,
        default=None,
        help="Mosquitto max_packet_size in bytes (default: one update fits)",
    )
    parser.add_argument(
        "--nats-max-payload", type=int, default=8 * 1024 * 1024, help="nats max_payload (bytes)"
    )
    parser.add_argument("--deadline", type=float, default=1800.0, help="seconds for one run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temp folder")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument(
        "--keep", action="store_true", help="keep configs, logs, span files and state"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``fedtier bench large-model``: prints the JSON result (and writes ``--out``)."""
    args = _parser().parse_args(argv)
    try:
        compare = [int(x) for x in args.compare_updates.split(",") if x.strip()]
    except ValueError as exc:
        raise FedtierError(f"--compare-updates {args.compare_updates!r}: {exc}") from exc
    plan = LargeModelPlan(
        params=args.params,
        codec=args.codec,
        updates=args.updates,
        partial_codec=args.partial_codec,
        mqtt_max_packet=args.mqtt_max_packet,
        nats_max_payload=args.nats_max_payload,
        deadline_s=args.deadline,
        seed=args.seed,
    )
    for count in compare:
        LargeModelPlan(params=plan.params, updates=count)  # validates each count
    with sigterm_as_interrupt():
        result = trio.run(
            stop_on_signals,
            lambda: run_large_model_bench(
                plan, compare_updates=compare, workdir=args.workdir, keep=args.keep
            ),
        )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
