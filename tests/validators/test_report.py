"""Release report: scatter labels that do not collide, a KLD axis that shows 0, no negative zeros,
byte-identical output for one manifest, and the page as headless Debian Chromium renders it."""

from __future__ import annotations

import itertools
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from smolconvert.validators import plots, report

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The four 4-bit artifacts users saw overprint: within 6 MB and 0.005 KLD of each other.
COLLIDING = ("coreml:int4", "mlc:q4f16_1", "onnx:int4", "gguf:q3_k_m")
ZERO_KLD = "litert:fp32"
NEG_KLD = "onnx:fp32"
NAN_KLD = "executorch:8da4w"
REF_DECODE = 61.5


def artifact(target: str, size_mb: float, kld: float, decode: float | None) -> dict[str, Any]:
    return {
        "name": target.replace(":", "-"),
        "target": target,
        "size_bytes": int(size_mb * 1e6),
        "bits_per_weight": size_mb * 8e6 / 135e6,
        "validation": {
            "quality": {
                "ppl_ratio": 1.0 + max(kld, 0.0) if math.isfinite(kld) else kld,
                "kld_mean": kld,
                "kld_p99": kld * 8,
                "top1": 0.999 if math.isfinite(kld) else kld,
                "n_windows": 4,
                "ctx": 256,
                "n_scored": 1020,
                "ppl_reference": 14.25,
            },
            "latency": None
            if decode is None
            else {"ttft_ms": 40.0, "decode_tok_s": decode, "peak_rss_mb": 300.0},
            "runtime": "test runtime",
            "candidate": f"{target} in its runtime",
            "notes": [],
        },
        "gate": {
            "passed": math.isfinite(kld),
            "failures": [] if math.isfinite(kld) else [{"message": "kld_mean is not a number"}],
        },
    }


def release_manifest(reference: bool = True) -> dict[str, Any]:
    arts = [
        artifact("coreml:int4", 80.4, 0.0712, 95.0),
        artifact("mlc:q4f16_1", 82.1, 0.0731, 140.0),
        artifact("onnx:int4", 84.0, 0.0698, 88.0),
        artifact("gguf:q3_k_m", 78.2, 0.0745, 120.0),
        artifact("gguf:q4_k_m", 98.7, 0.0421, 110.0),
        artifact("gguf:q8_0", 145.0, 0.0019, 90.0),
        artifact("mlc:q0f16", 270.0, 2.3e-5, 70.0),
        artifact(NEG_KLD, 540.0, -1e-9, 30.0),
        artifact(ZERO_KLD, 538.0, 0.0, None),
        artifact(NAN_KLD, 90.0, math.nan, 20.0),
        artifact("ncnn:int8", 150.0, 0.004, 80.0),  # a family the colour table does not know
    ]
    return {
        "model": "SmolLM2-135M",
        "origin": "safetensors in HuggingFaceTB/SmolLM2-135M",
        "source_sha256": "ab" * 32,
        "eval_text": {"name": "wikitext-2 test"},
        "host": "test host",
        "reference_latency": (
            {"ttft_ms": 50.0, "decode_tok_s": REF_DECODE, "peak_rss_mb": 700.0}
            if reference
            else None
        ),
        "artifacts": arts,
    }


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return release_manifest()


@pytest.fixture(scope="module")
def page(manifest: dict[str, Any]) -> str:
    return report.html(manifest, report.rows(manifest))


def overlaps(a: Any, b: Any) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def svg_texts(svg: str) -> list[str]:
    return [
        re.sub(r"\s+", " ", t).strip() for t in re.findall(r"<text\b[^>]*>(.*?)</text>", svg, re.S)
    ]


@pytest.mark.parametrize(
    ("x", "spec", "expected"),
    [
        (-1e-9, ".4f", "0.0000"),
        (-0.0, ".1f", "0.0"),
        (-0.00004, ".4f", "0.0000"),
        (-1e-9, ".1%", "0.0%"),
        (-0.0, ".1e", "0.0e+00"),
        (-0.5, ".4f", "-0.5000"),
        (-1e-9, ".1e", "-1.0e-09"),
        (-100.0, ".0f", "-100"),
        (-math.inf, ".4f", "-inf"),
        (math.nan, ".4f", "nan"),
        (0.1234, ".4f", "0.1234"),
    ],
)
def test_fmt_drops_only_negative_zero(x: float, spec: str, expected: str) -> None:
    assert plots.fmt(x, spec) == expected


def test_four_bit_labels_would_collide_and_do_not(manifest: dict[str, Any]) -> None:
    plot = plots.size_kld_plot(report.rows(manifest))
    assert plot is not None
    fig = plot.figure
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    ax = fig.axes[0]
    boxes = {n: t.get_window_extent(renderer) for n, t in plot.labels.items()}
    assert sorted(boxes) == sorted(plot.points)
    for (a, ba), (b, bb) in itertools.combinations(boxes.items(), 2):
        assert not overlaps(ba, bb), f"labels {a} and {b} overlap: {ba} {bb}"
    frame = ax.get_window_extent(renderer)
    for name, box in boxes.items():
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1, name
        assert frame.y0 <= box.y0 and box.y1 <= frame.y1, name
        for other, (x, y) in plot.points.items():
            px, py = ax.transData.transform((x, y))
            assert not (box.x0 < px < box.x1 and box.y0 < py < box.y1), f"{name} covers {other}"

    # the fixture is the reported case: every label at the first offset would overprint
    first = plots._candidates()[0]
    naive = {}
    for name in COLLIDING:
        plots._put(plot.labels[name], fig, first)
        naive[name] = plot.labels[name].get_window_extent(renderer)
    assert any(overlaps(a, b) for a, b in itertools.combinations(naive.values(), 2))


def test_zero_kld_is_on_the_axis_not_clamped(manifest: dict[str, Any]) -> None:
    plot = plots.size_kld_plot(report.rows(manifest))
    assert plot is not None
    ax = plot.figure.axes[0]
    assert plot.points[ZERO_KLD] == (538.0, 0.0)
    assert plot.points[NEG_KLD] == (540.0, 0.0)  # -1e-9 is round-off around 0
    drawn = {tuple(map(float, xy)) for c in ax.collections for xy in c.get_offsets()}
    assert (538.0, 0.0) in drawn and (540.0, 0.0) in drawn
    assert not any(y == pytest.approx(1e-6, abs=1e-12) for _, y in drawn)
    bottom, top = ax.get_ylim()
    assert bottom < 0.0 < plot.linthresh <= 2.3e-5 < top
    ticks = dict(zip(ax.get_yticks(), [t.get_text() for t in ax.get_yticklabels()], strict=True))
    assert ticks[0.0] == "0"
    # 0 and the smallest non-zero KLD are visibly apart on screen
    y0 = ax.transData.transform((0, 0.0))[1]
    y1 = ax.transData.transform((0, 2.3e-5))[1]
    assert y1 - y0 > 10
    assert NAN_KLD not in plot.points and plot.left_off == [NAN_KLD]


def test_front_families_and_reference_line(manifest: dict[str, Any]) -> None:
    table = report.rows(manifest)
    plot = plots.size_kld_plot(table)
    assert plot is not None and plot.front is not None
    front = [(x, y) for x, y, _ in plots.pareto([(x, y, n) for n, (x, y) in plot.points.items()])]
    assert list(zip(plot.front.get_xdata(), plot.front.get_ydata(), strict=True)) == front
    assert front[0] == (78.2, 0.0745) and front[-1][1] == 0.0

    colours = plots.family_colors(plots.family(r["target"]) for r in table)
    used = [colours[f] for f in ("gguf", "onnx", "coreml", "mlc", "executorch", "litert", "ncnn")]
    assert len(set(used)) == len(used)
    faces = {c.get_label(): c.get_facecolor()[0][:3] for c in plot.figure.axes[0].collections}
    assert set(faces) == {"coreml", "gguf", "litert", "mlc", "ncnn", "onnx"}

    fig = plots.decode_plot(table, manifest["reference_latency"])
    assert fig is not None
    ref_lines = [ln for ln in fig.axes[0].lines if ln.get_gid() == "reference-line"]
    assert len(ref_lines) == 1 and list(ref_lines[0].get_xdata()) == [REF_DECODE, REF_DECODE]
    bars = fig.axes[0].patches
    assert [round(b.get_width(), 1) for b in bars] == [
        r["decode_tok_s"] for r in table if r["decode_tok_s"] is not None
    ]
    no_ref = plots.decode_plot(table, None)
    assert no_ref is not None and not [ln for ln in no_ref.axes[0].lines if ln.get_gid()]


def test_page_names_everything_without_negative_zero(manifest: dict[str, Any], page: str) -> None:
    table = report.rows(manifest)
    md = report.markdown(manifest, table)
    for text in (md, page):
        assert "-0.0" not in text and "−0" not in text
    assert f"| {NEG_KLD} | 540.0 | 32.00 | 1.0000 | 0.0000 | 0.0000 |" in md
    svgs = re.findall(r"<svg\b.*?</svg>", page, re.S)
    assert len(svgs) == 2
    scatter, bars = svg_texts(svgs[0]), svg_texts(svgs[1])
    for r in table:
        assert (r["target"] in scatter) == (r["target"] != NAN_KLD), r["target"]
        assert (r["target"] in bars) == (r["decode_tok_s"] is not None), r["target"]
    assert f"torch fp32 reference: {REF_DECODE} tok/s" in bars
    assert f"Not plotted, their size or KLD is not a finite number: {NAN_KLD}." in page
    assert f"No decode speed measured for: {ZERO_KLD}." in page
    # self-contained: no URL besides the SVG namespace, no fetched resource
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page
    assert not re.search(r"<(script|link|img|iframe)\b", page)
    # one page, two figures: ids stay unique and every reference points at one of them
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))
    refs = re.findall(r'href="#([^"]+)"|url\(#([^)]+)\)', page)
    assert refs and {a or b for a, b in refs} <= set(ids)


def test_same_manifest_same_bytes(manifest: dict[str, Any], page: str) -> None:
    assert report.html(manifest, report.rows(manifest)) == page
    # and in a fresh interpreter with another hash seed (set iteration order, font cache state)
    code = (
        "import sys; from tests.validators.test_report import release_manifest as m; "
        "from smolconvert.validators import plots, report; "
        "sys.stdout.write(report.html(m(), report.rows(m())))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"},
    )
    assert out.stdout == page


def test_page_in_headless_chromium(tmp_path: Path, page: str, manifest: dict[str, Any]) -> None:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is missing: pip install 'smolconvert[dev]'")
    path = tmp_path / "report.html"
    path.write_text(page)
    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.on("request", lambda r: requests.append(r.url))
            tab.goto(path.as_uri())
            tab.wait_for_load_state("load")
            scatter = tab.locator("svg").nth(0)
            for r in report.rows(manifest):
                cell = tab.locator("td", has_text=re.compile(f"^{re.escape(r['target'])}$"))
                assert cell.count() == 1 and cell.is_visible(), r["target"]
                if r["target"] != NAN_KLD:
                    label = scatter.locator("text", has_text=re.compile(re.escape(r["target"])))
                    assert label.count() == 1 and label.is_visible(), r["target"]
            # the labels do not collide as Chromium lays them out either (its own font metrics)
            boxes = tab.eval_on_selector_all(
                "svg [id^=kld-label-] text",
                "els => els.map(e => {const b = e.getBoundingClientRect();"
                " return [e.textContent, b.left, b.top, b.right, b.bottom]})",
            )
            assert len(boxes) == len(report.rows(manifest)) - 1
            for a, b in itertools.combinations(boxes, 2):
                apart = a[3] <= b[1] or b[3] <= a[1] or a[4] <= b[2] or b[4] <= a[2]
                assert apart, f"{a[0]} and {b[0]} overlap in Chromium"
            tab.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert requests == [path.as_uri()]  # nothing fetched besides the page itself
    assert (tmp_path / "report.png").stat().st_size > 10_000
