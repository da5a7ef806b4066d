"""The dependency rules of docs/architecture.md (layering), checked on every import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IO_LIBRARIES = {"trio", "trio_asyncio", "paho", "nats", "asyncio", "socket", "opentelemetry"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def top(name: str) -> str:
    return name.split(".")[0]


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", files("protocol"), ids=lambda p: str(p.relative_to(ROOT)))
def test_protocol_is_sans_io_outside_bus_and_telemetry(path: Path) -> None:
    names = imports_of(path)
    assert not {top(n) for n in names} & {"tiers", "client", "simulations"}, names
    sub = path.relative_to(ROOT / "protocol").parts
    if sub[0] in ("bus", "telemetry"):
        return
    assert not {top(n) for n in names} & (IO_LIBRARIES | {"time"}), (
        f"{path.name} imports an I/O library or a clock: {sorted(names)}"
    )


@pytest.mark.parametrize("path", files("tiers"), ids=lambda p: str(p.relative_to(ROOT)))
def test_tiers_never_import_client_or_simulations(path: Path) -> None:
    assert not {top(n) for n in imports_of(path)} & {"client", "simulations"}


@pytest.mark.parametrize("path", files("client"), ids=lambda p: str(p.relative_to(ROOT)))
def test_client_never_imports_tiers_or_simulations(path: Path) -> None:
    assert not {top(n) for n in imports_of(path)} & {"tiers", "simulations"}


@pytest.mark.parametrize(
    "path",
    [p for pkg in ("protocol", "tiers", "client", "simulations") for p in files(pkg)],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_no_pickle_anywhere_in_library_code(path: Path) -> None:
    source = path.read_text()
    assert "pickle" not in {top(n) for n in imports_of(path)}
    assert "torch.load(" not in source
    assert "yaml.load(" not in source
    assert "allow_pickle=True" not in source


def test_only_the_nats_module_touches_asyncio_nats_or_trio_asyncio() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for pkg in ("protocol", "tiers", "client", "simulations")
        for p in files(pkg)
        if {top(n) for n in imports_of(p)} & {"asyncio", "nats", "trio_asyncio"}
        and p != ROOT / "protocol" / "bus" / "_nats.py"
    ]
    assert offenders == []


def test_every_public_bus_name_imports() -> None:
    import fedtier.protocol.bus

    for name in fedtier.protocol.bus.__all__:
        assert getattr(fedtier.protocol.bus, name) is not None, name
