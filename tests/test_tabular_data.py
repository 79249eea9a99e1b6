"""Tabular data: loaders, bad input named clearly, stratified standardised splits."""

import numpy as np
import pandas as pd
import pytest
import torch

from mbrl_bilevel.tabular.data import from_arrays, load, load_bundled, load_csv, split
from mbrl_bilevel.validation import ConfigError


@pytest.mark.parametrize(
    "name, shape, classes",
    [("iris", (150, 4), 3), ("wine", (178, 13), 3), ("breast_cancer", (569, 30), 2)],
)
def test_bundled_datasets_load_offline(name, shape, classes):
    data = load_bundled(name)
    assert data.x.shape == shape and data.num_classes == classes
    assert set(np.unique(data.y)) == set(range(classes))


def test_split_is_stratified_disjoint_seeded_and_standardised_on_train():
    data = load_bundled("wine")
    splits = split(data, seed=3)
    sizes = [len(s) for s in (splits.train, splits.val, splits.test)]
    assert sum(sizes) == 178 and sizes[1] == pytest.approx(0.2 * 178, abs=2)
    frequencies = np.bincount(data.y) / len(data.y)
    for part in (splits.train, splits.val, splits.test):
        observed = torch.bincount(part.y, minlength=3).numpy() / len(part)
        assert np.abs(observed - frequencies).max() < 0.05
    assert splits.train.x.mean(0).abs().max() < 1e-5
    assert (splits.train.x.std(0, unbiased=False) - 1).abs().max() < 1e-4
    assert splits.test.x.mean(0).abs().max() > 1e-3  # test statistics were not used
    rows = [tuple(r) for s in (splits.train, splits.val, splits.test) for r in s.x.tolist()]
    assert len(set(rows)) == 178  # disjoint (wine has no duplicate rows)
    again, other = split(data, seed=3), split(data, seed=4)
    assert torch.equal(again.test.x, splits.test.x)
    assert not torch.equal(other.test.x, splits.test.x)


def test_labels_of_any_type_are_encoded():
    data = from_arrays(np.arange(12.0).reshape(6, 2), ["b", "a", "c", "a", "b", "c"])
    assert data.classes == ("a", "b", "c")
    assert data.y.tolist() == [1, 0, 2, 0, 1, 2]


@pytest.mark.parametrize(
    "x, y, message",
    [
        (
            [[1.0], [np.nan], [2.0], [3.0]],
            [0, 0, 1, 1],
            "1 NaN values; clean them or pass --impute mean",
        ),
        ([[1.0], [np.inf], [2.0], [3.0]], [0, 0, 1, 1], "inf"),
        ([["a"], ["b"], ["c"], ["d"]], [0, 0, 1, 1], "features must be numeric"),
        ([[1.0], [2.0], [3.0], [4.0]], [0, 0, 0, 1], "class 1 has a single sample"),
        ([[1.0], [2.0], [3.0]], [0, 0, 0], "at least 2 classes"),
        ([[1.0], [2.0], [3.0]], [0, 1], "shapes"),
        ([[1.0], [2.0], [3.0], [4.0]], [0.0, np.nan, 1.0, 1.0], "target has 1 NaN"),
    ],
)
def test_bad_arrays_are_named(x, y, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        from_arrays(np.array(x, dtype=object) if isinstance(x[0][0], str) else x, y)


def test_mean_imputation_uses_the_training_split_only():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2))
    y = np.repeat([0, 1], 20)
    x[5, 0] = np.nan
    data = from_arrays(x, y, impute="mean")
    splits = split(data, seed=0, val=0.25, test=0.25)
    assert all(torch.isfinite(s.x).all() for s in (splits.train, splits.val, splits.test))


def test_csv_round_trip_and_bad_csvs(tmp_path):
    frame = pd.DataFrame({"a": [1.0, 2, 3, 4, 5, 6], "b": [0.5] * 6, "label": list("xyxyxy")})
    path = tmp_path / "ok.csv"
    frame.to_csv(path, index=False)
    data = load_csv(path, "label")
    assert data.x.shape == (6, 2) and data.classes == ("x", "y") and data.name == "ok"
    with pytest.raises(ConfigError, match=r"no target column 'kind'; columns are \['a', 'b'"):
        load_csv(path, "kind")
    frame.assign(b=list("pqrstu")).to_csv(tmp_path / "text.csv", index=False)
    with pytest.raises(ConfigError, match=r"non-numeric feature columns \['b'\]"):
        load_csv(tmp_path / "text.csv", "label")
    with pytest.raises(ConfigError, match="cannot read CSV"):
        load_csv(tmp_path / "missing.csv", "label")


def test_uci_offline_gives_a_clear_message(monkeypatch):
    import ucimlrepo

    def offline(id):
        raise ConnectionError("Error connecting to server")

    monkeypatch.setattr(ucimlrepo, "fetch_ucirepo", offline)
    with pytest.raises(ConfigError, match=r"spambase \(id 94\).*network.*--csv PATH"):
        load("spambase")
    with pytest.raises(ConfigError, match="unknown dataset 'nope'"):
        load("nope")
