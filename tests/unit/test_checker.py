from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fedtier.simulations.checker import DeviceHistory, check, load_device_logs, main


def write_log(path: Path, events: list[tuple[str, str]]) -> None:
    path.write_text(
        "".join(
            json.dumps({"update_id": u, "seq": i, "event": e, "reason": "", "time_s": 0.0}) + "\n"
            for i, (u, e) in enumerate(events)
        )
    )


def test_every_class_is_recognised(tmp_path: Path) -> None:
    write_log(
        tmp_path / "dev-a.jsonl",
        [
            ("aa", "sent"),
            ("aa", "receipt_accepted"),  # ok
            ("bb", "sent"),
            ("bb", "receipt_accepted"),  # lost
            ("cc", "sent"),
            ("cc", "resent"),
            ("cc", "receipt_duplicate"),  # duplicated
            ("dd", "sent"),  # unknown
            ("ee", "sent"),  # recovered
            ("ff", "sent"),
            ("ff", "receipt_rejected"),  # rejected
            ("gg", "sent"),
            ("gg", "receipt_rejected"),  # rejected but counted
        ],
    )
    (tmp_path / "dev-b.jsonl").write_text('{"update_id": "hh", "event": "sent"}\n{"torn')
    histories = load_device_logs(sorted(tmp_path.glob("*.jsonl")))
    counted = Counter({"aa": 1, "cc": 2, "ee": 1, "gg": 1, "zz": 1, "hh": 1})
    report = check(histories, counted, versions=3)
    assert dict(report.counts) == {
        "ok": 1,  # aa
        "lost": 1,  # bb
        "duplicated": 1,  # cc
        "unknown": 1,  # dd
        "recovered": 2,  # ee, and hh from the log whose last line is torn
        "rejected": 1,  # ff
        "rejected_but_counted": 1,  # gg
        "unexpected": 1,  # zz
    }
    assert report.failed
    assert report.examples["lost"] == ["bb"]
    assert report.examples["unexpected"] == ["zz"]
    assert report.examples["duplicated"] == ["cc"]


def test_clean_history_passes() -> None:
    histories = {"aa": DeviceHistory(sent=True, accepted=True)}
    report = check(histories, Counter({"aa": 1}), versions=1)
    assert not report.failed
    assert report.counts["ok"] == 1


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--device-logs", str(tmp_path / "nope"), "--central-store", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
