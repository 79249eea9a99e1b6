"""Run folders runs/<name>/ and atomic file writes (temporary name, then rename)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from mbrl_bilevel.validation import ConfigError

FINISHED = "summary.json"
"""Every command writes this file last: a run folder holding it is a finished run."""


def create_run_dir(out_dir: str | Path, name: str | None, prefix: str) -> Path:
    """Make and return runs/<name>; the default name is <prefix>-<date>-<time>. A folder
    holding a finished run is refused (ConfigError), so no result is overwritten."""
    name = name or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(out_dir) / name
    if (path / FINISHED).is_file():
        raise ConfigError(f"{path} holds a finished run: pass another --name or remove that folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def safe_name(value: Any) -> str:
    """A short file-name-safe form of `value`; env ids lose their namespace
    (mbrl_bilevel/PointMass-v0 -> PointMass-v0)."""
    text = str(value).rsplit("/", 1)[-1]
    return re.sub(r"[^\w.+-]", "_", text) or "_"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON (dataclasses become dicts)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Atomically write rows (dicts, keys in first-seen order) as CSV."""
    fields: dict[str, None] = {}
    for row in rows:
        fields.update(dict.fromkeys(row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def save_figure(figure, path: str | Path) -> None:
    """Atomically save a matplotlib figure as PNG."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
