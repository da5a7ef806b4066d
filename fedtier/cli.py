"""The ``fedtier`` command: parses arguments and dispatches; never imports ``fedtier.simulations``.

Production commands come from the parts that run them: ``fedtier keys``
(``fedtier._keys``), the daemons and ``fedtier trace`` (``fedtier.tiers.cli``)
and ``fedtier device`` (``fedtier.client.cli``); ``fedtier model``
(``fedtier._models``) joins the central's store and the client's models,
``fedtier quarantine`` (``fedtier._quarantine``) manages a tier's quarantined inputs, and
the central gets its evaluator from ``fedtier._evaluation``, so tiers never
import the client. Lab commands (``demo``,
``sim``, ``bench``) plug in through the ``fedtier.commands`` entry-point group,
which only the lab registers, so a daemon or a device never loads the lab: a
command module's ``add_commands``-like function receives the subcommand table
and adds its parsers, each with ``set_defaults(run=...)`` and optionally
``extra=`` (the install extra it needs) and ``requires=`` (modules checked
before it runs). Commands import their heavy modules only when they run,
so ``fedtier keys`` does not pay for torch or the brokers: every process
(each daemon, device and key command) builds the whole parser first, so the
modules imported here keep numpy, trio, sqlite3 and the config loader out of
their module level.

Errors the user can fix are one readable sentence on stderr and exit status 2,
never a traceback; that includes a command whose dependencies this install
lacks (``fedtier demo`` on a device install names the extra to install).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, TypeAlias

from fedtier import _evaluation, _keys, _models, _quarantine
from fedtier.client import cli as client_cli
from fedtier.protocol.errors import FedtierError, sole_error
from fedtier.tiers import cli as tiers_cli

if TYPE_CHECKING:
    from importlib.metadata import EntryPoints

__all__ = ["COMMAND_GROUP", "FULL_EXTRA", "Subcommands", "add_forwarded", "main"]

COMMAND_GROUP: Final = "fedtier.commands"
"""Entry points here name a command and a function ``add(sub: Subcommands) -> None``."""

FULL_EXTRA: Final = "lab"
"""The extra with every module the commands import (torch aside); the default ``extra``."""

# Optional modules with an extra of their own, whatever the command needs
# otherwise (the lab's demo trains a torch MLP, but the lab extra has no torch).
_EXTRA_OF_MODULE: Final = {"torch": "torch"}

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

Run: TypeAlias = Callable[[argparse.Namespace], int]

# A forwarded command's parser treats no argument as an option, so options
# reach its module's own parser untouched (argparse.REMAINDER alone drops a
# leading option). No one types a NUL, so it stands for "no prefix".
_NO_OPTION_PREFIX: Final = "\0"


def add_forwarded(
    sub: Subcommands,
    name: str,
    module: str,
    help_text: str,
    *,
    keep_name: bool = False,
    extra: str | None = None,
    requires: tuple[str, ...] = (),
) -> None:
    """Add subcommand ``name`` that hands its argument list to ``module.main(argv)``.

    The module parses its own arguments (and its own ``--help``), so its
    options are the command's options.

    Args:
        sub: the subcommand table to add to.
        name: the subcommand's name.
        module: the module whose ``main(argv: list[str]) -> int`` runs it, imported when it runs.
        help_text: one line for the parent's ``--help``.
        keep_name: pass ``name`` as the first argument (for a module serving several commands).
        extra: the install extra that brings the module's dependencies.
        requires: modules checked before the command runs (see ``main``).
    """
    parser = sub.add_parser(name, help=help_text, add_help=False, prefix_chars=_NO_OPTION_PREFIX)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    lead = (name,) if keep_name else ()

    def run(args: argparse.Namespace) -> int:
        main_of: Callable[[list[str]], int] = importlib.import_module(module).main
        return main_of([*lead, *args.rest])

    parser.set_defaults(run=run, requires=requires)
    if extra is not None:
        parser.set_defaults(extra=extra)


def _add_unavailable(sub: Subcommands, name: str, missing: str) -> None:
    """Stand in for plug-in command ``name``, whose module could not be imported."""
    sentence = _missing_sentence(name, missing, FULL_EXTRA)
    parser = sub.add_parser(
        name,
        help=f"(not installed: pip install 'fedtier[{FULL_EXTRA}]')",
        add_help=False,
        prefix_chars=_NO_OPTION_PREFIX,
    )
    parser.add_argument("rest", nargs=argparse.REMAINDER)

    def run(args: argparse.Namespace) -> int:
        raise FedtierError(sentence)

    parser.set_defaults(run=run)


def entry_points(*, group: str) -> EntryPoints:
    """The installed entry points of ``group``.

    ``importlib.metadata`` (zipfile, email) costs more to import than the rest
    of this module, and only a plug-in command or ``--help`` reads it.
    """
    from importlib.metadata import entry_points as installed

    return installed(group=group)


def _add_plugins(sub: Subcommands, wanted: str | None) -> None:
    """Add the plug-in commands: only ``wanted`` when a plug-in names it, else all (for help)."""
    found = sorted(entry_points(group=COMMAND_GROUP), key=lambda ep: ep.name)
    if any(ep.name == wanted for ep in found):
        found = [ep for ep in found if ep.name == wanted]
    for ep in found:
        if ep.name in sub.choices:
            continue  # a plug-in does not replace a production command
        try:
            add: Callable[[Subcommands], None] = ep.load()
        except ImportError as exc:
            _add_unavailable(sub, ep.name, exc.name or str(exc))
            continue
        add(sub)


def _parser(command: str | None) -> argparse.ArgumentParser:
    """The parser for a run whose first argument is ``command``.

    Plug-ins are loaded only when ``command`` is not a production command, so
    a daemon or a device never imports the lab's command module.
    """
    parser = argparse.ArgumentParser(
        prog="fedtier",
        description="Federated-learning aggregation mesh: devices over MQTT, tiers over NATS.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _keys.add_commands(sub)
    tiers_cli.add_commands(sub)
    # The composition root's part of the central: the [evaluation] table's evaluator.
    sub.choices["central"].set_defaults(make_evaluator=_evaluation.build_evaluator)
    client_cli.add_commands(sub)
    _models.add_commands(sub)
    _quarantine.add_commands(sub)
    if command not in sub.choices:
        _add_plugins(sub, command)
    return parser


def _missing_module(exc: BaseException) -> str | None:
    """The third-party module whose absence ``exc`` reports, or ``None`` for anything else."""
    error = sole_error(exc)
    if not isinstance(error, ModuleNotFoundError) or not error.name:
        return None
    if error.name.split(".")[0] == "fedtier":
        return None  # a broken install or a bug, not a missing extra: keep the traceback
    return error.name


def _first_absent(modules: Sequence[str]) -> str | None:
    """The first of ``modules`` that this install cannot import, without importing it."""
    import importlib.util

    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            return module
    return None


def _missing_sentence(command: str, module: str, extra: str) -> str:
    extra = _EXTRA_OF_MODULE.get(module.split(".")[0], extra)
    return (
        f"'fedtier {command}' needs the {module!r} module, which this install lacks; "
        f"install it with: pip install 'fedtier[{extra}]'"
    )


def _import_from_working_directory() -> None:
    """Let plug-ins (``"mypkg.models:make_model"``) import from the working directory.

    ``python -m fedtier`` puts the working directory first on ``sys.path``; the
    ``fedtier`` console script does not. Both behave the same, as ``python -m``
    does: a user's own module beside their config runs without installing it.
    """
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fedtier`` with ``argv`` (default: the process arguments); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _import_from_working_directory()
    args = _parser(argv[0] if argv else None).parse_args(argv)
    run: Run = args.run
    extra: str = getattr(args, "extra", FULL_EXTRA)
    # A command may name the modules it needs (``set_defaults(requires=...)``),
    # so it fails before it starts anything rather than halfway through.
    absent = _first_absent(getattr(args, "requires", ()))
    if absent is not None:
        print(f"fedtier: {_missing_sentence(args.command, absent, extra)}", file=sys.stderr)
        return 2
    try:
        return run(args)
    except FedtierError as exc:
        print(f"fedtier: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedtier: interrupted", file=sys.stderr)
        return 130
    except (ImportError, ExceptionGroup) as exc:
        module = _missing_module(exc)
        if module is None:
            raise
        print(f"fedtier: {_missing_sentence(args.command, module, extra)}", file=sys.stderr)
        return 2
