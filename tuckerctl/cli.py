"""The ``tuckerctl`` command line: a thin layer over the library.

Conventions: machine output (``--json``) on stdout or ``--output FILE``; tables and
progress on stderr (progress only on a TTY); exit 0 success, 1 a check failed,
2 bad usage or unreadable/unsupported input (one line, no traceback).
"""

from __future__ import annotations

import functools
import math
import os
import sys
from dataclasses import asdict, dataclass, fields
from inspect import Parameter, signature
from pathlib import Path
from typing import Annotated, get_type_hints

import typer
from rich.console import Console
from rich.text import Text

from . import __version__, options
from .errors import CheckFailed, InputError, printable
from .outputs import Target, Terminated, claim, dumps_strict, install_signal_handlers, write_text

app = typer.Typer(
    name="tuckerctl",
    help="Measure and compress the attention weights of transformer checkpoints with Tucker decompositions.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err = Console(stderr=True)
if not err.is_terminal:  # logs and CI: do not wrap at 80 columns unless COLUMNS says so
    err = Console(stderr=True, width=int(os.environ["COLUMNS"]) if os.environ.get("COLUMNS", "").isdigit() else 200)

# ------------------------------------------------------------------ shared options

SOURCE_PANEL = "Reading the checkpoint"
ANALYSIS_PANEL = "Analysis"
Config = Annotated[Path | None, typer.Option(
    "--config", rich_help_panel=SOURCE_PANEL, help="config.json to use instead of the one beside the checkpoint.")]


@dataclass
class ModelSource:
    """How to read a checkpoint's structure: ``--config`` and the overrides of its fields
    (analyze, inspect, compress, report); the library takes them as keyword arguments."""

    config: Config = None
    heads: Annotated[int | None, typer.Option(
        "--heads", help="Query heads H (needed without config.json).", rich_help_panel=SOURCE_PANEL)] = None
    kv_heads: Annotated[int | None, typer.Option(
        "--kv-heads", help="KV heads G (GQA groups).", rich_help_panel=SOURCE_PANEL)] = None
    head_dim: Annotated[int | None, typer.Option(
        "--head-dim", help="Per-head width d_h.", rich_help_panel=SOURCE_PANEL)] = None
    family: Annotated[str | None, typer.Option(
        "--family", help="Force the architecture family (config model_type).", rich_help_panel=SOURCE_PANEL)] = None


@dataclass
class AnalysisOptions:
    """What ``analyze`` measures (analyze, and report on checkpoints); ``energy`` is parsed by
    :func:`_analysis_options`."""

    layers: Annotated[str | None, typer.Option(
        "--layers", help="Layers to analyse, e.g. 0,5-7 (default all).", rich_help_panel=ANALYSIS_PANEL)] = None
    energy: Annotated[str, typer.Option(
        "--energy", help="Energy thresholds for the energy ranks.", rich_help_panel=ANALYSIS_PANEL)] = \
        "0.9,0.99,0.999"
    tol: Annotated[float | None, typer.Option(
        "--tol", help="Numerical-rank tolerance relative to sigma_1 (default from the stored dtype).",
        rich_help_panel=ANALYSIS_PANEL)] = None


def bundled(name: str, bundle: type):
    """Decorator: give a command the options of the dataclass ``bundle`` (fields annotated with
    Typer options) and pass them to it as one ``name`` argument, so that an option shared by
    several commands is declared once. Typer reads the signature set here."""
    hints = get_type_hints(bundle, include_extras=True)
    added = [Parameter(f.name, Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
             for f in fields(bundle)]

    def wrap(command):
        params = [p for p in signature(command, eval_str=True).parameters.values() if p.name != name]

        @functools.wraps(command)
        def run(*args, **kwargs):
            return command(*args, **{name: bundle(**{f.name: kwargs.pop(f.name) for f in fields(bundle)})},
                           **kwargs)

        run.__signature__ = signature(command).replace(parameters=params + added)
        del run.__wrapped__  # Typer must see the signature above, not the command's
        return run

    return wrap

Device = Annotated[str, typer.Option(
    "--device", help="auto | cpu | cuda | cuda:N.")]
Json = Annotated[bool, typer.Option(
    "--json", help="Write the JSON document to stdout.")]
Output = Annotated[Path | None, typer.Option(
    "--output",
    help="Write the JSON document to this file (new, or with --overwrite an earlier tuckerctl JSON; never an "
         "input).")]
Overwrite = Annotated[bool, typer.Option(
    "--overwrite", help="Replace an existing output written by tuckerctl.")]
# -o is always where a command's result goes: the JSON file of analyze/inspect/verify, the
# directory of compress/report (whose --output is the JSON document beside it).
OutputFile = Annotated[Path | None, typer.Option(
    "--output", "-o",
    help="Write the JSON document to this file (new, or with --overwrite an earlier tuckerctl JSON; never an "
         "input).")]
Quiet = Annotated[bool, typer.Option(
    "--quiet", "-q", help="No tables or progress on stderr.")]
Revision = Annotated[str | None, typer.Option(
    "--revision", rich_help_panel=SOURCE_PANEL,
    help="Hub model ids and cache folders: branch, tag or commit (default main).")]


def _progress(quiet: bool, label: str, unit: str = "layers"):
    """A (callback, context manager) pair; silent unless stderr is a TTY.

    The bar is shown at once (before torch is imported and the checkpoint opened), so
    a start never looks hung; it counts ``unit`` and estimates the time left."""
    if quiet or not err.is_terminal:
        import contextlib

        return None, contextlib.nullcontext()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn(unit), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                   console=err, transient=True)
    task = bar.add_task(f"{label}: starting (importing torch, opening the checkpoint)", total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total, description=label)

    return update, bar


def claim_json(output: Path | None, inputs, overwrite: bool):
    """Clear ``--output`` for writing before any work (:func:`tuckerctl.outputs.claim`)."""
    return None if output is None else claim(output, "json", inputs=inputs, overwrite=overwrite)


def emit_json(doc: dict, to_stdout: bool, output) -> None:
    """Write the document (strict JSON) to stdout and/or a claimed output (temp file + rename).

    ``output``: a :class:`tuckerctl.outputs.Target` from :func:`claim_json`, or a path
    (then claimed here: a new file only)."""
    # Compact: json's C encoder only serves indent=None (a 70B document, 49 MB indented, took
    # 4.3 s to encode indented and 1.4 s compact); `jq .` pretty-prints it for reading.
    text = dumps_strict(doc, separators=(",", ":"))
    if output is not None:
        target = output if isinstance(output, Target) else claim(output, "json")
        write_text(target, text + "\n")
    if to_stdout:
        sys.stdout.write(text + "\n")


def _analysis_options(energy: str, tol, device) -> tuple[float, ...]:
    """Check the analysis options before any work; returns the energy levels."""
    options.device(device)
    if tol is not None:
        options.fraction(tol, "tol", closed=False)
    return options.energies(energy)


# ------------------------------------------------------------------ commands

SOURCES_HELP = ("Checkpoints: .safetensors files, (sharded) model directories, .gguf files, Hugging Face cache "
                "folders or Hub model ids (org/name); globs allowed.")
RopeOffsets = Annotated[int, typer.Option(
    "--rope-offsets", min=0, rich_help_panel=ANALYSIS_PANEL,
    help="RoPE models: average the query-key mode spectra over offsets 0..N-1 (0: the zero-offset form W\\[h] = "
         "W_Q^h W_K^gT).")]


def expand_sources(sources: list[str]) -> list[str]:
    """Expand glob patterns the shell left alone; natural order (step-200 before step-1000)."""
    import glob
    import re

    def natural(s: str):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]

    out: list[str] = []
    for s in sources:
        if not Path(s).exists() and any(c in s for c in "*?["):
            found = sorted(glob.glob(s), key=natural)
            if not found:
                raise InputError(f"{s}: no file or folder matches this pattern")
            out.extend(found)
        else:
            out.append(s)
    return out


def _checked_sources(sources: list[str], layers: str | None) -> list[str]:
    """Usage checks before torch is imported: globs, analysis JSONs given as checkpoints,
    the --layers syntax."""
    from .usage import check_checkpoint_source, parse_layer_spec

    paths = expand_sources(sources)
    for p in paths:
        check_checkpoint_source(p)
    if layers:
        parse_layer_spec(layers)
    return paths


def _analysis_docs(sources: list[str], quiet: bool, show: bool, wide: bool = False, **options) -> list[dict]:
    """Analyse each source in turn (printing its table unless quiet/``show`` is off)."""
    from .distributed import is_writer, leave, thread_hint

    quiet = quiet or not is_writer()  # under torchrun only rank 0 shows progress and tables
    if not quiet and (hint := thread_hint()):
        err.print(hint, highlight=False)
    docs = []
    for k, src in enumerate(sources):
        what = f"analyze {src}" + ("" if len(sources) == 1 else f" ({k + 1}/{len(sources)})")
        callback, ctx = _progress(quiet, what)
        try:
            with ctx:
                from .analysis import analyze as run  # torch: imported while the bar already shows

                docs.append(run(src, progress=callback, **options))
        finally:
            if k == len(sources) - 1:
                leave()
        from .tables import print_analysis

        if show and not quiet:
            if len(sources) > 1:
                err.rule(f"{docs[-1]['source']['name']} ({src})", style="dim")
            print_analysis(docs[-1], err, wide=wide)
    return docs


@app.command()
@bundled("source", ModelSource)
@bundled("measure", AnalysisOptions)
def analyze(
    sources: Annotated[list[str], typer.Argument(
        help=SOURCES_HELP, show_default=False)],
    source: ModelSource = None,
    measure: AnalysisOptions = None,
    rope_offsets: RopeOffsets = 2048,
    cross_check: Annotated[bool, typer.Option(
        "--cross-check",
        help="Also compute the spectra of every layer of at most 16 Mi numbers per tensor the dense "
             "way, with TensorLy; exit 1 when they deviate by more than 1e-6 sigma_1.")] = False,
    device: Device = "auto",
    revision: Revision = None,
    wide: Annotated[bool, typer.Option(
        "--wide", help="One table for both tensors (needs a wide terminal).")] = False,
    json_out: Json = False,
    output: OutputFile = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
):
    """Multilinear ranks of every layer's query-key and value-output tensors.

    Several sources give one document with a "models" list (schema tuckerctl.analyses/1).

    Example: [bold]tuckerctl analyze model/ --layers 0-3 --json > analysis.json[/bold]
    """
    from . import __version__ as version

    paths = _checked_sources(sources, measure.layers)
    energies = _analysis_options(measure.energy, measure.tol, device)
    from .distributed import is_writer

    # Under torchrun only rank 0 writes: the others neither claim nor write the output.
    target = claim_json(output, [*paths, source.config], overwrite) if is_writer() else None
    docs = _analysis_docs(paths, quiet, True, wide, **asdict(source), layers=measure.layers, energy=energies,
                          tol=measure.tol, device=device, revision=revision, rope_offsets=rope_offsets)
    if not is_writer():  # under torchrun every rank holds the documents; rank 0 checks and writes them
        return
    doc = docs[0] if len(docs) == 1 else {"schema": "tuckerctl.analyses/1", "tool_version": version,
                                          "models": docs}
    if cross_check:
        from .crosscheck import cross_check as check

        for src, d in zip(paths, docs):
            cc = d["cross_check"] = check(src, d, **asdict(source), rope_offsets=rope_offsets, device=device,
                                          revision=revision)
            if not quiet:
                err.print(f"cross-check against TensorLy ({src}): {len(cc['layers'])} layers, largest deviation "
                          f"{cc['max_deviation']:.2e} sigma_1 (tolerance {cc['tolerance']:g})"
                          + (f"; not checked (too large): {cc['skipped']}" if cc["skipped"] else ""),
                          highlight=False)
    emit_json(doc, json_out, target)
    worst = max((d["cross_check"]["max_deviation"] for d in docs if not d["cross_check"]["passed"]),
                default=None) if cross_check else None
    if worst is not None:
        raise CheckFailed(f"structured spectra deviate from TensorLy's by {worst:.3g} sigma_1 "
                          f"(tolerance {docs[0]['cross_check']['tolerance']:g})")


@app.command()
@bundled("source", ModelSource)
def inspect(
    path: Annotated[str, typer.Argument(
        help="A .safetensors file, a (sharded) model directory, a .gguf file, a Hugging Face cache folder or a "
             "Hub model id (org/name).")],
    source: ModelSource = None,
    revision: Revision = None,
    json_out: Json = False,
    output: OutputFile = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
):
    """Show the detected structure, tensor by tensor (reads one layer only).

    Example: [bold]tuckerctl inspect model.safetensors[/bold]
    """
    from .usage import check_checkpoint_source

    check_checkpoint_source(path)
    output = claim_json(output, [path, source.config], overwrite)
    from .analysis import inspect as run
    from .tables import print_inspect

    doc = run(path, **asdict(source), revision=revision)
    if not quiet:
        print_inspect(doc, err)
    emit_json(doc, json_out, output)


@app.command()
@bundled("source", ModelSource)
def compress(
    path: Annotated[Path, typer.Argument(
        help="The source checkpoint (file, directory or .gguf).")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Output directory (written atomically).")],
    ranks: Annotated[str | None, typer.Option(
        "--ranks", help="head,query,key ranks, e.g. 8,128,64 (both tensors unless --ranks-post).")] = None,
    ranks_post: Annotated[str | None, typer.Option(
        "--ranks-post", help="head,output,value ranks of the post-softmax tensor.")] = None,
    energy: Annotated[float | None, typer.Option(
        "--energy", help="Per-layer, per-mode ranks keeping this fraction of each mode's energy.")] = None,
    params: Annotated[float | None, typer.Option(
        "--params",
        help="Fraction of the attention parameters to keep; ranks allocated across layers and modes.")] = None,
    hooi_iters: Annotated[int, typer.Option(
        "--hooi-iters", help="HOOI sweeps after the truncated HOSVD.")] = 2,
    dtype: Annotated[str | None, typer.Option(
        "--dtype",
        help="Stored factor dtype: float32, bfloat16, float16 (default: the source's; float32 for "
             "float32/fp8/quantised sources).")] = None,
    structure: Annotated[str, typer.Option(
        "--structure",
        help="Query-key structure: qk-input (exact with the model's own RoPE; the default for RoPE "
             "models), tucker (3-mode, heads mixed; the default otherwise; on RoPE models it needs "
             "latent RoPE, an approximation).")] = "auto",
    check: Annotated[bool, typer.Option(
        "--check/--no-check", help="Verify the written checkpoint.")] = True,
    max_error: Annotated[float | None, typer.Option(
        "--max-error", help="With the check: exit 1 when a layer's relative weight error exceeds this.")] = None,
    tokens: Annotated[int, typer.Option(
        "--tokens", help="Random tokens for the functional check.")] = 64,
    calibrate: Annotated[Path | None, typer.Option(
        "--calibrate",
        help="Text file: run the original model on it and minimise the error of the layers' outputs on "
             "those inputs (needs transformers).")] = None,
    calib_tokens: Annotated[int, typer.Option(
        "--calib-tokens", help="Calibration tokens (from the start of the --calibrate text).")] = 4096,
    method: Annotated[str, typer.Option(
        "--method",
        help="tucker (shared subspaces per layer) or svd (per-matrix SVD baseline, SVD-LLM style "
             "when calibrated).")] = "tucker",
    tensors: Annotated[str, typer.Option(
        "--tensors", help="Which tensors to compress: pre (query-key), post (value-output) or both.")] = "both",
    overwrite: Annotated[bool, typer.Option(
        "--overwrite",
        help="Replace existing outputs written by tuckerctl (never an input, never anything else).")] = False,
    source: ModelSource = None,
    device: Device = "auto",
    json_out: Json = False,
    output: Output = None,
    quiet: Quiet = False,
):
    """Write a compressed Tucker checkpoint (HOSVD + HOOI from the factors), then check it.

    Example: [bold]tuckerctl compress model/ --params 0.5 --calibrate calib.txt -o model-tucker/[/bold]
    """
    from .usage import check_checkpoint_source, check_ranks_options

    check_checkpoint_source(str(path))
    check_ranks_options(ranks, ranks_post, energy, params)
    ranks, ranks_post = options.parse_ranks(ranks, "ranks"), options.parse_ranks(ranks_post, "ranks_post")
    options.compress_choice(ranks, ranks_post, energy, params, hooi_iters, dtype)
    options.device(device)
    options.non_negative(max_error, "max_error")
    options.positive_int(tokens, "tokens")
    if max_error is not None and not check:
        raise InputError("--max-error needs the check: drop --no-check (or --max-error)")
    config = source.config
    claim(out, "checkpoint", inputs=[path, config, calibrate], overwrite=overwrite)
    output = claim_json(output, [path, config, calibrate, out], overwrite)
    from .compress import compress as run
    from .distributed import is_writer, leave, thread_hint
    from .tables import print_compress, print_verify
    from .verify import verify

    if is_writer() and not quiet and (hint := thread_hint()):
        err.print(hint, highlight=False)
    callback, ctx = _progress(quiet or not is_writer(), "compress")
    try:
        with ctx:
            doc = run(path, out, ranks=ranks, ranks_post=ranks_post, energy=energy, params=params,
                      hooi_iters=hooi_iters, device=device, dtype=dtype, overwrite=overwrite, structure=structure,
                      **asdict(source), calibrate=calibrate, calib_tokens=calib_tokens, method=method, tensors=tensors,
                      progress=callback)
    finally:
        leave()
    if doc is None:  # a torchrun rank other than 0: rank 0 writes, checks and reports
        return
    if not quiet:
        print_compress(doc, out, err)
    elif doc.get("warnings"):  # a result bigger than its source is worth a line even when quiet
        for warning in doc["warnings"]:
            err.print(f"warning: {warning}", highlight=False)
    if check:
        callback, ctx = _progress(quiet, "verify")
        with ctx:
            doc["check"] = verify(out, path, max_error=max_error, tokens=tokens, device=device, config=config,
                                  progress=callback)
        if not quiet:
            print_verify(doc["check"], err)
    emit_json(doc, json_out, output)
    if check and doc["check"]["passed"] is False:
        raise CheckFailed(f"relative weight error {doc['check']['max_rel_error']:.3g} exceeds "
                          f"--max-error {max_error}")


@app.command()
def verify(
    compressed: Annotated[Path, typer.Argument(
        help="A checkpoint written by tuckerctl compress.")],
    against: Annotated[Path, typer.Option(
        "--against", help="The source checkpoint it was compressed from.")],
    max_error: Annotated[float | None, typer.Option(
        "--max-error", help="Exit 1 when a layer's relative weight error (either tensor) exceeds this.")] = None,
    tokens: Annotated[int, typer.Option(
        "--tokens", help="Random tokens for the functional check.")] = 64,
    seed: Annotated[int, typer.Option(
        "--seed", help="Seed of the random tokens.")] = 0,
    config: Config = None,
    device: Device = "auto",
    json_out: Json = False,
    output: OutputFile = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
):
    """Reconstruction checks: per-layer weight errors (dense, per head) and attention output errors.

    Example: [bold]tuckerctl verify out/ --against model/ --max-error 0.05 --json[/bold]
    """
    from .usage import check_checkpoint_source

    check_checkpoint_source(str(against))
    options.non_negative(max_error, "max_error")
    options.positive_int(tokens, "tokens")
    options.device(device)
    output = claim_json(output, [compressed, against, config], overwrite)
    from .tables import print_verify
    from .verify import verify as run

    callback, ctx = _progress(quiet, "verify")
    with ctx:
        doc = run(compressed, against, max_error=max_error, tokens=tokens, seed=seed, device=device,
                  config=config, progress=callback)
    if not quiet:
        print_verify(doc, err)
    emit_json(doc, json_out, output)
    if doc["passed"] is False:
        raise CheckFailed(f"relative weight error {doc['max_rel_error']:.3g} exceeds --max-error {max_error}")


@app.command("eval")
def eval_(
    compressed: Annotated[Path, typer.Argument(
        help="A checkpoint written by tuckerctl compress.")],
    against: Annotated[Path, typer.Option(
        "--against", help="The original checkpoint (directory with config.json, or .gguf).")],
    text: Annotated[Path, typer.Option(
        "--text", help="UTF-8 text file to score the models on.")],
    seq_len: Annotated[int, typer.Option(
        "--seq-len", help="Tokens per window (non-overlapping windows).")] = 512,
    max_tokens: Annotated[int | None, typer.Option(
        "--max-tokens", help="Score at most this many tokens (from the start of the text).")] = None,
    max_kld: Annotated[float | None, typer.Option(
        "--max-kld", help="Exit 1 when the mean KL divergence exceeds this.")] = None,
    max_ppl_ratio: Annotated[float | None, typer.Option(
        "--max-ppl-ratio", help="Exit 1 when compressed / original perplexity exceeds this.")] = None,
    device: Device = "auto",
    json_out: Json = False,
    output: Output = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
):
    """Score a compressed model against the original on real text: perplexity of both,
    KL divergence and top-1 agreement of the next-token distributions (causal LMs), or
    cosine similarity of the final hidden states (encoders). Needs transformers.

    Example: [bold]tuckerctl eval out/ --against model/ --text wiki.txt --max-kld 0.05 --json[/bold]
    """
    options.device(device)
    output = claim_json(output, [compressed, against, text], overwrite)
    from .evaluate import evaluate
    from .tables import print_eval

    callback, ctx = _progress(quiet, "eval", unit="tokens")
    with ctx:
        doc = evaluate(compressed, against, text, seq_len=seq_len, max_tokens=max_tokens, device=device,
                       max_kld=max_kld, max_ppl_ratio=max_ppl_ratio, progress=callback)
    if not quiet:
        print_eval(doc, err)
    emit_json(doc, json_out, output)
    if not doc["checks"]["passed"]:
        raise CheckFailed("; ".join(doc["checks"]["failures"]))


@app.command()
def heal(
    compressed: Annotated[Path, typer.Argument(
        help="A checkpoint written by tuckerctl compress (qk_input structure).")],
    against: Annotated[Path, typer.Option(
        "--against",
        help="The original it was compressed from (model directory or .gguf), run with transformers as the "
             "teacher.")],
    text: Annotated[Path, typer.Option(
        "--text", help="UTF-8 healing text (keep it disjoint from evaluation text).")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Output directory (a normal compressed checkpoint, written atomically).")],
    tokens: Annotated[int, typer.Option(
        "--tokens", help="Tokens of the text to use (from its start).")] = 8192,
    steps: Annotated[int, typer.Option(
        "--steps",
        help="Layer-wise optimiser steps per layer (0: skip the layer-wise pass; needs --kl-steps).")] = 100,
    lr: Annotated[float, typer.Option(
        "--lr", help="Peak step size relative to each tensor's RMS.")] = 0.003,
    kl_steps: Annotated[int, typer.Option(
        "--kl-steps",
        help="Steps of an end-to-end pass after the layer-wise one: all layers' factors jointly on the "
             "next-token KL divergence to the original (0: off).")] = 0,
    kl_lr: Annotated[float | None, typer.Option(
        "--kl-lr",
        help="Peak step size of the end-to-end pass, relative to each tensor's RMS [default: 0.001].")] = None,
    seq_len: Annotated[int, typer.Option(
        "--seq-len", help="Tokens per window.")] = 256,
    batch: Annotated[int, typer.Option(
        "--batch", help="Windows per step.")] = 4,
    seed: Annotated[int, typer.Option(
        "--seed", help="Seed of the window order.")] = 0,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an existing output directory.")] = False,
    device: Device = "auto",
    json_out: Json = False,
    output: Output = None,
    quiet: Quiet = False,
):
    """Distil the Tucker factors layer by layer so each compressed layer reproduces the original
    layer's attention output on real hidden states; same structure and ranks.

    Example: [bold]tuckerctl heal out/ --against model/ --text calib.txt -o out-healed/[/bold]
    """
    from .heal import heal as run

    options.device(device)
    options.positive_int(tokens, "tokens")
    for value, name in ((steps, "--steps"), (kl_steps, "--kl-steps")):
        if value < 0:
            raise InputError(f"{name}: {value} must be at least 0")
    if steps == 0 and kl_steps == 0:
        raise InputError("--steps: 0 layer-wise steps and no --kl-steps leave nothing to do")
    options.positive_int(seq_len, "seq_len")
    options.positive_int(batch, "batch")
    for value, name in ((lr, "--lr"), (kl_lr, "--kl-lr")):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise InputError(f"{name}: expected a positive number, got {value}")
    claim(out, "checkpoint", inputs=[compressed, against, text], overwrite=overwrite)  # refuse before any work
    output = claim_json(output, [compressed, against, text, out], overwrite)
    callback, ctx = _progress(quiet, "heal", unit="steps")
    with ctx:  # Ctrl-C / SIGTERM: nothing is written until the end, atomically
        doc = run(compressed, against, text, out, tokens=tokens, steps=steps, lr=lr, kl_steps=kl_steps,
                  kl_lr=kl_lr, seq_len=seq_len, batch=batch, seed=seed, device=device, overwrite=overwrite,
                  progress=callback)
    if not quiet:
        loss, e2e = doc["loss"], doc["end_to_end"]
        parts = []
        if loss and None not in loss.values():
            parts.append(f"layer-wise held-out relative output loss mean {loss['val_initial_mean']:.4g} -> "
                         f"{loss['val_final_mean']:.4g}, worst {loss['val_initial_max']:.4g} -> "
                         f"{loss['val_final_max']:.4g}")
        if e2e and None not in (e2e["val_kl_initial"], e2e["val_kl_final"]):
            parts.append(f"end-to-end held-out KL {e2e['val_kl_initial']:.4g} -> {e2e['val_kl_final']:.4g} nats")
        err.print(f"healed in {doc['seconds']:.1f} s: "
                  f"{'; '.join(parts) or 'non-finite losses'}; wrote {out}/", highlight=False)
    emit_json({"schema": "tuckerctl.heal/1", **doc}, json_out, output)


@app.command()
def export(
    compressed: Annotated[Path, typer.Argument(
        help="A checkpoint written by tuckerctl compress.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Output transformers directory (written atomically).")],
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an existing output directory.")] = False,
    json_out: Json = False,
    output: Output = None,
    quiet: Quiet = False,
):
    """Materialise the compressed attention back into the family's own projections: a directory that
    loads with plain transformers (AutoModelForCausalLM / AutoModel). Same architecture, so no parameter or
    KV-cache saving.

    Example: [bold]tuckerctl export model-tucker/ -o model-tucker-hf/[/bold]
    """
    from .export import export as run

    output = claim_json(output, [compressed, out], overwrite)
    doc = run(compressed, out, overwrite=overwrite)
    if not quiet:
        err.print(f"wrote {out}/ (loads with transformers' from_pretrained); largest per-layer error added by the "
                  f"per-group split: {doc['max_export_error']:.3g}", highlight=False)
    emit_json(doc, json_out, output)


@app.command()
@bundled("source", ModelSource)
@bundled("measure", AnalysisOptions)
def report(
    sources: Annotated[list[str], typer.Argument(
        show_default=False,
        help="Analysis JSONs (from analyze --json) or checkpoints (analysed first, with the options below); any "
             "number, globs allowed.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Report directory.")],
    compare: Annotated[list[str] | None, typer.Option(
        "--compare",
        help="More analyses or checkpoints to draw over the first (repeatable; the same as listing them).")] = None,
    label: Annotated[list[str] | None, typer.Option(
        "--label",
        help="A label per analysis, in order (repeat it), e.g. --label step-1000; default: the folder "
             "names.")] = None,
    formats: Annotated[str, typer.Option(
        "--format", help="Outputs: png, svg, pdf figures and csv (ranks.csv), combinable: png,csv.")] = "png",
    style: Annotated[str, typer.Option(
        "--style",
        help="Figure size preset: screen, paper (7 in, double column), paper-single (3.5 in panels, "
             "with --panels), slides (16:9).")] = "screen",
    panels: Annotated[bool, typer.Option(
        "--panels", help="Also write one file per panel (<figure>-p<k>.<fmt>).")] = False,
    source: ModelSource = None,
    measure: AnalysisOptions = None,
    revision: Revision = None,
    device: Device = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
):
    """Rank plots and the Tucker-vs-GQA-vs-MLA trade-off, as figures + index.html + summary.md.

    Several analyses: drawn over each other (up to four), and from three on, the ranks
    against the training step (from the folder names or --label) or the model size.

    Example: [bold]tuckerctl report run/step-*/ -o evolution/ --format png,csv[/bold]
    """
    if style not in ("screen", "paper", "paper-single", "slides"):
        raise InputError(f"--style: {style!r} is not one of screen, paper, paper-single, slides")
    paths = expand_sources(list(sources) + list(compare or []))
    if measure.layers:
        from .usage import parse_layer_spec

        parse_layer_spec(measure.layers)
    fmts = options.formats(formats)
    energies = _analysis_options(measure.energy, measure.tol, device)
    inputs = [*paths, source.config]
    claim(out, "report", inputs=inputs, overwrite=overwrite)
    from .report import build_report, load_analyses

    docs: list[dict] = []
    for p in paths:
        if p.endswith(".json"):
            docs.extend(load_analyses(p))
        else:
            docs.extend(_analysis_docs([p], quiet, False, **asdict(source), layers=measure.layers,
                                       energy=energies, tol=measure.tol, device=device, revision=revision))
    written = build_report(docs, out, formats=fmts, labels=label or None, style=style, panels=panels,
                           overwrite=overwrite, inputs=inputs)
    if not quiet:
        err.print(Text(f"wrote {len(written)} files to {out}/ (open {out}/index.html)"))


def _version(value: bool):
    if value:
        print(f"tuckerctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option(
              "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False):
    """tuckerctl: what ranks does this model's attention really have, and how far can it be compressed?"""


def _say(label: str, style: str, message: str) -> None:
    """One line on stderr; the message is printed literally (no rich markup, escape codes shown)."""
    err.print(Text(label, style=style) + Text(" " + printable(message)), highlight=False, soft_wrap=True)


# Library arguments whose option is not ``--`` + the name with dashes.
_OPTION_NAMES = {"formats": "--format", "labels": "--label"}


def option_name(argument: str) -> str:
    """The CLI option of a library keyword argument named in an InputError."""
    return _OPTION_NAMES.get(argument, "--" + argument.replace("_", "-"))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: maps library errors to exit codes without tracebacks.
    ``argv`` defaults to ``sys.argv[1:]`` (tests pass it to run the CLI in-process)."""
    install_signal_handlers()
    try:
        app(args=argv)
    except InputError as e:
        _say("error:", "red", e.for_options(option_name))
        sys.exit(2)
    except CheckFailed as e:
        _say("check failed:", "red", str(e))
        sys.exit(1)
    except (KeyboardInterrupt, Terminated) as e:
        err.print("interrupted" if isinstance(e, KeyboardInterrupt) else f"terminated (signal {e.signum})")
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 128 + e.signum)
    except OSError as e:  # an unexpected read/write failure: still one line, exit 2
        _say("error:", "red", f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))
        sys.exit(2)
    except RecursionError:
        _say("error:", "red", "input nested too deeply")
        sys.exit(2)
