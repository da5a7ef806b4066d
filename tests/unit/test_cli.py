from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from fedtier.simulations.cli import main


def test_keys_new_then_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "new", "--name", "edge-1", "--out", str(tmp_path), "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    key_file = tmp_path / "edge-1.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    for path in (key_file, tmp_path / "edge-1.pub"):
        assert main(["keys", "show", str(path), "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["key_id"] == created["key_id"]
        assert shown["public_key"] == created["public_key"]


def test_errors_are_one_sentence_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "new", "--name", "k", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["keys", "new", "--name", "k", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedtier: key file")
    assert "refusing to overwrite" in err
    assert "Traceback" not in err
    assert main(["keys", "show", str(tmp_path / "missing.pub")]) == 2


def test_bench_codec_json_reports_every_codec(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "codec", "--json", "--params", "20000", "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_params"] == 20000
    assert result["baseline"]["fold_ms"] > 0
    codecs = result["codecs"]
    assert codecs["f32"]["payload_bytes"] == 80_000
    assert codecs["f32"]["rel_l2_error"] == 0.0
    assert codecs["i8"]["rel_l2_error"] < 0.01
    for row in codecs.values():
        assert row["wire_bytes"] > row["payload_bytes"]  # the signed envelope around it
        assert row["encode_ms"] >= 0
        assert row["decode_fold_ms"] >= 0
    assert codecs["top1%+i8"]["payload_bytes"] < codecs["i8"]["payload_bytes"] / 15
