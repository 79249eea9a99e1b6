"""Sampling-based trajectory optimisers over action sequences: CEM (PETS) and iCEM.

A planner maximises objective(actions [P, H, A]) -> returns [P] over sequences within the action
box. `act` returns the first action of the best plan and keeps the rest as the warm start of the
next call (the plan shifted by one step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mbrl_bilevel.validation import ConfigError

Objective = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CEMConfig:
    """Cross-entropy method settings; noise_beta > 0 and keep_elites > 0 turn it into iCEM."""

    horizon: int = 15
    """Planning horizon H."""
    population: int = 500
    """Candidate sequences P per iteration."""
    elites: int = 50
    """Best candidates that refit the sampling distribution."""
    iterations: int = 5
    """Refits per planning call."""
    momentum: float = 0.1
    """Weight of the previous mean and variance in each refit (PETS's alpha)."""
    noise_beta: float = 0.0
    """Power-law exponent of the sampling noise over time: 0 white (CEM), 2-3 coloured (iCEM)."""
    keep_elites: float = 0.0
    """Fraction of the elites carried into the next iteration and the next step (iCEM)."""
    population_decay: float = 1.0
    """Population shrink factor per iteration (iCEM uses 1.25)."""

    def __post_init__(self):
        if min(self.horizon, self.population, self.elites, self.iterations) <= 0:
            raise ConfigError("horizon, population, elites and iterations must be > 0")
        if self.elites > self.population:
            raise ConfigError(
                f"elites ({self.elites}) cannot exceed population ({self.population})"
            )
        if not 0 <= self.momentum < 1 or not 0 <= self.keep_elites <= 1:
            raise ConfigError("momentum must be in [0, 1) and keep_elites in [0, 1]")
        if self.population_decay < 1:
            raise ConfigError(f"population_decay must be >= 1, got {self.population_decay}")


def coloured_noise(shape: tuple[int, ...], beta: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise [P, H, A] with power spectrum ∝ f^(-beta) along H, unit variance per entry."""
    population, horizon, actions = shape
    if beta == 0:
        return torch.randn(shape, generator=generator)
    freqs = torch.fft.rfftfreq(horizon)
    freqs[0] = freqs[1] if horizon > 1 else 1.0
    scale = freqs ** (-beta / 2)
    spectrum_shape = (population, actions, len(freqs))
    real = torch.randn(spectrum_shape, generator=generator)
    imag = torch.randn(spectrum_shape, generator=generator)
    noise = torch.fft.irfft((real + 1j * imag) * scale, n=horizon)  # [P, A, H]
    noise = noise / noise.std(dim=-1, keepdim=True).clamp_min(1e-8)
    return noise.transpose(1, 2).contiguous()


class CEMPlanner:
    """CEM over action sequences in the box [low, high]^A with warm-started means.

    Sampling follows PETS: the variance is capped so that ±2 std stays inside the box and
    samples are truncated at 2 std; the refit mixes old and elite statistics with `momentum`.
    """

    def __init__(
        self,
        action_low: torch.Tensor,
        action_high: torch.Tensor,
        config: CEMConfig,
        generator: torch.Generator | None = None,
    ):
        self.low, self.high = action_low.float(), action_high.float()
        if self.low.shape != self.high.shape or not (self.low < self.high).all():
            raise ConfigError(f"bad action box: low {action_low}, high {action_high}")
        self.config = config
        self.generator = generator or torch.Generator().manual_seed(0)
        self.reset()

    def reset(self) -> None:
        """Forget the warm start (call at the start of every episode)."""
        horizon = self.config.horizon
        self.mean = ((self.low + self.high) / 2).expand(horizon, -1).clone()
        self.kept: torch.Tensor | None = None

    def initial_variance(self) -> torch.Tensor:
        return ((self.high - self.low) ** 2 / 16).expand(self.config.horizon, -1).clone()

    def sample(self, mean: torch.Tensor, var: torch.Tensor, population: int) -> torch.Tensor:
        """Candidates [P, H, A] around mean [H, A] with variance var, inside the box."""
        room = torch.minimum(mean - self.low, self.high - mean).clamp_min(0)
        std = torch.minimum(var, (room / 2) ** 2).sqrt()
        shape = (population, *mean.shape)
        if self.config.noise_beta > 0:
            noise = coloured_noise(shape, self.config.noise_beta, self.generator)
        else:
            noise = torch.nn.init.trunc_normal_(
                torch.empty(shape), a=-2.0, b=2.0, generator=self.generator
            )
        return (mean + std * noise).clamp(self.low, self.high)

    @torch.no_grad()
    def plan(self, objective: Objective) -> torch.Tensor:
        """Run the CEM iterations from the warm start; return the best sequence found [H, A]."""
        config = self.config
        mean, var = self.mean, self.initial_variance()
        best_value, best = -torch.inf, mean
        population = config.population
        kept = self.kept
        for iteration in range(config.iterations):
            candidates = self.sample(mean, var, max(population, config.elites))
            if kept is not None:
                candidates = torch.cat([candidates, kept])
            if iteration == config.iterations - 1 and config.noise_beta > 0:
                candidates = torch.cat([candidates, mean[None]])  # iCEM: try the mean itself
            values = objective(candidates)
            values = torch.where(
                torch.isfinite(values), values, torch.full_like(values, -torch.inf)
            )
            top = values.topk(config.elites)
            elites = candidates[top.indices]
            if top.values[0] > best_value:
                best_value, best = top.values[0], elites[0]
            elite_mean, elite_var = elites.mean(0), elites.var(0, unbiased=False)
            mean = config.momentum * mean + (1 - config.momentum) * elite_mean
            var = config.momentum * var + (1 - config.momentum) * elite_var
            n_keep = int(config.keep_elites * config.elites)
            kept = elites[:n_keep] if n_keep else None
            population = int(population / config.population_decay)
        self.mean = mean
        self.kept = kept
        return best

    def act(self, objective: Objective) -> torch.Tensor:
        """The first action [A] of the best plan; shifts the plan by one step for the next call."""
        best = self.plan(objective)
        fill = ((self.low + self.high) / 2)[None]
        self.mean = torch.cat([self.mean[1:], fill])
        if self.kept is not None:
            self.kept = torch.cat([self.kept[:, 1:], fill.expand(len(self.kept), 1, -1)], dim=1)
        return best[0]
