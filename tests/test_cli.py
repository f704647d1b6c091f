"""The command line as users and CI scripts see it: JSON on stdout, exit codes, one-line errors.

Most cases run in-process (``oracle.run_cli``: ``cli.main`` under typer's CliRunner); the
few that are about the process itself (the ``python -m tuckerctl`` entry point, exit codes
and stderr as a shell sees them) run a subprocess."""

import json
import shutil
import subprocess
import sys

import pytest
from oracle import assert_user_error, run_cli
from safetensors.torch import load_file, save_file


def subprocess_cli(*args):
    return subprocess.run([sys.executable, "-m", "tuckerctl", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def check_mode(m):
    assert set(m) >= {"size", "ceiling", "numerical_rank", "energy_ranks", "entropy_rank", "stable_rank",
                      "singular_values"}
    assert isinstance(m["size"], int) and isinstance(m["ceiling"], int) and isinstance(m["numerical_rank"], int)
    assert all(isinstance(v, int) for v in m["energy_ranks"].values())
    sv = m["singular_values"]
    assert all(a >= b for a, b in zip(sv, sv[1:])) and len(sv) <= m["size"]
    assert m["numerical_rank"] <= m["structural_rank"] <= m["ceiling"] <= m["size"]
    assert 0 < m["tol"] < 1


def check_analysis(doc, layers):
    assert doc["schema"] == "tuckerctl.analysis/2" and isinstance(doc["tool_version"], str)
    assert doc["source"]["format"] in ("safetensors", "gguf") and doc["source"]["path"]
    model = doc["model"]
    for key, typ in (("family", str), ("layers", int), ("d", int), ("heads", int), ("kv_heads", int),
                     ("head_dim", int), ("bias", bool), ("rope", bool), ("qk_norm", bool)):
        assert isinstance(model[key], typ), key
    assert isinstance(doc["settings"]["energy"], list) and doc["settings"]["tol"] is None
    noise = doc["settings"]["noise_model"]
    assert noise["dtype"] == "F32" and 0 < noise["relative_rms"] < 1e-7
    assert [layer["index"] for layer in doc["layers"]] == layers
    for layer in doc["layers"]:
        for key, modes in (("pre", ("head", "query", "key")), ("post", ("head", "output", "value"))):
            assert len(layer[key]["shape"]) == 3
            assert set(layer[key]["modes"]) == set(modes)
            for m in layer[key]["modes"].values():
                check_mode(m)
        assert isinstance(layer["params"]["original"], int)


def test_analyze_json_stdout_is_valid(tiny_llama):
    res = run_cli("analyze", tiny_llama, "--json", "--layers", "0,2", "--energy", "0.5,0.99")
    assert res.code == 0, res.stderr
    doc = json.loads(res.stdout)
    check_analysis(doc, [0, 2])
    assert doc["settings"]["energy"] == [0.5, 0.99]
    key = doc["layers"][0]["pre"]["modes"]["key"]
    assert key["ceiling"] == 32 and key["numerical_rank"] == 32  # G * d_h
    assert "Ranks per layer and mode" in res.stderr  # the table goes to stderr


def test_analyze_output_file_and_quiet(tiny_llama, tmp_path):
    out = tmp_path / "a.json"
    res = run_cli("analyze", tiny_llama, "--output", out, "--quiet")
    assert res.code == 0 and res.stdout == "" and res.stderr == ""
    check_analysis(json.loads(out.read_text()), [0, 1, 2])


def test_inspect(tiny_llama):
    res = run_cli("inspect", tiny_llama, "--json")
    assert res.code == 0
    doc = json.loads(res.stdout)
    assert doc["model"]["attention"] == "GQA"
    assert [t["name"] for t in doc["layer0"]["tensors"]][0] == "model.layers.0.self_attn.q_proj.weight"


def test_help_has_examples():
    for cmd in ("analyze", "inspect", "compress", "verify", "report"):
        res = run_cli(cmd, "--help")
        assert res.code == 0 and "Example" in res.stdout


def test_truncated_file(tiny_llama, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_llama, dst)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_user_error(run_cli("analyze", dst), "model.safetensors", "truncated")


def test_missing_shard(tiny_llama, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_llama, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, str(dst / "model-00001-of-00002.safetensors"))
    (dst / "model.safetensors").unlink()
    wm = {k: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors")
          for i, k in enumerate(names)}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    assert_user_error(run_cli("analyze", dst), "missing shard model-00002-of-00002.safetensors")


def test_unknown_family(tiny_llama, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_llama, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (dst / "config.json").write_text(json.dumps(cfg))
    assert_user_error(run_cli("analyze", dst), "unknown family 'mamba'")


def test_inconsistent_heads(tiny_llama):
    assert_user_error(run_cli("analyze", tiny_llama, "--heads", "4"), "q_proj.weight", "heads=4")


@pytest.mark.parametrize("args,fragment", [
    (("--layers", "7"), "--layers"), (("--energy", "1.5"), "--energy"), (("--device", "tpu"), "--device")])
def test_bad_options(tiny_llama, args, fragment):
    assert_user_error(run_cli("analyze", tiny_llama, *args), fragment)


def test_no_config_needs_heads(tiny_llama, tmp_path):
    dst = tmp_path / "m"
    dst.mkdir()
    shutil.copy(tiny_llama / "model.safetensors", dst)
    assert_user_error(run_cli("analyze", dst), "--heads")
    res = run_cli("analyze", dst, "--heads", "8", "--kv-heads", "2", "--json", "--quiet")
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["layers"][0]["pre"]["modes"]["key"]["numerical_rank"] == 32


def test_usage_error_exit_code():
    assert run_cli("analyze").code == 2
    assert run_cli("frobnicate").code == 2


def test_process_exit_codes_and_one_line_errors(tiny_llama, tmp_path):
    """The entry point as a shell sees it: exit 2 with one stderr line and no traceback for
    bad input, 2 for bad usage, 0 and JSON on stdout for success."""
    dst = tmp_path / "m"
    shutil.copytree(tiny_llama, dst)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_user_error(subprocess_cli("analyze", dst), "model.safetensors", "truncated")
    assert subprocess_cli("frobnicate").returncode == 2
    res = subprocess_cli("inspect", tiny_llama, "--json", "--quiet")
    assert res.returncode == 0 and json.loads(res.stdout)["model"]["attention"] == "GQA" and res.stderr == ""
