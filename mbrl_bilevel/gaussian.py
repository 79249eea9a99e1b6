"""The Gaussian theory of SPEC section 2 as functions, the synthetic data, and the study that
compares NLL training with PG under U*, U = I and the scaled plug-in U = λd/(2 tr Σ̂)·I, and,
with --solver, a reward learned by a solver of mbrl_bilevel.solvers.

Notation: model N(μ, S), data N(f, Σ), reward r_U(ŷ, y) = -(ŷ - y)ᵀ U (ŷ - y), entropy weight λ.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.tensorboard import SummaryWriter

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.losses import NLLLoss, PGLoss
from mbrl_bilevel.models import FullCovGaussianMLP, LinearGaussian, covariance
from mbrl_bilevel.parallel import map_seeds
from mbrl_bilevel.rewards import FixedMahalanobis, quadratic_form
from mbrl_bilevel.training import FitConfig, fit
from mbrl_bilevel.validation import ConfigError, check_positive, check_spd, parse_matrix

# ---------------------------------------------------------------- closed forms (SPEC section 2)


def inner_optimal_covariance(U: torch.Tensor, lam: float) -> torch.Tensor:
    """S* = (λ/2) U⁻¹: the PG optimum's covariance for reward matrix U [D, D], whatever the data."""
    return 0.5 * lam * torch.linalg.inv(U)


def optimal_reward_matrix(sigma: torch.Tensor, lam: float) -> torch.Tensor:
    """U* = (λ/2) Σ⁻¹: the reward whose PG optimum has the data covariance Σ [D, D]."""
    return 0.5 * lam * torch.linalg.inv(sigma)


def scaled_reward_scalar(sigma_hat: torch.Tensor, lam: float) -> float:
    """The reference's isotropic plug-in u = λ·d / (2 tr Σ̂), for U = u·I."""
    return lam * sigma_hat.shape[-1] / (2 * float(sigma_hat.diagonal().sum()))


def expected_mahalanobis_reward(
    mean: torch.Tensor,
    cov: torch.Tensor,
    target_mean: torch.Tensor,
    U: torch.Tensor,
    target_cov: torch.Tensor | None = None,
) -> torch.Tensor:
    """E_y E_ŷ r_U = -(μ - f)ᵀU(μ - f) - tr(U S) - tr(U Σ) for ŷ ~ N(μ, S), y ~ N(f, Σ).

    mean, target_mean [..., D]; cov [..., D, D]; target_cov [..., D, D] or None (a fixed y = f).
    Returns [...]; differentiable in every argument.
    """
    value = -quadratic_form(mean - target_mean, U) - (U * cov).sum((-2, -1))
    if target_cov is not None:
        value = value - (U * target_cov).sum((-2, -1))
    return value


def gaussian_entropy(cov: torch.Tensor) -> torch.Tensor:
    """H(N(μ, S)) = ½ log det(2πe S) for cov [..., D, D] -> [...]."""
    dim = cov.shape[-1]
    return 0.5 * (torch.logdet(cov) + dim * math.log(2 * math.pi * math.e))


def pg_objective(
    mean: torch.Tensor,
    cov: torch.Tensor,
    target_mean: torch.Tensor,
    U: torch.Tensor,
    lam: float,
    target_cov: torch.Tensor | None = None,
) -> torch.Tensor:
    """J = E r_U + λ H(p_θ), in closed form (the differentiable form of the PG objective)."""
    return expected_mahalanobis_reward(mean, cov, target_mean, U, target_cov) + lam * (
        gaussian_entropy(cov)
    )


def reverse_kl(
    mean: torch.Tensor, cov: torch.Tensor, target_mean: torch.Tensor, target_cov: torch.Tensor
) -> torch.Tensor:
    """KL(N(μ, S) ‖ N(f, Σ)) -> [...]."""
    dim = cov.shape[-1]
    sigma_inv = torch.linalg.inv(target_cov)
    return 0.5 * (
        (sigma_inv * cov.transpose(-2, -1)).sum((-2, -1))
        + quadratic_form(mean - target_mean, sigma_inv)
        - dim
        + torch.logdet(target_cov)
        - torch.logdet(cov)
    )


def reverse_kl_constant(target_cov: torch.Tensor, lam: float) -> torch.Tensor:
    """c in J(θ; U*) = -λ KL(p_θ ‖ q) + c, namely c = λ (H(q) - d)."""
    return lam * (gaussian_entropy(target_cov) - target_cov.shape[-1])


def residual_covariance(data: Dataset) -> torch.Tensor:
    """Covariance [D, D] of the residuals of an ordinary least-squares fit y ≈ [x, 1] W."""
    design = torch.cat([data.x, torch.ones_like(data.x[:, :1])], dim=1)
    weights = torch.linalg.lstsq(design, data.y).solution
    residual = data.y - design @ weights
    return residual.T @ residual / (len(data) - design.shape[1])


# ---------------------------------------------------------------- synthetic data


def paper_mean(x: torch.Tensor) -> torch.Tensor:
    """The paper's mean function f(x) = x + 6 (figure 1)."""
    return x + 6.0


def hetero_scale(x: torch.Tensor) -> torch.Tensor:
    """s(x) = exp(x₀) [N] for x [N, D]: the noise scale of the heteroscedastic data Σ(x) = s(x)Σ."""
    return x[:, 0].exp()


@dataclass(frozen=True)
class SyntheticGaussian:
    """y = f(x) + ε with ε ~ N(0, s(x)Σ) and inputs x ~ N(0, I); f maps [N, D] to [N, D] and
    s (the noise scale, None for 1) maps [N, D] to [N]."""

    sigma: torch.Tensor
    mean_fn: Callable[[torch.Tensor], torch.Tensor] = paper_mean
    scale_fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        check_spd(self.sigma, "Σ")

    @property
    def dim(self) -> int:
        return self.sigma.shape[0]

    def covariance_at(self, x: torch.Tensor) -> torch.Tensor:
        """Σ(x) [N, D, D] for x [N, D]."""
        scale = torch.ones(len(x), dtype=x.dtype) if self.scale_fn is None else self.scale_fn(x)
        return scale[:, None, None] * self.sigma

    def sample(self, n_inputs: int, samples_per_input: int, generator: torch.Generator) -> Dataset:
        """n_inputs distinct x, each with samples_per_input noisy y: N = n_inputs·samples rows."""
        if n_inputs <= 0 or samples_per_input <= 0:
            raise ConfigError("n_inputs and samples_per_input must be > 0")
        dtype = self.sigma.dtype
        x = torch.randn(n_inputs, self.dim, generator=generator, dtype=dtype)
        x = x.repeat_interleave(samples_per_input, dim=0)
        noise = torch.randn(x.shape, generator=generator, dtype=dtype)
        noise = noise @ torch.linalg.cholesky(self.sigma).T
        if self.scale_fn is not None:
            noise = noise * self.scale_fn(x).sqrt()[:, None]
        y = self.mean_fn(x) + noise
        return Dataset(x, y)


def paper_sigma(dim: int = 2) -> torch.Tensor:
    """The paper's noise Σ = 1.25² I."""
    return 1.25**2 * torch.eye(dim, dtype=torch.float64)


# ---------------------------------------------------------------- the study

METHODS = ("nll", "pg-star", "pg-identity", "pg-scaled")


@dataclass(frozen=True)
class GaussianConfig:
    """The Gaussian study: NLL vs PG under U*, U = I and U = λd/(2 tr Σ̂)·I on synthetic data."""

    dim: int = 2
    """Output (and input) dimension D."""
    lam: float = 1.0
    """Entropy weight λ > 0."""
    sigma: str = ""
    """Noise covariance Σ: "a,b;c,d" (rows split by ';') or a .npy path; empty: 1.25² I."""
    steps: int = 1500
    """Gradient steps per run."""
    seeds: int = 5
    """Number of seeds (0, 1, ...); every method starts from the same initialisation per seed."""
    methods: str = ",".join(METHODS)
    """Comma-separated methods among nll, pg-star, pg-identity, pg-scaled."""
    generations: int = 5
    """PG samples G per input."""
    baseline: str = "mean"
    """PG baseline: none, mean (group mean) or min."""
    lr: float = 5e-2
    """Adam learning rate."""
    lr_schedule: str = "cosine"
    """constant or cosine (cosine lets the noisy PG estimate settle on the optimum)."""
    n_inputs: int = 100
    """Distinct inputs x in the training set."""
    samples_per_input: int = 10
    """Noisy targets per input."""
    eval_every: int = 10
    """Record metrics every this many steps."""
    name: str | None = None
    """Run name; default gaussian-<date>-<time>."""
    out_dir: str = "runs"
    """Parent folder of run folders."""
    threads: int = 1
    """Torch threads per process (use 1 when runs share the machine)."""
    jobs: int = 2
    """Seeds run in parallel processes (this machine has 2 cores)."""
    noise: str = "constant"
    """constant: Σ at every x; hetero: Σ(x) = exp(x₀)·Σ (models then get an input-dependent
    covariance, an MLP; the pg-* methods do not apply)."""
    solver: str = ""
    """Also learn the reward with this solver: plugin, implicit or unrolled (empty: none)."""
    reward: str = "full"
    """The solver's reward: scalar, diag, full or input (U(x); implicit/unrolled), or for plugin
    also identity, raw-scalar, raw-full (the reference code's fixed choices)."""
    inner_steps: int = 10
    """K: inner steps per outer step (plugin: per refresh of U); --steps is the solver's total."""
    warmup_steps: int = 200
    """Inner steps before the first outer step (part of --steps)."""
    inner: str = "pg"
    """Inner steps of the implicit solver: pg (REINFORCE) or exact (Adam on the closed-form J)."""
    outer_lr: float = 0.1
    """Adam learning rate of the reward parameters (cosine-decayed over the outer steps)."""
    linear_solver: str = "cg"
    """IFT linear solver: cg, neumann or dense."""
    damping: float = 1e-4
    """δ in the IFT system (∇²_θθ(-J) + δI) v = ∇_θ NLL; raise it for MLP predictors."""
    unroll_lr: float = 0.05
    """Step size of the unrolled solver's differentiable inner gradient steps."""
    val_inputs: int = 0
    """Distinct inputs of the solver's held-out split (its outer objective); 0: --n-inputs."""

    def resolved_sigma(self) -> torch.Tensor:
        """Σ [D, D] (float64), checked: SPD and D == dim."""
        sigma = parse_matrix(self.sigma, "--sigma") if self.sigma else paper_sigma(self.dim)
        return check_spd(sigma, "Σ (--sigma)", dim=self.dim)

    def method_list(self) -> list[str]:
        methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        unknown = sorted(set(methods) - set(METHODS))
        if unknown or not (methods or self.solver):
            raise ConfigError(f"unknown methods {unknown or methods}; choose from {METHODS}")
        return methods

    def validate(self) -> None:
        if self.dim <= 0:
            raise ConfigError(f"--dim must be > 0, got {self.dim}")
        check_positive(self.lam, "--lam (entropy weight λ)")
        if self.steps <= 0:
            raise ConfigError(f"--steps must be > 0, got {self.steps}")
        if self.seeds <= 0:
            raise ConfigError(f"--seeds must be > 0, got {self.seeds}")
        if self.threads <= 0 or self.jobs <= 0:
            raise ConfigError(f"--threads and --jobs must be > 0, got {self.threads}, {self.jobs}")
        self.resolved_sigma()
        self.method_list()
        if self.noise not in ("constant", "hetero"):
            raise ConfigError(f"--noise must be constant or hetero, got {self.noise!r}")
        if self.noise == "hetero" and set(self.method_list()) - {"nll"}:
            raise ConfigError("--noise hetero has no constant U*: use --methods nll")
        if self.solver:
            from mbrl_bilevel.solvers.study import validate_solver_options

            validate_solver_options(self)

    def problem(self) -> SyntheticGaussian:
        """The synthetic data distribution of this config."""
        scale = hetero_scale if self.noise == "hetero" else None
        return SyntheticGaussian(self.resolved_sigma(), scale_fn=scale)


def method_reward_matrix(
    method: str, sigma: torch.Tensor, train: Dataset, lam: float
) -> torch.Tensor | None:
    """U [D, D] of a PG method (None for nll): U*, I, or the scaled plug-in from OLS residuals."""
    dim = sigma.shape[0]
    eye = torch.eye(dim, dtype=sigma.dtype)
    if method == "pg-star":
        return optimal_reward_matrix(sigma, lam)
    if method == "pg-identity":
        return eye
    if method == "pg-scaled":
        return scaled_reward_scalar(residual_covariance(train), lam) * eye
    return None


def closed_form_metrics(
    model: torch.nn.Module,
    test: Dataset,
    problem: SyntheticGaussian,
    theory_cov: torch.Tensor | None,
) -> dict[str, float]:
    """nll (held-out, per sample), mean_error (RMSE of μ(x) to f(x)), cov_error (‖S - Σ‖_F/‖Σ‖_F)
    and, for PG, theory_error (‖S - (λ/2)U⁻¹‖_F / ‖(λ/2)U⁻¹‖_F)."""
    with torch.no_grad():
        dist = model(test.x)
        cov = covariance(dist)
        metrics = {
            "nll": float(-dist.log_prob(test.y).mean()),
            "mean_error": float((dist.mean - problem.mean_fn(test.x)).pow(2).sum(-1).mean().sqrt()),
            "cov_error": relative_frobenius(cov, problem.covariance_at(test.x)),
        }
        if theory_cov is not None:
            metrics["theory_error"] = relative_frobenius(cov, theory_cov)
    return metrics


def relative_frobenius(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean ‖a - b‖_F / ‖b‖_F over the leading dims of a, b [..., D, D] (broadcast)."""
    a, b = torch.broadcast_tensors(a, b)
    return float(
        (torch.linalg.norm(a - b, dim=(-2, -1)) / torch.linalg.norm(b, dim=(-2, -1))).mean()
    )


def train_method(
    method: str,
    model: LinearGaussian,
    train: Dataset,
    test: Dataset,
    problem: SyntheticGaussian,
    config: GaussianConfig,
    writer=None,
) -> list[dict[str, float]]:
    """Train `model` in place with one method; return the metric rows recorded during training."""
    U = method_reward_matrix(method, problem.sigma, train, config.lam)
    if U is None:
        loss = NLLLoss()
    else:
        loss = PGLoss(FixedMahalanobis(U), config.lam, config.generations, config.baseline)
    theory = None if U is None else inner_optimal_covariance(U, config.lam)
    fit_config = FitConfig(
        steps=config.steps,
        lr=config.lr,
        lr_schedule=config.lr_schedule,
        eval_every=config.eval_every,
    )
    result = fit(
        model,
        loss,
        train,
        None,
        fit_config,
        writer=writer,
        description=method,
        monitor=lambda m: closed_form_metrics(m, test, problem, theory),
    )
    return result.history


def run_seed(seed: int, config: GaussianConfig, tb_dir: str | None = None):
    """All methods on one seed's data from one shared initialisation.

    Returns [(method, metric rows, learned reward summary or None)]; TensorBoard events go to tb_dir/<method>-seed<k> if given.
    """
    torch.set_num_threads(config.threads)
    problem = config.problem()
    generator = torch.Generator().manual_seed(seed)
    train = problem.sample(config.n_inputs, config.samples_per_input, generator)
    test = problem.sample(config.n_inputs, config.samples_per_input, generator)
    torch.manual_seed(seed)
    if config.noise == "hetero":
        initial = FullCovGaussianMLP(config.dim, config.dim, hidden=(32, 32)).double()
    else:
        initial = LinearGaussian(config.dim, config.dim, covariance="full").double()
    results = []
    for method in config.method_list():
        torch.manual_seed(seed)
        writer = SummaryWriter(f"{tb_dir}/{method}-seed{seed}") if tb_dir else None
        rows = train_method(method, copy.deepcopy(initial), train, test, problem, config, writer)
        if writer is not None:
            writer.close()
        results.append((method, rows, None))
    if config.solver:
        from mbrl_bilevel.solvers.study import train_solver

        val_inputs = config.val_inputs or config.n_inputs
        val = problem.sample(val_inputs, config.samples_per_input, generator)  # drawn after test
        torch.manual_seed(seed)
        label = f"{config.solver}-{config.reward}"
        writer = SummaryWriter(f"{tb_dir}/{label}-seed{seed}") if tb_dir else None
        rows, learned = train_solver(
            copy.deepcopy(initial), train, val, test, problem, config, writer
        )
        if writer is not None:
            writer.close()
        results.append((label, rows, learned))
    return results


def steps_to_converge(history: list[dict[str, float]], key: str, tolerance: float) -> float:
    """First recorded step from which `key` stays within `tolerance` of its final value."""
    final = history[-1][key]
    step = history[-1]["step"]
    for row in reversed(history):
        if abs(row[key] - final) > tolerance:
            break
        step = row["step"]
    return step


def run_study(config: GaussianConfig):
    """Run every (seed, method), write the run folder, return (run_dir, summary dict, table)."""
    from mbrl_bilevel.reporting import markdown_table, plot_curves, summary_table
    from mbrl_bilevel.runs import (
        atomic_write_text,
        create_run_dir,
        save_figure,
        write_csv,
        write_json,
    )

    config.validate()
    sigma = config.resolved_sigma()
    run_dir = create_run_dir(config.out_dir, config.name, "gaussian")
    write_json(run_dir / "config.json", config)

    rows, finals, learned = [], [], []
    for seed, results in enumerate(
        map_seeds(run_seed, config.seeds, config.jobs, config=config, tb_dir=str(run_dir / "tb"))
    ):
        for method, history, reward in results:
            rows += [{"method": method, "seed": seed, **row} for row in history]
            final = {"method": method, "seed": seed, **history[-1]}
            final["steps_to_nll"] = steps_to_converge(history, "nll", tolerance=0.01)
            finals.append(final)
            if reward is not None:
                learned.append(reward)
    metrics = ["nll", "mean_error", "cov_error", "theory_error", "steps_to_nll"]
    header, table, numbers = summary_table(finals, "method", metrics)
    oracle_nll = float(gaussian_entropy(sigma))
    text = markdown_table(header, table)
    write_csv(run_dir / "metrics.csv", rows)
    figure = plot_curves(
        rows,
        "step",
        metrics[:3],
        "method",
        titles=["held-out NLL (nats/sample)", "mean error ‖μ - f‖", "covariance error ‖S - Σ‖/‖Σ‖"],
        log_y=[True, True, True],
    )
    save_figure(figure, run_dir / "plots" / "gaussian_study.png")
    summary = {
        "command": "gaussian",
        "run_dir": str(run_dir),
        "seeds": config.seeds,
        "oracle_nll": oracle_nll,
        "U_star": None
        if config.noise == "hetero"
        else optimal_reward_matrix(sigma, config.lam).tolist(),
        "final": numbers,
    }
    if config.solver:
        from mbrl_bilevel.solvers.study import report_solver

        summary["solver"] = report_solver(config, learned, rows, run_dir)
    write_json(run_dir / "summary.json", summary)
    atomic_write_text(run_dir / "table.md", text + "\n")
    return run_dir, summary, text
