"""Output safety: the one place that decides whether a path may be written, and writes it.

Every command that writes a file or directory goes through this module::

    from tuckerctl.outputs import claim

    target = claim(out, "checkpoint", inputs=[src, config], overwrite=overwrite)  # before any work
    with target.staging() as tmp:          # a fresh temp file (file kinds) or directory (dir kinds)
        write_everything_into(tmp)
    # success: renamed into place atomically; exception or signal: the temp path is removed

:func:`claim` raises :class:`~tuckerctl.errors.InputError` (exit 2, one line) when

* the output is, contains or lies inside any input (paths resolved, symlinks followed;
  a directory input also protects the targets of the symlinks directly inside it, as in
  a Hugging Face cache snapshot; a ``.index.json`` input protects its shards);
* the output path is itself a symbolic link;
* the output exists and ``overwrite`` is false, or it exists but does not look like
  what tuckerctl writes for that kind (an empty directory counts as new).

Kinds (:data:`KINDS`): ``"json"`` (a tuckerctl JSON document: a file whose
``schema`` starts with ``tuckerctl.``), ``"checkpoint"`` (a directory written by
``compress``), ``"report"`` (a directory written by ``report``). New commands add
theirs with :func:`register_kind` (a name, file or directory, and a recogniser).

:meth:`Target.staging` guarantees: temp and backup names are unpredictable
(``mkstemp``/``mkdtemp`` beside the target) and removed on every exit path; a new
output is created exclusively (``link``/``rename`` that fail when the target appeared
meanwhile), so of two concurrent writers exactly one wins and the other gets an
InputError; an existing output is replaced only after the new one is complete;
permissions follow the umask; ENOSPC, EACCES, EROFS and other OS errors become a
one-line InputError with nothing left behind. :func:`install_signal_handlers` turns
SIGTERM (and SIGHUP) into :class:`Terminated`, so ``timeout`` and CI cancellations
clean up like Ctrl-C does.

This module imports neither torch nor numpy: the CLI calls it before the heavy imports.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import stat
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, arg


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM/SIGHUP so that cleanup runs (like KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP raise :class:`Terminated` in the main thread (the CLI calls this once)."""

    def handler(signum, frame):
        raise Terminated(signum)

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            with contextlib.suppress(ValueError, OSError):  # not the main thread / not settable
                signal.signal(sig, handler)


# ------------------------------------------------------------------ permissions

def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no reader-only way elsewhere; restored at once
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions of a new ordinary file under the current umask."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """Permissions of a new directory under the current umask."""
    return 0o777 & ~_umask()


# ------------------------------------------------------------------ kinds of output

@dataclass(frozen=True)
class Kind:
    """What a command writes: a file or a directory, and how to recognise an old one."""

    name: str
    is_dir: bool
    recognise: Callable[[Path], bool]  # True when an existing path looks like this kind's output
    description: str


KINDS: dict[str, Kind] = {}


def register_kind(name: str, is_dir: bool, recognise: Callable[[Path], bool], description: str) -> None:
    """Declare an output kind (e.g. ``export`` files); ``recognise`` must not raise."""
    KINDS[name] = Kind(name, is_dir, recognise, description)


_MAX_JSON = 256 * 1024 * 1024


def _is_tuckerctl_json(path: Path) -> bool:
    try:
        if not stat.S_ISREG(path.lstat().st_mode) or path.stat().st_size > _MAX_JSON:
            return False
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("schema"), str) and doc["schema"].startswith("tuckerctl.")


def safetensors_metadata(path: Path) -> dict | None:
    """The ``__metadata__`` of a safetensors file, or None when it is not one (no torch)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return None
            (n,) = struct.unpack("<Q", raw)
            if n > 100 * 1024 * 1024:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, RecursionError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


# (a compressed checkpoint also carries the source's tokenizer/generation files: tucker_format.AUX_FILES)
_CHECKPOINT_FILES = re.compile(r"config\.json|model\.safetensors|model\.safetensors\.index\.json|"
                               r"model-\d{5}-of-\d{5}\.safetensors|tokenizer\.json|tokenizer_config\.json|"
                               r"special_tokens_map\.json|vocab\.txt|vocab\.json|merges\.txt|tokenizer\.model|"
                               r"added_tokens\.json|chat_template\.jinja|chat_template\.json|"
                               r"generation_config\.json|preprocessor_config\.json")
_REPORT_FILES = re.compile(r"fig\d[\w-]*\.(png|svg|pdf)|index\.html|summary\.md|ranks\.csv")


def _only(path: Path, allowed: re.Pattern) -> list[str] | None:
    """Names in directory ``path`` if every entry is a regular file matching ``allowed``."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return None
    if any(not allowed.fullmatch(e.name) or not e.is_file(follow_symlinks=False) for e in entries):
        return None
    return [e.name for e in entries]


def _is_tuckerctl_checkpoint(path: Path) -> bool:
    names = _only(path, _CHECKPOINT_FILES)
    shards = sorted(n for n in names or () if n.endswith(".safetensors"))
    return bool(shards) and all("tuckerctl" in (safetensors_metadata(path / n) or {}) for n in shards)


def _is_tuckerctl_report(path: Path) -> bool:
    names = _only(path, _REPORT_FILES)
    if not names or "index.html" not in names:
        return False
    try:
        with open(path / "index.html", encoding="utf-8", errors="replace") as f:
            return "tuckerctl report" in f.read(4096)
    except OSError:
        return False


def _is_tuckerctl_export(path: Path) -> bool:
    names = _only(path, _CHECKPOINT_FILES)
    return bool(names) and "model.safetensors" in names and \
        "tuckerctl_export" in (safetensors_metadata(path / "model.safetensors") or {})


register_kind("json", False, _is_tuckerctl_json, "tuckerctl JSON document")
register_kind("checkpoint", True, _is_tuckerctl_checkpoint, "tuckerctl checkpoint directory")
register_kind("report", True, _is_tuckerctl_report, "tuckerctl report directory")
register_kind("export", True, _is_tuckerctl_export, "transformers directory written by tuckerctl export")


# ------------------------------------------------------------------ inputs

def _resolve(p: Path) -> Path:
    try:
        return Path(os.path.realpath(p))
    except (OSError, ValueError):
        return Path(os.path.abspath(p))


def protected_paths(inputs: Iterable[str | os.PathLike | None]) -> set[Path]:
    """Every path an output must keep clear of: the inputs as given and resolved, the
    targets of symlinks directly inside input directories, config.json beside an input
    file, and the shards a ``.index.json`` input names."""
    out: set[Path] = set()
    for item in inputs:
        if item is None:
            continue
        p = Path(item)
        out.add(Path(os.path.abspath(p)))
        out.add(_resolve(p))
        try:
            if p.is_dir():
                for e in os.scandir(p):
                    if e.is_symlink():
                        out.add(_resolve(Path(e.path)))
            elif p.exists():
                beside = p.parent / "config.json"
                if beside.exists():
                    out.add(_resolve(beside))
                if p.name.endswith(".index.json"):
                    out.update(_resolve(s) for s in _index_shards(p))
        except OSError:
            pass
    return out


def _index_shards(index: Path) -> list[Path]:
    try:
        if index.stat().st_size > _MAX_JSON:
            return []
        wm = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        return [index.parent / v for v in wm.values() if isinstance(v, str)] if isinstance(wm, dict) else []
    except (OSError, ValueError, AttributeError, RecursionError):
        return []


def _overlap(out: Path, protected: set[Path]) -> Path | None:
    for p in protected:
        if out == p or p in out.parents or out in p.parents:
            return p
    return None


# ------------------------------------------------------------------ claiming and writing

@dataclass
class Target:
    """An output path that :func:`claim` has cleared for writing."""

    path: Path
    kind: Kind
    replace: bool  # an existing tuckerctl output (or empty directory) will be replaced

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """Yield a temp path beside the target; on success move it into place."""
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if self.kind.is_dir:
                tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
                os.chmod(tmp, dir_mode())
            else:
                fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                os.close(fd)
                tmp = Path(name)
                os.chmod(tmp, file_mode())
        except OSError as e:
            raise write_error(path, e) from None
        try:
            yield tmp
            _sync(tmp)
            self._commit(tmp)
        except OSError as e:
            _remove(tmp)
            raise write_error(path, e) from None
        except BaseException:
            _remove(tmp)
            raise

    def _commit(self, tmp: Path) -> None:
        path = self.path
        if not self.replace or not _exists(path):
            _create_exclusively(tmp, path, self.kind.is_dir)
            return
        # Re-check just before replacing: what is there must still be ours to replace.
        if path.is_symlink() or not (self.kind.recognise(path) or _empty_dir(path)):
            raise InputError(f"{path}: changed while writing and no longer looks like a "
                             f"{self.kind.description}; left as it is")
        if not self.kind.is_dir:
            os.replace(tmp, path)
            return
        backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, backup)  # a directory may be renamed over an empty one
        try:
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rename(backup, path)
            raise
        shutil.rmtree(backup, ignore_errors=True)


def _exists(p: Path) -> bool:
    return os.path.lexists(p)


def _empty_dir(p: Path) -> bool:
    try:
        return p.is_dir() and not p.is_symlink() and not any(os.scandir(p))
    except OSError:
        return False


def _create_exclusively(tmp: Path, path: Path, is_dir: bool) -> None:
    """Move ``tmp`` to ``path`` only if nothing (other than an empty directory) is there."""
    try:
        if is_dir:
            os.rename(tmp, path)  # fails on an existing non-empty directory or a file
        else:
            try:
                os.link(tmp, path)  # fails if path exists
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV) or _exists(path):
                    raise
                os.rename(tmp, path)  # no hard links on this filesystem
            else:
                os.unlink(tmp)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise InputError(f"{path}: appeared while this command was writing (another tuckerctl?); "
                             f"left as it is, nothing written") from None
        raise


def _sync(tmp: Path) -> None:
    files = [tmp] if tmp.is_file() else [p for p in tmp.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_error(path: Path, e: OSError) -> InputError:
    """A one-line InputError for an OS error while writing ``path``."""
    what = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.EDQUOT: "disk quota exceeded"}.get(e.errno, e.strerror or str(e))
    return InputError(f"{path}: cannot write ({what}); nothing was written")


def claim(path: str | os.PathLike, kind: str, *, inputs: Iterable = (), overwrite: bool = False) -> Target:
    """Check that ``path`` may be written as a ``kind`` output; raise InputError if not.

    Call it before any computation. ``inputs``: every path the command reads (files,
    directories, configs; None entries are ignored), and any other output of the same
    command (outputs must not overlap either)."""
    k = KINDS[kind]
    path = Path(path)
    if str(path) in ("", ".") or path.name in ("", ".", ".."):
        raise InputError(f"{path}: not a usable output name (name a new {k.description.split()[-1]})")
    clash = _overlap(_resolve(path), protected_paths(inputs)) or _overlap(Path(os.path.abspath(path)),
                                                                          protected_paths(inputs))
    if clash is not None:
        raise InputError(f"{path}: refusing to write here: it is, contains or lies inside the input {clash}")
    if path.is_symlink():
        raise InputError(f"{path}: is a symbolic link; give the real output path")
    if not _exists(path):
        return Target(path, k, replace=False)
    if k.is_dir and _empty_dir(path):
        return Target(path, k, replace=True)
    if not overwrite:
        raise InputError(f"{path}: already exists (use {arg('overwrite', True)} to replace it)")
    if not k.recognise(path):
        raise InputError(f"{path}: exists and is not a {k.description}; refusing to replace it "
                         f"even with {arg('overwrite', True)}")
    return Target(path, k, replace=True)


def write_text(target: Target, text: str) -> None:
    """Write ``text`` (UTF-8) to a file target atomically."""
    with target.staging() as tmp:
        tmp.write_text(text, encoding="utf-8")


# ------------------------------------------------------------------ strict JSON

def _first_non_finite(obj, at: str = "") -> str | None:
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return at or "(document)"
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = ((f"[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for k, v in items:
        found = _first_non_finite(v, f"{at}{k}" if str(k).startswith("[") else f"{at}.{k}" if at else str(k))
        if found:
            return found
    return None


def dumps_strict(doc, what: str = "output", **kwargs) -> str:
    """``json.dumps`` that never writes NaN/Infinity: a non-finite number is an InputError
    naming the field (it comes from corrupted input, and must not pass silently)."""
    try:
        return json.dumps(doc, allow_nan=False, **kwargs)
    except ValueError:
        raise InputError(f"{what}: non-finite value at field '{_first_non_finite(doc)}' "
                         f"(NaN/Inf in the input?); nothing written") from None
