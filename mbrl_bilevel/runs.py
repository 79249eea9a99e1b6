"""Run folders runs/<name>/: atomic file writes (temporary name, then rename), files verified by
a SHA-256 header, and the lock that one live run holds on its folder."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mbrl_bilevel.validation import ConfigError

FINISHED = "summary.json"
"""Every command writes this file last: a run folder holding it is a finished run."""
LOCK = ".lock"
"""The file a live run holds locked (fcntl.flock) in its folder; it holds the run's PID."""
CHECKED_HEADER = re.compile(rb"(.+) sha256=([0-9a-f]{64}) bytes=([0-9]+)")
"""The first line of a file written by `checked_bytes`."""


class CheckedFileError(ConfigError):
    """A file that cannot be trusted: unreadable, truncated, altered or of another format."""


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


def atomic_write_bytes(path: str | Path, data: bytes, previous: str | Path | None = None) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never a torn one;
    with `previous`, the file it replaces is moved there first. An OSError (a full disk, no
    permission) becomes one ConfigError naming `path`; no temporary or torn file is left."""
    path = Path(path)
    try:
        _write_replacing(path, data, previous)
    except OSError as error:
        raise ConfigError(f"cannot write {path}: {error.strerror or error}") from None


def _write_replacing(path: Path, data: bytes, previous: str | Path | None) -> None:
    """Write a temporary file beside `path`, fsync it, then rename it to `path`."""
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
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_temporaries(run_dir: str | Path) -> None:
    """Delete the temporary files (.<name>.<random>.tmp) that the atomic writes of a killed run
    left in `run_dir`; only while holding its `run_lock`, when no other writer is live."""
    for path in Path(run_dir).rglob(".*.tmp"):
        path.unlink(missing_ok=True)


def checked_bytes(payload: bytes, label: str) -> bytes:
    """`payload` behind the one-line header `<label> sha256=<hex digest> bytes=<length>`, which
    `verified_payload` checks."""
    digest = hashlib.sha256(payload).hexdigest()
    return f"{label} sha256={digest} bytes={len(payload)}\n".encode() + payload


def verified_payload(data: bytes, path: str | Path) -> tuple[str, bytes]:
    """(label, payload) of `data` made by `checked_bytes`, read from `path`; CheckedFileError
    naming `path` when the header is missing, the payload is short or its SHA-256 differs."""
    header, newline, payload = data.partition(b"\n")
    match = CHECKED_HEADER.fullmatch(header)
    if match is None:
        problem = "has no checksum header" if newline else f"is truncated ({len(data)} bytes)"
        raise CheckedFileError(f"{path} {problem}")
    label, digest, length = match[1].decode(errors="replace"), match[2].decode(), int(match[3])
    if len(payload) != length:
        raise CheckedFileError(f"{path} is truncated: {len(payload)} of {length} bytes")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckedFileError(f"{path} is corrupt: its SHA-256 differs from the one saved with it")
    return label, payload


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold run_dir/.lock while the block runs, so that one live run at a time writes the folder;
    ConfigError naming the holder's PID if a live process holds it. The lock is an fcntl.flock,
    which the OS drops when its holder dies: a killed run's lock never blocks."""
    run_dir = Path(run_dir)
    with open(run_dir / LOCK, "a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            raise ConfigError(
                f"{run_dir} is in use by a live run (pid {holder}): wait for it to end or stop it"
            ) from None
        file.truncate(0)
        file.write(f"{os.getpid()}\n")
        file.flush()
        yield


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
