"""Atomic writes, and output folders that never destroy what attnflow did not write.

Files land under a temporary name beside their target and are renamed onto it (`atomic_path`,
`write_text`, `write_json`).  Folders are built under a temporary name and swapped in whole
(`atomic_dir`); every writer of a user-facing folder goes through `output_dir`, which first
checks that the target may be written:

    new path or empty folder          written
    a file                            refused (never moved aside)
    the input, or a folder holding it refused
    a folder attnflow wrote, same kind  replaced, only with overwrite=True (its marker: `folder_kind`)
    anything else                     refused

    >>> page = '<script id="attnflow-data" type="application/json">{}</script>'
    >>> with output_dir("view/", "html") as tmp:         # a new folder: written
    ...     _ = (tmp / "index.html").write_text(page)
    ...     _ = (tmp / "viewer.js").write_text("")
    >>> folder_kind("view/")
    'html'
    >>> with output_dir("view/", "html") as tmp:
    ...     pass
    Traceback (most recent call last):
    attnflow.errors.DataError: view already holds an attnflow html; pass overwrite=True (CLI: --overwrite) to replace it
    >>> with output_dir("view/", "html", overwrite=True) as tmp:   # view/ is swapped in whole
    ...     _ = (tmp / "index.html").write_text(page.replace("{}", '{"v": 2}'))
    ...     _ = (tmp / "viewer.js").write_text("")
    >>> Path("view/index.html").read_text()
    '<script id="attnflow-data" type="application/json">{"v": 2}</script>'

Temporary names are `.<name>.attnflow-tmp.<pid>.<random>`; the next write into the same parent
removes those whose process is gone (interrupted runs).  Writers of one parent folder take an
exclusive `flock` on it for the check-and-swap, and the swap is one `renameat2(RENAME_EXCHANGE)`
on Linux, so a reader finds the old folder or the new one, never none.  Where the exchange is not
available (other systems, file systems without it) the old folder is renamed aside and the new one
renamed in: a reader may then miss the folder for the instant between the two renames.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from attnflow._checks import flag, path as checked_path
from attnflow.errors import DataError, StorageError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: writers are not serialised
    fcntl = None

KINDS = ("trace", "parquet", "html", "demo", "model")
TMP_TAG = ".attnflow-tmp."
_TMP_RE = re.compile(r"^\..+" + re.escape(TMP_TAG) + r"(\d+)\.[A-Za-z0-9_]+$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public(path: Path, is_dir: bool) -> None:
    """mkstemp/mkdtemp create owner-only entries; give them the modes a plain open/mkdir would."""
    path.chmod((0o777 if is_dir else 0o666) & ~_umask())


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}{TMP_TAG}{os.getpid()}."


def _mkdir_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise DataError(f"cannot write {path}: a part of {path.parent} is a file; choose another output path") from None


_HINTS = {
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.ENOSPC: "the disk is full: free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free some space or write elsewhere",
}


@contextmanager
def storage_errors(path: str | os.PathLike, doing: str = "write") -> Iterator[None]:
    """Turn an OSError of the block (permission, read-only or full disk) into a one-line StorageError naming `path`.

    Nothing was replaced when it fires inside `output_dir`: the old folder (if any) is still there.

        >>> with storage_errors("out/table.parquet"):
        ...     raise OSError(errno.ENOSPC, "No space left on device")
        Traceback (most recent call last):
        attnflow.errors.StorageError: cannot write out/table.parquet: No space left on device [ENOSPC]; the disk is full: free some space or write elsewhere
    """
    try:
        yield
    except StorageError:
        raise
    except OSError as err:
        raise storage_error(err, path, doing) from None


def storage_error(err: OSError, path: str | os.PathLike, doing: str = "write") -> StorageError:
    """The one-line StorageError for `err` met while `doing` ("write", "read") `path`: reason, errno name, what to do.

        >>> str(storage_error(PermissionError(errno.EACCES, "Permission denied"), "run/config.json", "read"))
        'cannot read run/config.json: Permission denied [EACCES]; check its permissions or choose another path'
    """
    code = errno.errorcode.get(err.errno, "") if err.errno is not None else ""
    reason = (err.strerror or str(err) or type(err).__name__) + (f" [{code}]" if code else "")
    hint = _HINTS.get(err.errno, "check the path" if doing == "read" else "choose another path")
    storage = StorageError(f"cannot {doing} {path}: {reason}; {hint}")  # one argument: str() is the message alone
    storage.errno = err.errno
    return storage


def read_failure(err: Exception, path: str | os.PathLike, damaged: str) -> StorageError | DataError:
    """What a failed read of `path` raises: a StorageError when the system refused (an OSError with an errno:
    permission, I/O), else a DataError `damaged` (the file's bytes: pyarrow's own errors carry no errno).

        >>> type(read_failure(OSError("Parquet magic bytes not found"), "t.parquet", "t.parquet is damaged")).__name__
        'DataError'
    """
    if isinstance(err, OSError) and err.errno is not None:
        return storage_error(err, path, "read")
    return DataError(damaged)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` if the block succeeds.

    >>> import pyarrow.parquet as pq
    >>> with atomic_path("out/table.parquet") as tmp:
    ...     pq.write_table(pa.table({"x": [1, 2]}), tmp)
    ...     Path("out/table.parquet").exists()
    False
    >>> pq.read_table("out/table.parquet").num_rows, [p.name for p in Path("out").iterdir()]   # appeared whole
    (2, ['table.parquet'])
    """
    path = Path(path)
    with storage_errors(path):
        _mkdir_parent(path)
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), dir=path.parent)
        os.close(fd)
        _public(Path(tmp), is_dir=False)
        try:
            yield Path(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------
# temporary leftovers, locking, the swap
# ------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            path.unlink()
        except OSError:
            pass


def clean_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders in `folder` left by attnflow processes that are gone.

    >>> dead = Path("runs/.view.attnflow-tmp.999999999.k2j1x9")    # left by a killed process (pid 999999999)
    >>> dead.mkdir(parents=True)
    >>> clean_temps("runs/")
    [PosixPath('runs/.view.attnflow-tmp.999999999.k2j1x9')]
    >>> dead.exists(), clean_temps("runs/")
    (False, [])
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TMP_RE.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            _remove(Path(entry.path))
            removed.append(Path(entry.path))
    return removed


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive flock on `folder` itself: writers into one parent check and swap one at a time."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
except (AttributeError, OSError):  # not glibc >= 2.28 / not Linux
    _renameat2 = None


def exchange(a: Path, b: Path) -> bool:
    """Swap the entries `a` and `b` in one step (Linux renameat2); False where that is unsupported."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(tmp: Path, path: Path) -> None:
    """Put the folder `tmp` at `path`; whatever was at `path` ends up at `tmp` (removed by the caller)."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
    elif not exchange(tmp, path):
        aside = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=path.parent))
        os.rename(path, aside / "old")  # the window: `path` is missing until the next rename
        os.rename(tmp, path)
        os.rename(aside, tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike, check: Callable[[], None] | None = None) -> Iterator[Path]:
    """Build a directory under a temporary name; swap it onto `path` when the block succeeds.

    An existing directory at `path` is replaced in one step once the new one is complete; a file at
    `path` is never replaced.  `check()` runs again just before the swap, under the parent's lock.

    >>> import pyarrow.parquet as pq
    >>> with atomic_dir("parts/part-3") as tmp:
    ...     pq.write_table(pa.table({"x": [1, 2]}), tmp / "examples.parquet")
    ...     Path("parts/part-3").exists()
    False
    >>> [p.name for p in Path("parts/part-3").iterdir()], [p.name for p in Path("parts").iterdir()]
    (['examples.parquet'], ['part-3'])
    """
    path = Path(path)
    _mkdir_parent(path)
    clean_temps(path.parent)
    if os.path.lexists(path) and not path.is_dir():
        raise DataError(f"{path} is a file; attnflow writes a folder there and never replaces a file: choose another path")
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=path.parent))
    _public(tmp, is_dir=True)
    try:
        yield tmp
        with _locked(path.parent):
            if check is not None:
                check()
            if os.path.lexists(path) and not path.is_dir():
                raise DataError(f"{path} became a file while attnflow wrote it; nothing was replaced")
            _swap_in(tmp, path)
    finally:
        _remove(tmp)


# ------------------------------------------------------------------------------------
# output folders
# ------------------------------------------------------------------------------------
def folder_kind(path: str | os.PathLike) -> str | None:
    """The kind of attnflow output in folder `path`, read from the marker its writer leaves, else None.

    trace / parquet: manifest.json's "kind" (before markers: "tables" present means parquet);
    html: index.html with attnflow's data block beside viewer.js; demo: summary.json, examples.json,
    a parquet and an html folder.

    >>> tr.save("run/")
    PosixPath('run')
    >>> Path("notes/").mkdir(); _ = Path("notes/a.txt").write_text("mine")
    >>> folder_kind("run/"), folder_kind("notes/"), folder_kind("missing/")
    ('trace', None, None)
    """
    path = Path(path)
    man = _read_json(path / "manifest.json")
    if isinstance(man, dict) and "schema_version" not in man and "attnflow_version" in man and man.get("kind") in KINDS:
        return man["kind"]  # a marker-only manifest (e.g. a model folder written by gguf.save_model)
    if isinstance(man, dict) and "schema_version" in man:
        kind = man.get("kind")
        return kind if kind in ("trace", "parquet") else "parquet" if "tables" in man else "trace"
    if (path / "viewer.js").is_file() and 'id="attnflow-data"' in _head(path / "index.html"):
        return "html"
    if (path / "summary.json").is_file() and (path / "examples.json").is_file():
        if folder_kind(path / "parquet") == "parquet" and folder_kind(path / "html") == "html":
            return "demo"
    return None


def _read_json(file: Path):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _head(file: Path, size: int = 2**20) -> str:
    try:
        with open(file, "rb") as f:
            return f.read(size).decode("utf-8", "replace")
    except OSError:
        return ""


def check_inputs(path: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """DataError when the output `path` is one of `inputs` or a folder holding one."""
    out = Path(path).resolve()
    for given in inputs:
        src = Path(given).resolve()
        if src == out or out in src.parents:
            what = "is" if src == out else "holds"
            raise DataError(f"the output {path} {what} the input {given}; writing there would destroy it: choose another output folder")


def check_output(path: str | os.PathLike, kind: str, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """DataError unless `output_dir(path, kind, overwrite, inputs)` may write `path` (see the module doc).

    >>> check_output("thesis/", "trace")     # a new path: may be written
    >>> Path("thesis/").mkdir(); _ = Path("thesis/ch1.tex").write_text("...")
    >>> check_output("thesis/", "trace")     # a folder of the user's files
    Traceback (most recent call last):
    attnflow.errors.DataError: thesis exists and holds files attnflow did not write; ...
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; one of {KINDS}")
    path = checked_path("path", path)
    check_inputs(path, inputs)
    if os.path.lexists(path) and not path.is_dir():
        raise DataError(f"{path} is a file; attnflow writes a folder there and never replaces a file: choose another path")
    if not path.is_dir() or not any(path.iterdir()):
        return
    found = folder_kind(path)
    if found is None:
        raise DataError(
            f"{path} exists and holds files attnflow did not write; choose a new or empty folder (attnflow never replaces it)"
        )
    if found != kind:
        raise DataError(f"{path} holds an attnflow {found} output, not a {kind}; choose another folder")
    if not overwrite:
        raise DataError(f"{path} already holds an attnflow {kind}; pass overwrite=True (CLI: --overwrite) to replace it")


@contextmanager
def output_dir(
    path: str | os.PathLike, kind: str, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Build the output folder `path` under a temporary name and swap it in whole.

    Refuses (DataError, before the block runs and again before the swap) what `check_output` refuses.
    The block writes the kind's marker (see `folder_kind`), so the next write knows the folder.

    >>> from attnflow import codec
    >>> with output_dir("run/", "trace") as tmp:
    ...     manifest = codec.write_trace(tr, tmp)      # writes manifest.json, kind "trace"
    >>> folder_kind("run/"), af.AttentionTrace.load("run/").patterns.equal(tr.patterns)
    ('trace', True)
    """
    inputs = list(inputs)
    flag("overwrite", overwrite)
    check_output(path, kind, overwrite, inputs)
    target = Path(os.path.realpath(path))  # through a symlink: write where it points, keep the link
    with storage_errors(path), atomic_dir(target, check=lambda: check_output(target, kind, overwrite, inputs)) as tmp:
        yield tmp
