"""Plug-ins: import paths, data files (CSV, NPZ), and a user's own loaders and model factories."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from textwrap import dedent

import numpy as np
import numpy.typing as npt
import pytest
import torch

from fedtier.client.plugins import DataRequest, Dataset, load_data, load_model, load_object
from fedtier.client.trainers import NumpyLogRegTrainer, Trainer
from fedtier.protocol.errors import ConfigError

REQUEST = DataRequest(device="dev-1")
_names = itertools.count()


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A fresh module name in a folder outside the repository, on ``sys.path``."""
    folder = tmp_path / "userpkg"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    name = f"h10a_user_{next(_names)}"
    yield folder / f"{name}.py", name
    sys.modules.pop(name, None)


def _one_line(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# -- load_object -------------------------------------------------------------------------


def test_load_object_resolves_dotted_attributes(user_module: tuple[Path, str]) -> None:
    path, name = user_module
    path.write_text("class Box:\n    class Inner:\n        value = 7\n")
    assert load_object(f"{name}:Box.Inner.value", what="thing") == 7


def test_load_object_errors_are_one_sentence(user_module: tuple[Path, str]) -> None:
    path, name = user_module
    path.write_text("x = 1\n")
    with pytest.raises(ConfigError, match=r"model factory 'nowhere\.mod:f': module 'nowhere'") as e:
        load_object("nowhere.mod:f", what="model factory")
    _one_line(e)
    with pytest.raises(ConfigError, match=rf"data loader '{name}:load': {name} has no attribute"):
        load_object(f"{name}:load", what="data loader")
    with pytest.raises(ConfigError, match="is not an import path"):
        load_object("data/train.csv", what="data loader")
    path.write_text("raise RuntimeError('boom')\n")
    sys.modules.pop(name, None)
    with pytest.raises(ConfigError, match="failed with RuntimeError: boom") as e:
        load_object(f"{name}:x", what="model factory")
    _one_line(e)


# -- requests and datasets ---------------------------------------------------------------


def test_data_request_checks_its_place_in_the_fleet() -> None:
    assert DataRequest("d", index=2, count=3).split == "train"
    with pytest.raises(ConfigError, match="index 3 is outside a fleet of 3"):
        DataRequest("d", index=3, count=3)
    with pytest.raises(ConfigError, match="split 'dev'"):
        DataRequest("d", split="dev")


def test_dataset_coerces_and_checks() -> None:
    data = Dataset(np.ones((4, 2), np.float32), np.array([0, 1, 2, 1]))
    assert data.X.dtype == np.float32
    assert data.y.dtype == np.int64
    assert data.num_classes == 3
    assert data.num_features == 2
    assert len(data) == 4
    assert (
        Dataset(np.ones((2, 2), np.float32), np.array([0.0, 1.0])).y.dtype == np.int64
    )  # whole floats
    reg = Dataset(np.ones((2, 2), np.float32), np.array([0.5, 1]), task="regression")
    assert reg.y.dtype == np.dtype(np.float32)
    assert reg.num_classes is None
    with pytest.raises(ConfigError, match="fractional labels"):
        Dataset(np.ones((2, 2), np.float32), np.array([0.5, 1.0]))
    with pytest.raises(ConfigError, match="label -1"):
        Dataset(np.ones((2, 2), np.float32), np.array([-1, 1]))
    with pytest.raises(ConfigError, match=r"num_classes 2 allows 0\.\.1"):
        Dataset(np.ones((2, 2), np.float32), np.array([0, 2]), num_classes=2)
    with pytest.raises(ConfigError, match="example 1 are not finite"):
        Dataset(np.array([[1.0], [np.nan]], np.float32), np.array([0, 1]))
    with pytest.raises(ConfigError, match=r"holds X \(3, 2\) and y \(2,\)"):
        Dataset(np.ones((3, 2), np.float32), np.array([0, 1]))


# -- CSV ---------------------------------------------------------------------------------


def test_csv_with_integer_labels_is_classification(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,b,label\n1,2,0\n3,4.5,1\n\n5,6,2\n")
    data = load_data("d.csv", DataRequest("d", base_dir=tmp_path))
    assert data.task == "classification"
    assert data.X.tolist() == [[1, 2], [3, 4.5], [5, 6]]
    assert data.y.tolist() == [0, 1, 2]
    assert data.num_classes == 3
    assert "d.csv" in data.name
    assert "'label'" in data.name


def test_csv_with_float_labels_is_regression_and_label_picks_the_column(tmp_path: Path) -> None:
    path = tmp_path / "wine.csv"
    path.write_text("quality,acid,sugar\n5.5,0.7,1.9\n6,0.8,2.6\n")
    data = load_data(path, REQUEST, label="quality")
    assert data.task == "regression"
    assert data.y.dtype == np.float32
    assert data.y.tolist() == [5.5, 6.0]
    assert np.allclose(data.X, [[0.7, 1.9], [0.8, 2.6]])
    by_index = load_data(path, REQUEST, label=0)
    assert by_index.y.tolist() == [5.5, 6.0]
    # Integer quality scores are still a regression target when the config says so.
    path.write_text("acid,quality\n0.7,5\n0.8,6\n")
    assert load_data(path, REQUEST, task="regression").y.dtype == np.float32
    assert load_data(path, REQUEST).task == "classification"


def test_a_bad_csv_cell_names_the_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("a,b,y\n1,2,0\n3,oops,1\n")
    with pytest.raises(ConfigError) as e:
        load_data(path, REQUEST)
    assert _one_line(e) == f"data file {path}, line 3, column 'b': 'oops' is not a number"
    path.write_text("a,y\n1,0\n2,1,9\n")
    with pytest.raises(ConfigError, match=r"line 3 has 3 cells; the header has 2"):
        load_data(path, REQUEST)
    path.write_text("a,y\n1,0\n2,cat\n")
    with pytest.raises(ConfigError, match=r"line 3, column 'y': 'cat' is not a number \(map"):
        load_data(path, REQUEST)
    path.write_text("a,y\n1,0\n2,-1\n")
    with pytest.raises(ConfigError, match=r"line 3, column 'y': class label -1 is negative"):
        load_data(path, REQUEST)
    path.write_text("a,y\n1,0.5\n2,1\n")
    with pytest.raises(ConfigError, match=r"line 2, column 'y': '0.5' is not an integer class"):
        load_data(path, REQUEST, task="classification")
    path.write_text("a,y\ninf,0\n")
    with pytest.raises(ConfigError, match=r"line 2, column 'a': 'inf' is not a finite number"):
        load_data(path, REQUEST)


def test_csv_shape_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(ConfigError, match="line 1: the first row holds numbers; a CSV needs a"):
        load_data(path, REQUEST)
    path.write_text("a,b\n")
    with pytest.raises(ConfigError, match="has a header but no rows"):
        load_data(path, REQUEST)
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match=r"has no column 'label' \(its header names 'a', 'b'\)"):
        load_data(path, REQUEST, label="label")
    with pytest.raises(ConfigError, match="does not exist"):
        load_data(tmp_path / "missing.csv", REQUEST)
    (tmp_path / "x.txt").write_text("a\n")
    with pytest.raises(ConfigError, match=r"neither \.csv, \.npz nor \.parquet"):
        load_data(tmp_path / "x.txt", REQUEST)


def test_parquet_without_pyarrow_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whether or not pyarrow is installed here, the device install has none:
    # a None entry in sys.modules makes its import fail, as it would there.
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(ConfigError, match=r"needs pyarrow \(pip install pyarrow\)"):
        load_data(tmp_path / "d.parquet", REQUEST)


# -- NPZ ---------------------------------------------------------------------------------


def test_npz_keys_aliases_and_no_pickle(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", X=np.ones((3, 2)), y=np.array([0, 1, 1]))
    data = load_data(tmp_path / "a.npz", REQUEST)
    assert (data.task, data.num_classes) == ("classification", 2)
    np.savez(tmp_path / "b.npz", x=np.ones((2, 2)), labels=np.array([0.5, 1.5]))
    assert load_data(tmp_path / "b.npz", REQUEST).task == "regression"
    np.savez(tmp_path / "c.npz", X=np.array([{"a": 1}], dtype=object), y=np.arange(1))
    with pytest.raises(ConfigError, match="not a plain npz archive"):
        load_data(tmp_path / "c.npz", REQUEST)
    np.savez(tmp_path / "d.npz", features=np.ones((2, 2)))
    with pytest.raises(ConfigError, match="lacks array 'X' \\(it holds features\\)"):
        load_data(tmp_path / "d.npz", REQUEST)
    with pytest.raises(ConfigError, match="names a table column"):
        load_data(tmp_path / "a.npz", REQUEST, label="y")


# -- loaders -----------------------------------------------------------------------------

LOADERS = dedent(
    """
    import numpy as np
    import torch
    from fedtier.client.plugins import Dataset

    def arrays(request, scale=1.0):
        # Each device of the fleet gets its own shard of 10 rows.
        start = request.index * 10
        X = np.arange(start, start + 10, dtype=np.float32).reshape(10, 1)
        return X * scale, (X[:, 0] > start + 4).astype(np.int64)

    def dataset(request):
        return Dataset(np.ones((2, 3)), np.array([0.5, 1.5]), task="regression", name="mine")

    def tensors(request):
        return torch.utils.data.TensorDataset(torch.ones(5, 2), torch.arange(5) % 2)

    def nothing(request):
        return 42
    """
)


def test_a_loader_in_the_users_module_gets_the_request(user_module: tuple[Path, str]) -> None:
    path, name = user_module
    path.write_text(LOADERS)
    shard = load_data(f"{name}:arrays", DataRequest("d", index=2, count=4), args={"scale": 2.0})
    assert shard.X[:, 0].tolist() == [2.0 * v for v in range(20, 30)]
    assert shard.y.tolist() == [0] * 5 + [1] * 5
    assert shard.name == f"{name}:arrays"
    mine = load_data(f"{name}:dataset", REQUEST)
    assert (mine.name, mine.task) == ("mine", "regression")
    with pytest.raises(ConfigError, match="returned a regression dataset; the config says"):
        load_data(f"{name}:dataset", REQUEST, task="classification")
    with pytest.raises(ConfigError, match="returned a int; expected a Dataset"):
        load_data(f"{name}:nothing", REQUEST)


def test_a_torch_dataset_is_read_into_arrays(user_module: tuple[Path, str]) -> None:
    path, name = user_module
    path.write_text(LOADERS)
    data = load_data(f"{name}:tensors", REQUEST)
    assert data.X.shape == (5, 2)
    assert data.y.tolist() == [0, 1, 0, 1, 0]
    assert data.task == "classification"


def test_a_loader_callable_works_as_its_spec() -> None:
    def load(request: DataRequest) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        return np.ones((2, 2)), np.array([0, 1])

    assert load_data(load, REQUEST).num_classes == 2


def test_loader_args_it_does_not_take_are_one_sentence_its_own_errors_are_not() -> None:
    def load(request: DataRequest, *, rows: int = 2) -> tuple[npt.NDArray[np.float64], list[int]]:
        if rows < 0:
            raise TypeError("the loader's own bug")
        return np.ones((rows, 2)), [0, 1] * (rows // 2)

    assert len(load_data(load, REQUEST, args={"rows": 4})) == 4
    with pytest.raises(ConfigError, match=r"does not take the args \['colums'\]"):
        load_data(load, REQUEST, args={"colums": 3})
    with pytest.raises(TypeError, match="the loader's own bug"):
        load_data(load, REQUEST, args={"rows": -1})


# -- models ------------------------------------------------------------------------------

FACTORIES = dedent(
    """
    import torch
    from fedtier.client.trainers import NumpyLogRegTrainer

    def net(width=4, dataset=None):
        inputs = dataset.num_features if dataset is not None else 3
        return torch.nn.Sequential(torch.nn.Linear(inputs, width), torch.nn.Linear(width, 2))

    def plain():
        return torch.nn.Linear(3, 1)

    def trainer(dataset):
        return NumpyLogRegTrainer(dataset.num_features, 2, dataset.X, dataset.y)

    def wrong():
        return "a model"
    """
)


def test_a_factory_in_the_users_module_builds_a_module(user_module: tuple[Path, str]) -> None:
    path, name = user_module
    path.write_text(FACTORIES)
    module = load_model(f"{name}:net", args={"width": 6})
    assert isinstance(module, torch.nn.Sequential)
    assert module[0].in_features == 3
    data = Dataset(np.ones((2, 5), np.float32), np.array([0, 1]))
    sized = load_model(f"{name}:net", dataset=data)
    assert isinstance(sized, torch.nn.Sequential)
    assert sized[0].in_features == 5  # the factory asked for the dataset
    assert isinstance(load_model(f"{name}:plain", dataset=data), torch.nn.Linear)
    made = load_model(f"{name}:trainer", dataset=data)
    assert isinstance(made, Trainer)


def test_bad_model_specs_are_one_sentence(user_module: tuple[Path, str]) -> None:
    path, name = user_module
    path.write_text(FACTORIES)
    with pytest.raises(ConfigError, match=r"returned a str; expected a torch\.nn\.Module") as e:
        load_model(f"{name}:wrong")
    _one_line(e)
    with pytest.raises(ConfigError, match=rf"'{name}:plain' rejects its args \['width'\]"):
        load_model(f"{name}:plain", args={"width": 3})
    with pytest.raises(ConfigError, match="neither 'logreg' nor 'mlp' nor an import path"):
        load_model("resnet")
    with pytest.raises(ConfigError, match="module 'nowhere' cannot be found"):
        load_model("nowhere:make")


def test_builtin_models() -> None:
    data = Dataset(np.ones((4, 6), np.float32), np.array([0, 1, 2, 0]))
    mlp = load_model("mlp", args={"hidden": 5}, dataset=data)
    assert isinstance(mlp, torch.nn.Sequential)
    assert [tuple(p.shape) for p in mlp.parameters()] == [(5, 6), (5,), (3, 5), (3,)]
    sized = load_model("mlp", args={"in_features": 2, "num_classes": 4})
    assert isinstance(sized, torch.nn.Sequential)
    regression = Dataset(np.ones((2, 6), np.float32), np.array([0.5, 1.0]), task="regression")
    one_out = load_model("mlp", dataset=regression)
    assert isinstance(one_out, torch.nn.Sequential)
    assert one_out[2].out_features == 1
    with pytest.raises(ConfigError, match="needs args in_features and num_classes"):
        load_model("mlp")
    with pytest.raises(ConfigError, match="has no arg 'depth'"):
        load_model("mlp", args={"depth": 3}, dataset=data)
    logreg = load_model("logreg", dataset=data)
    assert isinstance(logreg, NumpyLogRegTrainer)
    assert logreg.layout.num_params == 3 * 6 + 3
    evaluator = load_model("logreg", args={"num_features": 6, "num_classes": 3})
    assert isinstance(evaluator, NumpyLogRegTrainer)
    with pytest.raises(ConfigError, match="logreg' classifies"):
        load_model("logreg", dataset=regression)
