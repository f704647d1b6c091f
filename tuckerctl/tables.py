"""Rich tables for the commands (always printed to stderr)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import printable
from .schema import MODE_NAMES, layer_modes


def lit(value) -> str:
    """``value`` as literal console text: markup escaped, control characters made visible."""
    return escape(printable(value))

TENSOR_LABELS = {"pre": "pre-softmax W (query-key)", "post": "post-softmax W̃ (value-output)"}


def _model_line(model: dict) -> str:
    flags = [f for f in ("bias", "rope", "qk_norm") if model.get(f)]
    extra = {k: model[k] for k in ("softcap", "clip_qkv", "alibi", "q_lora_rank", "kv_lora_rank",
                                   "qk_rope_head_dim") if model.get(k)}
    return (f"[bold]{lit(model['family'])}[/bold] ({model['attention']}): {model['layers']} layers, "
            f"d={model['d']}, heads={model['heads']}, kv_heads={model['kv_heads']}, "
            f"head_dim={model['head_dim']}" + (f", value_dim={model['value_dim']}"
                                                if model.get("value_dim") != model["head_dim"] else "")
            + (f"; {', '.join(flags)}" if flags else "")
            + "".join(f", {k}={v}" for k, v in extra.items()))


def print_analysis(doc: dict, console: Console, wide: bool = False) -> None:
    """Model summary, per-layer rank tables, the plain-language reading and the verdicts.

    One table per tensor (each fits an 80-column terminal; the parameter ratio is never
    cut), or one table for both with ``wide``."""
    model = doc["model"]
    console.print(_model_line(model), highlight=False)
    for note in model.get("notes", []):
        console.print(f"  [yellow]note:[/yellow] {lit(note)}", highlight=False)
    energies = [f"{t:g}" for t in doc["settings"]["energy"]]
    st = doc["settings"]
    tol = f"σ > {st['tol']:g}·σ_1" if st.get("tol") is not None else \
        f"σ above the {(st.get('noise_model') or {}).get('dtype', 'stored dtype')} storage noise, per mode"
    console.print(f"Ranks per layer and mode: energy ranks at {' / '.join(energies)} | numerical rank/ceiling "
                  f"({tol}); [green]green[/green]: at the ceiling", highlight=False)
    groups = [("pre", "post")] if wide else [("pre",), ("post",)]
    for keys in groups:
        title = " and ".join(TENSOR_LABELS[k] for k in keys)
        table = Table(title=title, title_justify="left")
        table.add_column("layer", justify="right", no_wrap=True)
        for key in keys:
            for mode in MODE_NAMES[key]:
                table.add_column(mode if not wide else f"{key}\n{mode}", justify="right")
        if keys[-1] == "post":
            table.add_column("Tucker@0.99\n/ original", justify="right", no_wrap=True, min_width=11)
        for layer in doc["layers"]:
            cells = [str(layer["index"])]
            for _, _, m in layer_modes(layer, keys):
                e = " ".join(str(m["energy_ranks"][t]) for t in energies)
                at = "[green]" if m["numerical_rank"] >= m["ceiling"] else ""
                cells.append(f"{e} | {at}{m['numerical_rank']}/{m['ceiling']}")
            if keys[-1] == "post":
                p = layer["params"]
                tucker = next(v for k, v in p.items() if k.startswith("tucker_"))
                cells.append(f"{100 * tucker / p['original']:.0f}%" if p["original"] else "–")
            table.add_row(*cells)
        console.print(table)
    summary = doc.get("summary", {})
    headline = summary.get("headline", [])
    for line in headline:
        console.print(f"[bold]{lit(line)}[/bold]", highlight=False)
    details = [v for v in summary.get("verdicts", []) if v not in headline]
    if details:
        console.print("[dim]Details:[/dim]", highlight=False)
    for line in details:
        console.print(f"• {lit(line)}", highlight=False)
    secs = summary.get("seconds")
    if secs is not None:
        console.print(f"[dim]{len(doc['layers'])} layers in {secs:.2f} s on {doc['settings']['device']}[/dim]")


def print_inspect(doc: dict, console: Console) -> None:
    src = doc["source"]
    console.print(f"{lit(src['path'])} ({src['format']}, {src['tensors']} tensors, config: {lit(src['config'])})",
                  highlight=False)
    console.print(_model_line(doc["model"]), highlight=False)
    for note in doc["model"].get("notes", []):
        console.print(f"  [yellow]note:[/yellow] {lit(note)}", highlight=False)
    layer = doc["layer0"]
    table = Table(title="Layer 0 tensors read", title_justify="left")
    for col in ("tensor", "dtype", "shape"):
        table.add_column(col)
    for t in layer["tensors"]:
        table.add_row(lit(t["name"]), lit(t["dtype"]), "×".join(map(str, t["shape"])))
    console.print(table)
    console.print(f"pre-softmax tensor {layer['pre_shape']} ceilings {layer['pre_ceilings']}; "
                  f"post-softmax tensor {layer['post_shape']} ceilings {layer['post_ceilings']}; "
                  f"{layer['params']:,} attention parameters per layer", highlight=False)


def print_compress(doc: dict, out, console: Console) -> None:
    s = doc["summary"]
    svd = doc.get("settings", {}).get("method") == "svd"
    kind, kv = ("per-matrix SVD", "compressed") if svd else ("Tucker", "tucker_max")
    count = s["params_compressed"] if svd else s["params_tucker"]
    weighted = (f", max activation-weighted error {s['max_activation_rel_error']:.3g}"
                if "max_activation_rel_error" in s else "")
    console.print(f"wrote {lit(out)}/: {count:,} {kind} parameters for {s['params_original']:,} "
                  f"attention parameters ({100 * s['ratio']:.1f}%), max relative weight error "
                  f"{s['max_rel_error']:.3g}{weighted}, KV cache per token {s['kv_cache_per_token']['original']} → "
                  f"{s['kv_cache_per_token'][kv]}", highlight=False)
    if "bytes_tucker_all_layers" in s["kv_cache_per_token"]:
        k = s["kv_cache_per_token"]
        console.print(f"  KV cache over all layers: {k['bytes_original_all_layers']:,} → "
                      f"{k['bytes_tucker_all_layers']:,} bytes per token", highlight=False)
    for warning in doc.get("warnings", []):
        console.print(f"  [bold red]warning:[/bold red] {lit(warning)}", highlight=False)
    for note in doc.get("notes", []):
        console.print(f"  [yellow]note:[/yellow] {lit(note)}", highlight=False)


def print_verify(doc: dict, console: Console) -> None:
    limit = doc["settings"]["max_error"]
    table = Table(title=f"Reconstruction check on {doc['settings']['device']} "
                        f"({doc['settings']['tokens']} random tokens"
                        + (f", max error {limit:g}" if limit is not None else "") + ")",
                  title_justify="left")
    svd = doc.get("method") == "svd"
    cols = ("layer", "q×k ranks" if svd else "pre ranks", "pre error", "v×o ranks" if svd else "post ranks",
            "post error", "logits error", "output error")
    for col in cols + (("",) if limit is not None else ()):
        table.add_column(col, justify="right")
    for r in doc["layers"]:
        ranks = lambda rs: "×".join("full" if x is None else str(x) for x in rs)  # noqa: E731  svd: None = kept dense
        row = [str(r["index"]), ranks(r["pre"]["ranks"]), f"{r['pre']['rel_error']:.3g}",
               ranks(r["post"]["ranks"]), f"{r['post']['rel_error']:.3g}",
               f"{r['logits_rel_error']:.3g}", f"{r['output_rel_error']:.3g}"]
        if limit is not None:  # without a bound nothing was checked: no ok/FAIL column
            row.append("[green]ok[/green]" if r["ok"] else "[red]FAIL[/red]")
        table.add_row(*row)
    console.print(table)
    if limit is None:
        console.print(f"max relative weight error {doc['max_rel_error']:.3g} ({doc['seconds']:.1f} s); "
                      f"give --max-error to check it", highlight=False)
        return
    verdict = "[green]passed[/green]" if doc["passed"] else "[red]failed[/red]"
    console.print(f"{verdict}: max relative weight error {doc['max_rel_error']:.3g} ≤ {limit:g} "
                  if doc["passed"] else f"{verdict}: max relative weight error {doc['max_rel_error']:.3g} > {limit:g} ",
                  f"({doc['seconds']:.1f} s)", highlight=False)


def print_eval(doc: dict, console: Console) -> None:
    def num(x, fmt):
        return "—" if x is None else format(x, fmt)

    head = f"{doc['compressed']} vs {doc['against']} on {doc['tokens']:,} tokens ({doc['method']})"
    if doc["model_kind"] == "causal_lm":
        p, k = doc["perplexity"], doc["kl_divergence"]
        console.print(f"{head}: perplexity {num(p['original'], '.4f')} → {num(p['compressed'], '.4f')} "
                      f"(×{num(p['ratio'], '.4f')}), KL divergence mean {num(k['mean'], '.3g')} "
                      f"p99 {num(k['p99'], '.3g')}, top-1 agreement {100 * doc['top1_agreement']:.2f}%",
                      highlight=False)
    else:
        c = doc["cosine"]
        console.print(f"{head}: cosine to the original, token mean {num(c['mean'], '.6f')} min "
                      f"{num(c['min'], '.6f')}, mean-pooled mean {num(c['pooled_mean'], '.6f')}", highlight=False)
    for note in doc.get("notes", []):
        console.print(f"  [yellow]note:[/yellow] {note}", highlight=False)
    for failure in doc["checks"]["failures"]:
        console.print(f"  [red]FAIL[/red] {failure}", highlight=False)
