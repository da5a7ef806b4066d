"""``fedtier model`` and the central's evaluator, end to end on a central with an in-memory bus."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import trio
from trio.testing import MockClock

from fedtier import _evaluation
from fedtier.cli import main
from fedtier.client.evaluation import METRICS, HeldOutEvaluator, metrics_from_outputs, predict
from fedtier.client.plugins import Dataset
from fedtier.client.torch_state import layout_for_module
from fedtier.client.torch_trainer import TorchTrainer
from fedtier.protocol.bus import MemoryBroker, MemoryBus
from fedtier.protocol.codecs import decode
from fedtier.protocol.envelope import open_envelope
from fedtier.protocol.errors import ConfigError
from fedtier.protocol.files import save_public_key, save_signing_identity
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import ModelLayout
from fedtier.protocol.messages import ModelAnnouncement, ModelBlob, Tier
from fedtier.tiers.aggregate import Accumulator
from fedtier.tiers.central import CentralDaemon
from fedtier.tiers.config import EVALUATION_METRICS, CentralConfig, load_config, load_initial_model
from fedtier.tiers.model_registry import MemoryModelRegistry
from fedtier.tiers.registry import KeyRegistry, TierKeys
from fedtier.tiers.store import read_stored_version
from fedtier.tiers.testing import sign_partial

FLEET = "acme"
REGIONAL = SigningIdentity.from_seed(b"\x33" * 32)
MODULE = "fedtier_test_usermodels"
# A user's own model module, outside the repository: a factory with BatchNorm.
USER_MODELS = """
import torch


def make_model(hidden=8, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Linear(4, hidden),
            torch.nn.BatchNorm1d(hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, 3),
        )
"""


@pytest.fixture
def user_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    yield folder
    sys.modules.pop(MODULE, None)


def make_model(hidden: int = 8) -> Any:
    """The user's factory's model (a torch module), imported as fedtier imports it."""
    return importlib.import_module(MODULE).make_model(hidden=hidden)


def write_heldout(path: Path, rows: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    X = rng.standard_normal((rows, 4)).astype(np.float32)
    y = rng.integers(0, 3, rows)
    lines = ["f0,f1,f2,f3,label"]
    lines += [",".join([*(f"{v:.6f}" for v in x), str(int(c))]) for x, c in zip(X, y, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return np.loadtxt(path, delimiter=",", skiprows=1, usecols=range(4), dtype=np.float32), y


def write_central(folder: Path, *, evaluation: bool = True) -> tuple[Path, SigningIdentity]:
    identity = SigningIdentity.from_seed(b"\x01" * 32)
    (folder / "keys").mkdir()
    save_signing_identity(identity, folder / "keys" / "central.key")
    save_public_key(identity.verify_key, folder / "keys" / "central.pub")
    text = f"""
fleet = "{FLEET}"
identity_key = "keys/central.key"
state_dir = "state"

[keys]
central = "keys/central.pub"

[model]
initial = "init.npz"

[flush]
max_inputs = 1
max_age_s = false
"""
    if evaluation:
        text += f"""
[evaluation]
model = "{MODULE}:make_model"
data = "heldout.csv"
label = "label"
metrics = ["accuracy", "loss"]
"""
    path = folder / "central.toml"
    path.write_text(text)
    return path, identity


def central_daemon(
    config: CentralConfig,
    identity: SigningIdentity,
    broker: MemoryBroker,
    registry: MemoryModelRegistry,
) -> CentralDaemon:
    keys = TierKeys(
        identity,
        KeyRegistry.from_keys({"regional-0": REGIONAL.verify_key}, role="regional"),
        identity.verify_key,
    )
    return CentralDaemon(
        config,
        nats=MemoryBus(broker),
        registry=registry,
        keys=keys,
        store_in_thread=False,
        evaluator=_evaluation.build_evaluator(config),
    )


def partial(layout: ModelLayout, seed: int, known_version: int) -> bytes:
    rng = np.random.default_rng(seed)
    acc = Accumulator(layout.num_params)
    acc.fold_update(
        seed.to_bytes(16, "big"),
        (0.1 * rng.standard_normal(layout.num_params)).astype(np.float32),
        n_samples=4,
        tau=0,
        discount=1.0,
        base_version=known_version,
    )
    return sign_partial(
        REGIONAL, FLEET, layout, acc, tier=Tier.REGIONAL, known_version=known_version, seq=seed
    )[1]


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    result: dict[str, object] = json.loads(capsys.readouterr().out)
    return result


def fails(argv: list[str], capsys: pytest.CaptureFixture[str], status: int = 2) -> str:
    assert main(argv) == status
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err + captured.out


async def current(registry: MemoryModelRegistry, key: SigningIdentity) -> tuple[int, np.ndarray]:
    keys = {key.key_id: key.verify_key}
    pointer_bytes = await registry.current_pointer()
    assert pointer_bytes is not None
    pointer = open_envelope(pointer_bytes, keys).message
    assert isinstance(pointer, ModelAnnouncement)
    blob_bytes = await registry.blob(pointer.version)
    assert blob_bytes is not None
    envelope = open_envelope(blob_bytes, keys)
    blob = envelope.message
    assert isinstance(blob, ModelBlob)
    return pointer.version, decode(envelope.payload, blob.codec, blob.num_params)


# -- model init -------------------------------------------------------------------------


@pytest.mark.parametrize("batchnorm", ["local", "global"])
def test_model_init_writes_the_layout_the_trainer_uses(
    batchnorm: str,
    tmp_path: Path,
    user_models: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "init.npz"
    info = run_json(
        [
            "model", "init", "--model", f"{MODULE}:make_model", "--args", '{"hidden": 6}',
            "--batchnorm", batchnorm, "--out", str(out),
        ],
        capsys,
    )  # fmt: skip
    layout, params = load_initial_model(out)  # what the central reads
    trainer = TorchTrainer(make_model(hidden=6), batchnorm=batchnorm)  # type: ignore[arg-type]
    assert layout == trainer.layout
    assert layout == layout_for_module(make_model(hidden=6), batchnorm=batchnorm)  # type: ignore[arg-type]
    np.testing.assert_array_equal(params, trainer.initial_params())
    assert info["layout_fingerprint"] == layout.fingerprint.hex()
    names = [t.name for t in layout.tensors]
    if batchnorm == "local":  # FedBN: the BatchNorm tensors stay on devices
        assert names == ["0.weight", "0.bias", "3.weight", "3.bias"]
        assert info["local"] == [
            "1.weight", "1.bias", "1.running_mean", "1.running_var",
        ]  # fmt: skip
    else:
        assert "1.running_mean" in names
        assert "1.num_batches_tracked" not in names  # integer buffers never travel
    # An existing file is not replaced without --force.
    err = fails(["model", "init", "--model", f"{MODULE}:make_model", "--out", str(out)], capsys)
    assert "refusing to overwrite" in err


def test_model_init_sizes_a_builtin_from_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_heldout(tmp_path / "train.csv")
    out = tmp_path / "mlp.npz"
    info = run_json(
        [
            "model", "init", "--model", "mlp", "--args", '{"hidden": 5}',
            "--data", str(tmp_path / "train.csv"), "--label", "label", "--out", str(out),
        ],
        capsys,
    )  # fmt: skip
    layout, _ = load_initial_model(out)
    assert [t.shape for t in layout.tensors] == [(5, 4), (5,), (3, 5), (3,)]
    assert info["num_params"] == layout.num_params
    err = fails(
        ["model", "init", "--model", "mlp", "--args", "[1]", "--out", str(out), "--force"], capsys
    )
    assert "JSON object" in err


# -- evaluation ---------------------------------------------------------------------------


def test_the_client_computes_every_metric_the_central_knows() -> None:
    assert set(METRICS) == set(EVALUATION_METRICS)


def test_metrics_from_outputs() -> None:
    y = np.array([0, 1, 2, 1])
    logits = np.array([[3.0, 0, 0], [0, 2, 0], [0, 0, 1], [5, 0, 0]])
    got = metrics_from_outputs(logits, y, "classification", ["accuracy", "loss"])
    assert got["accuracy"] == 0.75
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert got["loss"] == pytest.approx(-log_probs[np.arange(4), y].mean())
    targets = np.array([1.0, 2.0, 3.0, 4.0])
    pred = np.array([[1.5], [2.0], [2.5], [4.0]])
    got = metrics_from_outputs(pred, targets, "regression", ["r2", "mse", "mae", "rmse"])
    assert got["mse"] == pytest.approx(0.125)
    assert got["r2"] == pytest.approx(1 - 0.5 / 5.0)
    assert got["mae"] == pytest.approx(0.25)
    assert got["rmse"] == pytest.approx(0.125**0.5)
    with pytest.raises(ConfigError, match="does not apply"):
        metrics_from_outputs(pred, targets, "regression", ["accuracy"])


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ('model = "mlp"\ndata = "d.csv"\nmetrics = ["f1"]', "'f1' is not one of"),
        (
            'model = "mlp"\ndata = "d.csv"\ntask = "classification"\nmetrics = ["r2"]',
            "'r2' does not apply to classification",
        ),
        (
            'model = "mlp"\ndata = "d.csv"\nmetrics = ["r2"]\n'
            'target = { metric = "mse", value = 0.1 }',
            "'mse' is not among the evaluated metrics",
        ),
        ('model = "mlp"\ndata = "d.csv"\nevery_versions = 0', "every_versions"),
        ('model = "mlp"\ndata = "d.csv"\nwhen = 3', "unknown key 'when'"),
        ('data = "d.csv"', "evaluation.model is missing"),
    ],
)
def test_evaluation_table_errors_are_one_sentence(tmp_path: Path, table: str, error: str) -> None:
    path, _ = write_central(tmp_path, evaluation=False)
    path.write_text(path.read_text() + "\n[evaluation]\n" + table + "\n")
    with pytest.raises(ConfigError, match=error):
        load_config("central", path)


def test_evaluation_table_paths_and_loaders(tmp_path: Path) -> None:
    path, _ = write_central(tmp_path, evaluation=False)
    base = path.read_text()
    path.write_text(
        base + '\n[evaluation]\nmodel = "mlp"\nargs = { hidden = 4 }\ndata = "data/test.csv"\n'
        'label = 0\nevery_versions = 5\ntarget = { metric = "accuracy", value = 0.9 }\n'
    )
    config = load_config("central", path)
    assert isinstance(config, CentralConfig)
    settings = config.evaluation
    assert settings is not None
    assert settings.data == str(tmp_path / "data" / "test.csv")  # relative to the file
    assert settings.args == {"hidden": 4}
    assert settings.label == 0
    assert (settings.every_versions, settings.metrics) == (5, ())
    assert settings.target is not None
    assert settings.target.describe() == "accuracy >= 0.9"
    assert settings.target.reached_by({"accuracy": 0.9})
    assert not settings.target.reached_by({"loss": 0.1})
    assert settings.evaluates(10)
    assert not settings.evaluates(11)
    path.write_text(base + '\n[evaluation]\nmodel = "mlp"\ndata = "my.data:load_test"\n')
    config = load_config("central", path)
    assert isinstance(config, CentralConfig)
    assert config.evaluation is not None
    assert config.evaluation.data == "my.data:load_test"  # a loader stays an import path
    assert config.evaluation.base_dir == tmp_path


def test_a_model_that_does_not_fit_the_central_is_a_start_up_error(
    tmp_path: Path, user_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = write_central(tmp_path)
    write_heldout(tmp_path / "heldout.csv")
    args = ["--model", f"{MODULE}:make_model", "--args", '{"hidden": 5}']
    run_json(["model", "init", *args, "--out", str(tmp_path / "init.npz")], capsys)
    config = load_config("central", path)
    with pytest.raises(ConfigError, match=r"\[evaluation\] model .* does not fit"):
        _evaluation.build_evaluator(config)  # the factory's default is hidden=8


def test_fedtier_central_hands_the_daemon_its_evaluator(
    tmp_path: Path,
    user_models: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import fedtier.tiers.daemon

    path, _ = write_central(tmp_path)
    run_json(
        ["model", "init", "--model", f"{MODULE}:make_model", "--out", str(tmp_path / "init.npz")],
        capsys,
    )
    given: list[object] = []

    async def serve_daemon(kind: str, config: object, **options: object) -> None:
        given.append(options["evaluator"])

    monkeypatch.setattr(fedtier.tiers.daemon, "serve_daemon", serve_daemon)
    monkeypatch.setattr(fedtier.tiers.daemon, "configure_logging", lambda: None)
    (tmp_path / "heldout.csv").write_text("f0,f1,f2,f3,label\n0,0,0,0,1\n1,1,1,1,2\n")
    assert main(["central", "--config", str(path)]) == 0
    [evaluator] = given
    assert isinstance(evaluator, HeldOutEvaluator)
    assert evaluator.metrics == ("accuracy", "loss")
    # Held-out data that cannot be read is a configuration error, before anything starts.
    (tmp_path / "heldout.csv").unlink()
    assert main(["central", "--config", str(path)]) == 2
    assert len(given) == 1


async def test_versions_are_evaluated_listed_shown_exported_and_rolled_back(
    tmp_path: Path,
    user_models: Path,
    capsys: pytest.CaptureFixture[str],
    autojump_clock: MockClock,
) -> None:
    path, identity = write_central(tmp_path)
    X, y = write_heldout(tmp_path / "heldout.csv")
    run_json(
        ["model", "init", "--model", f"{MODULE}:make_model", "--out", str(tmp_path / "init.npz")],
        capsys,
    )
    config = load_config("central", path)
    assert isinstance(config, CentralConfig)
    layout, _ = load_initial_model(config.initial_model)
    broker, registry = MemoryBroker("nats"), MemoryModelRegistry()
    source = ["--config", str(path)]

    async with trio.open_nursery() as nursery:
        central = central_daemon(config, identity, broker, registry)
        await nursery.start(central.serve)
        for version in (0, 1):
            await MemoryBus(broker).publish(
                central.subjects.to_central(), partial(layout, 10 + version, version)
            )
            await trio.sleep(0.1)
        assert central.version == 2
        assert central.evaluation_failures == 0
        _, params2 = await current(registry, identity)
        # An offline rollback is refused while the central runs.
        err = fails(["model", "rollback", "1", *source], capsys)
        assert "stop the central first" in err
        nursery.cancel_scope.cancel()

    # Every version was evaluated on the held-out CSV with the same factory.
    listed = run_json(["model", "list", *source], capsys)
    versions = listed["versions"]
    assert isinstance(versions, list)
    assert [v["version"] for v in versions] == [0, 1, 2]
    assert all(set(v["metrics"]) == {"accuracy", "loss"} for v in versions)
    expected = HeldOutEvaluator(make_model(), Dataset(X, y), metrics=("accuracy", "loss"))
    assert versions[2]["metrics"] == pytest.approx(expected.score(params2, layout))
    assert versions[2]["update_count"] == 1

    shown = run_json(["model", "show", "2", *source], capsys)
    assert str(shown["signature"]).startswith("valid")
    assert shown["layout_fingerprint"] == layout.fingerprint.hex()
    assert shown["update_count"] == shown["lineage_ids"] == 1
    assert shown["model_file_state"] == "same bytes as the store"
    unchecked = run_json(["model", "show", "latest", "--state-dir", str(config.state_dir)], capsys)
    assert str(unchecked["signature"]).startswith("not checked")

    # pt: a plain state_dict; plain torch gives the predictions fedtier gives.
    pt = tmp_path / "v2.pt"
    exported = run_json(
        ["model", "export", "2", *source, "--format", "pt", "--out", str(pt),
         "--model", f"{MODULE}:make_model"],
        capsys,
    )  # fmt: skip
    assert exported["factory_values"] == [
        "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
    ]  # fmt: skip
    plain = make_model()
    plain.load_state_dict(torch.load(pt, weights_only=True))
    plain.eval()
    with torch.no_grad():
        torch_out = plain(torch.from_numpy(X)).numpy()
    fedtier_out = predict(make_model(), params2, layout, X)
    np.testing.assert_allclose(torch_out, fedtier_out, rtol=1e-6, atol=1e-6)
    # npz: the version's own tensors, by name.
    npz = tmp_path / "v2.npz"
    run_json(["model", "export", "2", *source, "--format", "npz", "--out", str(npz)], capsys)
    with np.load(npz, allow_pickle=False) as data:
        assert list(data.files) == [t.name for t in layout.tensors]
        for name, array in layout.unflatten(params2).items():
            np.testing.assert_array_equal(data[name], array)
    st = tmp_path / "v2.safetensors"
    st_args = ["model", "export", "2", *source, "--format", "safetensors", "--out", str(st)]
    if importlib.util.find_spec("safetensors") is None:
        err = fails(st_args, capsys)
        assert err.count("\n") == 1
        assert "pip install safetensors" in err
    else:
        run_json(st_args, capsys)
        from safetensors.numpy import load_file  # type: ignore[import-not-found, unused-ignore]

        loaded = load_file(str(st))
        for name, array in layout.unflatten(params2).items():
            np.testing.assert_array_equal(loaded[name], array)
    err = fails(
        ["model", "export", "2", "--state-dir", str(config.state_dir), "--format", "npz",
         "--out", str(tmp_path / "x.npz")],
        capsys,
    )  # fmt: skip
    assert "give --config or --central-key" in err

    # Rollback to v1: a new version v3 with v1's parameters, published at the next start.
    params1 = decode_stored(config, identity, 1)
    rolled = run_json(["model", "rollback", "1", *source], capsys)
    assert rolled == {"version": 3, "rollback_of": 1, "previous": 2}
    async with trio.open_nursery() as nursery:
        central = central_daemon(config, identity, broker, registry)
        await nursery.start(central.serve)
        await trio.sleep(0.1)
        assert central.version == 3
        version, params3 = await current(registry, identity)
        assert version == 3
        np.testing.assert_array_equal(params3, params1)
        # The next version steps from the rolled-back parameters.
        await MemoryBus(broker).publish(central.subjects.to_central(), partial(layout, 20, 3))
        await trio.sleep(0.1)
        assert central.version == 4
        nursery.cancel_scope.cancel()
    v3 = read_stored_version(config.store_path, 3)
    assert v3.rollback_of == 1
    assert v3.record.update_count == 0
    assert set(v3.metrics) == {"accuracy", "loss"}  # evaluated at start
    assert v3.metrics == pytest.approx(read_stored_version(config.store_path, 1).metrics)
    assert main(["model", "list", *source]) == 0
    table = capsys.readouterr().out
    assert "(rollback of v1)" in table
    assert table.count("accuracy") == 5  # v0 to v4
    assert main(["model", "show", "3", *source]) == 0
    text = capsys.readouterr().out
    assert "rollback of  v1" in text
    assert "signature    valid" in text
    err = fails(["model", "rollback", "4", *source], capsys)
    assert "current version already" in err
    err = fails(["model", "rollback", "9", *source], capsys)
    assert "v9 is not in state store" in err

    # A tampered blob is refused by export, and shown as invalid.
    conn = sqlite3.connect(config.store_path)
    with conn:
        (blob,) = conn.execute("SELECT blob FROM model_versions WHERE version = 2").fetchone()
        tampered = bytes(blob[:-1]) + bytes([blob[-1] ^ 0x01])
        conn.execute("UPDATE model_versions SET blob = ? WHERE version = 2", (tampered,))
    conn.close()
    out = tmp_path / "tampered.npz"
    err = fails(["model", "export", "2", *source, "--format", "npz", "--out", str(out)], capsys)
    assert "fails its checks" in err
    assert not out.exists()
    assert "INVALID" in fails(["model", "show", "2", *source], capsys, status=1)


def decode_stored(config: CentralConfig, identity: SigningIdentity, version: int) -> np.ndarray:
    stored = read_stored_version(config.store_path, version)
    envelope = open_envelope(stored.record.blob, {identity.key_id: identity.verify_key})
    blob = envelope.message
    assert isinstance(blob, ModelBlob)
    return decode(envelope.payload, blob.codec, blob.num_params)
