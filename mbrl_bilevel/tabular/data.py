"""Classification data for the tabular study: loaders, checks and seeded splits.

Sources: scikit-learn's bundled iris, wine, breast_cancer and digits (offline); any CSV file
with a named target column; (X, y) arrays; UCI datasets by id through ucimlrepo (needs the
network). Every source ends in a checked `TabularData`; `split` makes stratified, standardised
train/val/test `Dataset`s from a seed, with every statistic fit on the training split only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.validation import ConfigError

BUNDLED = ("iris", "wine", "breast_cancer", "digits")
UCI_IDS = {"credit_default": 350, "spambase": 94, "poker": 158}
IMPUTE = ("none", "mean")


@dataclass(frozen=True)
class TabularData:
    """Features x [N, F] (float64, NaN allowed only for imputation) and class indices y [N]."""

    name: str
    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    """Original label of each class index."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_features(self) -> int:
        return self.x.shape[1]


def from_arrays(x, y, name: str = "arrays", impute: str = "none") -> TabularData:
    """Check and encode features x [N, F] and labels y [N] (any hashable values).

    Raises ConfigError for non-numeric features, NaN or inf (unless impute="mean", which fills
    NaN with the training-split mean in `split`), fewer than 2 classes, or a class with fewer
    than 2 samples (a stratified split needs two).
    """
    if impute not in IMPUTE:
        raise ConfigError(f"unknown imputation {impute!r}; choose one of {IMPUTE}")
    try:
        features = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{name}: features must be numeric; encode categorical columns first"
        ) from None
    labels = np.asarray(y)
    if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
        raise ConfigError(
            f"{name}: need x [N, F] and y [N], got shapes {features.shape} and {labels.shape}"
        )
    if features.shape[0] == 0 or features.shape[1] == 0:
        raise ConfigError(f"{name}: the data is empty (shape {features.shape})")
    if np.isinf(features).any():
        raise ConfigError(f"{name}: features have {int(np.isinf(features).sum())} inf values")
    missing = int(np.isnan(features).sum())
    if missing and impute == "none":
        raise ConfigError(
            f"{name}: features have {missing} NaN values; clean them or pass --impute mean"
        )
    if labels.dtype.kind == "f" and np.isnan(labels).any():
        raise ConfigError(f"{name}: the target has {int(np.isnan(labels).sum())} NaN values")
    if labels.dtype == object and any(v is None or v != v for v in labels):
        raise ConfigError(f"{name}: the target has missing values")
    classes, index = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ConfigError(f"{name}: need at least 2 classes, found {len(classes)}")
    counts = np.bincount(index)
    if counts.min() < 2:
        rare = [str(classes[k]) for k in np.flatnonzero(counts < 2)]
        raise ConfigError(
            f"{name}: class {', '.join(rare)} has a single sample; a stratified split needs "
            "at least 2 per class (drop or merge it)"
        )
    return TabularData(name, features, index.astype(np.int64), tuple(str(c) for c in classes))


def load_bundled(name: str) -> TabularData:
    """One of scikit-learn's bundled datasets (no network)."""
    from sklearn import datasets

    if name not in BUNDLED:
        raise ConfigError(f"unknown bundled dataset {name!r}; choose one of {BUNDLED}")
    x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    return from_arrays(x, y, name)


def load_csv(path: str | Path, target: str, impute: str = "none") -> TabularData:
    """A CSV file with a header row: column `target` holds the labels, all others the features."""
    import pandas as pd

    path = Path(path)
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read CSV {str(path)!r}: {error}") from None
    if not target:
        raise ConfigError("--csv needs --target COLUMN, the name of the label column")
    if target not in frame.columns:
        raise ConfigError(
            f"{path.name}: no target column {target!r}; columns are {list(frame.columns)}"
        )
    features = frame.drop(columns=[target])
    text = [c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if text:
        raise ConfigError(
            f"{path.name}: non-numeric feature columns {text}; encode them as numbers first"
        )
    return from_arrays(features.to_numpy(), frame[target].to_numpy(), path.stem, impute)


def load_uci(key: str | int, impute: str = "none") -> TabularData:
    """A UCI dataset by name (credit_default, spambase, poker) or numeric id, via ucimlrepo."""
    uci_id = UCI_IDS.get(str(key)) or (int(key) if str(key).isdigit() else None)
    if uci_id is None:
        raise ConfigError(f"unknown UCI dataset {key!r}; use an id or one of {sorted(UCI_IDS)}")
    from ucimlrepo import fetch_ucirepo

    try:
        repo = fetch_ucirepo(id=uci_id)
    except Exception as error:  # ucimlrepo raises ConnectionError, ValueError, URLError ...
        raise ConfigError(
            f"cannot download UCI dataset {key} (id {uci_id}): {error}. This needs network "
            "access to archive.ics.uci.edu; offline, export it to CSV and use --csv PATH "
            "--target COLUMN"
        ) from None
    targets = repo.data.targets
    if targets is None or targets.shape[1] != 1:
        raise ConfigError(f"UCI dataset {uci_id} has no single target column")
    name = str(key) if str(key) in UCI_IDS else f"uci{uci_id}"
    return from_arrays(repo.data.features.to_numpy(), targets.iloc[:, 0].to_numpy(), name, impute)


def load(dataset: str, csv: str = "", target: str = "", impute: str = "none") -> TabularData:
    """Resolve the CLI's --dataset / --csv: a bundled name, a UCI name, 'uci:<id>', or a CSV."""
    if csv:
        return load_csv(csv, target, impute)
    if dataset in BUNDLED:
        return load_bundled(dataset)
    if dataset in UCI_IDS or dataset.startswith("uci:"):
        return load_uci(dataset.removeprefix("uci:"), impute)
    raise ConfigError(
        f"unknown dataset {dataset!r}; choose all, one of {BUNDLED}, one of {sorted(UCI_IDS)}, "
        "uci:<id>, or pass --csv PATH --target COLUMN"
    )


@dataclass(frozen=True)
class Splits:
    """Standardised train/val/test splits (float32 features, int64 labels)."""

    train: Dataset
    val: Dataset
    test: Dataset


def split(data: TabularData, seed: int, val: float = 0.2, test: float = 0.2) -> Splits:
    """Stratified train/val/test split from `seed`; imputation (NaN -> training mean) and
    standardisation are fit on the training split only."""
    from sklearn.impute import SimpleImputer
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    if not (0 < val and 0 < test and val + test < 1):
        raise ConfigError(f"val and test fractions must be > 0 and sum to < 1, got {val}, {test}")
    index = np.arange(len(data.y))
    try:
        rest, test_index = train_test_split(
            index, test_size=test, stratify=data.y, random_state=seed
        )
        train_index, val_index = train_test_split(
            rest, test_size=val / (1 - test), stratify=data.y[rest], random_state=seed
        )
    except ValueError as error:
        raise ConfigError(f"{data.name}: cannot make a stratified split: {error}") from None
    imputer = SimpleImputer(strategy="mean", keep_empty_features=True).fit(data.x[train_index])
    scaler = StandardScaler().fit(imputer.transform(data.x[train_index]))

    def part(rows: np.ndarray) -> Dataset:
        x = scaler.transform(imputer.transform(data.x[rows]))
        return Dataset(torch.tensor(x, dtype=torch.float32), torch.as_tensor(data.y[rows]))

    return Splits(part(train_index), part(val_index), part(test_index))
