"""`fedtier bench connections` with a small fleet: every update receipted, no drop, memory reported.

No timing assertions (speed is measured by the bench, never by tests); the
bench starts its own Mosquitto (TLS, a certificate per device, the deployed
ACL), the real edge daemon and the device processes, so this needs the real
broker.
"""

from __future__ import annotations

import json
import resource
import tempfile
from pathlib import Path
from typing import Any

import pytest

from fedtier.cli import main
from fedtier.simulations.bench._conn_worker import hist_percentile_ms

pytestmark = pytest.mark.brokers

SESSIONS, PROCESSES = 300, 2


@pytest.fixture
def private_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The bench's temporary folder goes here, so the test can see it is removed."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def run_bench(capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    assert main(["bench", "connections", *extra]) == 0
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    return result


def test_a_tls_fleet_holds_with_every_update_receipted_and_memory_reported(
    capsys: pytest.CaptureFixture[str], private_tempdir: Path
) -> None:
    # The command of docs/performance.md ("Connections") with a small fleet.
    result = run_bench(
        capsys,
        *("--sessions", str(SESSIONS), "--processes", str(PROCESSES), "--duration-s", "6"),
        *("--interval-s", "3", "--drain-s", "120", "--tls"),
    )
    assert (result["sessions"], result["processes"], result["tls"]) == (SESSIONS, PROCESSES, True)
    assert result["machine"]["nofile_hard"] != 0
    assert len(result["machine"]["load_avg_at_start"]) == 3

    baseline = result["baseline"]
    assert baseline["connected"] == SESSIONS
    assert baseline["drops"] == 0
    assert baseline["broker_kib_per_session"] > 0

    run = result["edge_run"]
    assert run["connected"] == run["connected_at_stop"] == SESSIONS
    assert run["gave_up"] == run["connect_failures"] == 0
    assert run["drops"] == run["reconnects"] == run["broker_logged_disconnects"] == 0
    assert run["drop_reasons"] == {}
    updates = run["updates"]
    # Every device sent at least once (its first update falls in its first interval).
    assert updates["sent"] >= SESSIONS
    assert updates["receipted"] == updates["accepted"] == updates["sent"]
    assert updates["missing"] == updates["resent"] == updates["puback_errors"] == 0
    assert updates["suback_refused"] == updates["bad_receipts"] == 0
    assert updates["statuses"] == {"accepted": updates["sent"]}
    # The edge saw exactly what the devices sent, and answered each once.
    edge = run["edge"]
    assert edge["outcomes"] == {"accepted": updates["sent"]}
    assert edge["receipts_sent"] == updates["sent"]
    latency = run["receipt_latency_ms"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]
    assert run["accepted_per_s"] > 0

    memory = run["memory_kib"]
    for process in ("broker", "edge"):
        figures = memory[process]
        assert figures["per_session"] > 0, process
        assert figures["before_devices"] > 0, process
        assert figures["peak"] >= figures["end"] > 0, process
    assert memory["devices"]["per_session"] > 0
    cpu = run["cpu_s_during_hold"]
    assert cpu["broker"] >= 0
    assert cpu["edge"] > 0
    assert len(cpu["devices"]) == PROCESSES

    assert list(private_tempdir.iterdir()) == []  # certificates, logs, state: all gone


def test_a_hard_file_limit_too_low_is_one_sentence_naming_it(
    capsys: pytest.CaptureFixture[str],
    private_tempdir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (256, 1024))
    assert main(["bench", "connections", "--sessions", "5000", "--no-tls"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("fedtier: ")
    assert "hard RLIMIT_NOFILE is 1024" in captured.err
    assert "Traceback" not in captured.err
    assert list(private_tempdir.iterdir()) == []  # nothing started


@pytest.mark.parametrize(
    "args",
    [["--sessions", "0"], ["--sessions", "20001"], ["--interval-s", "0"], ["--codec", "nope"]],
)
def test_bad_arguments_are_one_sentence(
    capsys: pytest.CaptureFixture[str], private_tempdir: Path, args: list[str]
) -> None:
    assert main(["bench", "connections", *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("fedtier: ")
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert list(private_tempdir.iterdir()) == []


def test_latency_percentiles_come_from_the_merged_histogram() -> None:
    assert hist_percentile_ms({}, 50) is None
    # Bucket i holds (1.02^(i-1), 1.02^i] microseconds.
    hist = {100: 98, 400: 2}
    assert hist_percentile_ms(hist, 50) == round(1.02**100 / 1000, 3)
    assert hist_percentile_ms(hist, 98) == round(1.02**100 / 1000, 3)
    assert hist_percentile_ms(hist, 99) == round(1.02**400 / 1000, 3)
