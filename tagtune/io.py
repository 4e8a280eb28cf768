"""Small I/O helpers shared by the stages: atomic writes that never delete what tagtune did not write,
the workspace lock, and line-numbered JSONL.

    with workspace_lock(root):                     # one stage or flow run per workspace
        with atomic_path(out_dir, owned=("rows.jsonl", "stats.json")) as tmp:
            tmp.mkdir(); write_jsonl(tmp / "rows.jsonl", rows)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import glob
import json
import os
import secrets
import shutil
import threading
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

from tagtune.errors import DataError, TagtuneError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class OutputPathError(TagtuneError):
    """An output would replace something tagtune did not write (user files, the cwd, home)."""


class DiskFullError(TagtuneError):
    """No space left while writing an output; nothing was replaced."""


class WorkspaceBusyError(TagtuneError):
    """Another stage or flow run holds this workspace."""


# --------------------------------------------------------------------------------- replacing outputs
def _protected(dest: Path) -> str | None:
    """What `dest` is, if it must never be replaced: the filesystem root, home, the working directory
    (or a directory above either)."""
    target = dest.resolve()
    if target == Path(target.anchor):
        return "the filesystem root"
    for what, place in (("your home directory", Path.home()), ("the working directory", Path.cwd())):
        place = place.resolve()
        if target == place or target in place.parents:
            return what
    return None


def check_replaceable(dest: str | os.PathLike[str], owned: Collection[str] = (), force: bool = False) -> None:
    """Raise unless writing `dest` can only replace what tagtune wrote there before.

    Args:
        dest: the output file or directory.
        owned: glob patterns of the entries a previous output of this kind holds (an existing
            directory may hold only these); an empty directory is always replaceable.
        force: replace a non-empty directory whatever it holds (the user asked for it).

    Raises:
        OutputPathError: `dest` is (or contains) the filesystem root, home or the working directory,
            or an existing directory holds entries outside `owned` and `force` is off.
    """
    dest = Path(dest)
    if why := _protected(dest):
        raise OutputPathError(f"{dest}: refusing to replace {why}; choose another output path")
    if force or dest.is_symlink() or not dest.is_dir():
        return
    foreign = sorted(p.name for p in dest.iterdir() if not any(fnmatch.fnmatch(p.name, o) for o in owned))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputPathError(
            f"{dest}: exists and holds files tagtune did not write ({shown}); refusing to replace it "
            "(move them away or choose another path)"
        )


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_temps(dest: Path) -> None:
    """Temp dirs beside `dest` left by a killed run (`.<name>.<pid>.<random>.tmp`, pid gone)."""
    prefix = f".{dest.name}."
    for p in dest.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = p.name[len(prefix) : -len(".tmp")].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _is_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(
    dest: str | os.PathLike[str], owned: Collection[str] = (), force: bool = False
) -> Iterator[Path]:
    """Yield a temp path beside `dest`; rename it over `dest` only if the block succeeds.

    Works for files and directories, so a failed stage never leaves a partial output behind. An
    existing directory is replaced only if it holds nothing but `owned` entries (see
    `check_replaceable`), checked before the block runs and again before the rename.

    Raises:
        OutputPathError: `dest` is not tagtune's to replace.
        DiskFullError: the disk filled up while writing (the old `dest` is untouched).
    """
    dest = Path(dest)
    check_replaceable(dest, owned, force)
    made = [p for p in dest.parents if not p.exists()]  # deepest first; removed again on failure
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(dest)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    target = tmp / dest.name
    try:
        yield target
        check_replaceable(dest, owned, force)
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(target, dest)
        made = []
    except OSError as e:
        if e.errno in DISK_FULL:
            raise DiskFullError(
                f"{dest}: no space left on device while writing it; nothing was replaced "
                "(free some space and run again)"
            ) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in made:
            with contextlib.suppress(OSError):  # only if still empty
                d.rmdir()


# ---------------------------------------------------------------------------------- workspace lock
_HELD: dict[tuple[int, int], list[int]] = {}  # (st_dev, st_ino) of a workspace → [fd, depth]
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def workspace_lock(root: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the workspace: one `dvc repro` stage or flow run at a time (an flock on the directory).

    Taken by `python -m stages.<name>` (what dvc.yaml runs) and by the Prefect flow. Reentrant within
    a process: the flow holds it while it runs the stages in-process. The kernel drops the lock when
    the holder dies, so a killed run never leaves a stale lock.

    Raises:
        WorkspaceBusyError: another process holds it (at once, without waiting).
    """
    root = Path(root).resolve()
    st = root.stat()
    key = (st.st_dev, st.st_ino)
    with _HELD_GUARD:
        if key in _HELD:
            _HELD[key][1] += 1
        else:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise WorkspaceBusyError(
                    f"{root}: another tagtune run is using this workspace (a `dvc repro` stage or a "
                    "`tagtune run` flow); try again when it ends"
                ) from None
            _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        with _HELD_GUARD:
            _HELD[key][1] -= 1
            if _HELD[key][1] == 0:
                os.close(_HELD.pop(key)[0])  # closing the descriptor releases the flock


# ------------------------------------------------------------------------------------------- JSON
def _dumps(obj: Any, **kw: Any) -> str:
    """JSON text; NaN and infinity (not valid JSON) raise ValueError instead of writing `NaN`."""
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, allow_nan=False, **kw)


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSON lines (UTF-8, stable key order); returns the row count.

    Raises:
        DataError: a row holds a non-finite number (JSON has no NaN/Infinity), naming its line.
    """
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            try:
                f.write(_dumps(row) + "\n")
            except ValueError:
                raise DataError(
                    path, n + 1, "a value is not finite (NaN or infinity); JSON cannot hold it"
                ) from None
            n += 1
    return n


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read JSON lines; a bad line raises DataError naming file and line."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(path, i, f"invalid JSON: {e.msg} (column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(path, i, f"expected a JSON object, got {type(obj).__name__}")
                rows.append(obj)
    except UnicodeDecodeError as e:
        raise DataError(path, None, f"not valid UTF-8 (byte offset {e.start})") from None
    except FileNotFoundError:
        raise DataError(path, None, "file not found (did the previous stage run?)") from None
    return rows


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON.

    Raises:
        DataError: `obj` holds a non-finite number (JSON has no NaN/Infinity).
    """
    try:
        text = _dumps(obj, indent=2)
    except ValueError:
        raise DataError(path, None, "a value is not finite (NaN or infinity); JSON cannot hold it") from None
    Path(path).write_text(text + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike[str]) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(path, None, "file not found (did the previous stage run?)") from None
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, f"invalid JSON: {e.msg}") from None
