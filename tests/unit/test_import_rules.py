"""The import contracts of docs/architecture.md (layering), checked on the source's syntax trees.

Every import counts, at any depth (inside functions, ``TYPE_CHECKING`` blocks,
``importlib.import_module("...")`` with a literal name): a contract is about
what a module may ever load, not about what it loads first. Each contract is
one test that lists every offending file and import, so one run shows all of
them. ``test_the_checker_catches_*`` show on synthetic sources that a check
reports what it should.

The last tests check the device install: nothing reachable at import time
from the client (and the ``fedtier`` command a device runs) needs a package
that only the daemon or lab extras install.
"""

from __future__ import annotations

import ast
import functools
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("protocol", "tiers", "client", "simulations")

# --- reading imports -------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One name an import statement may load, with where it is."""

    module: str
    """Absolute dotted name; ``from a import b`` yields both ``a`` and ``a.b``."""
    line: int


def module_name(rel: str) -> str:
    """The ``fedtier.*`` module a repository-relative file path stands for."""
    parts = list(Path(rel).with_suffix("").parts)
    if parts[0] != "fedtier":
        parts.insert(0, "fedtier")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _absolute(rel: str, module: str | None, level: int) -> str:
    if level == 0:
        return module or ""
    package = module_name(rel).split(".")
    if not rel.endswith("__init__.py"):
        package.pop()
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _literal_import(node: ast.Call) -> str | None:
    """The module of ``importlib.import_module("x")`` or ``__import__("x")``, if literal."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def imports_in(tree: ast.AST, rel: str) -> Iterator[Import]:
    """Every import anywhere in ``tree`` (the file ``rel``), relative ones made absolute."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(rel, node.module, node.level)
            yield Import(base, node.lineno)
            for alias in node.names:
                if alias.name != "*":
                    yield Import(f"{base}.{alias.name}", node.lineno)
        elif isinstance(node, ast.Call) and (literal := _literal_import(node)):
            yield Import(literal, node.lineno)


def within(module: str, *roots: str) -> bool:
    """Whether ``module`` is one of ``roots`` or inside one of them."""
    return any(module == root or module.startswith(root + ".") for root in roots)


# --- the files -------------------------------------------------------------------------


def _py_files(folder: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*.py"))


def _top_package_files() -> list[str]:
    """Real files of ``fedtier/`` (the parts there are symbolic links to the folders)."""
    return sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "fedtier").glob("*.py") if not p.is_symlink()
    )


PRODUCTION = [
    *_py_files("protocol"),
    *_py_files("tiers"),
    *_py_files("client"),
    *_top_package_files(),
]
LIBRARY = [*PRODUCTION, *_py_files("simulations")]
EVERYTHING = [*LIBRARY, *_py_files("tests")]

_TIER_CORE_MODULES = ("aggregate", "staleness", "flush", "optimizers", "validation", "folding")


def is_sans_io(rel: str) -> bool:
    """The wire modules of protocol and the tier core: they compute, never do I/O."""
    parts = Path(rel).parts
    if parts[0] == "protocol":
        return parts[1] not in ("bus", "telemetry", "files.py")
    if parts[0] == "tiers":
        return parts[1] == "core" or parts[1] in {f"{m}.py" for m in _TIER_CORE_MODULES}
    return False


SANS_IO = [rel for rel in PRODUCTION if is_sans_io(rel)]


def is_production(rel: str) -> bool:
    """protocol, tiers, client and the real files of ``fedtier/``: what a deployment runs."""
    parts = Path(rel).parts
    return parts[0] in ("protocol", "tiers", "client") or (
        parts[0] == "fedtier" and len(parts) == 2
    )


def is_library(rel: str) -> bool:
    """Production code and the lab: everything but the tests."""
    return is_production(rel) or Path(rel).parts[0] == "simulations"


# --- the contracts ---------------------------------------------------------------------

IO_AND_CLOCKS = (
    "trio",
    "trio_asyncio",
    "asyncio",
    "paho",
    "nats",
    "sqlite3",
    "opentelemetry",
    "os",
    "socket",
    "threading",
    "http",
    "urllib",
    "subprocess",
    "shutil",
    "tempfile",
    "time",
    "signal",
    "selectors",
    "logging",  # the tier math does no logging: its callers log its decisions
)
PICKLE_MODULES = ("pickle", "_pickle", "cPickle", "cloudpickle", "dill", "shelve")
_PRIVATE_BUS_RE = re.compile(r"fedtier\.protocol\.bus(\.mqtt|\.nats)?\._")
_SOURCE_BANS = ("torch.load(", "yaml.load(", "allow_pickle=True")


@dataclass(frozen=True)
class Contract:
    """Files matching ``applies`` must not import a module for which ``forbidden`` says why."""

    name: str
    applies: Callable[[str], bool]
    forbidden: Callable[[str, str], str | None]
    """``(file, module) -> reason`` when the import breaks the contract, else ``None``."""


def _sans_io(rel: str, module: str) -> str | None:
    if within(module, *IO_AND_CLOCKS):
        return "I/O, a clock or logging in a sans-IO module"
    if within(module, "fedtier") and not within(module, "fedtier.protocol.errors"):
        # A sans-IO module that imports an I/O module is no longer sans-IO.
        path = _file_of(module)
        if path is not None and not is_sans_io(path):
            return "a fedtier module that does I/O, from a sans-IO module"
    return None


def _private_bus(rel: str, module: str) -> str | None:
    if _PRIVATE_BUS_RE.match(module) and not rel.startswith("protocol/bus/"):
        return "a private module of protocol.bus; import the public names of protocol.bus"
    return None


def _nats_confined(rel: str, module: str) -> str | None:
    if within(module, "asyncio", "nats", "trio_asyncio") and not rel.startswith(
        "protocol/bus/nats/"
    ):
        return "asyncio, nats-py and trio-asyncio belong to protocol/bus/nats/ only"
    return None


_LAYERS = {
    "client": ("fedtier.tiers", "fedtier.simulations"),
    "tiers": ("fedtier.client", "fedtier.simulations"),
    "protocol": ("fedtier.tiers", "fedtier.client", "fedtier.simulations"),
    "fedtier": ("fedtier.simulations",),
}


def _layering(rel: str, module: str) -> str | None:
    banned = _LAYERS.get(Path(rel).parts[0], ())
    if within(module, *banned):
        return f"{Path(rel).parts[0]} must not import {module.split('.')[1]}"
    return None


def _generic_top_level(rel: str, module: str) -> str | None:
    if within(module, *PARTS):
        return f"a bare top-level import; write fedtier.{module}"
    return None


def _pickle(rel: str, module: str) -> str | None:
    if within(module, *PICKLE_MODULES):
        return "pickle runs code on load; data crosses trust boundaries as msgpack"
    return None


CONTRACTS = {
    "sans_io": Contract("sans-IO", is_sans_io, _sans_io),
    "private_bus": Contract("bus privacy", lambda rel: True, _private_bus),
    "nats_confined": Contract("nats confinement", lambda rel: True, _nats_confined),
    "layering": Contract("layering", is_production, _layering),
    "generic_top_level": Contract("one namespace", lambda rel: True, _generic_top_level),
    "no_pickle": Contract("no pickle", is_library, _pickle),
}


def violations(source: str, rel: str, contract: Contract) -> list[str]:
    """Each import in ``source`` (standing for file ``rel``) that breaks ``contract``."""
    if not contract.applies(rel):
        return []
    return _breaking(imports_in(ast.parse(source, filename=rel), rel), rel, contract)


def _breaking(imports: Iterable[Import], rel: str, contract: Contract) -> list[str]:
    found: list[str] = []
    seen: set[tuple[str, int]] = set()
    for imp in imports:
        reason = contract.forbidden(rel, imp.module)
        if reason is not None and (imp.module, imp.line) not in seen:
            seen.add((imp.module, imp.line))
            found.append(f"{rel}:{imp.line} imports {imp.module}: {reason}")
    return found


# Each contract test reads the same files: parsing them once for all of them
# (rather than once a contract) takes most of these tests' time away.
@functools.cache
def _read(rel: str) -> str:
    return (ROOT / rel).read_text()


@functools.cache
def _imports_of_file(rel: str) -> tuple[Import, ...]:
    return tuple(imports_in(ast.parse(_read(rel), filename=rel), rel))


def _check(contract: Contract, files: list[str]) -> None:
    found = [
        v
        for rel in files
        if contract.applies(rel)
        for v in _breaking(_imports_of_file(rel), rel, contract)
    ]
    assert not found, f"{contract.name}: {len(found)} forbidden imports\n" + "\n".join(found)


def test_sans_io_modules_import_no_io_clock_or_logging() -> None:
    """Wire modules of protocol and the tier core: bytes and ``now`` in, decisions out."""
    assert "tiers/aggregate.py" in SANS_IO
    assert "protocol/envelope.py" in SANS_IO
    _check(CONTRACTS["sans_io"], SANS_IO)


def test_nothing_outside_the_bus_imports_a_private_bus_module() -> None:
    _check(CONTRACTS["private_bus"], EVERYTHING)


def test_only_the_nats_bus_touches_asyncio_nats_or_trio_asyncio() -> None:
    """trio-asyncio switches the whole process's asyncio loop; one package owns that."""
    _check(CONTRACTS["nats_confined"], LIBRARY)


def test_parts_import_only_downward_and_production_never_the_lab() -> None:
    _check(CONTRACTS["layering"], PRODUCTION)


def test_no_generic_top_level_import_anywhere() -> None:
    _check(CONTRACTS["generic_top_level"], EVERYTHING)


def test_no_pickle_anywhere_in_library_code() -> None:
    _check(CONTRACTS["no_pickle"], LIBRARY)
    found = [f"{rel}: {ban}" for rel in LIBRARY for ban in _SOURCE_BANS if ban in _read(rel)]
    assert not found, "unsafe deserialisation:\n" + "\n".join(found)


# --- the checker itself ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "source", "contract", "expected"),
    [
        ("tiers/core/x.py", "import trio\n", "sans_io", "tiers/core/x.py:1 imports trio"),
        (
            "tiers/core/x.py",
            "def f():\n    from time import monotonic\n",
            "sans_io",
            "tiers/core/x.py:2 imports time",
        ),
        (
            "protocol/codecs.py",
            "from fedtier.protocol.bus import MemoryBus\n",
            "sans_io",
            "protocol/codecs.py:1 imports fedtier.protocol.bus",
        ),
        (
            "tiers/edge.py",
            "from fedtier.protocol.bus.mqtt import _wire\n",
            "private_bus",
            "tiers/edge.py:1 imports fedtier.protocol.bus.mqtt._wire",
        ),
        (
            "client/runner.py",
            "import importlib\nimportlib.import_module('fedtier.protocol.bus._mqtt')\n",
            "private_bus",
            "client/runner.py:2 imports fedtier.protocol.bus._mqtt",
        ),
        (
            "tiers/daemon.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import trio_asyncio\n",
            "nats_confined",
            "tiers/daemon.py:3 imports trio_asyncio",
        ),
        (
            "client/device.py",
            "from fedtier.tiers import aggregate\n",
            "layering",
            "client/device.py:1 imports fedtier.tiers",
        ),
        (
            "fedtier/cli.py",
            "from fedtier import simulations\n",
            "layering",
            "fedtier/cli.py:1 imports fedtier.simulations",
        ),
        (
            "tiers/x/y.py",
            "from ...simulations import demo\n",
            "layering",
            "tiers/x/y.py:1 imports fedtier.simulations",
        ),
        (
            "tests/unit/test_x.py",
            "from protocol import envelope\n",
            "generic_top_level",
            "tests/unit/test_x.py:1 imports protocol",
        ),
        ("client/outbox.py", "import pickle\n", "no_pickle", "client/outbox.py:1 imports pickle"),
    ],
)
def test_the_checker_catches_a_violation(
    rel: str, source: str, contract: str, expected: str
) -> None:
    found = violations(source, rel, CONTRACTS[contract])
    assert any(v.startswith(expected) for v in found), found


@pytest.mark.parametrize(
    ("rel", "source", "contract"),
    [
        ("protocol/bus/nats/_bus.py", "import nats\nimport trio_asyncio\n", "nats_confined"),
        ("protocol/bus/__init__.py", "from fedtier.protocol.bus._base import Bus\n", "private_bus"),
        ("tiers/edge.py", "import trio\nimport logging\n", "sans_io"),
        ("tiers/core/x.py", "from fedtier.protocol.errors import LocalProtocolError\n", "sans_io"),
        ("simulations/demo.py", "from fedtier.tiers import daemon\n", "layering"),
    ],
)
def test_the_checker_allows_what_the_contracts_allow(rel: str, source: str, contract: str) -> None:
    assert violations(source, rel, CONTRACTS[contract]) == []


def test_every_public_bus_name_imports() -> None:
    import fedtier.protocol.bus

    for name in fedtier.protocol.bus.__all__:
        assert getattr(fedtier.protocol.bus, name) is not None, name


# --- the device install ----------------------------------------------------------------

# Packages only the daemon or lab extras install (pyproject.toml): a device
# install lacks them, so nothing the device imports at module level may need them.
NOT_ON_A_DEVICE = (
    "nats",
    "trio_asyncio",
    "rich",
    "prometheus_client",
    "opentelemetry.exporter.prometheus",
)
NOT_ON_A_DEVICE_DISTRIBUTIONS = (
    "nats-py",
    "trio-asyncio",
    "nkeys",
    "rich",
    "prometheus-client",
    "opentelemetry-exporter-prometheus",
)
# What a device process loads: the SDK, the command it runs, and the modules
# client.runner imports when it starts (function-level, so named here).
DEVICE_ROOTS = (
    *(module_name(rel) for rel in _py_files("client")),
    "fedtier.cli",
    "fedtier.__main__",
    "fedtier.protocol.bus.mqtt",
    "fedtier.protocol.telemetry.tracing",
)


def _file_of(module: str) -> str | None:
    """The repository-relative file of a ``fedtier`` module, or ``None`` (not a module)."""
    parts = module.split(".")
    if parts[0] != "fedtier":
        return None
    inner = parts[1:]
    if not inner:
        base = ROOT / "fedtier"
    elif inner[0] in PARTS:
        base = ROOT.joinpath(*inner)
    else:
        base = ROOT / "fedtier" / Path(*inner)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return str(candidate.relative_to(ROOT))
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_time_imports(tree: ast.Module, rel: str) -> Iterator[Import]:
    """Imports that run when the module is imported: not in functions or ``TYPE_CHECKING``."""

    def visit(statements: list[ast.stmt]) -> Iterator[Import]:
        for stmt in statements:
            if isinstance(stmt, ast.Import | ast.ImportFrom):
                yield from imports_in(stmt, rel)
            elif isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            elif isinstance(stmt, ast.If):
                if not _is_type_checking(stmt.test):
                    yield from visit(stmt.body)
                yield from visit(stmt.orelse)
            elif isinstance(stmt, ast.Try):
                yield from visit(stmt.body)
                for handler in stmt.handlers:
                    yield from visit(handler.body)
                yield from visit(stmt.orelse)
                yield from visit(stmt.finalbody)
            elif isinstance(stmt, ast.ClassDef | ast.With | ast.For | ast.While):
                yield from visit(stmt.body)

    yield from visit(tree.body)


def reachable_imports(roots: tuple[str, ...]) -> dict[str, str]:
    """Every module loaded by importing ``roots``: module -> the fedtier file that imports it."""
    loaded: dict[str, str] = {}
    queue = list(roots)
    done: set[str] = set()
    while queue:
        module = queue.pop()
        if module in done:
            continue
        done.add(module)
        # Importing a.b.c runs a/__init__ and a/b/__init__ first.
        parts = module.split(".")
        queue += [".".join(parts[:i]) for i in range(1, len(parts))]
        rel = _file_of(module)
        if rel is None:
            continue
        tree = ast.parse(_read(rel), filename=rel)
        for imp in import_time_imports(tree, rel):
            loaded.setdefault(imp.module, rel)
            if imp.module.startswith("fedtier"):
                queue.append(imp.module)
    return loaded


def test_importing_the_client_never_needs_the_daemon_or_lab_extras() -> None:
    loaded = reachable_imports(DEVICE_ROOTS)
    assert "fedtier.client.device" in loaded or "fedtier.client.device" in DEVICE_ROOTS
    assert "fedtier.protocol.envelope" in loaded  # the walk follows fedtier imports
    found = sorted(
        f"{by} imports {module}"
        for module, by in loaded.items()
        if within(module, *NOT_ON_A_DEVICE)
    )
    assert not found, "a device install lacks these:\n" + "\n".join(found)


def test_the_walk_sees_through_packages_and_skips_functions_and_type_checking() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "import rich\n"
        "if TYPE_CHECKING:\n    import nats\n"
        "def f():\n    import trio_asyncio\n"
        "try:\n    import prometheus_client\nexcept ImportError:\n    pass\n"
    )
    tree = ast.parse(source)
    names = {imp.module for imp in import_time_imports(tree, "client/x.py")}
    assert {"rich", "prometheus_client"} <= names
    assert not names & {"nats", "trio_asyncio"}


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_base_dependencies_are_what_a_device_needs() -> None:
    project = tomllib.loads(_read("pyproject.toml"))["project"]
    base = {_requirement_name(r) for r in project["dependencies"]}
    assert {"numpy", "msgpack", "cryptography", "blake3", "trio", "paho-mqtt"} <= base
    device = base | {_requirement_name(r) for r in project["optional-dependencies"]["device"]}
    assert not device & set(NOT_ON_A_DEVICE_DISTRIBUTIONS), sorted(device)
    daemon = {_requirement_name(r) for r in project["optional-dependencies"]["daemon"]}
    assert {"nats-py", "trio-asyncio", "prometheus-client"} <= daemon
