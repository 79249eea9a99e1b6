"""The tabular study: every (dataset, seed, method) from one shared initialisation per seed, test
metrics as mean ± std over seeds, learning curves, and the run folder."""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass

import torch
from torch.utils.tensorboard import SummaryWriter

from mbrl_bilevel.parallel import map_seeds
from mbrl_bilevel.tabular.data import BUNDLED, IMPUTE, TabularData, load, split
from mbrl_bilevel.tabular.methods import (
    METHODS,
    MODELS,
    SOLVER_METHODS,
    MethodOptions,
    beta_star,
    make_model,
    train_method,
)
from mbrl_bilevel.tabular.metrics import METRICS, evaluate_classifier
from mbrl_bilevel.validation import ConfigError, check_positive


@dataclass(frozen=True)
class TabularConfig:
    """The tabular classification study: NLL vs PG under β = 1, β*, a plug-in and a bilevel reward."""

    dataset: str = "wine"
    """iris, wine, breast_cancer, digits, all (those four); credit_default, spambase, poker, uci:<id> (online)."""
    csv: str = ""
    """Path of a CSV file with a header row (use with --target)."""
    target: str = ""
    """Name of the label column of --csv."""
    impute: str = "none"
    """NaN features: none (refuse them) or mean (fill with the training-split mean)."""
    methods: str = ",".join(METHODS)
    """Comma-separated methods among nll, pg, pg-star, pg-plugin, bilevel."""
    model: str = "logistic"
    """logistic (multiclass logistic regression) or mlp."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden widths of the MLP."""
    seeds: int = 5
    """Number of seeds (0, 1, ...): each seed has its own split and initialisation."""
    lam: float = 10.0
    """Entropy weight λ > 0 (the reference's 10)."""
    beta: float = 1.0
    """Reward scale β of the method `pg` (U = βI)."""
    generations: int = 50
    """PG samples G per input."""
    baseline: str = "mean"
    """PG baseline: mean (leave-one-out, unbiased), grpo (group mean, as the reference), min, none."""
    steps: int = 300
    """Gradient steps per method (the reference's 30 epochs are ~270 steps on digits)."""
    lr: float = 0.04
    """Adam learning rate."""
    batch_size: int | None = None
    """Minibatch size of nll, pg, pg-star; None: full batches, as pg-plugin and bilevel always use."""
    eval_every: int = 10
    """Record the learning curves every this many steps."""
    val_fraction: float = 0.2
    """Held-out split for curves, the plug-in Σ̂ and the bilevel outer objective."""
    test_fraction: float = 0.2
    """Test split for the reported metrics."""
    bilevel_reward: str = "scalar"
    """Learned U of the bilevel method: scalar, diag or full."""
    inner_steps: int = 20
    """Bilevel: PG steps per outer step (steps / inner_steps outer steps); plug-in: refresh period."""
    outer_lr: float = 0.05
    """Bilevel: Adam learning rate of the reward parameters."""
    damping: float = 0.1
    """Bilevel: δ in the CG system (H + δI) v = ∇_θ F (softmax Hessians are singular; docs/results/tabular.md)."""
    name: str | None = None
    """Run name; default tabular-<date>-<time>."""
    out_dir: str = "runs"
    """Parent folder of run folders."""
    threads: int = 1
    """Torch threads per process."""
    jobs: int = 2
    """(dataset, seed) runs in parallel processes."""

    def method_list(self) -> list[str]:
        methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        unknown = sorted(set(methods) - set(METHODS))
        if unknown or not methods:
            raise ConfigError(f"unknown methods {unknown or methods}; choose from {METHODS}")
        if self.batch_size is not None and set(methods) & set(SOLVER_METHODS):
            raise ConfigError(
                "pg-plugin and bilevel train on full batches; drop --batch-size or those methods"
            )
        return methods

    def options(self) -> MethodOptions:
        return MethodOptions(
            lam=self.lam,
            beta=self.beta,
            generations=self.generations,
            baseline=self.baseline,
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            eval_every=self.eval_every,
            bilevel_reward=self.bilevel_reward,
            inner_steps=self.inner_steps,
            outer_lr=self.outer_lr,
            damping=self.damping,
            refresh_every=self.inner_steps,
        )

    def validate(self) -> None:
        self.method_list()
        check_positive(self.lam, "--lam (entropy weight λ)")
        check_positive(self.beta, "--beta")
        check_positive(self.lr, "--lr")
        check_positive(self.outer_lr, "--outer-lr")
        check_positive(self.damping, "--damping")
        if self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r}; choose one of {MODELS}")
        if self.impute not in IMPUTE:
            raise ConfigError(f"unknown --impute {self.impute!r}; choose one of {IMPUTE}")
        if self.bilevel_reward not in ("scalar", "diag", "full"):
            raise ConfigError(
                f"--bilevel-reward must be scalar, diag or full, not {self.bilevel_reward!r}"
            )
        for value, name in (
            (self.seeds, "--seeds"),
            (self.steps, "--steps"),
            (self.generations, "--generations"),
            (self.eval_every, "--eval-every"),
            (self.inner_steps, "--inner-steps"),
            (self.threads, "--threads"),
            (self.jobs, "--jobs"),
        ):
            if value <= 0:
                raise ConfigError(f"{name} must be > 0, got {value}")
        if any(width <= 0 for width in self.hidden):
            raise ConfigError(f"--hidden widths must be > 0, got {self.hidden}")
        if (
            not (0 < self.val_fraction and 0 < self.test_fraction)
            or self.val_fraction + self.test_fraction >= 1
        ):
            raise ConfigError("--val-fraction and --test-fraction must be > 0 and sum to < 1")

    def load_data(self) -> list[TabularData]:
        """The datasets to run: the four bundled ones for 'all', else the one named."""
        if self.csv:
            return [load("", self.csv, self.target, self.impute)]
        names = BUNDLED if self.dataset == "all" else (self.dataset,)
        return [load(name, impute=self.impute) for name in names]


@contextlib.contextmanager
def solver_warnings_silenced():
    """CG residuals and plug-in shrinkage go to curves.csv (solver/residual), not stderr: raise
    the solvers' log level to ERROR inside the block and restore it after."""
    logger = logging.getLogger("mbrl_bilevel.solvers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_one(index: int, config: TabularConfig, datasets: list[TabularData], tb_dir: str | None):
    """Every method on dataset index // seeds with seed index % seeds, from one initialisation.

    Returns (final rows {dataset, method, seed, test metrics, beta, seconds}, curve rows).
    """
    torch.set_num_threads(config.threads)
    data, seed = datasets[index // config.seeds], index % config.seeds
    splits = split(data, seed, config.val_fraction, config.test_fraction)
    torch.manual_seed(seed)
    initial = make_model(config.model, data.num_features, data.num_classes, config.hidden)
    finals, curves = [], []
    for method in config.method_list():
        torch.manual_seed(seed)
        predictor = copy.deepcopy(initial)
        writer = SummaryWriter(f"{tb_dir}/{data.name}/{method}-seed{seed}") if tb_dir else None
        start = time.perf_counter()
        with solver_warnings_silenced():
            history, beta = train_method(method, predictor, splits, config.options(), seed, writer)
        seconds = time.perf_counter() - start
        metrics = evaluate_classifier(predictor, splits.test)
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(f"test/{key}", value, config.steps)
            writer.close()
        key = {"dataset": data.name, "method": method, "seed": seed}
        finals.append({**key, **metrics, "beta": beta, "seconds": seconds})
        curves += [{**key, **row} for row in history]
    return finals, curves


def describe(data: TabularData, lam: float) -> dict:
    """Size, classes and β* of a dataset (β* from all its labels, for the record)."""
    y = torch.as_tensor(data.y)
    return {
        "rows": len(data.y),
        "features": data.num_features,
        "classes": data.num_classes,
        "beta_star_all_rows": beta_star(y, data.num_classes, lam),
    }


def paired_gap(rows: list[dict], a: str, b: str, metric: str, scale: float = 1.0) -> dict | None:
    """Mean and std over seeds of scale·(metric of method a - metric of method b), paired by
    seed (same split and initialisation); None if a method is missing."""
    from mbrl_bilevel.reporting import mean_std

    by = {(r["method"], r["seed"]): r[metric] for r in rows}
    seeds = sorted({r["seed"] for r in rows if r["method"] == a})
    if not seeds or any((b, s) not in by for s in seeds):
        return None
    mean, std = mean_std([scale * (by[a, s] - by[b, s]) for s in seeds])
    return {"mean": mean, "std": std, "n": len(seeds)}


def acceptance(finals: list[dict]) -> dict:
    """Per dataset: the test-accuracy gaps (percentage points) of pg-star and bilevel to nll and
    the test NLL of pg-star minus that of pg (negative: pg-star is better), paired by seed."""
    from mbrl_bilevel.reporting import group_by

    return {
        name: {
            "pg_star_minus_nll_accuracy_pp": paired_gap(rows, "pg-star", "nll", "accuracy", 100),
            "bilevel_minus_nll_accuracy_pp": paired_gap(rows, "bilevel", "nll", "accuracy", 100),
            "pg_star_minus_pg_nll": paired_gap(rows, "pg-star", "pg", "nll"),
        }
        for name, rows in group_by(finals, "dataset").items()
    }


def run_study(config: TabularConfig, datasets: list[TabularData] | None = None):
    """Run the study on `datasets` (default: those the config names) and write the run folder.

    Returns (run_dir, summary dict, markdown table).
    """
    from mbrl_bilevel.reporting import group_by, markdown_table, plot_curves, summary_table
    from mbrl_bilevel.runs import (
        atomic_write_text,
        create_run_dir,
        save_figure,
        write_csv,
        write_json,
    )

    config.validate()
    datasets = datasets if datasets is not None else config.load_data()
    run_dir = create_run_dir(config.out_dir, config.name, "tabular")
    write_json(run_dir / "config.json", config)
    started = time.perf_counter()
    results = map_seeds(
        run_one,
        len(datasets) * config.seeds,
        config.jobs,
        desc="dataset × seed",
        config=config,
        datasets=datasets,
        tb_dir=str(run_dir / "tb"),
    )
    finals = [row for rows, _ in results for row in rows]
    curves = [row for _, rows in results for row in rows]
    metrics = [*METRICS, "beta"]
    header, table, numbers = [], [], {}
    for name, rows in group_by(finals, "dataset").items():
        header, cells, numbers[name] = summary_table(rows, "method", metrics)
        table += [[name, *row] for row in cells]
    text = markdown_table(["dataset", *header], table)
    write_csv(run_dir / "metrics.csv", finals)
    write_csv(run_dir / "curves.csv", curves)
    for name, rows in group_by(curves, "dataset").items():
        figure = plot_curves(
            rows,
            "step",
            ["curve/accuracy", "curve/nll"],
            "method",
            titles=[f"{name}: held-out accuracy", f"{name}: held-out NLL (nats)"],
            log_y=[False, True],
        )
        save_figure(figure, run_dir / "plots" / f"{name}_curves.png")
    by_dataset = [{**row, row["dataset"]: row["curve/nll"]} for row in curves]
    names = list(group_by(curves, "dataset"))
    figure = plot_curves(
        by_dataset,
        "step",
        names,
        "method",
        titles=[f"{n}: held-out NLL (nats)" for n in names],
        log_y=[True] * len(names),
    )
    save_figure(figure, run_dir / "plots" / "tabular_nll.png")
    summary = {
        "command": "tabular",
        "run_dir": str(run_dir),
        "seeds": config.seeds,
        "seconds": time.perf_counter() - started,
        "datasets": {data.name: describe(data, config.lam) for data in datasets},
        "final": numbers,
        "acceptance": acceptance(finals),
    }
    write_json(run_dir / "summary.json", summary)
    atomic_write_text(run_dir / "table.md", text + "\n")
    return run_dir, summary, text
