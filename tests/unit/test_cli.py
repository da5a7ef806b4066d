from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import fedtier.cli
import fedtier.tiers.cli
from fedtier.cli import COMMAND_GROUP, main

ROOT = Path(__file__).resolve().parents[2]


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


def test_keys_new_writes_what_a_registry_folder_and_the_examples_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedtier.tiers.registry import KeyRegistry

    assert main(["keys", "new", "--name", "veh-0042", "--out", str(tmp_path), "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["veh-0042.key", "veh-0042.pub"]
    registry = KeyRegistry([tmp_path], role="device")  # a sender folder reads *.pub
    assert registry.name_of(created["key_id"]) == "veh-0042"
    # One naming: every key file the examples name is NAME.key or NAME.pub (or
    # a registry: a folder, or a TOML file of name = hex; or what `fedtier keys`
    # writes beside them: a certificate NAME.cert, the list revocations.bin).
    for example in sorted((ROOT / "deploy").glob("**/*.toml")):
        for name in re.findall(r'"(keys/[^"]+)"', example.read_text()):
            suffix = Path(name).suffix
            assert suffix in ("", ".key", ".pub", ".toml", ".cert", ".bin"), (example, name)
            assert suffix != ".bin" or Path(name).name == "revocations.bin", (example, name)


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


def test_bench_reject_refuses_every_hostile_shape_and_accepts_the_valid_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The command docs/protocol.md gives for its decoding-cost figures; no
    # timing is asserted (speed is a benchmark's figure, not a test's).
    assert main(["bench", "reject", "--repeats", "1", "--no-unguarded"]) == 0
    cases = json.loads(capsys.readouterr().out)["cases"]
    assert cases["nested_empty_arrays"]["outcome"].startswith("rejected: too_large")
    assert cases["outer_tree"]["outcome"].startswith("rejected")
    assert cases["largest_partial"]["outcome"].startswith("accepted")
    assert cases["largest_model_blob"]["outcome"].startswith("accepted")
    assert cases["nested_empty_arrays"]["peak_mib"] < 16


def test_every_command_is_listed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for command in ("keys", "edge", "regional", "central", "device", "trace"):
        assert f"\n    {command} " in out, command  # production, built in
    for command in ("bench", "demo", "sim"):
        assert f"\n    {command} " in out, command  # the lab, by entry point


def test_forwarded_commands_get_their_options_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Options first: argparse.REMAINDER alone would drop them.
    with pytest.raises(SystemExit) as exited:
        main(["sim", "check", "--device-logs", str(tmp_path), "--central-store", "x", "--bogus"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["sim", "check", "--help"])
    assert exited.value.code == 0
    assert "--central-store" in capsys.readouterr().out


def test_production_commands_do_not_load_plugins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_plugins(**_: object) -> list[EntryPoint]:
        raise AssertionError("a production command looked up the lab's commands")

    monkeypatch.setattr(fedtier.cli, "entry_points", no_plugins)
    assert main(["keys", "new", "--name", "k", "--out", str(tmp_path), "--json"]) == 0
    capsys.readouterr()


def test_a_daemon_run_never_imports_the_lab() -> None:
    code = (
        "import sys\n"
        "from fedtier.cli import _parser\n"
        "_parser('edge').parse_args(['edge', '--config', 'x.toml'])\n"
        "lab = sorted(m for m in sys.modules if m.startswith('fedtier.simulations'))\n"
        "sys.exit(f'imported {lab}' if lab else 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_a_key_command_imports_no_daemon_module() -> None:
    # Every CLI process (each daemon, device, key and status command the
    # tests and the chaos harness start) builds the whole parser first, so
    # the parser must not import what only a command's run needs.
    code = (
        "import sys\n"
        "from fedtier.cli import _parser\n"
        "_parser('keys').parse_args(['keys', 'new', '--name', 'k'])\n"
        "heavy = ('numpy', 'trio', 'sqlite3', 'cryptography', 'msgpack', 'importlib.metadata',\n"
        "         'fedtier.tiers.config', 'fedtier.tiers.store', 'fedtier.tiers.core',\n"
        "         'fedtier.tiers._status', 'fedtier.protocol.files')\n"
        "found = sorted(m for m in heavy if m in sys.modules)\n"
        "sys.exit(f'imported {found}' if found else 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_a_plugin_that_cannot_load_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = EntryPoint(name="demo", value="fedtier_absent_lab.cli:add_demo", group=COMMAND_GROUP)
    monkeypatch.setattr(fedtier.cli, "entry_points", lambda **_: [broken])
    assert main(["demo", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "'fedtier demo' needs the 'fedtier_absent_lab' module" in err
    assert "pip install 'fedtier[lab]'" in err


@pytest.mark.parametrize("argv", [["demo", "--quiet"], ["sim", "chaos", "--devices", "3"]])
def test_a_lab_command_checks_its_modules_before_it_starts(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fedtier.simulations.cli

    monkeypatch.setattr(fedtier.simulations.cli, "LAB_MODULES", ("rich", "fedtier_absent.sub"))
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"fedtier: 'fedtier {argv[0]}' needs the 'fedtier_absent.sub' module, which this "
        "install lacks; install it with: pip install 'fedtier[lab]'\n"
    )


def test_a_missing_dependency_is_one_sentence_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def run_daemon(_: object) -> int:
        # As trio.run reports it: the import fails inside the daemon's nursery.
        raise ExceptionGroup("daemon", [ModuleNotFoundError("No module named 'nats'", name="nats")])

    monkeypatch.setattr(fedtier.tiers.cli, "_daemon", run_daemon)
    assert main(["edge", "--config", "edge.toml"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "fedtier: 'fedtier edge' needs the 'nats' module, which this install lacks; "
        "install it with: pip install 'fedtier[daemon]'\n"
    )


def test_torch_is_its_own_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def run_daemon(_: object) -> int:
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(fedtier.tiers.cli, "_daemon", run_daemon)
    assert main(["central", "--config", "central.toml"]) == 2
    assert capsys.readouterr().err.endswith("pip install 'fedtier[torch]'\n")


def test_a_broken_fedtier_module_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def run_daemon(_: object) -> int:
        raise ModuleNotFoundError("No module named 'fedtier.gone'", name="fedtier.gone")

    monkeypatch.setattr(fedtier.tiers.cli, "_daemon", run_daemon)
    with pytest.raises(ModuleNotFoundError):
        main(["edge", "--config", "edge.toml"])


def test_python_dash_m_fedtier_is_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fedtier", "keys", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: fedtier keys")
