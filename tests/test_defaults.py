"""Defaults that do not surprise (issue 8 section 5): source dtype, size warning, no
'passed' without a bound, tokenizer/generation files carried along."""

import json

import torch
from oracle import run_cli as run
from safetensors import safe_open
from test_compress import make_llama

from tuckerctl.compress import compress


def test_factors_keep_the_source_dtype_unless_told(tmp_path):
    src = make_llama(tmp_path / "src")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    for dtype, want in ((None, torch.bfloat16), ("float32", torch.float32)):
        out = tmp_path / f"out-{dtype}"
        info = compress(tmp_path / "bf16", out, ranks="2,12,8", device="cpu", dtype=dtype)
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert f.get_tensor("tucker.layers.0.post.core").dtype == want
            assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16  # copied as is
        assert info["settings"]["dtype"] == str(want).removeprefix("torch.")


def test_bigger_than_the_original_warns_on_stderr_and_in_json(tmp_path):
    src = make_llama(tmp_path / "src")
    res = run("compress", src, "-o", tmp_path / "big", "--ranks", "100,100,100", "--json", "--no-check")
    doc = json.loads(res.stdout)
    assert res.code == 0 and doc["summary"]["ratio"] > 1
    assert doc["warnings"] and "MORE parameters" in doc["warnings"][0] and "MORE parameters" in res.stderr
    res = run("compress", src, "-o", tmp_path / "small", "--params", "0.5", "--json", "--no-check")
    assert json.loads(res.stdout)["warnings"] == [] and "warning" not in res.stderr


def test_no_bound_no_verdict(tmp_path):
    src = make_llama(tmp_path / "src")
    res = run("compress", src, "-o", tmp_path / "out", "--params", "0.5", "--json")
    doc = json.loads(res.stdout)
    assert res.code == 0 and doc["check"]["passed"] is None
    assert all(row["ok"] is None for row in doc["check"]["layers"])
    for text in (res.stderr, run("verify", tmp_path / "out", "--against", src).stderr):
        assert "passed" not in text and " ok" not in text and "max relative weight error" in text
    res = run("verify", tmp_path / "out", "--against", src, "--max-error", "0.99")
    assert res.code == 0 and "passed" in res.stderr


def test_analyze_and_plain_compress_never_import_transformers(tmp_path):
    """transformers and huggingface_hub are optional extras: analyze and a plain compress
    (Tucker or per-matrix SVD) never import them (only eval, export and --calibrate do).
    A fresh process, since this one has imported them long ago."""
    src = make_llama(tmp_path / "src")
    code = ("import sys\n"
            "from tuckerctl.analysis import analyze; from tuckerctl.compress import compress\n"
            "analyze(sys.argv[1]); compress(sys.argv[1], sys.argv[2] + '/a', params=0.5, device='cpu')\n"
            "compress(sys.argv[1], sys.argv[2] + '/b', params=0.5, method='svd', device='cpu')\n"
            "print(sorted({'transformers', 'huggingface_hub'} & set(sys.modules)))")
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"
    assert (tmp_path / "a" / "model.safetensors").is_file() and (tmp_path / "b" / "model.safetensors").is_file()


def test_export_bad_input_is_one_line_exit_2(tmp_path):
    from oracle import assert_user_error

    src = make_llama(tmp_path / "src")
    assert_user_error(run("export", src, "-o", tmp_path / "hf"), "not a tuckerctl checkpoint")
