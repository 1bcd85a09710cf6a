"""The release report's plots: matplotlib figures saved as inline SVG.

Size against mean KLD (one colour per family, the Pareto front, a symlog axis with zero on it,
labels placed by a greedy search over offsets so none overlaps another label or a point) and
decode speed per artifact with the torch reference marked. A fixed hash salt and no date make one
table always give the same bytes.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeGuard

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.backend_bases import RendererBase
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.path import Path
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

# tab10, one colour per exporter family; families added later take the spare colours in name order.
FAMILY_COLORS = {
    "gguf": "#1f77b4",
    "onnx": "#ff7f0e",
    "coreml": "#2ca02c",
    "mlc": "#d62728",
    "executorch": "#9467bd",
    "litert": "#8c564b",
}
_SPARE_COLORS = ("#e377c2", "#17becf", "#bcbd22", "#7f7f7f")

# 72 dpi makes one display unit one SVG point: label boxes measured with Agg are the SVG's boxes.
_DPI = 72
_LABEL_PT = 9
_MARKER_AREA = 36  # pt², radius 3 pt
_MARKER_PAD_PT = 4.5  # half the square around a marker that labels keep out of
_LABEL_PAD_PT = 1.5  # gap kept between two labels
_RINGS_PT = (6.0, 14.0, 24.0, 36.0, 50.0, 66.0)
_NO_METADATA = {"Creator": None, "Date": None, "Format": None, "Type": None}
# a label's offset from its point in points, and the text alignment that puts it on that side
_Offset = tuple[
    float, float, Literal["left", "center", "right"], Literal["bottom", "center", "top"]
]
_NEG_ZERO = re.compile(r"-[0.]*0[0.]*(?:[eE][+-]?\d+)?%?")


def fmt(x: float, spec: str) -> str:
    """`format(x, spec)` without negative zero: a mean KLD of -1e-9 (round-off in an fp32 export)
    prints 0.0000, not -0.0000. NaN and infinities print as Python does."""
    s = format(x, spec)
    return s[1:] if _NEG_ZERO.fullmatch(s) else s


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points not beaten on both size and KLD, by increasing size."""
    front: list[tuple[float, float, str]] = []
    for p in sorted(points):
        if not front or p[1] < front[-1][1]:
            front.append(p)
    return front


def family(target: str) -> str:
    return target.split(":", 1)[0]


def family_colors(families: Iterable[str]) -> dict[str, str]:
    """Colour per family: the fixed table, then spare colours for unknown families by name."""
    unknown = sorted(set(families) - FAMILY_COLORS.keys())
    spare = {f: _SPARE_COLORS[i % len(_SPARE_COLORS)] for i, f in enumerate(unknown)}
    return {**FAMILY_COLORS, **spare}


def finite(x: Any) -> TypeGuard[int | float]:
    return isinstance(x, int | float) and math.isfinite(x)


def _figure(width_in: float, height_in: float) -> Figure:
    # A Figure with its own Agg canvas: no pyplot, so no global figure registry or backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def svg_markup(fig: Figure, name: str) -> str:
    """The figure as SVG markup to inline in HTML: text kept as <text> (searchable, selectable),
    no XML prologue or date, and every id prefixed with `name`: matplotlib numbers its ids per
    figure (`axes_1`, `line2d_1`), so two plots on one page would otherwise share them."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"smolconvert-{name}"}):
        fig.savefig(buf, format="svg", metadata=_NO_METADATA)
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    # SVG 2's plain `href` works in every current browser and needs no xlink namespace, so the page
    # names no URL besides the SVG namespace itself.
    text = text.replace(' xmlns:xlink="http://www.w3.org/1999/xlink"', "")
    text = text.replace("xlink:href=", "href=")
    text = re.sub(r'(\bid="|\bhref="#|url\(#)', rf"\g<1>{name}-", text)
    return text.rstrip() + "\n"


def tick_text(v: float, _pos: float | None = None) -> str:
    return "0" if v == 0 else f"{v:g}"


@dataclass(frozen=True)
class ScatterPlot:
    """The size-vs-KLD figure and the handles tests and the page need."""

    figure: Figure
    points: dict[str, tuple[float, float]]  # target -> plotted (size MB, KLD)
    labels: dict[str, Text]  # target -> its label, in display coordinates via get_window_extent
    front: Line2D | None
    linthresh: float  # KLD below this is on the linear part of the axis
    left_off: list[str]  # targets whose KLD or size is not finite


def _candidates() -> list[_Offset]:
    """Label offsets (dx, dy in points) with their text alignment, nearest first; right of the
    point is tried first because that is where a reader looks for a point's name."""
    out: list[_Offset] = []
    for i, r in enumerate(_RINGS_PT):
        n = 8 if i == 0 else 16
        # within a ring: flattest first (right before left), straight up and down last
        angles = sorted(
            (360.0 * k / n for k in range(n)),
            key=lambda a: (round(abs(math.sin(math.radians(a))), 3), math.cos(math.radians(a)) < 0),
        )
        for a in angles:
            c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
            ha: Literal["left", "center", "right"] = (
                "left" if c > 0.3 else "right" if c < -0.3 else "center"
            )
            va: Literal["bottom", "center", "top"] = (
                "bottom" if s > 0.3 else "top" if s < -0.3 else "center"
            )
            out.append((round(r * c, 3), round(r * s, 3), ha, va))
    return out


def _overlap(a: Bbox, b: Bbox) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _outside(box: Bbox, frame: Bbox) -> float:
    inside = _overlap(box, frame)
    return box.width * box.height - inside


def _put(text: Text, fig: Figure, offset: _Offset) -> None:
    from matplotlib.transforms import offset_copy

    dx, dy, ha, va = offset
    assert text.axes is not None
    text.set_transform(offset_copy(text.axes.transData, fig=fig, x=dx, y=dy, units="points"))
    text.set_horizontalalignment(ha)
    text.set_verticalalignment(va)


def _nearest(p: tuple[float, float], box: Bbox) -> tuple[float, float]:
    """The point of `box` nearest to the display point `p`."""
    return min(max(p[0], box.x0), box.x1), min(max(p[1], box.y0), box.y1)


def _dist(p: tuple[float, float], box: Bbox) -> float:
    q = _nearest(p, box)
    return math.hypot(p[0] - q[0], p[1] - q[1])


def _leader(p: tuple[float, float], box: Bbox, start: float) -> Path | None:
    """The display segment from `start` past the marker centre `p` to the nearest point of the
    label's box; None when the box is that close already (the label needs no leader)."""
    from matplotlib.path import Path

    q = _nearest(p, box)
    d = math.hypot(q[0] - p[0], q[1] - p[1])
    if d <= start:
        return None
    s = (p[0] + (q[0] - p[0]) * start / d, p[1] + (q[1] - p[1]) * start / d)
    return Path([s, q])


def _place_labels(
    fig: Figure,
    ax: Axes,
    renderer: RendererBase,
    pts: list[tuple[float, float, str]],
    front: Path | None,
) -> dict[str, Text]:
    """Greedy placement: each label (by size, then KLD) takes the nearest candidate offset whose
    rendered box stays inside the axes and clear of every marker, label and leader placed so far
    and of the Pareto line (`front`, display coordinates), whose leader crosses no other marker or
    label, and which, without a leader, is nearer its own marker than any other; if no candidate
    is clear, the one that costs least."""
    from matplotlib.transforms import Bbox

    pt = fig.dpi / 72
    pad = _LABEL_PAD_PT * pt
    frame = ax.get_window_extent(renderer).padded(-2 * pt)
    r = _MARKER_PAD_PT * pt
    start = r + 1.5 * pt  # leaders begin just off the marker
    centres = [(float(cx), float(cy)) for cx, cy in ax.transData.transform([p[:2] for p in pts])]
    markers = [Bbox.from_extents(cx - r, cy - r, cx + r, cy + r) for cx, cy in centres]
    placed: list[Bbox] = []
    leaders: list[Path] = []
    labels: dict[str, Text] = {}
    candidates = _candidates()
    for i in sorted(range(len(pts)), key=lambda k: pts[k]):
        x, y, name = pts[i]
        others = [k for k in range(len(pts)) if k != i]
        text = ax.text(x, y, name, fontsize=_LABEL_PT, color="#222", zorder=4)
        best: tuple[float, _Offset, Bbox] | None = None
        for cand in candidates:
            _put(text, fig, cand)
            box = text.get_window_extent(renderer)
            cost = _outside(box, frame) * 10
            cost += sum(_overlap(box.padded(pad), b) for b in placed) * 10
            cost += sum(_overlap(box, m) for m in markers)
            cost += 100 * sum(line.intersects_bbox(box, filled=False) for line in leaders)
            if front is not None and front.intersects_bbox(box, filled=False):
                cost += 20  # readable across a dashed line, but better beside it
            line = _leader(centres[i], box, start)
            if line is not None:
                hit = placed + [markers[k] for k in others]
                cost += 100 * sum(line.intersects_bbox(b, filled=False) for b in hit)
            elif any(_dist(centres[k], box) < _dist(centres[i], box) + 2 * pt for k in others):
                cost += 100  # a foreign marker as near as its own: a reader would pair those
            if best is None or cost < best[0]:
                best = (cost, cand, box)
            if cost == 0:
                break
        assert best is not None
        _, offset, box = best
        _put(text, fig, offset)
        text.set_gid(f"label-{len(labels)}")
        placed.append(box)
        labels[name] = text
        line = _leader(centres[i], box, start)
        if line is not None:
            leaders.append(line)
            (px, py), (qx, qy) = centres[i], _nearest(centres[i], box)
            ax.annotate(
                "",
                xy=(x, y),
                xytext=((qx - px) / pt, (qy - py) / pt),
                textcoords="offset points",
                arrowprops={
                    "arrowstyle": "-",
                    "color": "#777",
                    "lw": 0.7,
                    "shrinkA": 0,
                    "shrinkB": start / pt,
                },
                zorder=2.5,
            )
    return labels


def size_kld_plot(table: list[dict[str, Any]]) -> ScatterPlot | None:
    """Size on disk against mean KLD, one colour per family, the Pareto front as a dashed line and
    labels that do not collide; None when no row has a finite size and KLD."""
    from matplotlib.path import Path
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    # KL divergence is never negative: a mean of -1e-9 is round-off around an exact 0.
    pts = [
        (r["size_mb"], max(float(r["kld_mean"]), 0.0), r["target"])
        for r in table
        if finite(r["kld_mean"]) and finite(r["size_mb"])
    ]
    kept = {p[2] for p in pts}
    left_off = [r["target"] for r in table if r["target"] not in kept]
    if not pts:
        return None
    colors = family_colors(family(n) for _, _, n in pts)
    fig = _figure(9.0, 5.0)
    ax = fig.add_axes((0.09, 0.12, 0.72, 0.82))

    # symlog: logarithmic above `linthresh`, linear from 0 to it, so a lossless export sits at an
    # honest 0 on the axis instead of being clamped to a made-up floor. The threshold is the decade
    # just under the smallest non-zero KLD, so every non-zero point is on the log part.
    positive = [k for _, k, _ in pts if k > 0]
    linthresh = 10.0 ** math.floor(math.log10(min(positive))) if positive else 1e-6
    top = 10.0 ** math.ceil(math.log10(max(positive) * 1.5)) if positive else linthresh * 10
    ax.set_yscale("symlog", linthresh=linthresh, linscale=0.6)
    # a little room under 0 so zero-KLD markers are not cut by the frame
    ax.set_ylim(-0.2 * linthresh, top)
    decades = range(round(math.log10(linthresh)), round(math.log10(top)) + 1)
    step = 1 if len(decades) <= 8 else 2
    ax.yaxis.set_major_locator(FixedLocator([0.0] + [10.0**e for e in decades[::step]]))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(tick_text))
    ax.set_xlim(0, max(x for x, _, _ in pts) * 1.12 or 1.0)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: fmt(v, ".0f")))
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel(f"mean KLD (log above {tick_text(linthresh)}, linear below)")
    ax.grid(True, color="#e5e5e5", lw=0.6, zorder=0)
    ax.set_axisbelow(True)

    front_pts = pareto(pts)
    front = None
    if len(front_pts) > 1:
        (front,) = ax.plot(
            [p[0] for p in front_pts],
            [p[1] for p in front_pts],
            color="#444",
            ls="--",
            lw=1,
            zorder=2,
            label="Pareto front",
        )
    for fam in sorted({family(n) for _, _, n in pts}):
        mine = [(x, y) for x, y, n in pts if family(n) == fam]
        ax.scatter(
            [p[0] for p in mine],
            [p[1] for p in mine],
            s=_MARKER_AREA,
            color=colors[fam],
            edgecolors="white",
            linewidths=0.6,
            zorder=3,
            label=fam,
        )
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=9)
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    front_path = None if front is None else Path(ax.transData.transform(front.get_xydata()))
    labels = _place_labels(fig, ax, renderer, pts, front_path)
    points = {n: (x, y) for x, y, n in pts}
    return ScatterPlot(fig, points, labels, front, linthresh, left_off)


def decode_plot(table: list[dict[str, Any]], reference: dict[str, Any] | None) -> Figure | None:
    """Decode tokens/s per artifact as horizontal bars in table order, coloured by family (the
    family leads each bar's name, so no legend), with the torch fp32 reference as a vertical line;
    None when no artifact has a finite decode speed."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.transforms import blended_transform_factory

    items = [(r["target"], float(r["decode_tok_s"])) for r in table if finite(r["decode_tok_s"])]
    if not items:
        return None
    ref_tok_s = (reference or {}).get("decode_tok_s")
    ref = float(ref_tok_s) if finite(ref_tok_s) else 0.0
    colors = family_colors(family(n) for n, _ in items)
    row_in, top_in, bottom_in = 0.28, 0.45, 0.5
    height = row_in * len(items) + top_in + bottom_in
    fig = _figure(9.0, height)
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    # the left margin fits the longest name, measured in points at the tick label size
    font = FontProperties(size=9)
    name_w = max(renderer.get_text_width_height_descent(n, font, ismath=False)[0] for n, _ in items)
    left = (name_w + 14) / (9.0 * fig.dpi)
    ax = fig.add_axes((left, bottom_in / height, 0.93 - left, row_in * len(items) / height))
    ys = list(range(len(items)))
    values = [v for _, v in items]
    ax.barh(ys, values, height=0.7, color=[colors[family(n)] for n, _ in items], zorder=2)
    ax.set_yticks(ys, [n for n, _ in items], fontsize=9)
    ax.set_ylim(len(items) - 0.5, -0.5)  # first table row on top
    right = max([*values, ref]) * 1.16 or 1.0
    ax.set_xlim(0, right)
    ax.xaxis.set_major_formatter(lambda v, _p: fmt(v, ".0f"))
    ax.set_xlabel("decode tokens/s (128 greedy steps)")
    ax.grid(True, axis="x", color="#e5e5e5", lw=0.6, zorder=0)
    for y, v in zip(ys, values, strict=True):
        ax.text(v, y, " " + fmt(v, ".1f"), va="center", fontsize=8, color="#222")
    if finite(ref_tok_s):
        ax.axvline(ref, color="#222", ls="--", lw=1, zorder=3, gid="reference-line")
        on_right = ref > 0.6 * right
        ax.text(
            ref,
            1.02,
            f"torch fp32 reference: {fmt(ref, '.1f')} tok/s",
            transform=blended_transform_factory(ax.transData, ax.transAxes),
            ha="right" if on_right else "left",
            va="bottom",
            fontsize=9,
        )
    return fig
