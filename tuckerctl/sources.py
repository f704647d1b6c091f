"""Where a checkpoint lives: local paths, Hugging Face cache folders and Hub model ids.

:func:`resolve` turns what a user typed into a local path plus the name people call
the model by:

* a file or directory on disk, as before;
* a Hugging Face cache snapshot (``.../models--org--name/snapshots/<hash>``) or the
  repo folder above it (``.../models--org--name``; the snapshot is chosen by
  ``--revision``, else ``refs/main``, else the only one);
* a Hub model id (``org/name``, with ``--revision``), resolved through
  ``huggingface_hub`` (the optional ``[hub]`` extra, imported only here): from the
  local cache first, and when a file is not cached, downloaded. Only ``config.json``,
  the index and the shards holding attention tensors are fetched for analysis.

No torch here: a wrong source is reported before anything heavy is imported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, arg

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Names of tensors an attention adapter may read: the per-layer attention block.
# (Not "post_attention_layernorm": the block's own name must be followed by a dot.)
_ATTENTION = re.compile(r"\.\d+\.(.*\.)?(self_attn|self_attention|attention|attn)\.")
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Source:
    """A resolved checkpoint: the local ``path`` to open, and ``name`` for people.

    ``partial``: shards listed in the index may be absent on purpose (a Hub snapshot
    downloaded for analysis only holds the attention shards)."""

    path: Path
    name: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    partial: bool = False


def is_attention_tensor(name: str) -> bool:
    """True for names an attention adapter reads (used to pick the shards to fetch)."""
    return bool(_ATTENTION.search(name))


def repo_of_cache_path(path: Path) -> tuple[str, Path] | None:
    """``org/name`` and the repo folder when ``path`` lies in a Hub cache repo folder."""
    parts = path.resolve().parts if path.exists() else path.parts
    for i, part in enumerate(parts):
        if part.startswith("models--") and len(part) > 8:
            return part[len("models--"):].replace("--", "/"), Path(*parts[:i + 1])
    return None


def _snapshot_of_repo_folder(folder: Path, revision: str | None) -> Path:
    """The snapshot folder of a ``models--org--name`` cache folder for ``revision``."""
    snaps = folder / "snapshots"
    if not snaps.is_dir():
        raise InputError(f"{folder}: a Hugging Face cache folder without snapshots/ (nothing downloaded yet?)")
    wanted = revision or "main"
    ref = folder / "refs" / wanted
    if ref.is_file():
        commit = ref.read_text().strip()
        if (snaps / commit).is_dir():
            return snaps / commit
        raise InputError(f"{folder}: refs/{wanted} points at {commit}, which has no snapshot folder")
    if revision and (snaps / revision).is_dir():
        return snaps / revision
    found = sorted(p.name for p in snaps.iterdir() if p.is_dir())
    if revision is None and len(found) == 1:
        return snaps / found[0]
    if revision is not None:
        raise InputError(f"{folder}: no snapshot for revision {revision!r} (have: {', '.join(found) or 'none'})")
    raise InputError(f"{folder}: {len(found)} snapshots and no refs/main; choose one with {arg('revision')} "
                     f"({', '.join(found) or 'none'})")


def resolve(source, revision: str | None = None, attention_only: bool = True) -> Source:
    """Resolve a path, cache folder or Hub model id to a local :class:`Source`.

    ``attention_only``: when downloading, fetch only the shards holding attention
    tensors (analysis); otherwise every shard (compression copies all tensors)."""
    text = str(source)
    path = Path(text)
    if path.exists():
        repo = repo_of_cache_path(path)
        if repo is not None and path.resolve() == repo[1].resolve():
            return Source(_snapshot_of_repo_folder(path, revision), repo[0], repo[0], revision, partial=True)
        if revision is not None and repo is None:
            raise InputError(f"{arg('revision')}: {path} is a local path, not a Hub model id or cache folder")
        if repo is not None:
            return Source(path, repo[0], repo[0], revision, partial=True)
        return Source(path)
    check_exists(text)
    return _from_hub(text, revision, attention_only)


def check_exists(source: str) -> None:
    """Raise the one-line error for a source that is neither a path on disk nor a Hub id."""
    text = str(source)
    if Path(text).exists() or (_REPO_ID.match(text) and not text.startswith((".", "/"))):
        return
    hint = "" if "/" in text else " (a Hub model is named org/name, e.g. HuggingFaceTB/SmolLM2-135M)"
    raise InputError(f"{text}: no such file or directory{hint}")


def _hub():
    try:
        import huggingface_hub
    except ModuleNotFoundError:
        raise InputError("Hub model ids need huggingface_hub: pip install 'tuckerctl[hub]'") from None
    return huggingface_hub


def _from_hub(repo_id: str, revision: str | None, attention_only: bool) -> Source:
    hub = _hub()
    from huggingface_hub import errors as hub_errors

    def fetch(filename: str, required: bool = True) -> Path | None:
        # The local cache first: no network when the file is there (also offline).
        try:
            return Path(hub.hf_hub_download(repo_id, filename, revision=revision, local_files_only=True))
        except hub_errors.LocalEntryNotFoundError:
            pass
        except hub_errors.EntryNotFoundError:
            return None
        try:
            return Path(hub.hf_hub_download(repo_id, filename, revision=revision))
        except hub_errors.RepositoryNotFoundError:
            raise InputError(f"{repo_id}: no such model on the Hub (or it is private: log in with "
                             f"`hf auth login`)") from None
        except hub_errors.RevisionNotFoundError:
            raise InputError(f"{repo_id}: no revision {revision!r}") from None
        except hub_errors.EntryNotFoundError:
            if required:
                raise InputError(f"{repo_id}: the repository has no {filename}") from None
            return None
        except hub_errors.LocalEntryNotFoundError:
            raise InputError(f"{repo_id}: {filename} is not in the local Hugging Face cache and the Hub "
                             f"cannot be reached (offline?)") from None
        except (hub_errors.HfHubHTTPError, OSError) as e:
            raise InputError(f"{repo_id}: cannot download {filename} ({str(e).splitlines()[0]})") from None

    config = fetch("config.json")
    index = fetch(INDEX, required=False)
    if index is None:
        weights = fetch("model.safetensors", required=False)
        if weights is None:
            raise InputError(f"{repo_id}: neither {INDEX} nor model.safetensors in the repository "
                             f"(GGUF repositories: download the .gguf file and give its path)")
        return Source(weights.parent, repo_id, repo_id, revision)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{repo_id}: {INDEX} is not a valid index (no 'weight_map')") from None
    shards = sorted({f for name, f in weight_map.items() if not attention_only or is_attention_tensor(name)})
    for shard in shards:
        fetch(shard)
    return Source(config.parent, repo_id, repo_id, revision, partial=attention_only)


def display_name(source: Source, config: dict | None, metadata: dict | None) -> str:
    """The name people use: Hub repo id, config ``_name_or_path``, GGUF ``general.name``,
    else the file or folder name."""
    if source.name:
        return source.name
    for value in ((config or {}).get("_name_or_path"), (metadata or {}).get("general.name")):
        if isinstance(value, str) and value.strip() and not Path(value).is_absolute():
            return value.strip()
    p = Path(str(source.path).rstrip("/\\"))
    return p.stem if p.suffix in (".safetensors", ".gguf") else (p.name or str(p))
