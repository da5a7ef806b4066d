"""Many device sessions on one edge site, memory per device; imports tiers only via its workers.

``run_connections_bench`` runs, on free loopback ports in a temporary folder:

* **baseline** (optional): a fresh Mosquitto and the same N sessions connected
  and subscribed with no edge and no traffic: the broker's own memory per
  session (and the load generator's).
* **edge run**: a fresh Mosquitto, the real ``EdgeDaemon`` of the site
  (``simulations.bench._conn_worker``: real MQTT bus, in-memory NATS upstream),
  then N MQTT v5 persistent sessions (clean start off, session expiry set),
  spread over a few device processes, each sending a signed update every
  ``interval_s`` (jittered) and waiting for its signed receipt. Once every
  session connected, the run holds ``duration_s``; then the devices stop
  sending, wait up to ``drain_s`` for their missing receipts, and disconnect.

Both brokers run as ``MosquittoProcess`` configures them; with ``tls`` as
``deploy/mosquitto/mosquitto.conf`` does: TLS 1.3 on two listeners, the
devices' (a certificate per device from a throwaway PKI, its CN the user name
of the deployed ACL and the session's client id) and the tiers' (the edge, with
a certificate of a second, tier CA). A reconnect is
a drop, whether the device or the broker log noticed it. Memory per device is
an RSS delta over connected sessions: the broker's from before the first device
connected to the end of the hold, the edge's from its ready state (before any
device) to the end of the hold. The bench raises RLIMIT_NOFILE to the hard
limit for itself and its children (Mosquitto included) and fails, naming the
limit, when that is too low. A run is bounded in sessions and seconds, and
every process and file (unless ``keep_dir`` asks to keep the folder) is gone
when it returns, whatever happened.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any, Final

import trio

from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.errors import BenchError, FedtierError, LocalProtocolError
from fedtier.simulations.bench._conn_worker import (
    EDGE_USER,
    READY_LINE,
    ConnSpec,
    device_identity,
    hist_percentile_ms,
    raise_nofile,
)
from fedtier.simulations.processes import (
    Child,
    ProcessGroup,
    open_process_group,
    sigterm_as_interrupt,
    stop_on_signals,
)
from fedtier.simulations.testing import (
    MALLOC_ENV,
    MosquittoProcess,
    MosquittoTls,
    TestPki,
    mosquitto_acl,
)

__all__ = ["MAX_SESSIONS", "main", "run_connections_bench"]

MAX_SESSIONS: Final = 20_000
MAX_DURATION_S: Final = 4 * 3600.0
MAX_PROCESSES: Final = 16
MAX_PARAMS: Final = 100_000
SITE: Final = "conn"
# File descriptors beyond one per session: logs, persistence, the edge, pipes.
_FD_MARGIN: Final = 512
_READY_TIMEOUT_S: Final = 120.0
_SAMPLE_EVERY_S: Final = 5.0
_POLL_S: Final = 0.5
_RESULT_WAIT_S: Final = 5.0
# The edge's shutdown waits for the intake in progress (at most its capacity).
_EDGE_STOP_GRACE_S: Final = 120.0
# Device client ids hold this; the broker log lines about them are counted.
# Devices' client ids are their key ids (the device listener binds the id to
# the certificate); every other client is the edge's.
_EDGE_MARK: Final = f"{SITE}-edge"
_DROP_LINE: Final = re.compile(
    r"Client (\S+) (?:closed its connection|has exceeded timeout|disconnected|already connected)"
    r"|Socket error on client (\S+)"
)


@dataclass
class _Lines:
    """The JSON event lines of one child, by event name."""

    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    result_arrived: trio.Event = field(default_factory=trio.Event)

    def take(self, line: str) -> None:
        try:
            parsed = json.loads(line)
        except ValueError:
            return
        if isinstance(parsed, dict) and isinstance(parsed.get("event"), str):
            self.events[parsed["event"]] = parsed
            if parsed["event"] == "result":
                self.result_arrived.set()


def _rss_kb(pid: int | None) -> int | None:
    """Resident set size of a process in KiB (``/proc``, Linux), else None."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a process (``/proc``, Linux), else None."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _delta(end: float | None, start: float | None, digits: int = 3) -> float | None:
    return None if end is None or start is None else round(end - start, digits)


def _per(total: float | None, count: int) -> float | None:
    return None if total is None or count <= 0 else round(total / count, 2)


@dataclass(frozen=True)
class _Plan:
    workdir: Path
    sessions: int
    processes: int
    duration_s: float
    drain_s: float
    connect_timeout_s: float
    tls: MosquittoTls | None
    tls_dir: str
    spec: ConnSpec
    child_env: dict[str, str | None]

    def device_specs(self, port: int, *, send_updates: bool) -> list[ConnSpec]:
        base, extra = divmod(self.sessions, self.processes)
        specs, first = [], 0
        for i in range(self.processes):
            count = base + (1 if i < extra else 0)
            specs.append(
                replace(
                    self.spec,
                    role="devices",
                    port=port,
                    first_device=first,
                    devices=count,
                    send_updates=send_updates,
                    seed=self.spec.seed + i,
                )
            )
            first += count
        return specs


async def _start(
    plan: _Plan, group: ProcessGroup, name: str, spec: ConnSpec, lines: _Lines
) -> Child:
    argv = [sys.executable, "-m", "fedtier.simulations.bench._conn_worker", spec.to_json()]
    return await group.start(
        name, argv, ready_pattern=f"^{READY_LINE}$", on_stdout_line=lines.take, env=plan.child_env
    )


def _check_alive(children: Sequence[Child], what: str) -> None:
    for child in children:
        if child.exited.is_set():
            raise BenchError(f"{child.describe_exit()} during {what}")


async def _result_of(child: Child, lines: _Lines) -> dict[str, Any]:
    # The stdout pump may deliver the line just after the exit is noticed.
    with trio.move_on_after(_RESULT_WAIT_S):
        await lines.result_arrived.wait()
    if "result" not in lines.events:
        raise BenchError(f"{child.describe_exit()}; it printed no result")
    return lines.events["result"]


def _drops_logged(log_path: Path, since_offset: int) -> tuple[int, int]:
    """(device disconnect lines in the broker log after ``since_offset``, the log's size)."""
    try:
        with open(log_path, "rb") as log:
            log.seek(since_offset)
            text = log.read()
    except OSError:
        return 0, since_offset
    found = 0
    for match in _DROP_LINE.finditer(text.decode(errors="replace")):
        client = match.group(1) or match.group(2) or ""
        if client and not client.startswith(_EDGE_MARK):
            found += 1
    return found, since_offset + len(text)


async def _start_broker(plan: _Plan, name: str) -> MosquittoProcess:
    start = partial(
        MosquittoProcess.start, plan.workdir / name / "mosquitto", tls=plan.tls, ready_timeout_s=30
    )
    return await trio.to_thread.run_sync(start)


async def _connect_devices(
    plan: _Plan, group: ProcessGroup, specs: list[ConnSpec], phase: str
) -> tuple[list[Child], list[_Lines], int, int]:
    """Start the device children; return them once each reported its sessions connected."""
    children, lines = [], []
    start_ns = time.monotonic_ns()
    for i, spec in enumerate(specs):
        line = _Lines()
        children.append(await _start(plan, group, f"{phase}-devices-{i}", spec, line))
        lines.append(line)
    with trio.move_on_after(plan.connect_timeout_s) as scope:
        while not all("connected" in line.events for line in lines):
            _check_alive(children, f"the {phase} connect phase")
            await trio.sleep(_POLL_S)
    if scope.cancelled_caught:
        counts = [line.events.get("connected", {}).get("connected") for line in lines]
        raise BenchError(
            f"{phase}: the device processes did not connect all {plan.sessions} sessions within"
            f" {plan.connect_timeout_s:g} s (connected per process: {counts}); see"
            f" {plan.workdir} logs"
        )
    return children, lines, start_ns, time.monotonic_ns()


async def _baseline(plan: _Plan) -> dict[str, Any]:
    """The sessions on a fresh Mosquitto with no edge and no traffic."""
    broker = await _start_broker(plan, "baseline")
    try:
        async with open_process_group(
            plan.workdir / "baseline" / "logs", stop_grace_s=plan.drain_s + 60
        ) as group:
            rss_before = _rss_kb(broker.pid)
            specs = plan.device_specs(broker.port, send_updates=False)
            children, lines, start_ns, done_ns = await _connect_devices(
                plan, group, specs, "baseline"
            )
            connected = sum(line.events["connected"]["connected"] for line in lines)
            rss_after = _rss_kb(broker.pid)
            devices_rss = [_rss_kb(c.process.pid) for c in children]
            await group.stop(children, grace_s=plan.drain_s + 60)
            results = [await _result_of(c, line) for c, line in zip(children, lines, strict=True)]
    finally:
        await trio.to_thread.run_sync(broker.stop)
    device_kb = sum(r or 0 for r in devices_rss)
    return {
        "connected": connected,
        "connect_s": round((done_ns - start_ns) / 1e9, 2),
        "drops": sum(r["drops"] for r in results),
        "broker_rss_kib": {"before": rss_before, "connected": rss_after},
        "broker_kib_per_session": _per(_delta(rss_after, rss_before, 0), connected),
        "devices_rss_kib": device_kb,
        "devices_kib_per_session": _per(device_kb, connected),
    }


@dataclass
class _Samples:
    """RSS samples (KiB) of the processes of the edge run, taken during the hold."""

    peak: Counter[str] = field(default_factory=Counter)

    def take(self, pids: dict[str, int | None]) -> dict[str, int | None]:
        now = {name: _rss_kb(pid) for name, pid in pids.items()}
        for name, kib in now.items():
            if kib is not None and kib > self.peak[name]:
                self.peak[name] = kib
        return now


async def _edge_run(plan: _Plan) -> dict[str, Any]:
    broker = await _start_broker(plan, "edge-run")
    try:
        async with open_process_group(
            plan.workdir / "edge-run" / "logs", stop_grace_s=plan.drain_s + 60
        ) as group:
            edge_lines = _Lines()
            edge_spec = replace(
                plan.spec,
                role="edge",
                port=broker.tier_port,
                devices=plan.sessions,
                state_dir=str(plan.workdir / "edge-run" / "edge-state"),
            )
            edge = await _start(plan, group, "edge", edge_spec, edge_lines)
            await group.wait_ready([edge], timeout_s=_READY_TIMEOUT_S)
            broker_before, edge_before = _rss_kb(broker.pid), _rss_kb(edge.process.pid)
            log_offset = broker.log_path.stat().st_size
            specs = plan.device_specs(broker.port, send_updates=True)
            devices, lines, start_ns, connected_ns = await _connect_devices(
                plan, group, specs, "edge-run"
            )
            connected = sum(line.events["connected"]["connected"] for line in lines)
            gave_up = sum(line.events["connected"]["gave_up"] for line in lines)
            pids = {
                "broker": broker.pid,
                "edge": edge.process.pid,
                **{f"devices-{i}": c.process.pid for i, c in enumerate(devices)},
            }
            samples = _Samples()
            at_connected = samples.take(pids)
            cpu_start = {name: _cpu_s(pid) for name, pid in pids.items()}
            hold_start = time.monotonic()
            # The hold: the children must stay up; RSS is sampled for the peaks.
            while (left := plan.duration_s - (time.monotonic() - hold_start)) > 0:
                _check_alive([edge, *devices], "the hold")
                if not broker.running:
                    raise BenchError(f"Mosquitto exited during the hold; see {broker.log_path}")
                samples.take(pids)
                await trio.sleep(min(_SAMPLE_EVERY_S, left))
            held_s = time.monotonic() - hold_start
            at_end = samples.take(pids)
            cpu_end = {name: _cpu_s(pid) for name, pid in pids.items()}
            logged_drops, _ = _drops_logged(broker.log_path, log_offset)
            await group.stop(devices, grace_s=plan.drain_s + 60)
            results = [await _result_of(c, line) for c, line in zip(devices, lines, strict=True)]
            await group.stop([edge], grace_s=_EDGE_STOP_GRACE_S)
            edge_result = await _result_of(edge, edge_lines)
            if edge.returncode != 0:
                raise BenchError(f"the edge: {edge.describe_exit()}")
    finally:
        await trio.to_thread.run_sync(broker.stop)
    return _summarise_edge_run(
        plan,
        connected=connected,
        gave_up=gave_up,
        connect_s=(connected_ns - start_ns) / 1e9,
        held_s=held_s,
        logged_drops=logged_drops,
        results=results,
        edge_result=edge_result,
        memory={
            "broker_before": broker_before,
            "edge_before": edge_before,
            "at_connected": at_connected,
            "at_end": at_end,
            "peak": dict(samples.peak),
        },
        cpu={name: _delta(cpu_end[name], cpu_start[name]) for name in pids},
    )


def _summarise_edge_run(
    plan: _Plan,
    *,
    connected: int,
    gave_up: int,
    connect_s: float,
    held_s: float,
    logged_drops: int,
    results: list[dict[str, Any]],
    edge_result: dict[str, Any],
    memory: dict[str, Any],
    cpu: dict[str, float | None],
) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    hist: Counter[int] = Counter()
    drop_reasons: Counter[str] = Counter()
    for result in results:
        statuses.update(result["receipts"])
        hist.update({int(k): v for k, v in result["latency_hist"].items()})
        drop_reasons.update(result["drop_reasons"])
    total = {
        key: sum(r[key] for r in results)
        for key in (
            "sent",
            "resent",
            "missing",
            "drops",
            "reconnects",
            "connect_failures",
            "puback_errors",
            "suback_refused",
            "extra_receipts",
            "bad_receipts",
            "connected_at_stop",
        )
    }
    receipted = sum(statuses.values())
    accepted = statuses.get("accepted", 0)
    firsts = [r["first_publish_ns"] for r in results if r["first_publish_ns"] is not None]
    lasts = [r["last_receipt_ns"] for r in results if r["last_receipt_ns"] is not None]
    span_s = (max(lasts) - min(firsts)) / 1e9 if firsts and lasts else 0.0
    at_end, at_connected = memory["at_end"], memory["at_connected"]
    devices_end = sum(v or 0 for k, v in at_end.items() if k.startswith("devices-"))
    broker_delta = _delta(at_end["broker"], memory["broker_before"], 0)
    edge_delta = _delta(at_end["edge"], memory["edge_before"], 0)
    device_cpu = [v for k, v in cpu.items() if k.startswith("devices-")]
    return {
        "connected": connected,
        "gave_up": gave_up,
        "connected_at_stop": total["connected_at_stop"],
        "connect_s": round(connect_s, 2),
        "held_s": round(held_s, 1),
        "drops": total["drops"],
        "reconnects": total["reconnects"],
        "connect_failures": total["connect_failures"],
        "broker_logged_disconnects": logged_drops,
        "drop_reasons": dict(drop_reasons.most_common(8)),
        "updates": {
            "sent": total["sent"],
            "receipted": receipted,
            "accepted": accepted,
            "missing": total["missing"],
            "statuses": dict(statuses),
            "resent": total["resent"],
            "puback_errors": total["puback_errors"],
            "suback_refused": total["suback_refused"],
            "extra_receipts": total["extra_receipts"],
            "bad_receipts": total["bad_receipts"],
        },
        "offered_per_s": round(plan.sessions / plan.spec.interval_s, 1),
        # Everything the edge spent from ready to stop, over what it admitted.
        "edge_cpu_ms_per_update": round(
            1000 * edge_result["cpu_s"] / max(1, sum(edge_result["outcomes"].values())), 2
        ),
        "accepted_per_s": round(accepted / span_s, 1) if span_s else None,
        "receipt_latency_ms": {
            "p50": hist_percentile_ms(hist, 50),
            "p99": hist_percentile_ms(hist, 99),
            "max": hist_percentile_ms(hist, 100),
        },
        "memory_kib": {
            "broker": {
                "before_devices": memory["broker_before"],
                "connected": at_connected["broker"],
                "end": at_end["broker"],
                "peak": memory["peak"].get("broker"),
                "per_session": _per(broker_delta, connected),
            },
            "edge": {
                "before_devices": memory["edge_before"],
                "connected": at_connected["edge"],
                "end": at_end["edge"],
                "peak": memory["peak"].get("edge"),
                "per_session": _per(edge_delta, connected),
            },
            "devices": {"end": devices_end, "per_session": _per(devices_end, connected)},
        },
        "cpu_s_during_hold": {
            "broker": cpu["broker"],
            "edge": cpu["edge"],
            "devices": device_cpu,
        },
        "cpu_util_during_hold": {
            name: round(value / held_s, 3) if value is not None and held_s else None
            for name, value in (
                ("broker", cpu["broker"]),
                ("edge", cpu["edge"]),
                ("devices", sum(v or 0.0 for v in device_cpu)),
            )
        },
        "edge": {k: v for k, v in edge_result.items() if k != "event"},
    }


async def _measure(plan: _Plan, baseline: bool) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if baseline:
        result["baseline"] = await _baseline(plan)
    result["edge_run"] = await _edge_run(plan)
    return result


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def _make_pki(workdir: Path, sessions: int) -> tuple[MosquittoTls, str]:
    """The deployed layout: a device CA, a tier CA, their certificates and the ACL.

    Devices connect to the device listener (their certificate's CN is their
    client id there), the edge to the tier listener with a certificate of
    the tier CA, which it writes into the device PKI's folder as
    ``EDGE_USER.pem``/``.key`` (the worker's convention).
    """
    pki = TestPki.create(workdir / "pki")
    server = pki.issue_server("mosquitto")
    tier_pki = TestPki.create(workdir / "tier-pki")
    edge = tier_pki.issue_client(EDGE_USER)
    (pki.directory / f"{EDGE_USER}.pem").write_bytes(edge.cert_file.read_bytes())
    (pki.directory / f"{EDGE_USER}.key").write_bytes(edge.key_file.read_bytes())
    for index in range(sessions):
        pki.issue_client(device_identity(index).key_id)
    acl = workdir / "pki" / "acl"
    acl.write_text(mosquitto_acl([EDGE_USER]))
    tls = MosquittoTls(
        ca_file=pki.ca_file,
        cert_file=server.cert_file,
        key_file=server.key_file,
        acl_file=acl,
        tier_ca_file=tier_pki.ca_file,
    )
    return tls, str(pki.directory)


def _check_arguments(
    sessions: int,
    duration_s: float,
    processes: int,
    interval_s: float,
    jitter: float,
    num_params: int,
    codec: str,
) -> None:
    problems = [
        (1 <= sessions <= MAX_SESSIONS, f"sessions is {sessions}; expected 1..{MAX_SESSIONS}"),
        (
            0 < duration_s <= MAX_DURATION_S,
            f"duration_s is {duration_s}; expected 0 < d <= {MAX_DURATION_S:g}",
        ),
        (
            1 <= processes <= min(MAX_PROCESSES, sessions),
            f"processes is {processes}; expected 1..{min(MAX_PROCESSES, sessions)}",
        ),
        (interval_s >= 1, f"interval_s is {interval_s}; expected >= 1"),
        (0 <= jitter < 1, f"jitter is {jitter}; expected 0 <= j < 1"),
        (1 <= num_params <= MAX_PARAMS, f"num_params is {num_params}; expected 1..{MAX_PARAMS}"),
    ]
    for ok, problem in problems:
        if not ok:
            raise LocalProtocolError(problem)
    CodecSpec.parse(codec, num_params=num_params)


def run_connections_bench(
    sessions: int = 10_000,
    duration_s: float = 600.0,
    *,
    tls: bool = True,
    processes: int | None = None,
    interval_s: float = 45.0,
    jitter: float = 0.33,
    num_params: int = 512,
    codec: str = "i8",
    keepalive_s: int = 60,
    baseline: bool = True,
    drain_s: float = 30.0,
    connect_timeout_s: float | None = None,
    seed: int = 0,
    keep_dir: Path | None = None,
    connect_concurrency: int = 64,
) -> dict[str, Any]:
    """Hold ``sessions`` device sessions on one edge site; measure memory, drops and receipts.

    Args:
        sessions: concurrent device sessions (one device identity each).
        duration_s: how long the edge run holds once every session connected.
        tls: TLS 1.3 with a client certificate per device, and the deployed ACL.
        processes: device processes (default: one per 2,500 sessions, at least 1).
        interval_s: mean seconds between one device's updates.
        jitter: each interval is drawn from ``interval_s * [1 - jitter, 1 + jitter]``.
        num_params: model size (the delta of every update).
        codec: the updates' ``CodecSpec`` name.
        keepalive_s: the devices' MQTT keepalive.
        baseline: first measure the sessions on a Mosquitto without edge or traffic.
        drain_s: after the hold, how long devices wait for missing receipts.
        connect_timeout_s: longest the connect phase may take (default from
            ``sessions``: 60 s + 60 ms per session, TLS handshakes included).
        seed: start offsets and jitter.
        connect_concurrency: connects (TCP, TLS, CONNECT, SUBSCRIBE) in
            progress at once per device process.
        keep_dir: a new folder to run in and keep (logs, broker configs,
            certificates; for a look after a failure); default a temporary one,
            deleted at the end.

    Returns:
        A JSON-serializable dict: the arguments, ``machine`` (CPUs, load averages,
        the RLIMIT_NOFILE hard limit), ``versions``, ``baseline`` (broker and load
        generator memory per idle session) and ``edge_run``: connected sessions,
        connect time, drops (device-noticed and broker-logged), updates sent,
        receipted, accepted and missing, receipt latency p50/p99/max, accepted
        and offered rates, RSS per process (before devices, connected, end, peak)
        and per session, CPU seconds and utilisation per process during the hold,
        and the edge's own counters.

    Raises:
        LocalProtocolError: arguments out of bounds.
        ConfigError: Mosquitto is missing or does not start, or RLIMIT_NOFILE is too low.
        BenchError: a child failed, the sessions did not connect in time, or counts disagree.
    """
    procs = processes if processes is not None else max(1, math.ceil(sessions / 2_500))
    _check_arguments(sessions, duration_s, procs, interval_s, jitter, num_params, codec)
    nofile_hard = raise_nofile(sessions + _FD_MARGIN, f"Mosquitto with {sessions} sessions")
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if keep_dir is None:
            workdir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="fedtier-bench-conn-"))
            )
        else:
            keep_dir.mkdir(parents=True)  # a fresh folder: never mix two runs' logs
            workdir = keep_dir.resolve()
        pki_s = 0.0
        mosquitto_tls, tls_dir = None, ""
        if tls:
            pki_start = time.monotonic()
            mosquitto_tls, tls_dir = _make_pki(workdir, sessions)
            pki_s = time.monotonic() - pki_start
        spec = ConnSpec(
            role="devices",
            host=MosquittoProcess.host,
            port=1,
            site=SITE,
            first_device=0,
            devices=sessions,
            num_params=num_params,
            codec=codec,
            interval_s=interval_s,
            jitter=jitter,
            keepalive_s=keepalive_s,
            tls_dir=tls_dir,
            drain_s=drain_s,
            seed=seed,
            connect_concurrency=connect_concurrency,
        )
        plan = _Plan(
            workdir=workdir,
            sessions=sessions,
            processes=procs,
            duration_s=duration_s,
            drain_s=drain_s,
            connect_timeout_s=connect_timeout_s
            if connect_timeout_s is not None
            else 60.0 + 0.06 * sessions,
            tls=mosquitto_tls,
            tls_dir=tls_dir,
            spec=spec,
            child_env=dict(MALLOC_ENV),
        )
        try:
            measured = trio.run(stop_on_signals, partial(_measure, plan, baseline))
        except BaseExceptionGroup as group:
            # Nurseries wrap a failure; give the caller the one sentence it can print.
            leaves = _leaves(group)
            if len(leaves) == 1 and isinstance(leaves[0], FedtierError):
                raise leaves[0] from None
            raise
    return {
        "sessions": sessions,
        "processes": procs,
        "tls": tls,
        "duration_s": duration_s,
        "interval_s": interval_s,
        "jitter": jitter,
        "num_params": num_params,
        "codec": codec,
        "keepalive_s": keepalive_s,
        "pki_s": round(pki_s, 1),
        "wall_s": round(time.monotonic() - started, 1),
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "load_avg_at_start": load_at_start,
            "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
            "nofile_hard": nofile_hard,
            "platform": platform.platform(),
        },
        "versions": {"python": platform.python_version(), "trio": version("trio")},
        "settings": {
            "broker": "MosquittoProcess: persistence (autosave 1 s), max_inflight 64, nodelay"
            + (", TLS 1.3 + client certificates + deployed ACL" if tls else ", plain TCP"),
            "sessions": "MQTT v5, clean start off, session expiry 3600 s, QoS 1 both ways",
            "edge": "EdgeDaemon, edge bench settings, influence bounds off, in-memory NATS",
        },
        **measured,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its JSON; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="fedtier bench connections",
        description=(
            "Many concurrent MQTT v5 device sessions on one edge site (real Mosquitto, real"
            " EdgeDaemon, loopback): memory per device, drops, receipts. Prints JSON."
        ),
    )
    parser.add_argument("--sessions", type=int, default=10_000, help="sessions (default 10000)")
    parser.add_argument(
        "--duration-s", type=float, default=600.0, help="hold once connected (default 600)"
    )
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--tls", dest="tls", action="store_true", default=True, help="TLS (default)")
    tls.add_argument("--no-tls", dest="tls", action="store_false", help="plain TCP")
    parser.add_argument(
        "--processes", type=int, default=None, help="device processes (default sessions/2500)"
    )
    parser.add_argument(
        "--interval-s", type=float, default=45.0, help="mean s between a device's updates (45)"
    )
    parser.add_argument("--jitter", type=float, default=0.33, help="interval jitter (0.33)")
    parser.add_argument("--params", type=int, default=512, help="model size (default 512)")
    parser.add_argument("--codec", default="i8", help="update codec (default i8)")
    parser.add_argument("--keepalive-s", type=int, default=60, help="MQTT keepalive (60)")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the broker-only baseline phase"
    )
    parser.add_argument("--drain-s", type=float, default=30.0, help="receipt wait at the end")
    parser.add_argument("--seed", type=int, default=0, help="seed of offsets and jitter")
    parser.add_argument(
        "--connect-concurrency",
        type=int,
        default=64,
        help="connects in progress at once per device process (default 64)",
    )
    parser.add_argument(
        "--keep-dir", type=Path, default=None, help="run in this new folder and keep it (logs)"
    )
    args = parser.parse_args(argv)
    with sigterm_as_interrupt():
        result = run_connections_bench(
            sessions=args.sessions,
            duration_s=args.duration_s,
            tls=args.tls,
            processes=args.processes,
            interval_s=args.interval_s,
            jitter=args.jitter,
            num_params=args.params,
            codec=args.codec,
            keepalive_s=args.keepalive_s,
            baseline=not args.no_baseline,
            drain_s=args.drain_s,
            seed=args.seed,
            keep_dir=args.keep_dir,
            connect_concurrency=args.connect_concurrency,
        )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
