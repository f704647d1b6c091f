"""Nothing lost: every output option of every command against every kind of path.

The matrix runs the real CLI entry point in-process (``tuckerctl.cli.main``) over
commands x output options x input forms (directory, file, symlink, Hugging Face cache
snapshot) x targets (the input, its parent, files inside it, new paths inside it,
siblings new and existing, tuckerctl outputs of the right and the wrong kind, empty
directories, symlinks, dangling links) x with/without ``--overwrite``. After each case
every byte (and every symlink) of the tree must be unchanged, except the target when the
case is expected to succeed, and no temp or backup file may be left anywhere.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from oracle import assert_user_error, run_cli, save_llama
from safetensors.torch import save_file

from tuckerctl import outputs
from tuckerctl.errors import InputError

CLI = [sys.executable, "-m", "tuckerctl"]


# ----------------------------------------------------------------------------- the tree

def _fake_outputs(root: Path) -> None:
    (root / "old.json").write_text(json.dumps({"schema": "tuckerctl.analysis/1"}))
    (root / "old_ck").mkdir()
    save_file({"x": torch.zeros(2)}, str(root / "old_ck" / "model.safetensors"), metadata={"tuckerctl": "{}"})
    (root / "old_ck" / "config.json").write_text("{}")
    (root / "old_report").mkdir()
    (root / "old_report" / "index.html").write_text("<title>tuckerctl report: x</title>")
    (root / "old_report" / "summary.md").write_text("# tuckerctl report: x")
    (root / "old_report" / "fig1-spectra.png").write_bytes(b"png")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety-template")
    save_llama(root / "model", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
               num_hidden_layers=2, intermediate_size=16, vocab_size=20)
    os.symlink("model", root / "link")
    # A Hugging Face cache snapshot: files are symlinks into ../../blobs.
    blobs, snap = root / "hf" / "blobs", root / "hf" / "snapshots" / "r1"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    shutil.copy(root / "model" / "model.safetensors", blobs / "b1")
    shutil.copy(root / "model" / "config.json", blobs / "b2")
    os.symlink("../../blobs/b1", snap / "model.safetensors")
    os.symlink("../../blobs/b2", snap / "config.json")
    assert run_cli("compress", root / "model", "-o", root / "ck", "--ranks", "2,8,8", "--no-check", "-q").code == 0
    assert run_cli("analyze", root / "model", "--output", root / "a.json", "-q").code == 0
    os.symlink("a.json", root / "a_link.json")
    _fake_outputs(root)
    (root / "model" / "old.json").write_text(json.dumps({"schema": "tuckerctl.analysis/1"}))
    (root / "notes.txt").write_text("keep me")
    (root / "data").mkdir()
    (root / "data" / "keep.bin").write_bytes(os.urandom(64))
    (root / "empty").mkdir()
    os.symlink("old_ck", root / "out_link")
    os.symlink("nowhere", root / "dangling")
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of the bytes, 'link:target' or 'dir', for the whole tree."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ----------------------------------------------------------------------------- the matrix

MODEL_FORMS = {"dir": "model", "file": "model/model.safetensors", "link": "link", "hf": "hf/snapshots/r1"}
REPORT_FORMS = {"file": "a.json", "link": "a_link.json"}

# (command, output kind, argument builder(input, target)); every builder puts the target in one output option.
COMMANDS = {
    "analyze --output": ("json", lambda i, t: ["analyze", i, "--layers", "0", "--output", t]),
    "inspect --output": ("json", lambda i, t: ["inspect", i, "--output", t]),
    "compress -o": ("checkpoint", lambda i, t: ["compress", i, "-o", t, "--ranks", "2,8,8", "--no-check"]),
    "compress --output": ("json", lambda i, t: ["compress", i, "-o", "ck_new", "--ranks", "2,8,8", "--no-check",
                                                "--output", t]),
    "verify --output": ("json", lambda i, t: ["verify", "ck", "--against", i, "--tokens", "4", "--output", t]),
    "report -o": ("report", lambda i, t: ["report", i, "-o", t]),
}

TARGETS = [
    "model", "link", ".", "hf", "hf/snapshots", "hf/snapshots/r1", "hf/blobs", "hf/blobs/b1",
    "model/model.safetensors", "model/config.json", "link/config.json", "hf/snapshots/r1/config.json",
    "model/new", "link/new", "hf/snapshots/r1/new", "hf/blobs/new", "model/old.json",
    "ck", "ck/model.safetensors", "ck/new", "a.json", "a_link.json",
    "new", "sub/deeper/new", "notes.txt", "data", "data/keep.bin", "empty", "old.json", "old_ck", "old_report",
    "out_link", "dangling", "ck_new",
]
RIGHT_KIND = {"json": {"old.json", "model/old.json", "a.json"}, "checkpoint": {"old_ck", "ck"},
              "report": {"old_report"}}
NEW = {"model/new", "link/new", "hf/snapshots/r1/new", "hf/blobs/new", "ck/new", "new", "sub/deeper/new", "ck_new"}


def inputs_of(command: str, form: str) -> list[str]:
    model = MODEL_FORMS.get(form) if command != "report -o" else REPORT_FORMS[form]
    extra = {"verify --output": ["ck"], "compress --output": ["ck_new"]}.get(command, [])
    return [model, *extra]


def overlaps(command: str, form: str, target: str) -> bool:
    """Does ``target`` touch an input (or another output)? Written out by hand, per form."""
    if target in (".",):
        return True
    touched = {
        "dir": {"model", "link", "model/", "link/"},
        "link": {"model", "link", "model/", "link/"},
        "file": {"model", "link", "model/model.safetensors", "model/config.json", "link/config.json"},
        "hf": {"hf", "hf/snapshots", "hf/snapshots/r1", "hf/snapshots/r1/", "hf/blobs", "hf/blobs/b1",
               "hf/blobs/b2"},
    }
    if command == "report -o":
        return target in {"a.json", "a_link.json"}
    spots = touched[form]
    if command == "verify --output":
        spots = spots | {"ck", "ck/"}
    if command == "compress --output":
        spots = spots | {"ck_new", "ck_new/"}
    return target in spots or any(s.endswith("/") and target.startswith(s) for s in spots)


def expected_ok(command: str, form: str, target: str, overwrite: bool) -> bool:
    kind = COMMANDS[command][0]
    if overlaps(command, form, target) or target in ("out_link", "dangling", "link", "a_link.json"):
        return False
    if target in NEW:
        return True
    if target == "empty":
        return kind != "json"
    return overwrite and target in RIGHT_KIND[kind]


CASES = [(c, f, t, o) for c in COMMANDS for f in (REPORT_FORMS if c == "report -o" else MODEL_FORMS)
         for t in TARGETS for o in (False, True)]


@pytest.fixture(scope="module")
def shared(template, tmp_path_factory):
    """One copy of the template for the cases that must refuse (they must not change it), and
    its snapshot taken once: every case compares the tree with this pristine state."""
    root = tmp_path_factory.mktemp("safety-shared") / "t"
    shutil.copytree(template, root, symlinks=True)
    return root, snapshot(root)


def _run_case(root: Path, command: str, form: str, target: str, overwrite: bool):
    kind, build = COMMANDS[command]
    model = (REPORT_FORMS if command == "report -o" else MODEL_FORMS)[form]
    args = build(model, target) + (["--overwrite"] if overwrite else []) + ["-q"]
    cwd = os.getcwd()
    os.chdir(root)
    try:
        return run_cli(*args)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("command,form,target,overwrite", [
    pytest.param(*c, id=f"{c[0].replace(' ', '')}-{c[1]}-{c[2]}-{'ow' if c[3] else 'new'}")
    for c in CASES if not expected_ok(*c)])
def test_refused_and_nothing_changed(shared, command, form, target, overwrite):
    root, pristine = shared
    assert_user_error(_run_case(root, command, form, target, overwrite))
    assert snapshot(root) == pristine  # every byte, link and directory as it was


def _allowed_cases():
    """Allowed cases, each (command, target, overwrite) once: with the first input form that allows it."""
    seen, out = set(), []
    for c in CASES:
        if expected_ok(*c) and (c[0], c[2], c[3]) not in seen:
            seen.add((c[0], c[2], c[3]))
            out.append(c)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("command,form,target,overwrite", [
    pytest.param(*c, id=f"{c[0].replace(' ', '')}-{c[1]}-{c[2]}-{'ow' if c[3] else 'new'}")
    for c in _allowed_cases()])
def test_allowed_writes_only_the_target(template, tmp_path, monkeypatch, command, form, target, overwrite):
    if command == "report -o":  # the figures take seconds; the claim/staging/commit path is the real one
        from tuckerctl import report

        def quick(analyses, labels, out_dir, *args):
            (out_dir / "index.html").write_text("<title>tuckerctl report: quick</title>")
            return [out_dir / "index.html"]

        monkeypatch.setattr(report, "_write_report", quick)
    root = tmp_path / "t"
    shutil.copytree(template, root, symlinks=True)
    before = snapshot(root)
    res = _run_case(root, command, form, target, overwrite)
    assert res.code == 0, res.stderr
    after = snapshot(root)
    written = {target, os.path.relpath(os.path.realpath(root / target), os.path.realpath(root))}
    written |= {"ck_new"} if command == "compress --output" else set()
    changed = {k for k in before if after.get(k) != before[k]} | (set(after) - set(before))

    def inside(k):
        return any(k == w or k.startswith(w + "/") for w in written) or k in ("sub", "sub/deeper")

    assert {k for k in changed if not inside(k)} == set()  # nothing else touched, no temp/backup left
    kind = COMMANDS[command][0]
    assert outputs.KINDS[kind].recognise(root / target)


def test_every_command_has_refused_and_allowed_cases():
    for command in COMMANDS:
        outcomes = {expected_ok(*c) for c in CASES if c[0] == command}
        assert outcomes == {True, False}, command


# ----------------------------------------------------------------------------- the helper itself

def test_concurrent_writers_exactly_one_wins(tmp_path):
    for kind in ("json", "checkpoint"):
        out = tmp_path / f"out-{kind}"
        a, b = outputs.claim(out, kind), outputs.claim(out, kind)  # both see a new path
        results = []

        def write(target, tag, results=results):
            try:
                with target.staging() as tmp:
                    if target.kind.is_dir:
                        save_file({"x": torch.zeros(1)}, str(tmp / "model.safetensors"), metadata={"tuckerctl": tag})
                    else:
                        tmp.write_text(json.dumps({"schema": "tuckerctl.analysis/1", "by": tag}))
                results.append(("ok", tag))
            except InputError as e:
                results.append(("refused", str(e)))

        threads = [threading.Thread(target=write, args=(t, tag)) for t, tag in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(r[0] for r in results) == ["ok", "refused"], results
        assert "appeared while" in [r[1] for r in results if r[0] == "refused"][0]
        assert sorted(p.name for p in tmp_path.iterdir() if kind in p.name) == [out.name]


@pytest.mark.slow
def test_concurrent_cli_writers(template, tmp_path):
    root = tmp_path / "t"
    shutil.copytree(template, root, symlinks=True)
    args = [*CLI, "compress", "model", "-o", "same", "--ranks", "2,8,8", "--no-check", "-q"]
    procs = [subprocess.Popen(args, cwd=root, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    assert [r[0] for r in results] == [0, 2], results
    assert len(results[1][1].strip().splitlines()) == 1
    assert sorted(p.name for p in root.iterdir() if p.name.startswith((".same", "same"))) == ["same"]


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT])
@pytest.mark.parametrize("where", ["compress", "report", "analyze"])
def test_write_faults_are_one_line_and_leave_nothing(template, tmp_path, monkeypatch, err, where):
    root = tmp_path / "t"
    shutil.copytree(template, root, symlinks=True)
    before = snapshot(root)

    def fail(*a, **k):
        raise OSError(err, os.strerror(err))

    if where == "compress":
        from tuckerctl import tucker_format

        monkeypatch.setattr(tucker_format, "_write_shard", fail)
        args = ["compress", root / "model", "-o", root / "out", "--ranks", "2,8,8", "--no-check"]
    elif where == "report":
        from matplotlib.figure import Figure

        monkeypatch.setattr(Figure, "savefig", fail)
        args = ["report", root / "a.json", "-o", root / "out"]
    else:
        monkeypatch.setattr(Path, "write_text", fail)
        args = ["analyze", root / "model", "--output", root / "out", "--layers", "0", "-q"]
    line = assert_user_error(run_cli(*args))
    assert os.strerror(err).lower().split()[0] in line.lower() or "cannot write" in line
    assert snapshot(root) == before  # no output, no temp directory, inputs intact


def test_fault_in_commit_keeps_old_output(tmp_path, monkeypatch):
    _fake_outputs(tmp_path)
    before = snapshot(tmp_path)
    target = outputs.claim(tmp_path / "old_ck", "checkpoint", overwrite=True)
    real, failed = os.rename, []

    def rename(a, b):
        if Path(b).name == "old_ck" and not failed:  # the new directory's move fails, the restore works
            failed.append(a)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(InputError, match="no space left"):
        with target.staging() as tmp:
            save_file({"y": torch.ones(1)}, str(tmp / "model.safetensors"), metadata={"tuckerctl": "{}"})
    assert snapshot(tmp_path) == before  # the old output is back, nothing else left


def _wait_for_temp(parent: Path, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(p.name.endswith(".tmp") for p in parent.iterdir()):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_write_leaves_nothing(template, tmp_path, sig):
    root = tmp_path / "t"
    shutil.copytree(template, root, symlinks=True)
    before = snapshot(root)
    # Slow the shard write down so that the signal lands while the temp directory exists.
    code = ("import sys, time; import tuckerctl.tucker_format as tf; w = tf._write_shard\n"
            "def slow(*a):\n    w(*a); time.sleep(60)\n"
            "tf._write_shard = slow\nfrom tuckerctl.cli import main\n"
            "sys.argv = ['tuckerctl', 'compress', 'model', '-o', 'out', '--ranks', '2,8,8', '--no-check', '-q']\n"
            "main()\n")
    # A background job's SIGINT is ignored (and inherited); give the child the default back.
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert _wait_for_temp(root, proc), proc.stderr.read() if proc.poll() is not None else "no temp dir"
    proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    assert rc in (128 + sig, 130, 1) and rc != 0, rc
    assert "Traceback" not in proc.stderr.read()
    assert snapshot(root) == before


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_umask_is_respected(template, tmp_path, mask):
    root = tmp_path / "t"
    shutil.copytree(template, root, symlinks=True)
    old = os.umask(mask)
    try:
        assert run_cli("compress", root / "model", "-o", root / "ck2", "--ranks", "2,8,8", "--no-check", "-q",
                       "--output", root / "c.json").code == 0
    finally:
        os.umask(old)
    assert (root / "ck2").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (root / "ck2" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (root / "c.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_checks_before_any_work_and_before_torch(tmp_path):
    """A refused output or a bad option is reported before torch is imported."""
    probe = ("import sys; from tuckerctl.cli import main\nsys.argv = ['tuckerctl'] + sys.argv[1:]\n"
             "try:\n    main()\nfinally:\n    print('torch' in sys.modules, file=sys.stderr)\n")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"x")
    for args in (["compress", "m", "-o", "m", "--ranks", "2,8,8"],
                 ["compress", "m", "-o", "o", "--ranks", "2,8,8", "--max-error", "nan"],
                 ["compress", "m", "-o", "o", "--ranks", "2,8,8", "--no-check", "--max-error", "0.1"],
                 ["compress", "m", "-o", "o", "--ranks", "2,8,8", "--tokens", "0"],
                 ["compress", "m", "-o", "o", "--ranks", "2,8,8", "--max-error", "-1"],
                 ["analyze", "m", "--energy", "nan"], ["analyze", "m", "--tol", "inf"],
                 ["analyze", "m", "--output", "m/a.json"], ["report", "x.json", "-o", "r", "--format", "gif"],
                 ["verify", "m", "--against", "m", "--max-error", "nan"]):
        res = subprocess.run([sys.executable, "-c", probe, *args], cwd=tmp_path, capture_output=True, text=True,
                             timeout=60)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 2 and lines[1] == "False", (args, res.stderr)
