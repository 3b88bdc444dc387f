"""Files a resumed run reads as facts: written whole or not at all."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

from nemo_plrd.errors import InputError, OutputExistsError


def sync_tree(folder: Path) -> None:
    """Every file under ``folder``, and the folders' entries, on disk: what a rename of ``folder`` then
    vouches for survives a power loss (megatron syncs its shards; the files written beside them too)."""
    for path in [*folder.rglob("*"), folder]:
        fsync(path)


def fsync(path: Path) -> None:
    """A file's data, or a folder's entries, on disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def append_line(path: Path, line: str) -> None:
    """``line`` appended to ``path`` and on disk before the call returns: a training step's row must be there
    when the checkpoint that counts the step is, or a run resumed after a power loss reports fewer steps
    than it took (a torn last line is dropped on resume)."""
    new = not path.exists()
    with path.open("a") as out:
        out.write(line + "\n")
        out.flush()
        os.fsync(out.fileno())
    if new:  # and its name, in the folder
        fsync(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    """``text`` at ``path`` through a temp name in the same folder and a rename: a run cut short
    leaves the old file or none, never a half-written one that looks finished. The text reaches the
    disk before the name does, so a node that loses power cannot leave the new name on empty blocks. The temp
    name is the writer's own (two processes writing one path each rename a whole file: the last one stays)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def leftover_temp_files(folder: Path) -> list[Path]:
    """The temp files ``write_text_atomic`` calls under ``folder`` left where their process was killed."""
    return [path for path in folder.rglob(".*.tmp*") if path.name.rpartition(".tmp")[2].isdigit()]


def refuse_existing(path: str | Path, what: str, exists: Callable[[Path], bool] = Path.exists) -> None:
    """Outputs are never overwritten: ``path`` (a ``what``) refused if it ``exists`` (under torch.distributed,
    rank 0's answer for every rank: ``parallel.exists_on_rank0``), or if it could not be made; a script asks
    before it loads anything."""
    if exists(Path(path)):
        raise OutputExistsError(f"{what} {path} already exists; choose a new path")
    check_can_make(path, f"{what} {path}")


def check_can_make(path: str | Path, named: str) -> None:
    """``path`` (``named`` so in a refusal) could be made: the nearest folder above it that exists is a folder
    this process may write in (asked before the work whose result goes there, not when it is written)."""
    above = Path(path).absolute().parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise InputError(f"{named} cannot be made: {above} is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise InputError(f"{named} cannot be made: {above} is not writable")


def try_acquire(lock: FileLock, timeout: float = 0) -> bool:
    """Whether this process now holds ``lock``, another holder waited for ``timeout`` seconds at most."""
    try:
        lock.acquire(timeout=timeout)
        return True
    except Timeout:
        return False


@contextmanager
def held_folder(folder: Path, lock_name: str, named: str, busy: str, advice: str) -> Iterator[None]:
    """``folder``, made if missing (a path that cannot be one is refused now, not after the work), held by this
    process through the lock ``folder/lock_name`` while the block runs: another holder is refused as
    "``named`` ``busy`` (it holds LOCK); ``advice``". The kernel drops the lock of a process that dies. The
    folders this made and left empty (a refused request) go."""
    made = [path for path in (folder, *folder.parents) if not path.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{named} cannot be made a folder: {error.strerror}") from None
    lock = FileLock(folder / lock_name)
    try:
        held = try_acquire(lock)
    except OSError as error:
        raise InputError(f"{named} is not writable: {error.strerror}") from None
    if not held:
        raise InputError(f"{named} {busy} (it holds {folder / lock_name}); {advice}")
    try:
        yield
    finally:
        lock.release()
        (folder / lock_name).unlink(missing_ok=True)
        for path in made:  # the deepest first
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
