"""Release reports from a manifest: rows for report.json, a Markdown table ready for a model card,
and a self-contained HTML page (size-vs-KLD scatter with its Pareto front, decode-speed bars).

Pure functions of the manifest: no measurement happens here, and nothing is fetched by the page.
The plots are validators/plots.py's; one manifest always gives the same bytes.
"""

from __future__ import annotations

import html as _html
from typing import Any

from smolconvert.validators.plots import (
    decode_plot,
    finite,
    fmt,
    size_kld_plot,
    svg_markup,
    tick_text,
)

HEADER_KEYS = (
    "model",
    "origin",
    "source_sha256",
    "eval_text",
    "protocol",
    "host",
    "reference_latency",
    "shard",
)


def rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for e in manifest["artifacts"]:
        v = e["validation"]
        q, lat = v["quality"], v.get("latency") or {}
        out.append(
            {
                "name": e["name"],
                "target": e["target"],
                "size_mb": round(e["size_bytes"] / 1e6, 2),
                "bits_per_weight": round(e["bits_per_weight"], 3),
                "ppl_ratio": q["ppl_ratio"],
                "kld_mean": q["kld_mean"],
                "kld_p99": q["kld_p99"],
                "top1": q["top1"],
                "ttft_ms": lat.get("ttft_ms"),
                "decode_tok_s": lat.get("decode_tok_s"),
                "peak_rss_mb": lat.get("peak_rss_mb"),
                "runtime": v["runtime"],
                "measured_by": v["candidate"],
                "notes": [n for n in v.get("notes", []) if not n.startswith("target ")],
                "passed": e["gate"]["passed"],
                "failures": [f["message"] for f in e["gate"]["failures"]],
            }
        )
    return out


def _num(x: float | None, spec: str) -> str:
    return "–" if x is None else fmt(x, spec)


def markdown(manifest: dict[str, Any], table: list[dict[str, Any]]) -> str:
    q0 = manifest["artifacts"][0]["validation"]["quality"] if manifest["artifacts"] else None
    lines = [
        f"# {manifest['model']}: release report",
        "",
        f"Source: {manifest['origin']} (sha256 `{manifest['source_sha256'][:16]}…`).",
    ]
    if q0:
        lines.append(
            f"Quality: {q0['n_windows']} windows × {q0['ctx']} tokens of "
            f"{manifest['eval_text']['name']} ({q0['n_scored']} scored tokens), each artifact "
            f"run in its own runtime against the fp32 reference decoder (perplexity "
            f"{fmt(q0['ppl_reference'], '.3f')})."
        )
    lines += [
        f"Latency: 128-token prompt (TTFT), 128 greedy decode steps, peak RSS of a fresh process; "
        f"host {manifest['host']}.",
        "",
        "| artifact | size MB | bits/weight | ppl ratio | KLD mean | KLD p99 | top-1 | TTFT ms "
        "| decode tok/s | peak RSS MB | runtime | gate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['target']} | {fmt(r['size_mb'], '.1f')} | {fmt(r['bits_per_weight'], '.2f')} | "
            f"{fmt(r['ppl_ratio'], '.4f')} | {fmt(r['kld_mean'], '.4f')} | "
            f"{fmt(r['kld_p99'], '.4f')} | {fmt(r['top1'] * 100, '.1f')}% | "
            f"{_num(r['ttft_ms'], '.0f')} | {_num(r['decode_tok_s'], '.1f')} | "
            f"{_num(r['peak_rss_mb'], '.0f')} | {r['runtime']} | "
            f"{'pass' if r['passed'] else 'FAIL'} |"
        )
    ref = manifest.get("reference_latency")
    if ref:
        lines.append(
            f"| reference (torch fp32) | – | 32 | 1 | 0 | 0 | 100% | "
            f"{_num(ref.get('ttft_ms'), '.0f')} | {_num(ref.get('decode_tok_s'), '.1f')} | "
            f"{_num(ref.get('peak_rss_mb'), '.0f')} | torch | – |"
        )
    lines += ["", "## What ran", ""]
    for r in table:
        lines.append(f"- **{r['target']}**: {r['measured_by']}")
        lines += [f"  - {n}" for n in r["notes"]]
        lines += [f"  - gate failed: {m}" for m in r["failures"]]
    return "\n".join(lines) + "\n"


def _scatter(table: list[dict[str, Any]]) -> str:
    plot = size_kld_plot(table)
    if plot is None:
        return "<p>No artifact has a finite KLD to plot.</p>" if table else ""
    parts = [
        "<p>Dashed line: the Pareto front (no artifact is both smaller and closer to the "
        f"reference). Colour: target family. The KLD axis is logarithmic above "
        f"{tick_text(plot.linthresh)} and linear below it, so a KLD of 0 sits on the axis.</p>",
        svg_markup(plot.figure, "kld"),
    ]
    if plot.left_off:
        names = ", ".join(_html.escape(n) for n in plot.left_off)
        parts.append(f"<p>Not plotted, their size or KLD is not a finite number: {names}.</p>")
    return "\n".join(parts)


def _bars(table: list[dict[str, Any]], reference: dict[str, Any] | None) -> str:
    fig = decode_plot(table, reference)
    if fig is None:
        return "<p>No latency was measured.</p>"
    parts = [svg_markup(fig, "decode")]
    missing = [_html.escape(r["target"]) for r in table if not finite(r["decode_tok_s"])]
    if missing:
        parts.append(f"<p>No decode speed measured for: {', '.join(missing)}.</p>")
    return "\n".join(parts)


def html(manifest: dict[str, Any], table: list[dict[str, Any]]) -> str:
    head = [
        "artifact",
        "size MB",
        "bits/weight",
        "ppl ratio",
        "KLD mean",
        "KLD p99",
        "top-1",
        "TTFT ms",
        "decode tok/s",
        "peak RSS MB",
        "runtime",
        "gate",
    ]
    body = []
    for r in table:
        cells = [
            r["target"],
            fmt(r["size_mb"], ".1f"),
            fmt(r["bits_per_weight"], ".2f"),
            fmt(r["ppl_ratio"], ".4f"),
            fmt(r["kld_mean"], ".4f"),
            fmt(r["kld_p99"], ".4f"),
            fmt(r["top1"] * 100, ".1f") + "%",
            _num(r["ttft_ms"], ".0f"),
            _num(r["decode_tok_s"], ".1f"),
            _num(r["peak_rss_mb"], ".0f"),
            r["runtime"],
            "pass" if r["passed"] else "FAIL: " + "; ".join(r["failures"]),
        ]
        body.append("<tr>" + "".join(f"<td>{_html.escape(c)}</td>" for c in cells) + "</tr>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{_html.escape(manifest["model"])} release</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:72em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}
svg{{max-width:100%;height:auto}}
</style></head><body>
<h1>{_html.escape(manifest["model"])}: release report</h1>
<p>{_html.escape(manifest["origin"])}. Host: {_html.escape(manifest["host"])}.
Evaluation text: {_html.escape(manifest["eval_text"]["name"])}.</p>
<table><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>
{chr(10).join(body)}</table>
<h2>Size against quality</h2>
{_scatter(table)}
<h2>Decode speed</h2>
{_bars(table, manifest.get("reference_latency"))}
</body></html>
"""
