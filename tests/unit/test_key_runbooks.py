"""The key lifecycle runbooks of docs/operations.md, run command by command as an operator would.

Every ``fedtier`` line of the "Key lifecycle" section's code blocks runs here,
in order, in one folder; the test then checks what the commands left behind
with the code that reads it at run time (registries, certificates, revocation
lists, the CRL). What the runbook assumes already exists (the edges' registry,
a device's TLS certificate) is made just before the command that needs it.
The central's rotation is checked on a central "running" from before the
rotation's command: its SIGHUP reload takes the installed key.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import shlex
import time
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtier.cli import main
from fedtier.protocol.certificates import KeyRole, open_certificate, open_revocations
from fedtier.protocol.files import load_public_key
from fedtier.simulations.testing import TestPki
from fedtier.tiers._identity import IdentityReload
from fedtier.tiers._telemetry import quiet_metrics
from fedtier.tiers.config import RetrySettings
from fedtier.tiers.model_registry import MemoryModelRegistry
from fedtier.tiers.registry import KeyRegistry, TierKeys

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def runbook_commands() -> list[str]:
    text = DOC.read_text()
    section = text[text.index("## Key lifecycle\n") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def running_central() -> IdentityReload:
    """The central as configured by the runbook's set-up, and its SIGHUP reload."""
    root = "keys/root.pub"
    keys = TierKeys.load(Path("keys/central.key"), [], role="regional", root=root,
                         certificates=[Path("keys")])  # fmt: skip
    keys.check_central_identity()
    return IdentityReload(
        keys,
        identity_key=Path("keys/central.key"),
        certificates=[Path("keys")],
        registry=MemoryModelRegistry(),
        clock_ms=lambda: time.time_ns() // 1_000_000,
        retry=RetrySettings(),
        metrics=quiet_metrics("central", keys.identity.key_id),
        log=logging.getLogger("test"),
    )


async def test_every_runbook_command_runs_and_does_what_the_runbook_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    commands = runbook_commands()
    assert len(commands) == 8, commands
    central: IdentityReload | None = None
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "fedtier", command
        if "--install" in argv:
            central = running_central()
        if "--registry" in argv:
            # The regional's registry, as it was before the rotation.
            today = load_public_key(Path("keys/edge-north.pub")).raw.hex()
            Path("keys/edges.toml").write_text(f'[keys]\nedge-north = "{today}"\n')
        if "--tls-cert" in argv:
            ca = x509.load_pem_x509_certificate(Path("keys/ca.pem").read_bytes())
            key = serialization.load_pem_private_key(Path("keys/ca.key").read_bytes(), None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            Path("tls").mkdir()
            issued = TestPki(Path("tls"), key, ca, dt.timedelta(days=1)).issue_client("veh-0042")
            issued.cert_file.rename("tls/veh-0042.crt")
        assert main(argv[1:]) == 0, command
    capsys.readouterr()

    root = load_public_key(Path("keys/root.pub"))
    # Central rotation: both certificates verify, the running central's SIGHUP takes the
    # installed key once its certificate is published, and a restart starts with it.
    for name in ("central", "central-1"):
        cert = open_certificate(Path(f"keys/{name}.cert").read_bytes(), root, role=KeyRole.CENTRAL)
        assert cert.key_id == load_public_key(Path(f"keys/{name}.pub")).key_id
        assert cert.name == "central"
    old, new = (load_public_key(Path(f"keys/{n}.pub")) for n in ("central", "central-1"))
    assert central is not None, "the central's rotation uses --install (docs/operations.md)"
    assert central.keys.identity.key_id == old.key_id
    assert central.request() is None
    async with trio.open_nursery() as nursery:
        await nursery.start(central.serve)
        with trio.fail_after(10):
            while not central.rotations:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert central.keys.identity.key_id == new.key_id
    assert (
        await central.registry.certificate(new.key_id) == Path("keys/central-1.cert").read_bytes()
    )
    restarted = running_central()
    assert restarted.keys.identity.key_id == new.key_id
    assert restarted.keys.models.knows(old.key_id)
    # Edge rotation: two keys for one sender, the old one ending after the overlap.
    registry = KeyRegistry([Path("keys/edges.toml")], role="edge")
    old, new = (load_public_key(Path(f"keys/{n}.pub")) for n in ("edge-north", "edge-north-1"))
    assert {registry.name_of(old.key_id), registry.name_of(new.key_id)} == {"edge-north"}
    old_window, new_window = registry.window(old.key_id), registry.window(new.key_id)
    assert old_window is not None
    assert new_window is not None
    assert old_window[1] - new_window[0] == 2 * 86_400_000
    assert registry.get(old.key_id) == old
    assert registry.get(new.key_id) == new
    # Revocation: the list names the device, and the CRL its TLS certificate.
    revocations = open_revocations(
        Path("keys/revocations.bin").read_bytes(), {root.key_id: root}, "acme"
    )
    assert revocations.revokes(load_public_key(Path("keys/veh-0042.pub")).key_id)
    assert revocations.serial == 1
    crl = x509.load_pem_x509_crl(Path("keys/crl.pem").read_bytes())
    device_cert = x509.load_pem_x509_certificate(Path("tls/veh-0042.crt").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(device_cert.serial_number) is not None


def test_revoke_again_keeps_what_it_revoked_and_raises_the_serial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "ca", "--out", str(tmp_path)]) == 0
    out = tmp_path / "revocations.bin"
    base = ["keys", "revoke", "--signer", str(tmp_path / "root.key"), "--fleet", "acme"]
    assert main([*base, "--out", str(out), "--name", "veh-1"]) == 0
    assert main([*base, "--out", str(out), "--name", "veh-2"]) == 0
    capsys.readouterr()
    root = load_public_key(tmp_path / "root.pub")
    revocations = open_revocations(out.read_bytes(), {root.key_id: root}, "acme")
    assert revocations.serial == 2
    assert revocations.names == {"veh-1", "veh-2"}
    # Another fleet's name on the same file is refused, and the file is kept.
    assert main([*base[:-1], "other", "--out", str(out), "--name", "veh-3"]) == 2
    assert open_revocations(out.read_bytes(), {root.key_id: root}, "acme").serial == 2


def test_rotate_central_needs_the_root(tmp_path: Path) -> None:
    argv = ["keys", "rotate", "--role", "central", "--name", "central", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert not list(tmp_path.glob("*.key"))


def test_show_prints_a_certificate_and_a_revocation_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "ca", "--out", str(tmp_path)]) == 0
    assert main(["keys", "new", "--name", "central", "--out", str(tmp_path)]) == 0
    root = str(tmp_path / "root.key")
    key = str(tmp_path / "central.pub")
    assert main(["keys", "issue", "--root", root, "--key", key, "--role", "central",
                 "--name", "central", "--serial", "7"]) == 0  # fmt: skip
    out = str(tmp_path / "revocations.bin")
    assert main(["keys", "revoke", "--signer", root, "--fleet", "acme", "--out", out,
                 "--key", key]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["keys", "show", str(tmp_path / "central.cert"), "--json"]) == 0
    cert = json.loads(capsys.readouterr().out)
    assert (cert["role"], cert["name"], cert["serial"]) == ("central", "central", 7)
    assert main(["keys", "show", out, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["key_ids"] == [cert["key_id"]]
    assert main(["keys", "show", key, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["key_id"] == cert["key_id"]


def test_rotate_install_replaces_the_identity_key_and_keeps_the_numbered_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedtier.protocol.files import load_signing_identity

    assert main(["keys", "ca", "--out", str(tmp_path)]) == 0
    assert main(["keys", "new", "--name", "central", "--out", str(tmp_path)]) == 0
    before = load_signing_identity(tmp_path / "central.key").key_id
    argv = ["keys", "rotate", "--role", "central", "--name", "central", "--out", str(tmp_path),
            "--root", str(tmp_path / "root.key"),
            "--install", str(tmp_path / "central.key")]  # fmt: skip
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    installed = load_signing_identity(tmp_path / "central.key")  # mode 0600, or it would refuse
    assert installed.key_id == info["key_id"] != before
    assert load_signing_identity(tmp_path / "central-1.key").key_id == installed.key_id
    root = load_public_key(tmp_path / "root.pub")
    cert = open_certificate((tmp_path / "central-1.cert").read_bytes(), root, role=KeyRole.CENTRAL)
    assert cert.key_id == installed.key_id
    assert info["installed_key_file"] == str(tmp_path / "central.key")
