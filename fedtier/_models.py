"""``fedtier model init|list|show|export|rollback``: the central's model versions; never the lab.

It joins the client's models (``fedtier.client.plugins``, ``torch_state``) and
the central's store (``fedtier.tiers.store``), so it lives in the composition
root. Heavy modules (torch, the client's models) are imported only by the
actions that need them.

* ``init`` writes the initial model file the central starts from, with the
  layout the devices' trainer uses (``layout_for_module``: same tensors, same
  order, same local-tensor policy), so both sides agree by construction.
* ``list`` and ``show`` read the central's store read-only (the central may run).
* ``export`` checks the version's signature and digest against the pinned
  central key first, then writes ``npz``, ``safetensors`` or a torch ``pt``
  state_dict.
* ``rollback`` stores the parameters of an old version as a new version,
  signed with the central's key; version numbers only move forward. It needs
  the central stopped (it takes the store exclusively, so it cannot race the
  central for a version number); the central publishes the new version when
  it starts, like any version it had not published yet.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from fedtier.protocol.errors import ConfigError, FedtierError, RemoteProtocolError

# numpy too is imported by the actions that use it: ``fedtier.cli`` imports
# this module to build every command's parser, ``fedtier keys`` included.
if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from fedtier.protocol.certificates import ModelSigners
    from fedtier.protocol.identity import VerifyKey
    from fedtier.protocol.layout import ModelLayout
    from fedtier.protocol.limits import Limits
    from fedtier.protocol.messages import ModelAnnouncement, ModelBlob
    from fedtier.tiers.config import CentralConfig
    from fedtier.tiers.store import StoredVersion

__all__ = ["FORMATS", "add_commands"]

FORMATS: Final = ("npz", "safetensors", "pt")
"""Export formats: npz always; safetensors when the package is installed; pt needs torch."""


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``fedtier model`` and its actions to the subcommand table ``sub``."""
    model = sub.add_parser(
        "model", help="the central's model versions: init, list, show, export, rollback"
    )
    actions = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")

    init = actions.add_parser(
        "init",
        help="write the initial model file (.npz) of a model factory, in the devices' layout",
    )
    init.add_argument("--model", required=True, help="'mlp', 'logreg' or 'package.module:factory'")
    init.add_argument("--args", default=None, help="the factory's keyword arguments, as JSON")
    init.add_argument("--data", default=None, help="data to size a built-in model from")
    init.add_argument("--label", default=None, help="the data's label column (CSV)")
    init.add_argument("--task", choices=("classification", "regression"), default=None)
    init.add_argument(
        "--local",
        action="append",
        default=[],
        metavar="GLOB",
        help="tensors that stay on devices (as the devices' [model] local); repeatable",
    )
    init.add_argument(
        "--batchnorm",
        choices=("local", "global"),
        default="local",
        help="BatchNorm tensors stay on devices (local, FedBN; the default) or travel",
    )
    init.add_argument("--seed", type=int, default=None, help="seed torch before the factory runs")
    init.add_argument("--out", type=Path, required=True, help="the .npz file to write")
    init.add_argument("--force", action="store_true", help="replace an existing --out")
    init.add_argument("--json", action="store_true", help="print JSON")
    init.set_defaults(run=_init)

    listing = actions.add_parser("list", help="model versions: time, updates, metrics")
    _add_source(listing, key=False)
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=_list)

    show = actions.add_parser(
        "show", help="one version: metrics, lineage, signature check, digest, layout"
    )
    show.add_argument("version", help="a version number, or 'latest'")
    _add_source(show, key=True)
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(run=_show)

    export = actions.add_parser(
        "export", help="write a version's parameters (signature and digest checked first)"
    )
    export.add_argument("version", help="a version number, or 'latest'")
    _add_source(export, key=True)
    export.add_argument("--format", choices=FORMATS, required=True, dest="fmt")
    export.add_argument("--out", type=Path, required=True, help="the file to write")
    export.add_argument(
        "--model",
        default=None,
        help="model factory: export its full state_dict (tensors outside the version keep "
        "the factory's values), so load_state_dict(strict=True) works",
    )
    export.add_argument("--args", default=None, help="the factory's keyword arguments, as JSON")
    export.add_argument("--force", action="store_true", help="replace an existing --out")
    export.add_argument("--json", action="store_true", help="print JSON")
    export.set_defaults(run=_export)

    rollback = actions.add_parser(
        "rollback",
        help="store an old version's parameters as a new signed version (central stopped)",
    )
    rollback.add_argument("version", type=int, help="the version whose parameters to republish")
    rollback.add_argument("--config", type=Path, required=True, help="the central's TOML file")
    rollback.add_argument("--json", action="store_true", help="print JSON")
    rollback.set_defaults(run=_rollback)


def _add_source(parser: argparse.ArgumentParser, *, key: bool) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="the central's TOML file")
    where.add_argument("--state-dir", type=Path, help="the central's state folder")
    if key:
        parser.add_argument(
            "--central-key",
            default=None,
            help="with --state-dir: the pinned central key (64 hex digits or a .pub file)",
        )


# -- where the versions are -----------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """A central's state folder and the key its versions must verify against."""

    state_dir: Path
    central: VerifyKey | None
    fleet: str | None
    limits: Limits

    @property
    def store_path(self) -> Path:
        return self.state_dir / "state.sqlite"

    def model_file(self, version: int) -> Path:
        return self.state_dir / "models" / f"v{version}.blob"


def _load_central_config(path: Path) -> CentralConfig:
    from fedtier.tiers.config import CentralConfig, load_config

    config = load_config("central", path)
    assert isinstance(config, CentralConfig)
    return config


def _source(args: argparse.Namespace) -> _Source:
    from fedtier.protocol.limits import DEFAULT_LIMITS
    from fedtier.tiers.registry import load_verify_key

    key_text: str | None = getattr(args, "central_key", None)
    central: VerifyKey | None
    if args.config is not None:
        if key_text is not None:
            raise ConfigError("--central-key goes with --state-dir; --config names the key")
        config = _load_central_config(args.config)
        central = load_verify_key(config.central_key)  # resolved by load_config
        return _Source(config.state_dir, central, config.fleet, config.limits)
    central = None if key_text is None else load_verify_key(key_text, base_dir=Path.cwd())
    return _Source(Path(args.state_dir), central, None, DEFAULT_LIMITS)


def _version_arg(text: str, source: _Source) -> StoredVersion:
    from fedtier.tiers.store import read_latest_version, read_stored_version

    if text == "latest":
        latest = read_latest_version(source.store_path)
        if latest is None:
            raise ConfigError(f"state store {source.store_path} holds no model version yet")
        return latest
    try:
        number = int(text)
    except ValueError:
        raise ConfigError(f"version {text!r} is neither a number nor 'latest'") from None
    stored = read_stored_version(source.store_path, number)
    if not stored.record.blob:
        raise ConfigError(
            f"model v{number}'s parameters were pruned: the central keeps those of its newest "
            "[retention] keep_versions versions; its metrics and lineage remain "
            "(fedtier model list)"
        )
    return stored


@dataclass(frozen=True)
class _Opened:
    """A version whose pointer and blob verified against the central key."""

    pointer: ModelAnnouncement
    blob: ModelBlob
    params: npt.NDArray[np.float32]


def _open_version(
    stored: StoredVersion, central: VerifyKey | ModelSigners, fleet: str | None, limits: Limits
) -> _Opened:
    """Check a stored version's signatures and digest; decode its parameters.

    Raises:
        RemoteProtocolError: a signature, the digest or the version number does not check.
    """
    from fedtier.protocol.codecs import decode
    from fedtier.protocol.envelope import parse_envelope
    from fedtier.protocol.errors import DecodeError
    from fedtier.protocol.models import open_model_blob, open_model_pointer

    if fleet is None:  # --state-dir: the pointer names its fleet; the signature decides
        message = parse_envelope(stored.record.pointer, limits).message
        fleet = getattr(message, "fleet", "")
    _, pointer = open_model_pointer(stored.record.pointer, central, fleet or "", limits)
    envelope, blob = open_model_blob(stored.record.blob, central, pointer, limits)
    if pointer.version != stored.version:
        raise DecodeError(f"stored model v{stored.version} holds a pointer to v{pointer.version}")
    params = decode(envelope.payload, blob.codec, blob.num_params)
    return _Opened(pointer, blob, params)


# -- list and show ---------------------------------------------------------------------


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000))
    return f"{stamp}Z"


def _metrics_text(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in metrics.items()) or "-"


def _list(args: argparse.Namespace) -> int:
    from fedtier.tiers.store import read_stored_versions, read_target_reached

    source = _source(args)
    versions = read_stored_versions(source.store_path)
    target = read_target_reached(source.store_path)
    rows = [
        {
            "version": v.version,
            "created_ms": v.record.created_ms,
            "created": _when(v.record.created_ms),
            "update_count": v.record.update_count,
            "published": v.record.published,
            "metrics": dict(v.metrics),
            "rollback_of": v.rollback_of,
            "pruned": not v.record.blob,
        }
        for v in versions
    ]
    target_info = None
    if target is not None:
        target_info = {
            "version": target.version,
            "metric": target.metric,
            "value": target.value,
            "target": target.target,
        }
    if args.json:
        print(json.dumps({"versions": rows, "target_reached": target_info}, indent=2))
        return 0
    print(f"{'version':>7}  {'created (UTC)':20}  {'updates':>7}  {'published':9}  metrics")
    for row, stored in zip(rows, versions, strict=True):
        note = f"  (rollback of v{stored.rollback_of})" if stored.rollback_of is not None else ""
        if not stored.record.blob:
            note += "  (parameters pruned)"
        print(
            f"{stored.version:>7}  {row['created']:20}  {stored.record.update_count:>7}  "
            f"{'yes' if stored.record.published else 'no':9}  "
            f"{_metrics_text(stored.metrics)}{note}"
        )
    if not versions:
        print(f"(no model version in {source.store_path} yet)")
    if target is not None:
        print(
            f"the central stopped at its evaluation target: v{target.version} scored "
            f"{target.metric} {target.value:.6g} (target {target.target:g})"
        )
    return 0


def _layout_rows(layout: ModelLayout) -> list[dict[str, object]]:
    return [
        {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "size": t.size}
        for t in layout.tensors
    ]


def _show(args: argparse.Namespace) -> int:
    from fedtier.protocol.envelope import parse_envelope
    from fedtier.protocol.messages import ModelAnnouncement, ModelBlob

    source = _source(args)
    stored = _version_arg(args.version, source)
    record = stored.record
    signature: str
    layout: ModelLayout | None = None
    digest: str | None = None
    if source.central is None:
        signature = "not checked (give --config or --central-key)"
        blob_message = parse_envelope(record.blob, source.limits).message
        pointer_message = parse_envelope(record.pointer, source.limits).message
        if isinstance(blob_message, ModelBlob):
            layout = blob_message.tensors
        if isinstance(pointer_message, ModelAnnouncement):
            digest = pointer_message.blob_blake3.hex()
    else:
        try:
            opened = _open_version(stored, source.central, source.fleet, source.limits)
        except RemoteProtocolError as exc:
            signature = f"INVALID: {exc}"
        else:
            signature = f"valid (central key {source.central.key_id})"
            layout = opened.blob.tensors
            digest = opened.pointer.blob_blake3.hex()
    model_file = source.model_file(record.version)
    if not model_file.exists():
        file_state = "absent (written when the central publishes the version)"
    elif model_file.read_bytes() == record.blob:
        file_state = "same bytes as the store"
    else:
        file_state = "DIFFERS from the store (the store's copy is the one checked)"
    info: dict[str, Any] = {
        "version": record.version,
        "created": _when(record.created_ms),
        "published": record.published,
        "rollback_of": stored.rollback_of,
        "metrics": dict(stored.metrics),
        "evaluated": _when(stored.evaluated_ms) if stored.evaluated_ms is not None else None,
        "update_count": record.update_count,
        "lineage_ids": len(record.lineage),
        "signature": signature,
        "blob_blake3": digest,
        "model_file": str(model_file),
        "model_file_state": file_state,
        "layout_fingerprint": None if layout is None else layout.fingerprint.hex(),
        "num_params": None if layout is None else layout.num_params,
        "tensors": [] if layout is None else _layout_rows(layout),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model v{record.version}")
    print(f"  created      {info['created']}")
    print(f"  published    {'yes' if record.published else 'no'}")
    if stored.rollback_of is not None:
        print(f"  rollback of  v{stored.rollback_of} (the same parameters, a new version)")
    print(f"  metrics      {_metrics_text(stored.metrics)}")
    if stored.evaluated_ms is not None:
        print(f"  evaluated    {info['evaluated']}")
    updates = "update" if record.update_count == 1 else "updates"
    print(
        f"  lineage      {record.update_count} device {updates} ({len(record.lineage)} ids "
        "recorded; the devices are known at the edges: fedtier trace follows an id)"
    )
    print(f"  signature    {signature}")
    print(f"  blob digest  {digest or '-'} (BLAKE3)")
    print(f"  model file   {model_file}: {file_state}")
    if layout is not None:
        print(
            f"  layout       {layout.fingerprint.hex()}: {len(layout.tensors)} tensors, "
            f"{layout.num_params} values"
        )
        for spec in layout.tensors:
            shape = "x".join(map(str, spec.shape)) or "scalar"
            print(f"    {spec.name:40} {spec.dtype:9} {shape}")
    return 0 if not signature.startswith("INVALID") else 1


# -- export ---------------------------------------------------------------------------


def _json_args(text: str | None, what: str) -> dict[str, object]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a JSON object such as '{{\"hidden\": 64}}'")
    return value


def _check_out(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise ConfigError(f"{path} exists; refusing to overwrite it (--force replaces it)")
    if not path.parent.is_dir():
        raise ConfigError(f"folder {path.parent} does not exist")


def _write(path: Path, data: bytes) -> None:
    from fedtier.protocol.files import atomic_write

    try:
        atomic_write(path, data)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _npz_bytes(arrays: Mapping[str, npt.NDArray[Any]]) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    # Insertion order is the file order, which is the layout order the central reads.
    np.savez(buffer, **{name: np.ascontiguousarray(a) for name, a in arrays.items()})  # type: ignore[arg-type]
    return buffer.getvalue()


def _full_state(
    spec: str,
    model_args: Mapping[str, object],
    layout: ModelLayout,
    params: npt.NDArray[np.float32],
) -> tuple[dict[str, Any], list[str]]:
    """The factory's module with the version loaded: its whole state_dict, and what kept init."""
    from fedtier.client.plugins import load_model

    model = load_model(spec, args=model_args)
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ConfigError(
            f"--model {spec!r} builds a {type(model).__name__}; only a torch module has a "
            "state_dict to complete (export without --model)"
        )
    from fedtier.client.torch_state import load_into_module

    load_into_module(model, layout, params)
    in_layout = {t.name for t in layout.tensors}
    state = {name: t.detach().to("cpu").clone() for name, t in model.state_dict().items()}
    kept = [name for name in state if name not in in_layout]
    return state, kept


def _export(args: argparse.Namespace) -> int:
    source = _source(args)
    if source.central is None:
        raise ConfigError(
            "export checks the version's signature first: give --config or --central-key"
        )
    out: Path = args.out
    _check_out(out, args.force)
    model_args = _json_args(args.args, "--args")
    if model_args and args.model is None:
        raise ConfigError("--args are the keyword arguments of --model; give --model too")
    stored = _version_arg(args.version, source)
    try:
        opened = _open_version(stored, source.central, source.fleet, source.limits)
    except RemoteProtocolError as exc:
        raise FedtierError(
            f"model v{stored.version} in {source.store_path} fails its checks, so it is not "
            f"exported: {exc}"
        ) from exc
    layout = opened.blob.tensors
    kept: list[str] = []
    fmt: str = args.fmt
    if args.model is not None:
        state, kept = _full_state(args.model, model_args, layout, opened.params)
        if fmt == "pt":
            data = _torch_bytes(state)
        else:
            data = _array_bytes(fmt, {n: _tensor_array(t) for n, t in state.items()})
    elif fmt == "pt":
        data = _torch_bytes(_tensors_of(layout, opened.params))
    else:
        data = _array_bytes(fmt, dict(layout.unflatten(opened.params)))
    _write(out, data)
    info = {
        "version": stored.version,
        "format": fmt,
        "out": str(out),
        "layout_fingerprint": layout.fingerprint.hex(),
        "tensors": len(layout.tensors),
        "num_params": layout.num_params,
        "blob_blake3": opened.pointer.blob_blake3.hex(),
        "factory_values": kept,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(
        f"exported model v{stored.version} ({len(layout.tensors)} tensors, {layout.num_params} "
        f"values, signature and digest checked) to {out} as {fmt}"
    )
    if kept:
        print(
            f"{len(kept)} tensors are not in the version (they stay on devices, such as "
            "BatchNorm statistics under FedBN, or are integer counters) and hold the "
            f"factory's initial values: {', '.join(kept[:6])}{', ...' if len(kept) > 6 else ''}"
        )
    elif args.model is None and fmt == "pt":
        print(
            "it holds the version's tensors only: a model with more (BatchNorm under FedBN, "
            "integer buffers) loads it with strict=False, or export with --model for a full "
            "state_dict"
        )
    return 0


def _array_bytes(fmt: str, arrays: Mapping[str, npt.NDArray[Any]]) -> bytes:
    import numpy as np

    if fmt == "npz":
        return _npz_bytes(arrays)
    try:
        from safetensors.numpy import save  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise ConfigError(
            "--format safetensors needs the safetensors package (pip install safetensors); "
            "npz needs nothing more"
        ) from None
    data: bytes = save({name: np.ascontiguousarray(a) for name, a in arrays.items()})
    return data


def _tensors_of(layout: ModelLayout, params: npt.NDArray[np.float32]) -> dict[str, Any]:
    """The version's tensors as torch tensors, each in its layout dtype (bfloat16 too)."""
    import numpy as np
    import torch

    dtypes = {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "float64": torch.float64,
    }
    return {
        spec.name: torch.from_numpy(np.array(array, dtype=np.float32)).to(dtypes[spec.dtype])
        for spec, array in zip(layout.tensors, layout.unflatten(params).values(), strict=True)
    }


def _tensor_array(tensor: Any) -> npt.NDArray[Any]:
    import torch

    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
        tensor = tensor.to(torch.float32)
    array: npt.NDArray[Any] = tensor.numpy()
    return array


def _torch_bytes(state: Mapping[str, Any]) -> bytes:
    import torch

    buffer = io.BytesIO()
    # A plain dict of tensors, which torch reads back with weights_only=True.
    torch.save(dict(state), buffer)
    return buffer.getvalue()


# -- init -----------------------------------------------------------------------------


def _init(args: argparse.Namespace) -> int:
    from fedtier.client.plugins import DataRequest, load_data, load_model
    from fedtier.tiers.config import load_initial_model

    out: Path = args.out
    _check_out(out, args.force)
    model_args = _json_args(args.args, "--args")
    dataset = None
    if args.data is not None:
        label: str | int | None = args.label
        if isinstance(label, str) and label.lstrip("-").isdigit():
            label = int(label)
        request = DataRequest(device="model-init", split="train", base_dir=Path.cwd())
        dataset = load_data(args.data, request, label=label, task=args.task)
    elif args.label is not None or args.task is not None:
        raise ConfigError("--label and --task describe --data; give --data too")
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    model = load_model(args.model, args=model_args, dataset=dataset)
    layout, flat, local = _initial_of(model, args.local, args.batchnorm)
    if any(t.dtype == "bfloat16" for t in layout.tensors):
        raise ConfigError(
            "the model has bfloat16 tensors, which an .npz cannot hold; build it in float32 "
            "(the devices may still train in bfloat16 only if their layout says float32)"
        )
    _write(out, _npz_bytes(layout.unflatten(flat)))
    written, _ = load_initial_model(out)  # what the central will read
    if written.fingerprint != layout.fingerprint:
        raise FedtierError(f"{out} does not read back with the layout written; please report it")
    info = {
        "out": str(out),
        "layout_fingerprint": layout.fingerprint.hex(),
        "tensors": _layout_rows(layout),
        "num_params": layout.num_params,
        "local": local,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(
        f"wrote {out}: layout {layout.fingerprint.hex()}, {len(layout.tensors)} tensors, "
        f"{layout.num_params} values"
    )
    if local:
        print(f"kept out (they stay on devices): {', '.join(local)}")
    print(
        "point the central's [model] initial at it; devices need the same model and the same "
        "[model] local and batchnorm settings"
    )
    return 0


def _initial_of(
    model: object, local: Sequence[str], batchnorm: str
) -> tuple[ModelLayout, npt.NDArray[np.float32], list[str]]:
    """The travelling layout of ``model``, its initial vector and the local tensor names."""
    import sys

    import numpy as np

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        from fedtier.client.torch_state import (
            flat_for_module,
            layout_for_module,
            local_tensor_names,
        )

        policy: Any = batchnorm
        layout = layout_for_module(model, local=tuple(local), batchnorm=policy)
        kept = local_tensor_names(model, local=tuple(local), batchnorm=policy)
        names = [n for n in model.state_dict() if n in kept]
        return layout, flat_for_module(model, layout), names
    if local:
        raise ConfigError("--local names tensors of a torch module; this model is not one")
    layout_of_model = getattr(model, "layout", None)
    initial = getattr(model, "initial_params", None)
    from fedtier.protocol.layout import ModelLayout

    if not isinstance(layout_of_model, ModelLayout) or not callable(initial):
        raise ConfigError(
            f"the factory returned a {type(model).__name__} without a layout and "
            "initial_params(); a trainer needs both to start a central"
        )
    flat = np.asarray(initial(), dtype=np.float32)
    return layout_of_model, flat, []


# -- rollback -------------------------------------------------------------------------


def _rollback(args: argparse.Namespace) -> int:
    from fedtier.protocol.errors import StoreError
    from fedtier.tiers.central import CentralDaemon
    from fedtier.tiers.core import seal_version
    from fedtier.tiers.store import ModelVersionRecord, StoredVersion, open_store_exclusively

    config = _load_central_config(args.config)
    keys = CentralDaemon.load_keys(config)
    keys.check_central_identity()  # devices would reject the version otherwise
    wanted: int = args.version
    with open_store_exclusively(config.store_path) as store:
        latest = store.latest_version()
        if latest is None:
            raise StoreError(f"state store {config.store_path} holds no model version yet")
        source = store.model_version(wanted)
        if source is None:
            raise StoreError(
                f"model v{wanted} is not in state store {config.store_path} "
                f"(it holds v0 to v{latest.version})"
            )
        if wanted == latest.version:
            raise ConfigError(f"v{wanted} is the current version already; nothing to roll back")
        try:
            opened = _open_version(StoredVersion(source), keys.models, config.fleet, config.limits)
        except RemoteProtocolError as exc:
            raise FedtierError(
                f"model v{wanted} fails its checks, so it is not republished: {exc}"
            ) from exc
        new_version = latest.version + 1
        created_ms = time.time_ns() // 1_000_000
        # Above the stored sequence and the wall clock, as the central's own counter is.
        seq = max(store.out_seq(), created_ms * 1000)
        sealed = seal_version(
            new_version,
            opened.params,
            opened.blob.tensors,
            identity=keys.identity,
            fleet=config.fleet,
            created_ms=created_ms,
            blob_seq=seq + 1,
            pointer_seq=seq + 2,
            update_count=0,
        )
        store.add_rollback_version(
            ModelVersionRecord(
                version=new_version,
                blob=sealed.blob,
                pointer=sealed.pointer,
                lineage=(),
                update_count=0,
                created_ms=created_ms,
            ),
            rollback_of=wanted,
            out_seq=seq + 2,
        )
    info = {"version": new_version, "rollback_of": wanted, "previous": latest.version}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(
        f"stored model v{new_version} with the parameters of v{wanted} (the newest was "
        f"v{latest.version}); start the central to publish it, and devices move on to it"
    )
    return 0
