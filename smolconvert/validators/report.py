"""Release reports from a manifest: rows for report.json, a Markdown table ready for a model card,
and a self-contained HTML page (size-vs-KLD scatter with its Pareto front, decode-speed bars).

Pure functions of the manifest: no measurement happens here, and nothing is fetched by the page.
"""

from __future__ import annotations

import html as _html
import math
from typing import Any

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


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points not beaten on both size and KLD, by increasing size."""
    front: list[tuple[float, float, str]] = []
    for p in sorted(points):
        if not front or p[1] < front[-1][1]:
            front.append(p)
    return front


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
            f"{q0['ppl_reference']:.3f})."
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
            f"| {r['target']} | {r['size_mb']:.1f} | {r['bits_per_weight']:.2f} | "
            f"{r['ppl_ratio']:.4f} | {r['kld_mean']:.4f} | {r['kld_p99']:.4f} | "
            f"{r['top1'] * 100:.1f}% | {_num(r['ttft_ms'], '.0f')} | "
            f"{_num(r['decode_tok_s'], '.1f')} | {_num(r['peak_rss_mb'], '.0f')} | "
            f"{r['runtime']} | {'pass' if r['passed'] else 'FAIL'} |"
        )
    ref = manifest.get("reference_latency")
    if ref:
        lines.append(
            f"| reference (torch fp32) | – | 32 | 1 | 0 | 0 | 100% | {ref['ttft_ms']:.0f} | "
            f"{ref['decode_tok_s']:.1f} | {ref['peak_rss_mb']:.0f} | torch | – |"
        )
    lines += ["", "## What ran", ""]
    for r in table:
        lines.append(f"- **{r['target']}**: {r['measured_by']}")
        lines += [f"  - {n}" for n in r["notes"]]
        lines += [f"  - gate failed: {m}" for m in r["failures"]]
    return "\n".join(lines) + "\n"


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _scatter(table: list[dict[str, Any]]) -> str:
    # NaN or infinite KLD (a broken artifact, failed by its gate) has no place on a log axis.
    pts = [
        (r["size_mb"], max(r["kld_mean"], 1e-6), r["target"])
        for r in table
        if _finite(r["kld_mean"]) and _finite(r["size_mb"])
    ]
    if not pts:
        return "<p>No artifact has a finite KLD to plot.</p>" if table else ""
    w, h, pad = 640, 360, 60
    xs = [p[0] for p in pts]
    ys = [math.log10(p[1]) for p in pts]
    x0, x1 = 0.0, max(xs) * 1.1
    y0, y1 = math.floor(min(ys)), math.ceil(max(ys)) + (1 if min(ys) == max(ys) else 0)

    def sx(x: float) -> float:
        return pad + (x - x0) / (x1 - x0 or 1) * (w - 2 * pad)

    def sy(y: float) -> float:
        return h - pad - (math.log10(y) - y0) / (y1 - y0 or 1) * (h - 2 * pad)

    parts = [
        f'<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg" '
        'font-family="sans-serif" font-size="11">',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#444"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#444"/>',
        f'<text x="{w / 2}" y="{h - 20}" text-anchor="middle">size on disk (MB)</text>',
        f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" '
        'text-anchor="middle">mean KLD (log scale)</text>',
    ]
    for e in range(y0, y1 + 1):
        y = h - pad - (e - y0) / (y1 - y0 or 1) * (h - 2 * pad)
        parts.append(f'<text x="{pad - 5}" y="{y + 4}" text-anchor="end">1e{e}</text>')
    for k in range(5):
        x = x1 * k / 4
        parts.append(f'<text x="{sx(x)}" y="{h - pad + 15}" text-anchor="middle">{x:.0f}</text>')
    front = pareto(pts)
    if len(front) > 1:
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in front)
        parts.append(
            f'<polyline points="{path}" fill="none" stroke="#d62728" stroke-dasharray="4 3"/>'
        )
    for x, y, name in pts:
        on = any(name == f[2] for f in front)
        parts.append(
            f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" '
            f'fill="{"#d62728" if on else "#1f77b4"}"/>'
        )
        parts.append(f'<text x="{sx(x) + 6:.1f}" y="{sy(y) - 6:.1f}">{_html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _bars(table: list[dict[str, Any]], reference: dict[str, Any] | None) -> str:
    items = [(r["target"], r["decode_tok_s"]) for r in table if _finite(r["decode_tok_s"])]
    if reference and _finite(reference.get("decode_tok_s")):
        items.append(("reference (torch fp32)", reference["decode_tok_s"]))
    if not items:
        return "<p>No latency was measured.</p>"
    top = max(v for _, v in items) or 1
    row, w, label = 22, 640, 200
    parts = [
        f'<svg width="{w}" height="{row * len(items) + 10}" '
        'xmlns="http://www.w3.org/2000/svg" font-family="sans-serif" font-size="11">'
    ]
    for i, (name, v) in enumerate(items):
        y = i * row + 5
        bw = v / top * (w - label - 80)
        parts.append(
            f'<text x="{label - 5}" y="{y + 13}" text-anchor="end">{_html.escape(name)}</text>'
        )
        parts.append(
            f'<rect x="{label}" y="{y}" width="{bw:.1f}" height="{row - 6}" fill="#2ca02c"/>'
        )
        parts.append(f'<text x="{label + bw + 5:.1f}" y="{y + 13}">{v:.1f} tok/s</text>')
    parts.append("</svg>")
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
            f"{r['size_mb']:.1f}",
            f"{r['bits_per_weight']:.2f}",
            f"{r['ppl_ratio']:.4f}",
            f"{r['kld_mean']:.4f}",
            f"{r['kld_p99']:.4f}",
            f"{r['top1'] * 100:.1f}%",
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
</style></head><body>
<h1>{_html.escape(manifest["model"])}: release report</h1>
<p>{_html.escape(manifest["origin"])}. Host: {_html.escape(manifest["host"])}.
Evaluation text: {_html.escape(manifest["eval_text"]["name"])}.</p>
<table><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>
{chr(10).join(body)}</table>
<h2>Size against quality</h2>
<p>Red: the Pareto front (no artifact is both smaller and closer to the reference).</p>
{_scatter(table)}
<h2>Decode speed</h2>
{_bars(table, manifest.get("reference_latency"))}
</body></html>
"""
