"""`fedtier bench large-model` on a small model whose every leg goes through parts.

1.2 M parameters with nats-server's ``max_payload`` at 1 MiB (the edge's and
the regional's float32 partials, 4.8 MB, go as numbered parts) and Mosquitto's
``max_packet_size`` at 1.5 MiB (an i8 update of 1.2 MB fits, the 4.8 MB model
blob goes to the device as retained parts), run for 1 and for 3 updates in the
buffer (``--compare-updates``, as docs/performance.md runs it at 100 M). The
real daemons run as separate processes; the device's load of version 1 is the
end-to-end proof. No timed assertions: the legs' seconds are figures, not checks.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest

from fedtier.cli import main

pytestmark = pytest.mark.brokers

PARAMS = 1_200_000
COUNTS = (1, 3)
MIB = 1024 * 1024
DAEMONS = ("central", "regional", "edge", "mosquitto", "nats_server", "devices")


@pytest.fixture
def private_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The bench's temporary folder goes here, so the test can see it is removed."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_every_leg_parted_reaches_the_device(
    capsys: pytest.CaptureFixture[str], private_tempdir: Path
) -> None:
    out = private_tempdir / "result.json"
    argv = [
        "bench",
        "large-model",
        "--params",
        str(PARAMS),
        "--compare-updates",
        ",".join(str(n) for n in COUNTS),
        "--mqtt-max-packet",
        str(3 * MIB // 2),
        "--nats-max-payload",
        str(MIB),
        "--deadline",
        "240",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == result

    # The model is the MLP nearest the asked size, and too large for one message anywhere.
    params = result["parameters"]
    assert abs(params - PARAMS) < 100
    assert result["model_bytes"] == 4 * params
    assert [run["updates"] for run in result["runs"]] == list(COUNTS)
    for run in result["runs"]:
        check_run(run, result["model_bytes"], params)

    # Nothing is left behind.
    assert list(private_tempdir.iterdir()) == [out]


def check_run(run: dict[str, Any], model_bytes: int, params: int) -> None:
    assert model_bytes > run["nats_max_payload_bytes"] == MIB
    assert model_bytes > run["mqtt_max_packet_bytes"] == 3 * MIB // 2

    # A device verified and loaded the version the updates made.
    assert run["model_version_before"] == 0
    assert run["model_version_after"] == 1
    assert run["updates"] == run["updates_delivered"]

    # Counts agree: an i8 update is a byte per parameter plus scales and header;
    # the headers differ by a few bytes (the real client adds its metrics).
    each = run["update_envelope_bytes"]
    assert params < each < params * 1.05
    assert run["updates"] * (each - 1024) < run["update_bytes_on_wire"] <= run["updates"] * each
    assert each < run["mqtt_max_packet_bytes"]

    # Every daemon's and broker's peak RSS is reported, finite and positive,
    # and so is its ratio to the model's float32 bytes.
    for name in DAEMONS:
        rss = run["peak_rss_bytes"][name]
        assert isinstance(rss, int), name
        assert rss > 0, name
        ratio = run["peak_rss_per_model_bytes"][name]
        assert math.isfinite(ratio), name
        assert ratio == pytest.approx(rss / model_bytes, 1e-2)
    # Every leg was seen (the daemons' span files and the device's clock).
    for leg, seconds in run["legs_s"].items():
        assert seconds is not None, leg
        assert seconds >= 0, leg
