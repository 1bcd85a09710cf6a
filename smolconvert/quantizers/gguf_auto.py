"""`gguf:auto`: one GGUF type per tensor, chosen to minimise the model's expected KL divergence
within a byte budget.

`measure` prices every tensor under every candidate type on calibration tokens, with the fp32
reference: the type's error on the tensor, weighted per input column by the mean square of that
column's activations (what an imatrix weighs), times a gain that turns such error into output KLD.
The gain comes from one forward per layer with the whole layer at a probe type, shared among the
layer's tensors by how far each alone moves the layer's output; the embedding and output get a
forward of their own. `choose` then spends the budget greedily along each tensor's convex hull of
(bytes, KLD) points, the classic bit-allocation answer for costs that add up.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from math import prod
from typing import Any

import gguf
import numpy as np
import torch
from numpy.typing import NDArray

from smolconvert import progress
from smolconvert.errors import ConfigError, UnsupportedError
from smolconvert.model.imatrix import Imatrix, input_square_sums
from smolconvert.model.weights import canonical_names, expected_shape
from smolconvert.quantizers.gguf_recipes import block_size
from smolconvert.quantizers.recipe import role_of
from smolconvert.quantizers.registry import get_codec

# Types llama.cpp loads for any row width that is a multiple of their block, smallest first.
# q4_1 and q5_1 are left out: the embedded default model's weights lie on a Q4_1 grid, which
# 32-blocks with a float minimum replay almost exactly, and a plan built on that would flatter them.
AUTO_CODECS = (
    "q2_k",
    "q3_k",
    "iq4_xs",
    "q4_k",
    "iq4_nl",
    "q4_0",
    "q5_k",
    "q5_0",
    "q6_k",
    "q8_0",
    "f16",
)
PROBE = "q4_0"  # the type each layer is measured at: 32-blocks fit every row here
ALIGN = 32  # GGUF's default general.alignment: every tensor's data is padded to it
SAMPLE_ROWS = 128  # rows per tensor whose error is measured for every candidate (evenly spaced)


@dataclass(frozen=True)
class TensorCost:
    name: str  # canonical
    nbytes: dict[str, int]  # candidate type -> bytes in the file, padding included
    kld: dict[str, float]  # candidate type -> predicted contribution to the mean KLD


def candidates(cols: int) -> tuple[str, ...]:
    return tuple(c for c in AUTO_CODECS if cols % block_size(c) == 0)


def nbytes(codec: str, shape: Sequence[int]) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[codec.upper()]]
    data = prod(shape) // block * type_size
    return -(-data // ALIGN) * ALIGN


def matrices(spec: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(canonical name, shape) of every tensor that gets a type: the 2-D ones."""
    shapes = ((n, expected_shape(spec, n)) for n in canonical_names(spec))
    return [(n, s) for n, s in shapes if len(s) == 2]


def minimum_bytes(spec: Any) -> int:
    """The smallest the matrices can be: each at its smallest candidate."""
    return sum(min(nbytes(c, s) for c in _candidates_of(n, s)) for n, s in matrices(spec))


def _candidates_of(name: str, shape: tuple[int, ...]) -> tuple[str, ...]:
    found = candidates(shape[-1])
    if PROBE not in found:
        raise UnsupportedError(
            f"gguf:auto: {name} has rows of {shape[-1]} weights, not a multiple of 32; "
            "choose a fixed GGUF scheme for this model"
        )
    return found


def _hull(cost: TensorCost) -> list[str]:
    """The candidates on the lower convex hull of (bytes, KLD), by bytes: the only points an
    optimum of additive costs under one budget uses."""
    hull: list[str] = []
    for c in sorted(cost.nbytes, key=lambda c: (cost.nbytes[c], cost.kld[c], c)):
        if hull and cost.kld[c] >= cost.kld[hull[-1]]:
            continue  # more bytes, no less KLD
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            left = (cost.kld[b] - cost.kld[a]) * (cost.nbytes[c] - cost.nbytes[b])
            right = (cost.kld[c] - cost.kld[b]) * (cost.nbytes[b] - cost.nbytes[a])
            if left < right:
                break
            hull.pop()  # b lies on or above the chord from a to c
        hull.append(c)
    return hull


def choose(costs: Sequence[TensorCost], budget: int) -> dict[str, str]:
    """A type per tensor with the least predicted KLD whose bytes fit `budget`: every tensor
    starts at its smallest hull point, then the upgrade that buys the most KLD per byte goes
    first (ties by name, so the plan is deterministic)."""
    by_name = {c.name: c for c in costs}
    hulls = {c.name: _hull(c) for c in costs}
    step = dict.fromkeys(hulls, 0)
    used = sum(by_name[n].nbytes[h[0]] for n, h in hulls.items())
    if used > budget:
        raise ConfigError(
            f"gguf:auto: the budget leaves {budget / 1e6:.2f} MB for the weights, and the "
            f"smallest types need {used / 1e6:.2f} MB; raise size_mb or bpw"
        )
    heap: list[tuple[float, str]] = []

    def offer(name: str) -> None:
        hull, i = hulls[name], step[name]
        if i + 1 < len(hull):
            cost = by_name[name]
            gain = cost.kld[hull[i]] - cost.kld[hull[i + 1]]
            extra = cost.nbytes[hull[i + 1]] - cost.nbytes[hull[i]]
            heapq.heappush(heap, (-gain / extra, name))

    for name in sorted(hulls):
        offer(name)
    while heap:
        _, name = heapq.heappop(heap)
        hull, i = hulls[name], step[name]
        extra = by_name[name].nbytes[hull[i + 1]] - by_name[name].nbytes[hull[i]]
        if used + extra > budget:
            continue  # this tensor stays; smaller upgrades elsewhere may still fit
        used += extra
        step[name] = i + 1
        offer(name)
    return {name: hulls[name][i] for name, i in step.items()}


def _round(x: float) -> float:
    """Four significant digits: plans must not flip on the last bits of a float sum."""
    return float(f"{max(x, 0.0):.4g}")


class _Probe:
    """The fp32 reference on the calibration tokens: its output distribution, every layer's input
    and the mean squares of every Linear's input, and the KLD when some weights are swapped."""

    @torch.inference_mode()
    def __init__(self, model: Any, ids: Sequence[int]) -> None:
        from smolconvert.model.reference import build_reference

        self.decoder = build_reference(model.spec, source=model.weights)
        self.params = dict(self.decoder.named_parameters(remove_duplicate=False))
        tokens = torch.as_tensor(list(ids), dtype=torch.long)[None]  # (1, T)
        self.tokens = tokens
        self.cos, self.sin, self.mask = self.decoder.rope_and_mask(
            torch.ones_like(tokens), torch.arange(tokens.shape[1])[None], torch.float32
        )
        self.past = self.decoder.empty_past()
        self.layers = self.decoder.model.blocks()
        linears = {
            f"model.layers.{name}.weight": m
            for name, m in self.decoder.model.layers.named_modules()
            if isinstance(m, torch.nn.Linear)
        }
        linears["lm_head.weight"] = self.decoder.lm_head
        self.hidden: list[torch.Tensor] = []  # input of layer i; the last entry: the final output
        with input_square_sums(linears) as sums:
            h = self.decoder.model.embed_tokens(tokens)
            for i in range(len(self.layers)):
                self.hidden.append(h)
                h = self._layer(i, h)
            self.hidden.append(h)
            self.ref = self._head(h)  # (T, vocab) log-probabilities
        self.ref_p = self.ref.exp()
        n = tokens.shape[1]
        self.mean_squares = {k: (v / n).float().numpy() for k, v in sums.items()}

    def _layer(self, i: int, h: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        attn, _, _ = layer.self_attn(
            layer.input_layernorm(h), self.cos, self.sin, self.mask, *self.past[2 * i : 2 * i + 2]
        )
        h = h + attn
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.decoder.lm_head(self.decoder.model.norm(h)).float()[0]
        return torch.log_softmax(logits, dim=-1)

    @contextmanager
    def swapped(self, weights: dict[str, NDArray[np.float32]]) -> Iterator[None]:
        with torch.inference_mode():
            saved = {n: self.params[n].detach().clone() for n in weights}
            for n, w in weights.items():
                self.params[n].copy_(torch.from_numpy(w))
        try:
            yield
        finally:
            with torch.inference_mode():
                for n, old in saved.items():
                    self.params[n].copy_(old)

    @torch.inference_mode()
    def kld(self, start: int | None) -> float:
        """Mean KLD(reference || now) over the tokens, running from layer `start`'s recorded
        input (None: from the embedding)."""
        if start is None:
            h, start = self.decoder.model.embed_tokens(self.tokens), 0
        else:
            h = self.hidden[start]
        for i in range(start, len(self.layers)):
            h = self._layer(i, h)
        return float((self.ref_p * (self.ref - self._head(h))).sum(-1).mean())

    @torch.inference_mode()
    def layer_shift(self, i: int) -> float:
        """Squared distance of layer i's output from the reference's, on the reference's input."""
        return float(((self._layer(i, self.hidden[i]) - self.hidden[i + 1]) ** 2).sum())


def _errors(
    w: NDArray[np.float32], names: Sequence[str], act: NDArray, importance: NDArray | None
) -> dict[str, float]:
    """Activation-weighted squared error of each type on evenly spaced rows, scaled to all rows."""
    rows = w.shape[0]
    pick = np.unique(np.linspace(0, rows - 1, min(rows, SAMPLE_ROWS)).round().astype(np.int64))
    ws = np.ascontiguousarray(w[pick])
    out = {}
    for name in names:
        codec = get_codec(name, "gguf")
        back = codec.dequantize(codec.quantize(ws, importance), ws.shape)
        err = ((ws.astype(np.float64) - back) ** 2 * act).sum()
        out[name] = float(err) * rows / len(pick)
    return out


def _probe_weights(w: NDArray[np.float32], importance: NDArray | None) -> NDArray[np.float32]:
    codec = get_codec(PROBE, "gguf")
    return codec.dequantize(codec.quantize(w, importance), w.shape)


@torch.inference_mode()
def measure(
    model: Any, ids: Sequence[int], imatrix: Imatrix | None = None, quiet: bool = False
) -> list[TensorCost]:
    """Each matrix's bytes and predicted KLD under every candidate type, on `ids`."""
    spec = model.spec
    probe = _Probe(model, ids)
    tied = spec.tie_word_embeddings
    shapes = dict(matrices(spec))
    errors: dict[str, dict[str, float]] = {}
    gains: dict[str, float] = {}

    def activations(name: str) -> NDArray:
        role, _ = role_of(name, tied)
        if role == "token_embd":  # a lookup: every column counts alike
            return np.ones(shapes[name][-1], np.float64)
        if imatrix is not None and imatrix.get(name) is not None:
            return np.asarray(imatrix.get(name), np.float64)
        key = "lm_head.weight" if role == "output" else name
        return probe.mean_squares[key].astype(np.float64)

    def price(name: str) -> NDArray[np.float32]:
        """Record the tensor's errors; return its weights at the probe type."""
        w = model.weights.get(name).float().numpy()
        importance = imatrix.get(name) if imatrix is not None else None
        errors[name] = _errors(w, _candidates_of(name, w.shape), activations(name), importance)
        return _probe_weights(w, importance)

    def gain(name: str, kld: float) -> float:
        return kld / errors[name][PROBE] if errors[name][PROBE] > 0 else 0.0

    with progress.bar(len(shapes), "sensitivity") as bar:
        for name in shapes:
            if role_of(name, tied)[1] is None:  # embedding, output: a forward of their own
                with probe.swapped({name: price(name)}):
                    gains[name] = gain(name, probe.kld(None))
                bar.update(1)
        for i in range(spec.n_layers):
            prefix = f"model.layers.{i}."
            layer = {n: price(n) for n in shapes if n.startswith(prefix)}
            shift = {}
            for n, w in layer.items():
                with probe.swapped({n: w}):
                    shift[n] = probe.layer_shift(i)
            with probe.swapped(layer):
                kld = probe.kld(i)
            total = sum(shift.values())
            for n in layer:
                gains[n] = gain(n, kld * shift[n] / total if total > 0 else 0.0)
            bar.update(len(layer))
    return [
        TensorCost(
            name,
            {c: nbytes(c, shape) for c in errors[name]},
            {c: _round(gains[name] * e) for c, e in errors[name].items()},
        )
        for name, shape in shapes.items()
    ]
