"""Writing outputs so that nothing is lost: one atomic-write helper and the ``--out`` claim.

Every writer of the project (PNG grids, schedules, reports, JSON records, exported safetensors,
selector files) goes through :func:`atomic_write`: the data goes to a temporary name in the target's
folder and is renamed into place with ``os.replace`` (atomic on POSIX), so a reader never sees a
half-written file and an interrupted write leaves the previous file intact. Orbax checkpoints are
already written that way by orbax (a temporary folder renamed when complete).

:func:`claim_output` takes a fresh ``--out`` file with an exclusive create (``O_CREAT | O_EXCL``)
before any work, so two runs given the same fresh path cannot both succeed: the second one gets a
clear error at once instead of silently losing its image at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping

from qlip_jax.errors import BadArgument

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str | None = None, encoding: str | None = "utf-8",
                 newline: str | None = None) -> Iterator:
    """Write ``path`` atomically; creates its folder.

    ``mode=None`` yields a temporary PATH (same folder, same extension, so ``np.save``, PIL or
    safetensors pick the right format) for the caller to write; ``mode='w'`` / ``'wb'`` yields an open
    file. On success the temporary file replaces ``path``; on an exception it is removed and ``path``
    is left as it was.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(name)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=folder)
    try:
        if mode is None:
            os.close(fd)
            yield tmp
        else:
            text = "b" not in mode
            with os.fdopen(fd, mode, encoding=encoding if text else None, newline=newline if text else None) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """Build a folder atomically: yields an empty temporary folder next to ``path``; on success it takes
    ``path``'s place (a previous ``path`` is moved aside first and removed only once the new one is in
    place); on an exception it is removed and ``path`` is left as it was."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=parent)
            os.replace(path, os.path.join(old, name))
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_image(image, path: str | os.PathLike) -> str:
    """A PIL image to ``path`` atomically, in the format its extension names (PNG for ``.png``)."""
    from PIL import Image

    with atomic_write(path) as tmp:
        image.save(tmp, format=Image.registered_extensions().get(os.path.splitext(os.fspath(path))[1].lower()))
    return os.fspath(path)


def write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` to ``path`` atomically."""
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Mapping | list, indent: int | None = 2, **kw) -> None:
    """``obj`` as JSON (and a final newline) to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=indent, **kw) + "\n")


def check_image_path(path: str, name: str = "--out") -> str:
    """``path`` ends with a known image extension and its folder can be written (made if absent)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_EXTENSIONS:
        raise BadArgument(f"{name} {path} has {'no' if not ext else 'an unknown'} image extension"
                          f"{'' if not ext else ' ' + repr(ext)}",
                          f"end it with one of {', '.join(IMAGE_EXTENSIONS)}, e.g. {os.path.splitext(path)[0]}.png")
    if os.path.isdir(path):
        raise BadArgument(f"{name} {path} is a folder", "give a file name such as grid.png")
    check_writable_dir(os.path.dirname(os.path.abspath(path)), name)
    return path


def check_writable_dir(folder: str, name: str = "--out") -> str:
    """``folder`` (or its nearest existing ancestor, where it would be made) is a writable folder."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise BadArgument(f"{name}: {probe} is a file, so {folder} cannot be a folder", f"choose another {name}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BadArgument(f"{name}: cannot write in {probe} (permission denied)", f"choose another {name}")
    return folder


def claim_output(path: str, overwrite: bool, name: str = "--out") -> bool:
    """Take the output file ``path`` before any work; True if this call created it (an empty placeholder
    that :func:`atomic_write` later replaces, and :func:`release_claim` removes if the run fails).

    Without ``overwrite`` the file is created with ``O_CREAT | O_EXCL``: if it exists (or another run
    claimed it a moment ago) this raises :class:`BadArgument`. With ``overwrite`` an existing file is
    left in place until the new one replaces it.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if overwrite and os.path.exists(path):
        return False
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise BadArgument(f"{name} {path} exists (or another run is writing it)",
                          "pass --overwrite to replace it, or choose another name") from None
    except OSError as e:
        raise BadArgument(f"{name} {path} cannot be created: {e.strerror}", f"choose another {name}") from None
    os.close(fd)
    return True


def release_claim(path: str) -> None:
    """Remove a placeholder made by :func:`claim_output` if it is still empty (the run failed before
    writing), so a failed run leaves no file behind."""
    with contextlib.suppress(OSError):
        if os.path.getsize(path) == 0:
            os.unlink(path)
