"""Models and data named by one plug-in syntax; imports protocol only, and torch never on import.

The same strings work in a device TOML, a scenario TOML and the Python API:

* a model is ``"package.module:factory"`` (a callable returning a
  ``torch.nn.Module`` or a ``fedtier.client.Trainer``) or a built-in name,
  ``"logreg"`` (numpy) or ``"mlp"`` (torch);
* data is a file (``.csv`` with a header row, ``.npz`` with arrays ``X`` and
  ``y``, ``.parquet`` when pyarrow is installed) or ``"package.module:loader"``,
  a callable taking a :class:`DataRequest` and returning a :class:`Dataset`, a
  pair ``(X, y)`` or a torch ``Dataset`` (read into arrays once).

A loader gets the device's identity and its place in the fleet
(:class:`DataRequest`), so one loader can serve a whole simulated fleet by
returning each device its own shard. A file is read whole: each real device
has its own file, and the simulator shards what it reads.

Nothing here unpickles: ``.npz`` files are opened with ``allow_pickle=False``
and CSV is parsed by the standard library. Every problem is one
``ConfigError`` sentence naming the spec, file, line or column at fault.
"""

from __future__ import annotations

import csv
import importlib
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, cast

import numpy as np
import numpy.typing as npt

from fedtier.protocol.errors import ConfigError

__all__ = ["DataRequest", "Dataset", "is_import_path", "load_data", "load_model", "load_object"]

Task = Literal["classification", "regression"]
_TASKS: Final[tuple[Task, ...]] = ("classification", "regression")
_SPLITS: Final = ("train", "validation", "test")
_BUILTIN_MODELS: Final = ("logreg", "mlp")
# ``package.module:attribute`` with an optionally dotted attribute; anything
# else is a file path (a Windows drive letter is followed by a backslash).
_IMPORT_PATH: Final = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_SHOWN_CHARS: Final = 40


def is_import_path(spec: str) -> bool:
    """Whether ``spec`` reads as ``"package.module:attribute"`` rather than a file path."""
    return _IMPORT_PATH.fullmatch(spec) is not None


def load_object(spec: str, *, what: str) -> object:
    """The object an import path ``"package.module:attr"`` names (``attr`` may be dotted).

    Args:
        spec: the import path.
        what: what the object is for, named in errors (``"model factory"``).

    Raises:
        ConfigError: ``spec`` is not an import path, or its module cannot be
            imported, or it lacks the attribute.
    """
    if not isinstance(spec, str) or not is_import_path(spec):
        raise ConfigError(f"{what} {spec!r} is not an import path; expected 'package.module:name'")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"{what} {spec!r}: module {exc.name or module_name!r} cannot be found "
            "(is its folder on sys.path, or the package installed?)"
        ) from exc
    except Exception as exc:  # the user's module raised while importing
        raise ConfigError(
            f"{what} {spec!r}: importing {module_name} failed with {type(exc).__name__}: {exc}"
        ) from exc
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{what} {spec!r}: {module_name} has no attribute {attr!r}") from None
    return obj


@dataclass(frozen=True, slots=True)
class DataRequest:
    """Who asks a loader for data, and which part.

    Attributes:
        device: the participant's key id, or a simulated device's name.
        index: its 0-based position in the fleet (a shard number).
        count: the fleet's size (the number of shards).
        seed: the run's seed, for loaders that shuffle or synthesise.
        split: ``"train"``, ``"validation"`` or ``"test"``.
        base_dir: the folder of the configuration file that named the data,
            for relative paths; None means the working directory.
    """

    device: str
    index: int = 0
    count: int = 1
    seed: int = 0
    split: str = "train"
    base_dir: Path | None = None

    def __post_init__(self) -> None:
        if not (0 <= self.index < self.count):
            raise ConfigError(f"data request index {self.index} is outside a fleet of {self.count}")
        if self.split not in _SPLITS:
            raise ConfigError(
                f"data request split {self.split!r} is not one of {', '.join(_SPLITS)}"
            )


@dataclass(frozen=True, slots=True)
class Dataset:
    """Local examples as arrays, and what they are.

    Construction coerces ``X`` to float32 and ``y`` to int64 (classification)
    or float32 (regression), and checks them.

    Attributes:
        X: features, shape ``(n, F)`` for tabular data (``(n, ...)`` for a torch
            model that takes images, say), float32, finite.
        y: int64 class labels in ``0..num_classes-1`` for classification,
            float32 targets for regression; shape ``(n,)``.
        task: ``"classification"`` or ``"regression"``.
        name: what reports print, e.g. ``"wine quality (UCI, CSV)"``.
        num_classes: for classification, the class count (at least
            ``max(y) + 1``; None means exactly that); None for regression.

    Raises:
        ConfigError: the arrays do not fit (shapes, dtypes, labels, NaN).
    """

    X: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64] | npt.NDArray[np.float32]
    task: Task = "classification"
    name: str = "data"
    num_classes: int | None = None

    def __post_init__(self) -> None:
        X = np.asarray(self.X)
        y = np.asarray(self.y)
        where = f"dataset {self.name!r}"
        if self.task not in _TASKS:
            raise ConfigError(f"{where}: task {self.task!r} is not one of {', '.join(_TASKS)}")
        if X.ndim < 2 or y.ndim != 1 or X.shape[0] != y.shape[0] or X.shape[0] == 0:
            raise ConfigError(
                f"{where} holds X {X.shape} and y {y.shape}; expected (n, ...) and (n,), n >= 1"
            )
        if not (np.issubdtype(X.dtype, np.number) or X.dtype == np.bool_):
            raise ConfigError(f"{where} holds features of {X.dtype}; expected numbers")
        if not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_):
            raise ConfigError(f"{where} holds labels of {y.dtype}; expected numbers")
        X32 = np.ascontiguousarray(X, dtype=np.float32)
        if not np.isfinite(X32).all():
            row = int(np.argwhere(~np.isfinite(X32).reshape(X32.shape[0], -1))[0][0])
            raise ConfigError(f"{where}: features of example {row} are not finite numbers")
        labels: npt.NDArray[np.int64] | npt.NDArray[np.float32]
        num_classes = self.num_classes
        if self.task == "classification":
            values = y.astype(np.float64)
            if not np.issubdtype(y.dtype, np.integer) and not (
                np.isfinite(values).all() and (values == np.round(values)).all()
            ):
                raise ConfigError(
                    f"{where} has fractional labels; classification needs integer labels "
                    "(or say task = 'regression')"
                )
            labels = y.astype(np.int64)
            low, high = int(labels.min()), int(labels.max())
            if low < 0:
                raise ConfigError(f"{where} has label {low}; class labels must be integers 0..C-1")
            if num_classes is None:
                num_classes = high + 1
            elif num_classes < high + 1:
                raise ConfigError(
                    f"{where} has label {high}; num_classes {num_classes} allows "
                    f"0..{num_classes - 1}"
                )
        else:
            labels = np.ascontiguousarray(y, dtype=np.float32)
            if not np.isfinite(labels).all():
                row = int(np.argwhere(~np.isfinite(labels))[0][0])
                raise ConfigError(f"{where}: the target of example {row} is not a finite number")
            num_classes = None
        object.__setattr__(self, "X", X32)
        object.__setattr__(self, "y", labels)
        object.__setattr__(self, "num_classes", num_classes)

    def __len__(self) -> int:
        return int(self.X.shape[0])

    @property
    def num_features(self) -> int:
        """Features per example once flattened (``F`` for tabular data)."""
        return int(np.prod(self.X.shape[1:]))


def load_data(
    spec: str | Path | Callable[..., object],
    request: DataRequest,
    *,
    label: str | int | None = None,
    task: str | None = None,
    args: Mapping[str, object] | None = None,
) -> Dataset:
    """Read the data ``spec`` names for ``request``.

    Args:
        spec: a ``.csv``, ``.npz`` or ``.parquet`` file (relative to
            ``request.base_dir``), or a loader ``"package.module:loader"``
            (the Python API may pass the loader itself).
        request: who asks, and for which split.
        label: a table's label column, by header name or 0-based index
            (negative counts from the end); default the last column. Only for
            CSV and Parquet.
        task: ``"classification"`` or ``"regression"``; by default integer
            labels are classes and fractional ones regression targets.
        args: keyword arguments for a loader (``loader(request, **args)``).

    Raises:
        ConfigError: the file or loader cannot be used (one sentence naming
            the file, line and column, or the loader).
    """
    if task is not None and task not in _TASKS:
        raise ConfigError(f"data task {task!r} is not one of {', '.join(_TASKS)}")
    chosen = task
    if callable(spec) or (isinstance(spec, str) and is_import_path(spec)):
        name = spec if isinstance(spec, str) else _name_of(spec)
        if label is not None:
            raise ConfigError(f"data label {label!r} names a table column; {name} is a loader")
        loader = load_object(spec, what="data loader") if isinstance(spec, str) else spec
        return _from_loader(name, loader, request, chosen, dict(args or {}))
    if args:
        raise ConfigError(f"data args are for a loader; {spec} is a file")
    path = Path(spec)
    if not path.is_absolute() and request.base_dir is not None:
        path = request.base_dir / path
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist")
    if suffix == ".csv":
        names, X, y_text, lines = _read_csv(path, label)
        return _tabular(path, names, X, y_text, lines, chosen, f"{path.name} (CSV)")
    if suffix == ".parquet":
        names, X, y_text, lines = _read_parquet(path, label)
        return _tabular(path, names, X, y_text, lines, chosen, f"{path.name} (Parquet)")
    if suffix == ".npz":
        if label is not None:
            raise ConfigError(f"data label {label!r} names a table column; {path} is an .npz")
        return _read_npz(path, chosen)
    raise ConfigError(
        f"data file {path} is neither .csv, .npz nor .parquet (or use a loader "
        "'package.module:function')"
    )


def load_model(
    spec: str | Callable[..., object],
    *,
    args: Mapping[str, object] | None = None,
    dataset: Dataset | None = None,
) -> object:
    """Build the model ``spec`` names: a ``torch.nn.Module`` or a ``Trainer``.

    ``spec`` is a built-in name or an import path (the Python API may pass
    the factory itself). A factory is called with ``args`` as keyword arguments, plus
    ``dataset=`` when it declares a parameter of that name and data is at hand
    (so it can size its input layer from the data). The built-ins:

    * ``"mlp"``: Linear-ReLU-Linear (``fedtier.client.torch_trainer.make_mlp``);
      args ``hidden`` (32), ``seed`` (0), ``in_features`` and ``num_classes``
      (taken from ``dataset`` when absent; a regression dataset gets one
      output).
    * ``"logreg"``: a ``NumpyLogRegTrainer`` on ``dataset`` (classification
      only); args ``num_features`` and ``num_classes`` when there is no data
      (then it can evaluate but not train).

    Raises:
        ConfigError: the spec, its args or what the factory returns cannot be used.
    """
    given = dict(args or {})
    if spec == "mlp":
        return _builtin_mlp(given, dataset)
    if spec == "logreg":
        return _builtin_logreg(given, dataset)
    if isinstance(spec, str):
        if not is_import_path(spec):
            raise ConfigError(
                f"model {spec!r} is neither {' nor '.join(map(repr, _BUILTIN_MODELS))} nor an "
                "import path 'package.module:factory'"
            )
        factory = load_object(spec, what="model factory")
    else:
        factory, spec = spec, _name_of(spec)
    if not callable(factory):
        raise ConfigError(f"model factory {spec!r} is a {type(factory).__name__}, not callable")
    if dataset is not None and _accepts(factory, "dataset"):
        given.setdefault("dataset", dataset)
    try:
        model = factory(**given)
    except TypeError as exc:
        raise ConfigError(
            f"model factory {spec!r} rejects its args {sorted(given)}: {exc}"
        ) from exc
    from fedtier.client.trainers import Trainer

    if isinstance(model, Trainer) or _is_torch_module(model):
        return model
    raise ConfigError(
        f"model factory {spec!r} returned a {type(model).__name__}; expected a "
        "torch.nn.Module or a fedtier.client.Trainer"
    )


# -- models -----------------------------------------------------------------------------


def _accepts(func: Callable[..., object], name: str) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
    param = params.get(name)
    return param is not None and param.kind in (
        inspect.Parameter.KEYWORD_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )


def _is_torch_module(obj: object) -> bool:
    # torch is imported already if the factory built a module: never import it here.
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _int_arg(args: dict[str, object], key: str, spec: str, default: int | None) -> int | None:
    value = args.pop(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"model {spec!r} arg {key} is {value!r}; expected an integer >= 1")
    return value


def _builtin_mlp(args: dict[str, object], dataset: Dataset | None) -> object:
    hidden = _int_arg(args, "hidden", "mlp", 32)
    in_features = _int_arg(args, "in_features", "mlp", None)
    num_classes = _int_arg(args, "num_classes", "mlp", None)
    seed = args.pop("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"model 'mlp' arg seed is {seed!r}; expected an integer")
    if args:
        raise ConfigError(
            f"model 'mlp' has no arg {sorted(args)[0]!r}; it takes hidden, in_features, "
            "num_classes and seed"
        )
    if dataset is not None:
        in_features = in_features or dataset.num_features
        if num_classes is None:
            num_classes = dataset.num_classes if dataset.task == "classification" else 1
    if in_features is None or num_classes is None:
        raise ConfigError(
            "model 'mlp' needs args in_features and num_classes when no data is at hand"
        )
    from fedtier.client.torch_trainer import make_mlp

    assert hidden is not None
    return make_mlp(in_features, hidden, num_classes, seed=seed)


def _builtin_logreg(args: dict[str, object], dataset: Dataset | None) -> object:
    num_features = _int_arg(args, "num_features", "logreg", None)
    num_classes = _int_arg(args, "num_classes", "logreg", None)
    if args:
        raise ConfigError(
            f"model 'logreg' has no arg {sorted(args)[0]!r}; it takes num_features and num_classes"
        )
    from fedtier.client.trainers import NumpyLogRegTrainer

    if dataset is None:
        if num_features is None or num_classes is None:
            raise ConfigError(
                "model 'logreg' needs args num_features and num_classes when no data is at hand"
            )
        return NumpyLogRegTrainer(num_features, max(num_classes, 2), None, None)
    if dataset.task != "classification" or dataset.num_classes is None:
        raise ConfigError(
            f"model 'logreg' classifies; dataset {dataset.name!r} is a regression task "
            "(use 'mlp' or a torch model with loss 'mse')"
        )
    if dataset.X.ndim != 2:
        raise ConfigError(
            f"model 'logreg' needs 2-D features; the data has shape {dataset.X.shape}"
        )
    return NumpyLogRegTrainer(
        num_features or dataset.num_features,
        max(num_classes or dataset.num_classes, 2),
        dataset.X,
        dataset.y,
    )


# -- data: loaders ----------------------------------------------------------------------


def _name_of(obj: object) -> str:
    """``module:qualname`` of a function or class, for messages and dataset names."""
    module = getattr(obj, "__module__", None) or "?"
    name = getattr(obj, "__qualname__", None) or type(obj).__name__
    return f"{module}:{name}"


def _from_loader(
    spec: str, loader: object, request: DataRequest, task: Task | None, args: dict[str, object]
) -> Dataset:
    if not callable(loader):
        raise ConfigError(f"data loader {spec!r} is a {type(loader).__name__}, not callable")
    try:
        # Checked before the call, so a TypeError raised inside the user's
        # loader is not mistaken for a bad config (and keeps its traceback).
        inspect.signature(loader).bind(request, **args)
    except TypeError as exc:
        raise ConfigError(
            f"data loader {spec!r} does not take the args {sorted(args)}: {exc}"
        ) from exc
    except ValueError:
        pass  # no introspectable signature (a builtin): let the call speak
    result = loader(request, **args)
    if isinstance(result, Dataset):
        if task is not None and task != result.task:
            raise ConfigError(
                f"data loader {spec!r} returned a {result.task} dataset; the config says {task}"
            )
        return result
    if isinstance(result, tuple) and len(result) == 2:
        X, y = (np.asarray(part) for part in result)
    elif hasattr(result, "__getitem__") and hasattr(result, "__len__"):
        X, y = _materialise(spec, result)
    else:
        raise ConfigError(
            f"data loader {spec!r} returned a {type(result).__name__}; expected a Dataset, "
            "a pair (X, y) or a torch Dataset"
        )
    return Dataset(X, y, task=task or _task_of(y), name=spec)


def _materialise(spec: str, dataset: object) -> tuple[npt.NDArray[np.generic], ...]:
    """A map-style (torch) dataset of ``(x, y)`` items as two stacked arrays."""
    items = cast("Sequence[object]", dataset)
    xs: list[npt.NDArray[np.generic]] = []
    ys: list[npt.NDArray[np.generic]] = []
    for i in range(len(items)):
        item = items[i]
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise ConfigError(f"data loader {spec!r}: item {i} of its dataset is not a pair (x, y)")
        # np.asarray reads a CPU tensor without copying; no torch import needed.
        xs.append(np.asarray(item[0]))
        ys.append(np.asarray(item[1]))
    if not xs:
        raise ConfigError(f"data loader {spec!r} returned an empty dataset")
    try:
        return np.stack(xs), np.stack(ys).reshape(len(ys))
    except ValueError as exc:
        raise ConfigError(f"data loader {spec!r}: its items differ in shape ({exc})") from exc


def _task_of(y: npt.NDArray[np.generic]) -> Task:
    return "classification" if np.issubdtype(y.dtype, np.integer) else "regression"


# -- data: files ------------------------------------------------------------------------


def _read_npz(path: Path, task: Task | None) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise ConfigError(f"data file {path} is a single array; it must be an .npz")
            x_key = next((k for k in ("X", "x") if k in archive.files), None)
            y_key = next((k for k in ("y", "labels") if k in archive.files), None)
            if x_key is None or y_key is None:
                missing = "X" if x_key is None else "y"
                raise ConfigError(
                    f"data file {path} lacks array {missing!r} (it holds "
                    f"{', '.join(archive.files) or 'nothing'})"
                )
            X = np.asarray(archive[x_key])
            y = np.asarray(archive[y_key])
    except OSError as exc:
        raise ConfigError(f"cannot read data file {path}: {exc}") from exc
    except ValueError as exc:  # object arrays (pickle) and corrupt archives
        raise ConfigError(f"data file {path} is not a plain npz archive: {exc}") from exc
    return Dataset(X, y, task=task or _task_of(y), name=f"{path.name} (NPZ)")


def _column(names: list[str], label: str | int | None, path: Path) -> int:
    if label is None:
        return len(names) - 1
    if isinstance(label, int) and not isinstance(label, bool):
        if not -len(names) <= label < len(names):
            raise ConfigError(
                f"data file {path} has {len(names)} columns; label {label} is not one"
            )
        return label % len(names)
    if label not in names:
        raise ConfigError(
            f"data file {path} has no column {label!r} (its header names "
            f"{', '.join(map(repr, names[:8]))}{', ...' if len(names) > 8 else ''})"
        )
    return names.index(label)


def _show(cell: str) -> str:
    text = cell if len(cell) <= _SHOWN_CHARS else cell[: _SHOWN_CHARS - 3] + "..."
    return repr(text)


def _read_csv(
    path: Path, label: str | int | None
) -> tuple[list[str], npt.NDArray[np.float32], list[str], list[int]]:
    """The header, features, label cells and each row's line number of a CSV file."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            header = next(reader, None)
            while header is not None and not any(cell.strip() for cell in header):
                header = next(reader, None)
            if header is None:
                raise ConfigError(f"data file {path} is empty; a CSV needs a header row")
            names = [cell.strip() for cell in header]
            if all(_is_float(cell) for cell in names):
                raise ConfigError(
                    f"data file {path}, line {reader.line_num}: the first row holds numbers; "
                    "a CSV needs a header row naming its columns"
                )
            target = _column(names, label, path)
            features = [i for i in range(len(names)) if i != target]
            if not features:
                raise ConfigError(f"data file {path} has no feature columns besides the label")
            rows: list[list[float]] = []
            labels: list[str] = []
            lines: list[int] = []
            for row in reader:
                line = reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(names):
                    raise ConfigError(
                        f"data file {path}, line {line} has {len(row)} cells; the header has "
                        f"{len(names)}"
                    )
                values: list[float] = []
                for i in features:
                    cell = row[i].strip()
                    try:
                        value = float(cell)
                    except ValueError:
                        raise ConfigError(
                            f"data file {path}, line {line}, column {names[i]!r}: "
                            f"{_show(cell)} is not a number"
                        ) from None
                    if not math.isfinite(value):
                        raise ConfigError(
                            f"data file {path}, line {line}, column {names[i]!r}: "
                            f"{_show(cell)} is not a finite number"
                        )
                    values.append(value)
                rows.append(values)
                labels.append(row[target].strip())
                lines.append(line)
    except OSError as exc:
        raise ConfigError(f"cannot read data file {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"data file {path} is not UTF-8 text: {exc}") from exc
    except csv.Error as exc:
        raise ConfigError(f"data file {path} is not valid CSV: {exc}") from exc
    if not rows:
        raise ConfigError(f"data file {path} has a header but no rows")
    X = np.asarray(rows, dtype=np.float32)
    return [names[target], *(names[i] for i in features)], X, labels, lines


def _read_parquet(
    path: Path, label: str | int | None
) -> tuple[list[str], npt.NDArray[np.float32], list[str], list[int]]:
    try:
        import pyarrow.parquet as pq  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise ConfigError(
            f"data file {path} is Parquet, which needs pyarrow (pip install pyarrow)"
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow's own error types
        raise ConfigError(f"cannot read data file {path}: {exc}") from exc
    names = [str(name) for name in table.column_names]
    target = _column(names, label, path)
    columns: list[npt.NDArray[np.float32]] = []
    for i, name in enumerate(names):
        if i == target:
            continue
        try:
            columns.append(np.asarray(table.column(i).to_numpy(), dtype=np.float32))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"data file {path}, column {name!r} is not numeric: {exc}") from exc
    if not columns:
        raise ConfigError(f"data file {path} has no feature columns besides the label")
    labels = [str(v) for v in table.column(target).to_pylist()]
    # Parquet has no lines: a bad label is reported by its row, 1-based.
    return (
        [names[target], *(n for i, n in enumerate(names) if i != target)],
        np.stack(columns, axis=1),
        labels,
        list(range(1, len(labels) + 1)),
    )


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _tabular(
    path: Path,
    names: list[str],
    X: npt.NDArray[np.float32],
    cells: list[str],
    lines: list[int],
    task: Task | None,
    name: str,
) -> Dataset:
    """A table's label cells as int64 classes or float32 targets; ``names[0]`` is the label."""
    column = names[0]
    where = "row" if path.suffix.lower() == ".parquet" else "line"
    integers = all(_is_int(cell) for cell in cells)
    if task is None:
        task = "classification" if integers else "regression"
    y: npt.NDArray[np.int64] | npt.NDArray[np.float32]
    if integers:
        y = np.asarray([int(cell) for cell in cells], dtype=np.int64)
    else:
        values: list[float] = []
        for cell, line in zip(cells, lines, strict=True):
            try:
                value = float(cell)
            except ValueError:
                raise ConfigError(
                    f"data file {path}, {where} {line}, column {column!r}: {_show(cell)} is not "
                    "a number (map class names to integers 0..C-1 first)"
                ) from None
            if not math.isfinite(value) or (task == "classification" and value != round(value)):
                kind = "an integer class label" if task == "classification" else "a finite number"
                raise ConfigError(
                    f"data file {path}, {where} {line}, column {column!r}: {_show(cell)} is not "
                    f"{kind}"
                )
            values.append(value)
        y = np.asarray(values, dtype=np.float32)
    if task == "classification" and y.size and int(y.min()) < 0:
        line = lines[int(np.argmin(y))]
        raise ConfigError(
            f"data file {path}, {where} {line}, column {column!r}: class label {int(y.min())} is "
            "negative; labels must be integers 0..C-1"
        )
    return Dataset(X, y, task=task, name=f"{name}, label {column!r}")
