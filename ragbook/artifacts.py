"""Build-or-load cache, so that any notebook can start cold.

An artifact is a directory under ``$RAGBOOK_CACHE/<recipe>/<key>``, where ``key`` hashes the
recipe's name and parameters. It is built in a temporary directory beside its final place and
renamed into place only when complete, so an interrupted build never leaves a half artifact
that a later run would load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .config import cache_dir

MANIFEST = "artifact.json"


def artifact_key(recipe: str, params: dict) -> str:
    """A short, stable hash of a recipe name and its JSON-serialisable parameters."""
    blob = json.dumps({"recipe": recipe, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def artifact_path(recipe: str, params: dict) -> Path:
    return cache_dir() / recipe / artifact_key(recipe, params)


def cached(recipe: str, params: dict, build: Callable[[Path], None]) -> Path:
    """Return the directory of artifact (recipe, params), calling ``build(tmpdir)`` if absent.

    ``build`` writes its files into the directory it is given; the directory becomes the
    artifact only after ``build`` returns.
    """
    final = artifact_path(recipe, params)
    if (final / MANIFEST).exists():
        return final
    with atomic_directory(final) as tmp:
        build(tmp)
        (tmp / MANIFEST).write_text(json.dumps({"recipe": recipe, "params": params},
                                               indent=2, default=str))
    return final


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Write a directory all or nothing: the body fills a temporary directory beside
    ``final``, which replaces ``final`` (an older copy or a stale, incomplete one) only when
    the body has finished. An interruption leaves ``final`` as it was, or absent, never half
    written."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        old = tmp.with_name(tmp.name + ".old")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` that never leaves a truncated checkpoint behind."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())
