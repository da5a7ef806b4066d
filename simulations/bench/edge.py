"""Edge daemon intake vs a bare pipeline on real Mosquitto; imports tiers only via its workers.

``run_edge_bench`` starts Mosquitto on a free loopback port in a temporary
folder, then for each update format runs three pipeline runs in turn, each as child
processes (``simulations.bench._edge_worker``) so that they start with the
malloc environment of ``docs/transport.md`` (performance facts):

* **baseline**: a bare subscriber on the trio-driven MQTT adapter (per the notes
  faster than paho's own loop thread, and the edge's own transport, so the
  ratio isolates what the edge adds) that parses, verifies (Ed25519 over the
  header, BLAKE3 of the payload) and folds each update into a numpy
  accumulator, then acknowledges it. Fed by an open-loop publisher with 64
  publishes awaiting PUBACK; its rate runs from the first publish to the last
  fold.
* **edge**: the real ``EdgeDaemon`` (real MQTT bus, in-memory NATS upstream,
  state store with ``synchronous=FULL`` grouped commits and envelopes in its
  fsync'd segment log, signed receipts), run twice. Open loop (``edge``, the
  like-for-like run the ratio uses): fed exactly as the baseline, 64 publishes
  awaiting the broker's PUBACK, the consumer holding at most 64 deliveries
  unacknowledged (the edge acknowledges one only once it is durable). Closed
  loop (``edge_closed_loop``): each device keeps one update unanswered and
  sends the next on its receipt, as devices do. Each rate runs
  from the first publish to the last receipt; the latencies are publish ->
  receipt at that load, so in the closed loop they read as ``devices / rate``
  plus service time, not as an idle system's latency.

The publisher signs every envelope before any timing, runs in its own process,
and reports its own rate (publishing everything to a topic nobody reads before
the baseline run). Every child reports its CPU time and the bench reads the
broker's from ``/proc``, so a reader can tell which process saturates (also per
update, ``cpu_ms_per_update``). The edge reports the bytes it wrote
(``/proc/self/io``) per update, in all and less its partials' bytes (a cut's
write, not intake's), each also as a multiple of the wire size. A run is
bounded in updates, bytes and seconds; every process and file is gone when
``run_edge_bench`` returns, whatever happened.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import trio

from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.errors import BenchError, FedtierError, LocalProtocolError
from fedtier.simulations.bench._edge_worker import EDGE_SETTINGS, READY_LINE, Role, WorkerSpec
from fedtier.simulations.bench._model_latency import MAX_ROUNDS as MAX_MODEL_ROUNDS
from fedtier.simulations.bench._model_latency import measure_model_latency
from fedtier.simulations.processes import (
    Child,
    ProcessGroup,
    open_process_group,
    sigterm_as_interrupt,
    stop_on_signals,
)
from fedtier.simulations.testing import MALLOC_ENV, MosquittoProcess

__all__ = ["DEFAULT_FORMATS", "main", "render_table", "run_edge_bench"]

DEFAULT_FORMATS: Final = ("f32", "i8", "top1%+i8")
MAX_UPDATES: Final = 100_000
MAX_DEVICES: Final = 1_000
MAX_PARAMS: Final = 16 * 1024 * 1024
# Per format: what the publisher holds signed in memory and what the broker may
# queue for the baseline (Mosquitto drops QoS 1 silently past max_queued_bytes, 2 GiB).
MAX_BYTES_PER_FORMAT: Final = 1024**3
_ENVELOPE_OVERHEAD_BYTES: Final = 512
_READY_TIMEOUT_S: Final = 60.0
_RESULT_AFTER_EXIT_S: Final = 5.0
_STOP_GRACE_S: Final = 60.0
LOADS: Final = {
    "open": (
        "open loop: 64 publishes awaiting the broker's PUBACK; the consumer holds at most 64"
        " unacknowledged deliveries and acknowledges after its fold (baseline) or once the"
        " update is durable (edge); rate until the last fold (baseline) or receipt (edge)"
    ),
    "closed": (
        "closed loop (edge only): each device keeps one update awaiting its receipt and"
        " sends the next on it, as devices do; rate until the last receipt"
    ),
}

Pipeline = Literal["baseline", "edge"]
Load = Literal["open", "closed"]


@dataclass
class _Result:
    """The one JSON line a child prints, once it arrived."""

    value: dict[str, Any] | None = None
    arrived: trio.Event = field(default_factory=trio.Event)

    def take_line(self, line: str) -> None:
        try:
            parsed = json.loads(line)
        except ValueError:
            return  # not the result line
        if isinstance(parsed, dict):
            self.value = parsed
            self.arrived.set()

    async def get(self, child: Child) -> dict[str, Any]:
        # The stdout pump may deliver the line just after the exit is noticed.
        with trio.move_on_after(_RESULT_AFTER_EXIT_S):
            await self.arrived.wait()
        if self.value is None:
            raise BenchError(f"{child.describe_exit()}; it printed no result")
        return self.value


def _cpu_s_of(pid: int | None) -> float | None:
    """User + system CPU seconds of a process from ``/proc`` (Linux), else None."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name, which may hold spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rate(count: int, start_ns: int, end_ns: int) -> float:
    return round(count * 1e9 / max(1, end_ns - start_ns), 1)


@dataclass(frozen=True)
class _Plan:
    broker: MosquittoProcess
    workdir: Path
    num_params: int
    updates: int
    devices: int
    repeats: int
    child_env: dict[str, str | None]
    run_timeout_s: float
    profile_dir: str = ""


class _Runner:
    """Runs the pipelines of one bench against one broker."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self._runs = 0

    def _spec(self, role: Role, run: str, codec: str, **extra: Any) -> WorkerSpec:
        plan = self.plan
        return WorkerSpec(
            role=role,
            host=plan.broker.host,
            port=plan.broker.port,
            run=run,
            codec=codec,
            num_params=plan.num_params,
            updates=plan.updates,
            devices=plan.devices,
            repeats=plan.repeats,
            profile_dir=plan.profile_dir if role != "publisher" else "",
            **extra,
        )

    async def _start(
        self, group: ProcessGroup, name: str, spec: WorkerSpec, result: _Result
    ) -> Child:
        argv = [sys.executable, "-m", "fedtier.simulations.bench._edge_worker", spec.to_json()]
        return await group.start(
            name,
            argv,
            ready_pattern=f"^{READY_LINE}$",
            on_stdout_line=result.take_line,
            env=self.plan.child_env,
        )

    async def run(self, pipeline: Pipeline, codec: str, load: Load = "open") -> dict[str, Any]:
        """One pipeline on one format: consumer ready, publisher runs, both report."""
        plan = self.plan
        self._runs += 1
        # Its own site (topics) and client ids: nothing of an earlier run can
        # reach this one through the broker.
        run = f"{pipeline}-{self._runs}"
        consumer_spec = self._spec(
            pipeline, run, codec, state_dir=str(plan.workdir / run / "edge-state")
        )
        publisher_spec = self._spec(
            "publisher",
            run,
            codec,
            closed_loop=load == "closed",
            receipts=pipeline == "edge",
            sink_first=pipeline == "baseline",
        )
        consumer_result, publisher_result = _Result(), _Result()
        what = f"the {pipeline} run of {codec}"
        async with open_process_group(plan.workdir / "logs", stop_grace_s=_STOP_GRACE_S) as group:
            consumer = await self._start(group, f"{run}-{pipeline}", consumer_spec, consumer_result)
            await group.wait_ready([consumer], timeout_s=_READY_TIMEOUT_S)
            broker_cpu_start = _cpu_s_of(plan.broker.pid)
            publisher = await self._start(
                group, f"{run}-publisher", publisher_spec, publisher_result
            )
            with trio.move_on_after(plan.run_timeout_s) as scope:
                await _until_done(group, publisher, consumer, consumer_exits=pipeline == "baseline")
            if scope.cancelled_caught:
                raise BenchError(
                    f"{what} did not finish within {plan.run_timeout_s:g} s"
                    f" ({plan.updates} updates); publisher: {publisher.describe_exit()};"
                    f" {pipeline}: {consumer.describe_exit()}"
                )
            broker_cpu_end = _cpu_s_of(plan.broker.pid)
            if pipeline == "edge":
                # SIGTERM: the edge samples its counters, then shuts down cleanly.
                await group.stop([consumer], grace_s=_STOP_GRACE_S)
                if consumer.returncode != 0:
                    raise BenchError(f"{what}: {consumer.describe_exit()}")
            published = await publisher_result.get(publisher)
            consumed = await consumer_result.get(consumer)
        broker_cpu = (
            round(broker_cpu_end - broker_cpu_start, 3)
            if broker_cpu_start is not None and broker_cpu_end is not None
            else None
        )
        return {"publisher": published, "consumer": consumed, "broker_cpu_s": broker_cpu}


async def _until_done(
    group: ProcessGroup, publisher: Child, consumer: Child, *, consumer_exits: bool
) -> None:
    """Wait until the publisher (and a self-ending consumer) exited; raise on any failure."""
    while True:
        for child in (publisher, consumer):
            if child.exited.is_set() and child.returncode != 0:
                raise BenchError(child.describe_exit())
        if consumer.exited.is_set() and not consumer_exits:
            raise BenchError(f"{consumer.describe_exit()} before the publisher finished")
        if publisher.exited.is_set() and (consumer.exited.is_set() or not consumer_exits):
            return
        await group.changed()


def _per_update_ms(cpu_s: float | None, updates: int) -> float | None:
    return None if cpu_s is None else round(cpu_s * 1000.0 / updates, 3)


def _edge_row(
    codec: str, updates: int, wire_bytes: int, edge: dict[str, Any], load: Load
) -> dict[str, Any]:
    """One edge run's figures, checking that every update was accepted and answered."""
    edge_pub, edge_host = edge["publisher"], edge["consumer"]
    accepted = edge_host["outcomes"].get("accepted", 0)
    receipts = edge_pub["run"]["receipts"]
    if accepted != updates or receipts.get("accepted", 0) != updates:
        raise BenchError(
            f"edge of {codec} ({load} loop) accepted {accepted} of {updates} updates and sent"
            f" receipts {receipts}; outcomes {edge_host['outcomes']}"
        )
    edge_run = edge_pub["run"]
    edge_rate = _rate(updates, edge_run["first_publish_ns"], edge_run["last_receipt_ns"])
    edge_seconds = (edge_run["last_receipt_ns"] - edge_run["first_publish_ns"]) / 1e9
    written = edge_host["storage_write_bytes"]
    partial_bytes = edge_host["partial_bytes"]
    intake_written = None if written is None else max(0, written - partial_bytes)
    return {
        "load": load,
        "updates": updates,
        "accepted": accepted,
        "receipts_accepted": receipts.get("accepted", 0),
        "updates_per_s": edge_rate,
        "seconds": round(edge_seconds, 3),
        "latency_ms": edge_run["latency_ms"],
        "commits": edge_host["commits"],
        "commits_per_update": round(edge_host["commits"] / updates, 4),
        "storage_write_bytes_per_update": None if written is None else round(written / updates),
        "storage_write_vs_wire": None
        if written is None
        else round(written / updates / wire_bytes, 3),
        "partial_bytes_per_update": round(partial_bytes / updates),
        "intake_write_bytes_per_update": None
        if intake_written is None
        else round(intake_written / updates),
        "intake_write_vs_wire": None
        if intake_written is None
        else round(intake_written / updates / wire_bytes, 3),
        "partials_published": edge_host["partials_published"],
        "held_peak": edge_host["held_peak"],
        "cpu_s": edge_host["cpu_s"],
        "trio_thread_cpu_s": edge_host["trio_thread_cpu_s"],
        "gc_collections": edge_host["gc_collections"],
        "cpu_util": round(edge_host["cpu_s"] / edge_seconds, 3),
        "publisher_cpu_s": edge_run["cpu_s"],
        "broker_cpu_s": edge["broker_cpu_s"],
        "cpu_ms_per_update": {
            "publisher": _per_update_ms(edge_run["cpu_s"], updates),
            "broker": _per_update_ms(edge["broker_cpu_s"], updates),
            "edge": _per_update_ms(edge_host["cpu_s"], updates),
        },
        # Of cpu_ms_per_update["edge"]: the trio thread's (admission, fold, receipts,
        # MQTT); the rest is the commit thread's (sqlite, segment appends and syncs).
        "trio_thread_cpu_ms_per_update": _per_update_ms(edge_host["trio_thread_cpu_s"], updates),
    }


def _summarise(
    codec: str,
    num_params: int,
    updates: int,
    baseline: dict[str, Any],
    edge: dict[str, Any],
    edge_closed: dict[str, Any],
) -> dict[str, Any]:
    """One format's row of the result, checking that every count adds up."""
    base_pub, base_sub = baseline["publisher"], baseline["consumer"]
    if base_sub["folded"] != updates:
        raise BenchError(f"baseline of {codec} folded {base_sub['folded']} of {updates} updates")
    wire_bytes = edge["publisher"]["wire_bytes"]
    base_start_ns = base_pub["run"]["first_publish_ns"]
    base_rate = _rate(updates, base_start_ns, base_sub["done_ns"])
    base_seconds = (base_sub["done_ns"] - base_start_ns) / 1e9
    ceiling_ms = base_sub["ceiling_ms"]
    open_row = _edge_row(codec, updates, wire_bytes, edge, "open")
    closed_row = _edge_row(codec, updates, wire_bytes, edge_closed, "closed")
    return {
        "spec": str(CodecSpec.parse(codec, num_params=num_params)),
        "wire_bytes": wire_bytes,
        "ceiling": {
            "open_fold_ms": ceiling_ms,
            "updates_per_s": round(1000.0 / ceiling_ms, 1) if ceiling_ms else None,
        },
        "publisher": {
            "alone_updates_per_s": base_pub["alone"]["updates_per_s"],
            "during_baseline_updates_per_s": base_pub["run"]["updates_per_s"],
            "window": LOADS,
        },
        "baseline": {
            "load": "open",
            "updates": updates,
            "updates_per_s": base_rate,
            "seconds": round(base_seconds, 3),
            "cpu_s": base_sub["cpu_s"],
            "cpu_util": round(base_sub["cpu_s"] / base_seconds, 3),
            "publisher_cpu_s": base_pub["run"]["cpu_s"],
            "broker_cpu_s": baseline["broker_cpu_s"],
            "cpu_ms_per_update": {
                "publisher": _per_update_ms(base_pub["run"]["cpu_s"], updates),
                "broker": _per_update_ms(baseline["broker_cpu_s"], updates),
                "bare": _per_update_ms(base_sub["cpu_s"], updates),
            },
        },
        "edge": open_row,
        "edge_closed_loop": closed_row,
        "edge_vs_baseline": round(open_row["updates_per_s"] / base_rate, 3) if base_rate else None,
        "edge_closed_loop_vs_baseline": round(closed_row["updates_per_s"] / base_rate, 3)
        if base_rate
        else None,
    }


async def _measure(plan: _Plan, formats: Sequence[str]) -> dict[str, Any]:
    runner = _Runner(plan)
    results: dict[str, Any] = {}
    for codec in formats:
        baseline = await runner.run("baseline", codec)
        edge = await runner.run("edge", codec, "open")
        edge_closed = await runner.run("edge", codec, "closed")
        results[codec] = _summarise(
            codec, plan.num_params, plan.updates, baseline, edge, edge_closed
        )
    return results


def _checked_formats(
    formats: Sequence[str], num_params: int, updates: int, devices: int
) -> list[str]:
    if not 1 <= num_params <= MAX_PARAMS:
        raise LocalProtocolError(f"num_params is {num_params}; expected 1..{MAX_PARAMS}")
    if not 1 <= updates <= MAX_UPDATES:
        raise LocalProtocolError(f"updates is {updates}; expected 1..{MAX_UPDATES}")
    if not 1 <= devices <= MAX_DEVICES:
        raise LocalProtocolError(f"devices is {devices}; expected 1..{MAX_DEVICES}")
    if not formats:
        raise LocalProtocolError("no update format to measure")
    for name in formats:
        spec = CodecSpec.parse(name, num_params=num_params)
        total = updates * (spec.max_payload_size(num_params) + _ENVELOPE_OVERHEAD_BYTES)
        if total > MAX_BYTES_PER_FORMAT:
            raise LocalProtocolError(
                f"{updates} updates of {num_params} parameters as {spec} are about"
                f" {total / 2**20:,.0f} MiB; the bench holds at most"
                f" {MAX_BYTES_PER_FORMAT / 2**20:,.0f} MiB per format: use fewer updates"
            )
    return list(dict.fromkeys(formats))


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def _mosquitto_version(broker: MosquittoProcess) -> str | None:
    try:
        for line in broker.log_path.read_text(errors="replace").splitlines():
            if "mosquitto version" in line:
                return line.split("mosquitto version", 1)[1].split()[0]
    except OSError:
        pass
    return None


def run_edge_bench(
    num_params: int = 100_000,
    updates: int = 2_000,
    devices: int = 50,
    formats: Sequence[str] = DEFAULT_FORMATS,
    *,
    malloc_tuning: bool = True,
    repeats: int = 5,
    run_timeout_s: float = 300.0,
    profile_dir: str = "",
    model_rounds: int = 0,
) -> dict[str, object]:
    """Measure the edge's intake against the bare pipeline, per update format.

    Args:
        num_params: model size (length of every delta).
        updates: updates per format and pipeline.
        devices: signed device identities; updates go round-robin, and in the
            edge run each device keeps one update unanswered.
        formats: ``CodecSpec`` names.
        malloc_tuning: start the measured processes with ``MALLOC_ENV``
            (without: with it removed). Mosquitto always runs with it
            (``MosquittoProcess`` sets it).
        repeats: timed runs of the in-process ceiling (median reported).
        run_timeout_s: longest one pipeline run may take.
        profile_dir: when set, the baseline and edge processes run under
            ``cProfile`` and leave ``<run>-<role>.pstats`` and ``.txt`` there
            (the profile slows them: their rates are then not the measurement).
        model_rounds: when > 0, afterwards run a real mesh (Mosquitto,
            nats-server, central, regional and edge daemons) for this many
            rounds and report the latency from a buffer's last update to the
            new model version at the device (``model_latency``; see
            ``simulations.bench._model_latency``); None when 0.

    Returns:
        A JSON-serializable dict: the arguments, ``machine`` (cpu count, load
        averages at start and end), ``versions``, ``settings`` and ``formats``,
        one entry per format with ``wire_bytes``, ``ceiling`` (open + fold in one
        process, no MQTT), ``publisher``, ``baseline`` and ``edge`` (rates in
        updates/s, CPU seconds of each process and of the broker; the edge adds
        publish -> receipt ``latency_ms``, ``commits_per_update``, partials) and
        ``edge_vs_baseline`` (ratio of the two rates).

    Raises:
        LocalProtocolError: arguments out of bounds.
        ConfigError: Mosquitto is missing or does not start.
        BenchError: a child failed or timed out, or counts disagree.
    """
    names = _checked_formats(formats, num_params, updates, devices)
    if not 0 <= model_rounds <= MAX_MODEL_ROUNDS:
        raise LocalProtocolError(f"model rounds is {model_rounds}; expected 0..{MAX_MODEL_ROUNDS}")
    if repeats < 1 or not run_timeout_s > 0:
        raise LocalProtocolError(
            f"repeats {repeats} must be >= 1 and run_timeout_s {run_timeout_s} > 0"
        )
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    child_env: dict[str, str | None] = (
        dict(MALLOC_ENV) if malloc_tuning else dict.fromkeys(MALLOC_ENV)
    )
    with tempfile.TemporaryDirectory(prefix="fedtier-bench-edge-") as tmp:
        workdir = Path(tmp)
        broker = MosquittoProcess.start(workdir / "mosquitto")
        try:
            plan = _Plan(
                broker=broker,
                workdir=workdir,
                num_params=num_params,
                updates=updates,
                devices=devices,
                repeats=repeats,
                child_env=child_env,
                run_timeout_s=run_timeout_s,
                profile_dir=str(Path(profile_dir).resolve()) if profile_dir else "",
            )
            mosquitto = _mosquitto_version(broker)
            try:
                results = trio.run(stop_on_signals, partial(_measure, plan, names))
            except BaseExceptionGroup as group:
                # Nurseries wrap a failure; give the caller the one sentence it can print.
                leaves = _leaves(group)
                if len(leaves) == 1 and isinstance(leaves[0], FedtierError):
                    raise leaves[0] from None
                raise
        finally:
            broker.stop()
    model_latency = measure_model_latency(model_rounds) if model_rounds else None
    return {
        "num_params": num_params,
        "updates": updates,
        "devices": devices,
        "repeats": repeats,
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "load_avg_at_start": load_at_start,
            "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(),
        },
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "trio": version("trio"),
            "paho_mqtt": version("paho-mqtt"),
            "mosquitto": mosquitto,
        },
        "settings": {
            "malloc_tuning": malloc_tuning,
            "broker_malloc_tuning": True,
            "broker": "loopback, plaintext (no TLS), set_tcp_nodelay true, persistence true",
            "transport": "fedtier.protocol.bus.mqtt (paho driven from trio) for every client",
            "edge": {
                **asdict(EDGE_SETTINGS),
                "upstream": "in-memory NATS",
                "store": (
                    "sqlite WAL, synchronous=FULL, grouped commits; envelopes and partials"
                    " in an append-only segment log, fdatasync'd before the commit"
                ),
                "telemetry": "no-op tracer and meter",
                "log_level": "WARNING",
            },
        },
        "formats": results,
        "model_latency": model_latency,
    }


def render_table(result: dict[str, Any]) -> Any:
    """A rich ``Table`` of ``run_edge_bench``'s result (rich is imported here only)."""
    from rich import box
    from rich.table import Table

    machine, settings = result["machine"], result["settings"]
    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        title=(
            f"edge intake vs bare pipeline: {result['num_params']:,} params,"
            f" {result['updates']:,} updates, {result['devices']} devices"
        ),
        caption=(
            "KB on the wire. Updates/s: ceil = open + fold in one process, no MQTT;"
            " pub = publisher alone; bare = bare pipeline; edge = EdgeDaemon until its last"
            " receipt, fed as bare is (64 awaiting PUBACK); ratio = edge/bare. Latency:"
            " publish -> receipt, closed loop (one update outstanding per device)."
            " wr/wire = bytes written per update (less partials) / wire bytes."
            f" {machine['cpu_count']} CPUs, load {machine['load_avg_at_start'][0]:.2f} at"
            f" start, malloc tuning {'on' if settings['malloc_tuning'] else 'off'}."
        ),
    )
    # Short headers, explained in the caption, so the table fits 80 columns.
    columns = (
        "format",
        "KB",
        "ceil/s",
        "pub/s",
        "bare/s",
        "edge/s",
        "ratio",
        "p50 ms",
        "p99 ms",
        "wr/wire",
    )
    longest_name = max(len(name) for name in result["formats"])
    for column in columns:
        table.add_column(
            column, justify="right", min_width=longest_name if column == "format" else None
        )
    for name, row in result["formats"].items():
        edge = row["edge"]
        latency = row["edge_closed_loop"]["latency_ms"]
        intake_ratio = edge["intake_write_vs_wire"]
        table.add_row(
            name,
            f"{row['wire_bytes'] / 1000:,.1f}",
            f"{row['ceiling']['updates_per_s']:,.0f}",
            f"{row['publisher']['alone_updates_per_s']:,.0f}",
            f"{row['baseline']['updates_per_s']:,.0f}",
            f"{edge['updates_per_s']:,.0f}",
            f"{row['edge_vs_baseline']:.2f}x",
            f"{latency['p50']:.0f}",
            f"{latency['p99']:.0f}",
            "-" if intake_ratio is None else f"{intake_ratio:.2f}",
        )
    return table


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print JSON with ``--json``, else a table; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="fedtier bench edge",
        description=(
            "The edge daemon's intake against a bare paho+numpy pipeline, on a Mosquitto"
            " started for the run on a free loopback port."
        ),
    )
    parser.add_argument("--params", type=int, default=100_000, help="model size (default 100000)")
    parser.add_argument(
        "--updates", type=int, default=2_000, help="updates per format and pipeline (default 2000)"
    )
    parser.add_argument(
        "--devices", type=int, default=50, help="signed device identities (default 50)"
    )
    parser.add_argument(
        "--formats",
        default=",".join(DEFAULT_FORMATS),
        # argparse %-formats help strings; top1%+i8 must not read as a directive.
        help=f"comma-separated codec names (default {','.join(DEFAULT_FORMATS)})".replace(
            "%", "%%"
        ),
    )
    parser.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="start the measured processes without the malloc settings (broker keeps them)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the ceiling")
    parser.add_argument(
        "--timeout-s", type=float, default=300.0, help="longest one pipeline run may take"
    )
    parser.add_argument(
        "--profile",
        default="",
        metavar="DIR",
        help="run the measured processes under cProfile; stats go to DIR (slows them)",
    )
    parser.add_argument(
        "--model-rounds",
        type=int,
        default=0,
        metavar="N",
        help=(
            "then run a real mesh (nats-server, central, regional, edge) for N rounds: latency"
            " from a buffer's last update to the new model at the device (default 0: skip)"
        ),
    )
    parser.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    args = parser.parse_args(argv)
    with sigterm_as_interrupt():
        result = run_edge_bench(
            num_params=args.params,
            updates=args.updates,
            devices=args.devices,
            formats=[name.strip() for name in args.formats.split(",") if name.strip()],
            malloc_tuning=not args.no_malloc_tuning,
            repeats=args.repeats,
            run_timeout_s=args.timeout_s,
            profile_dir=args.profile,
            model_rounds=args.model_rounds,
        )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    from rich.console import Console

    console = Console()
    console.print(render_table(result))
    model = result["model_latency"]
    if isinstance(model, dict):
        latency = model["latency_ms"]
        console.print(
            f"last update of a buffer -> new model at the device (real mesh on loopback,"
            f" {model['rounds']} rounds): p50 {latency['p50']:,.0f} ms,"
            f" max {latency['max']:,.0f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
