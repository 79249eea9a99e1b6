"""Agent checkpoints in a run folder: the file format (a torch.save payload behind a SHA-256
header), the last two checkpoints kept (checkpoints/agent.pt and checkpoints/agent.prev.pt), the
callback that saves them at episode ends, and loading the newest usable one."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import torch
from stable_baselines3.common.callbacks import BaseCallback

from mbrl_bilevel.runs import CheckedFileError, checked_bytes, verified_payload

CHECKPOINT = "checkpoints/agent.pt"
"""A run folder's newest checkpoint; the one before it is kept beside it (`previous_path`)."""
CHECKPOINT_FORMAT = 2
"""The format agents write: 2, a torch.save payload behind a SHA-256 header (runs.checked_bytes).
Format 1, the bare torch.save file of earlier versions, has no checksum; it is still read."""
CHECKPOINT_LABEL = f"mbrl-bilevel agent checkpoint, format {CHECKPOINT_FORMAT}"
ZIP_MAGIC = b"PK\x03\x04"
"""How a format-1 checkpoint (a torch.save zip file) begins."""


def previous_path(path: str | Path) -> Path:
    """Where the checkpoint before `path` is kept: agent.pt -> agent.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def checkpoint_bytes(state: dict[str, Any]) -> bytes:
    """`state` as a format-2 checkpoint file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return checked_bytes(buffer.getvalue(), CHECKPOINT_LABEL)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state a checkpoint file holds; CheckedFileError naming `path` if it is missing,
    unreadable, truncated, altered (SHA-256) or of another format."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CheckedFileError(f"no saved agent at {path}") from None
    except OSError as error:
        raise CheckedFileError(f"cannot read {path}: {error.strerror or error}") from None
    payload = data if data.startswith(ZIP_MAGIC) else _format2_payload(data, path)
    try:
        return torch.load(io.BytesIO(payload), weights_only=False)
    except Exception as error:  # whatever a damaged file makes torch.load raise, it is unusable
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckedFileError(f"{path} does not load: {reason}") from None


def _format2_payload(data: bytes, path: str | Path) -> bytes:
    """The torch payload of a format-2 checkpoint, verified."""
    label, payload = verified_payload(data, path)
    if label != CHECKPOINT_LABEL:
        raise CheckedFileError(
            f"{path} is a {label!r} file; this version reads {CHECKPOINT_LABEL!r} and format 1"
        )
    return payload


def load_newest(agent_type: type, path: str | Path, env, **kwargs) -> tuple[Any, Path] | None:
    """(agent, the file it came from) of the newest usable checkpoint: `path`, else the one kept
    before it (with a one-line warning on stderr naming both); None if neither file exists.
    ConfigError naming both when none is usable."""
    path = Path(path)
    candidates = [p for p in (path, previous_path(path)) if p.is_file()]
    if not candidates:
        return None
    problems = []
    for candidate in candidates:
        try:
            agent = agent_type.load(candidate, env, **kwargs)
        except CheckedFileError as error:
            problems.append(str(error))
            continue
        if candidate != path:
            newest = problems[0] if problems else f"{path} is missing"
            print(f"warning: {newest}; resuming from {candidate} instead", file=sys.stderr)
        return agent, candidate
    raise CheckedFileError(f"no usable checkpoint: {'; '.join(problems)}")


class EpisodeCheckpoint(BaseCallback):
    """Save the agent (atomically, the checkpoint it replaces kept at `previous_path(path)`) at
    the end of the first episode after `every` env steps since the last save (every=1: after
    every episode), so a killed run loses at most the steps since."""

    def __init__(self, path: Path, every: int = 1):
        super().__init__()
        self.path, self.every, self.saved_at = Path(path), every, 0

    def _on_training_start(self) -> None:
        self.saved_at = self.model.num_timesteps

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        if self.model.num_timesteps - self.saved_at >= self.every:
            self.model.save(self.path, previous_path(self.path))
            self.saved_at = self.model.num_timesteps
