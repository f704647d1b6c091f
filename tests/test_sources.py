"""Models where users keep them: Hugging Face cache folders and Hub model ids.

The cache is built on disk exactly as huggingface_hub lays it out (blobs named by
their hash, snapshots of symlinks, refs/main), and the download path is exercised
against a local HTTP server speaking the Hub's file protocol (HEAD with
X-Repo-Commit / ETag, then GET; 404 + X-Error-Code for missing files). No network.
"""

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tuckerctl.analysis import analyze
from tuckerctl.errors import InputError
from tuckerctl.sources import resolve

CLI = [sys.executable, "-m", "tuckerctl"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "acme/tiny-llama"


@pytest.fixture(scope="module")
def sharded(tiny_llama, tmp_path_factory):
    """The tiny Llama as a two-shard repository: attention tensors in shard 2 only."""
    tensors = load_file(tiny_llama / "model.safetensors")
    attn = {k: v for k, v in tensors.items() if ".self_attn." in k}
    rest = {k: v for k, v in tensors.items() if k not in attn}
    repo = tmp_path_factory.mktemp("repo")
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    save_file(rest, repo / names[0], metadata={"format": "pt"})
    save_file(attn, repo / names[1], metadata={"format": "pt"})
    weight_map = {k: names[0] for k in rest} | {k: names[1] for k in attn}
    (repo / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(tiny_llama / "config.json", repo / "config.json")
    return repo


def make_cache(repo: Path, cache: Path, files=None) -> Path:
    """huggingface_hub's cache layout for REPO at COMMIT; returns the repo folder."""
    folder = cache / ("models--" + REPO.replace("/", "--"))
    snap = folder / "snapshots" / COMMIT
    (folder / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    for f in files or sorted(p.name for p in repo.iterdir()):
        data = (repo / f).read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f).symlink_to(os.path.relpath(blob, snap))
    return folder


def run(*args, env=None):
    full = {**os.environ, **(env or {})}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300, env=full)


@pytest.fixture(scope="module")
def want(sharded):
    """The analysis of the repository read as a plain local directory."""
    return analyze(sharded, device="cpu")


def same_ranks(a, b):
    assert [layer["pre"]["modes"]["key"]["singular_values"] for layer in a["layers"]] == \
        [layer["pre"]["modes"]["key"]["singular_values"] for layer in b["layers"]]
    assert a["summary"]["params_original"] == b["summary"]["params_original"]


@pytest.mark.slow
def test_repo_id_from_the_local_cache_offline(sharded, want, tmp_path):
    make_cache(sharded, tmp_path / "hub")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    res = run("analyze", REPO, "--json", "--quiet", env=env)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["source"]["name"] == REPO and doc["source"]["path"] == REPO
    assert doc["source"]["local_path"].endswith(f"snapshots/{COMMIT}")
    same_ranks(doc, want)
    # --revision by commit hash, and an unknown revision named in a one-line error.
    assert run("analyze", REPO, "--revision", COMMIT, "--quiet", env=env).returncode == 0
    bad = run("analyze", REPO, "--revision", "v9", "--quiet", env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and REPO in bad.stderr


def test_cache_folders_are_named_by_repo_id(sharded, want, tmp_path):
    folder = make_cache(sharded, tmp_path / "hub")
    for path in (folder, folder / "snapshots" / COMMIT):
        doc = analyze(path, device="cpu")
        assert doc["source"]["name"] == REPO  # not the snapshot hash
        same_ranks(doc, want)


def test_cache_with_only_the_attention_shard(sharded, want, tmp_path):
    """A snapshot fetched for analysis lacks the other shards; it still reads."""
    files = ["config.json", "model.safetensors.index.json", "model-00002-of-00002.safetensors"]
    folder = make_cache(sharded, tmp_path / "hub", files)
    same_ranks(analyze(folder, device="cpu"), want)


def test_repo_folder_revision_choice(sharded, tmp_path):
    folder = make_cache(sharded, tmp_path / "hub")
    (folder / "refs" / "main").unlink()
    assert resolve(folder).path == folder / "snapshots" / COMMIT  # the only snapshot
    (folder / "snapshots" / ("f" * 40)).mkdir()
    with pytest.raises(InputError, match="choose one with revision "):
        resolve(folder)
    assert resolve(folder, revision=COMMIT).path == folder / "snapshots" / COMMIT


def test_unknown_local_name_hints_at_repo_ids(tmp_path):
    with pytest.raises(InputError, match="org/name"):
        resolve("nothing-here-at-all")
    with pytest.raises(InputError, match="^revision: .* is a local path"):
        resolve(tmp_path, revision="main")


# ----------------------------------------------------------------------------- download

class HubHandler(http.server.BaseHTTPRequestHandler):
    """The Hub's file endpoint: /{org}/{name}/resolve/{revision}/{file}."""

    repo_dir: Path
    requests: list

    def _file(self):
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve" or "/".join(parts[:2]) != REPO:
            return None, "RepoNotFound"
        if parts[3] not in ("main", COMMIT):
            return None, "RevisionNotFound"
        f = self.repo_dir / "/".join(parts[4:])
        return (f, None) if f.is_file() else (None, "EntryNotFound")

    def _answer(self, body: bool):
        self.requests.append((self.command, self.path))
        f, error = self._file()
        if f is None:
            self.send_response(404)
            self.send_header("X-Error-Code", error)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = f.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):  # noqa: N802
        self._answer(False)

    def do_GET(self):  # noqa: N802
        self._answer(True)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub_server(sharded):
    HubHandler.repo_dir = sharded
    HubHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", HubHandler.requests
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_download_fetches_only_config_index_and_attention_shards(sharded, want, hub_server, tmp_path):
    endpoint, requests = hub_server
    env = {"HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}
    res = run("analyze", REPO, "--json", "--quiet", env=env)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["source"]["name"] == REPO
    same_ranks(doc, want)
    fetched = {p.rsplit("/", 1)[-1] for method, p in requests if method == "GET"}
    assert fetched == {"config.json", "model.safetensors.index.json", "model-00002-of-00002.safetensors"}
    snap = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / COMMIT
    assert not (snap / "model-00001-of-00002.safetensors").exists()
    # Second run: everything comes from the cache, nothing is downloaded again.
    requests.clear()
    res = run("analyze", REPO, "--quiet", env=env)
    assert res.returncode == 0, res.stderr
    assert not [r for r in requests if r[0] == "GET"]


def test_download_errors_are_one_line(hub_server, tmp_path):
    endpoint, _ = hub_server
    env = {"HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_XET": "1"}
    res = run("analyze", "acme/missing", "--quiet", env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "acme/missing" in res.stderr and len(res.stderr.strip().splitlines()) == 1
