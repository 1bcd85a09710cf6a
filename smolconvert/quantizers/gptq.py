"""GPTQ: blockwise weight quantization that corrects each column's rounding error on the columns
not yet quantized, weighted by the layer's input Hessian H = E[x x^T] (Frantar et al. 2022,
"GPTQ", Algorithm 1: Cholesky of H^-1, lazy updates over 128 columns).

Three steps per weight:
1. The grid: each block's scale and zero point from the codec's own round-to-nearest search on
   the float weights ("static groups"), so the result packs exactly like the codec's plain output.
2. The levels: GPTQ's sweep in descending order of H's diagonal ("act order": the loudest inputs
   first, while the most columns remain to absorb their error).
3. The scales again: with the levels fixed, each row's block scales are the least-squares
   solution of its output error (w - w_hat) H (w - w_hat)^T, a small linear system per row.

`sequential_gptq` runs the reference decoder over calibration text layer by layer, quantizing
each projection on the inputs the already quantized layers produce. k and v are weighed by what
attention does with them (`attention_hessians`): v's error reaches the attention output mixed by
the attention weights, so v's Hessian is that of the mixed inputs (exact per kv head), and each
key's rows count by the attention the key receives. Each of these choices lowered the error of
the int4 ONNX export; the measurements are in docs/onnx.md.

The codec stays the caller's: `gptq` takes a grid and returns levels and scales on it, and
`sequential_gptq` hands each group of weights to a callback that quantizes them (for MatMulNBits:
quantizers/nbits.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from smolconvert import progress

# Of H's mean diagonal, added to its diagonal. The GPTQ paper's 0.01 fits the calibration text
# closest; 0.1 keeps the levels nearer round-to-nearest where the Hessian is thin, which held up
# better on text unlike the calibration (docs/onnx.md, "int4 outside its calibration domain").
DAMP = 0.1


@dataclass(frozen=True)
class GptqResult:
    levels: NDArray[np.uint8]  # (N, K padded to whole blocks)
    scales: NDArray[np.float32]  # (N, n_blocks), refit; the zero points are the grid's


# Rows swept at once. GPTQ treats the rows of W independently (one Hessian for all), so sweeping
# them in chunks gives the same levels while bounding the sweep's (rows, K) float32 temporaries:
# SmolLM2-1.7B's tied 49152 x 2048 head took ~3 GB at once.
ROWS = 4096


def gptq(
    w: NDArray[np.float32],
    hessian: torch.Tensor,
    bits: int,
    block_size: int,
    scales: NDArray[np.float32],
    zeros: NDArray[np.float32],
    damp: float = DAMP,
    lazy: int = 128,
    rows: int = ROWS,
) -> GptqResult:
    """Quantize w (N, K) against H (K, K) on the grid `scales`, `zeros` (N, n_blocks): the
    codec's round-to-nearest grid of w, w = scale * (level - zero) with levels in [0, 2**bits).
    K is zero-padded to whole blocks, as the codec pads."""
    n, k = w.shape
    nb = scales.shape[1]
    kp = nb * block_size
    Hf = _padded(hessian, kp, torch.float32)  # the refit's, undamped
    order, U = _factor(_padded(hessian, kp, torch.float64), damp)  # _factor owns its copy
    levels = np.empty((n, kp), dtype=np.uint8)
    refit = np.empty_like(scales, dtype=np.float32)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        W = torch.zeros((r1 - r0, kp), dtype=torch.float32)
        W[:, :k] = torch.from_numpy(np.asarray(w[r0:r1], np.float32))
        levels[r0:r1] = _sweep(W, U, order, scales[r0:r1], zeros[r0:r1], bits, block_size, lazy)
        refit[r0:r1] = refit_scales(W, Hf, levels[r0:r1], scales[r0:r1], zeros[r0:r1], block_size)
    return GptqResult(levels, refit)


def _padded(h: torch.Tensor, kp: int, dtype: torch.dtype) -> torch.Tensor:
    """A copy of h (K, K) in `dtype`, zero-padded to (kp, kp)."""
    out = torch.zeros((kp, kp), dtype=dtype)
    out[: len(h), : len(h)] = h
    return out


def _factor(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column order (descending diag(H): "act order") and U, the upper Cholesky factor of
    the damped, reordered H^-1 (U^T U = H^-1), in float32. Damps H in place.

    One factorization: with J the order reversal, J H J = L L^T gives H = R R^T for the upper
    triangular R = J L J, so H^-1 = R^-T R^-1 and U = R^-1 = J L^-1 J (where factor, invert and
    factor again took three; torch's cholesky_inverse alone took 25 s at 2048 x 2048 on 2 cores).
    The reversal is folded into the reordering, so H is copied once."""
    kp = len(H)
    diag = torch.diagonal(H)
    dead = diag == 0  # inputs never seen (or padding): their weights do not matter
    H[dead, dead] = 1.0
    diag.add_(damp * diag.mean())
    order = torch.argsort(diag, descending=True, stable=True)
    rev = order.flip(0)
    A = H[rev][:, rev]
    del H, diag, dead  # the only reference (down_proj's is 0.5 GB at SmolLM2-1.7B)
    try:
        L = torch.linalg.cholesky(A)
    except torch.linalg.LinAlgError:  # numerically singular: more damping, as GPTQ's authors do
        torch.diagonal(A).add_(0.1 * torch.diagonal(A).mean())
        L = torch.linalg.cholesky(A)
    del A
    # the inverse in float32, as GPTQ uses U: the factorization needs float64, this does not
    # (relative error ~1e-6 at 8192 x 8192, in half the time)
    eye = torch.eye(kp, dtype=torch.float32)
    Linv = torch.linalg.solve_triangular(L.float(), eye, upper=False)
    del L, eye
    return order, Linv.flip((0, 1))


def _sweep(
    W: torch.Tensor,
    U: torch.Tensor,
    order: torch.Tensor,
    scales: NDArray[np.float32],
    zeros: NDArray[np.float32],
    bits: int,
    block_size: int,
    lazy: int,
) -> NDArray[np.uint8]:
    """GPTQ's levels for W (N, Kp) on the fixed grid, columns in `order`, U from `_factor`."""
    n, kp = W.shape
    # columns as rows (kp, n): each step reads and updates contiguous memory
    WT = W.T[order].contiguous()
    S = torch.from_numpy(np.repeat(scales, block_size, axis=1)).T[order].contiguous()
    Z = torch.from_numpy(np.repeat(zeros, block_size, axis=1)).T[order].contiguous()
    live = S != 0
    S[~live] = 1.0
    nmax = (1 << bits) - 1
    levels = torch.zeros((kp, n), dtype=torch.uint8)
    for i1 in range(0, kp, lazy):
        i2 = min(i1 + lazy, kp)
        W1, U1 = WT[i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            c = i1 + i
            q = torch.clamp(torch.round(W1[i] / S[c]) + Z[c], 0, nmax)
            q = torch.where(live[c], q, Z[c])
            levels[c] = q.to(torch.uint8)
            err = (W1[i] - torch.where(live[c], (q - Z[c]) * S[c], 0.0)) / U1[i, i]
            W1[i:].addr_(U1[i, i:], err, alpha=-1)  # rank-1 update in place
            E1[i] = err
        WT[i2:] -= U[i1:i2, i2:].T @ E1
    return levels.T[:, torch.argsort(order)].numpy()


def refit_scales(
    W: torch.Tensor,
    H: torch.Tensor,
    levels: NDArray[np.uint8],
    scales: NDArray[np.float32],
    zeros: NDArray[np.float32],
    block_size: int,
    ridge: float = 1e-4,
    elements: int = 1 << 24,
) -> NDArray[np.float32]:
    """Each row's block scales s minimizing (w - M s)^T H (w - M s), where column b of M holds the
    row's (level - zero) in block b: s = (M^T H M)^-1 M^T H w, with a small ridge toward the
    current scales (a block of all-zero levels keeps its scale). W (N, Kp), H (Kp, Kp).
    Rows are solved in chunks of about `elements` Gram entries (nb x nb per row: 8192-wide
    down_proj rows have 256 blocks, and all 2048 rows' systems at once took ~4 GB)."""
    n, kp = W.shape
    nb = kp // block_size
    rows = max(1, elements // (nb * nb))
    Hf = H.float()
    out = np.array(scales, copy=True)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        lv = torch.from_numpy(levels[r0:r1].astype(np.float32)).reshape(r1 - r0, nb, block_size)
        D = (lv - torch.from_numpy(zeros[r0:r1])[..., None]).reshape(r1 - r0, kp)
        D3 = D.reshape(r1 - r0, nb, block_size)
        G = torch.empty((r1 - r0, nb, nb), dtype=torch.float32)
        for a in range(nb):  # G[:, a, b] = d_a H_ab d_b per row, all b >= a at once (symmetric)
            cols = slice(a * block_size, (a + 1) * block_size)
            Y = (D[:, cols] @ Hf[cols, a * block_size :]).reshape(r1 - r0, nb - a, block_size)
            G[:, a, a:] = torch.einsum("rbj,rbj->rb", Y, D3[:, a:])
            G[:, a + 1 :, a] = G[:, a, a + 1 :]
        rhs = ((W[r0:r1] @ Hf) * D).reshape(r1 - r0, nb, block_size).sum(-1)
        s0 = torch.from_numpy(scales[r0:r1])
        lam = ridge * torch.diagonal(G, dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
        A = G.double()
        del G
        torch.diagonal(A, dim1=1, dim2=2).add_(lam.double()[:, None])
        s = torch.linalg.solve(A, (rhs + lam[:, None] * s0).double()[..., None])[..., 0]
        out[r0:r1] = torch.where(s0 == 0, 0.0, s).float().numpy()
    return out


def gram(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) -> sum of x x^T over its rows, (K, K) float64. The product runs in float32 (one
    batch of calibration windows: relative error ~3e-7, twice as fast); callers sum in float64."""
    x = x.reshape(-1, x.shape[-1]).float()
    return (x.T @ x).double()


# A weight's Hessians by row range: [(rows, H (K, K)), ...] in row order, covering every row.
# GPTQ is per row, so rows may answer to different Hessians (k and v: one per kv head).
Segments = list[tuple[int, torch.Tensor]]

# Called with the canonical names of tensors that read one input (q/k/v, gate/up, or one
# projection), their float32 weights (N_i, K) and each one's Hessian segments; returns the
# dequantized weights to continue with.
QuantizeGroup = Callable[
    [Sequence[str], list[NDArray[np.float32]], list[Segments]], dict[str, torch.Tensor]
]


def attention_hessians(
    att: Any,
    xs: Sequence[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    pooled: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per kv head g, the Hessians that k's and v's rows of head g answer to, from the reference
    attention `att` (float q/k) on normalised inputs xs [(B, T, d)] with cos/sin/mask as
    `rope_and_mask` makes them (one window, broadcast over B).

    v: head h's attention output is sum_t p_ht (x_t W_v^T), so an error E in W_v's rows of
    head g moves it by (sum_t p_ht x_t) E^T: the Hessian is that of the mixed inputs
    x_bar_h = P_h x over g's query heads, sum_h x_bar_h x_bar_h^T (exact before o_proj).
    k: an error moves key t's scores; its cost grows with the attention key t receives, so
    each x_t x_t^T is weighed by that attention, summed over g's query heads and all queries
    (mean weight 1). Both are divided by the token count (and the group size), as the input's.

    pooled: one Hessian each for k and v, the mean of the per-head ones, computed without a
    gram per head: v's is sum_b x_b^T (sum_h P_h^T P_h) x_b, k's one gram weighed by the
    attention each key receives from every head. Per-head Hessians cost two d x d grams per kv
    head and layer (64 at SmolLM2-1.7B's 32 kv heads, most of GPTQ's time); pooled ones cost
    about as much as the input's."""
    from smolconvert.model.reference import rotate_half

    nh, nkv, hd = att.n_heads, att.n_kv, att.head_dim
    group = nh // nkv
    d = xs[0].shape[-1]
    slots = 1 if pooled else nkv
    hk = [torch.zeros((d, d), dtype=torch.float64) for _ in range(slots)]
    hv = [torch.zeros((d, d), dtype=torch.float64) for _ in range(slots)]
    tokens = 0
    for x in xs:
        b, t, _ = x.shape
        tokens += b * t
        q = att.q_proj(x).view(b, t, nh, hd).transpose(1, 2)
        k = att.k_proj(x).view(b, t, nkv, hd).transpose(1, 2)
        if att.use_rope:
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        k = k[:, :, None].expand(b, nkv, group, t, hd).reshape(b, nh, t, hd)
        probs = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * hd**-0.5 + mask, dim=-1)
        received = probs.sum(2)  # (B, nh, S): attention each key receives
        if pooled:
            mixing = torch.matmul(probs.transpose(2, 3), probs).sum(1).double()  # (B, S, S)
            xd = x.double()
            hv[0] += (xd.transpose(1, 2) @ mixing @ xd).sum(0)
            hk[0] += gram(x * received.sum(1)[..., None].sqrt())
            continue
        mixed = torch.matmul(probs, x[:, None])  # (B, nh, T, d): x_bar per query and head
        for g in range(nkv):
            heads = slice(g * group, (g + 1) * group)
            hv[g] += gram(mixed[:, heads])
            hk[g] += gram(x * received[:, heads].sum(1)[..., None].sqrt())
    norm = tokens * (nh if pooled else group)
    return [h / norm for h in hk], [h / norm for h in hv]


@torch.inference_mode()
def sequential_gptq(
    model: Any,
    windows: Sequence[Sequence[int]],
    quantize_group: QuantizeGroup,
    batch: int = 4,
    pooled: bool = False,
) -> int:
    """Run `windows` (token ids, all of one length) through the reference decoder one layer at a
    time: each projection's Hessian comes from the outputs of the layers already quantized, then
    the tied embedding's (or lm_head's) from the final norm. Returns the calibration token count.

    Only the layer at work holds its fp32 weights (read from the model's source when it starts,
    dropped when it ends), so memory is one layer and the embedding, not the whole fp32 model.
    `pooled`: k and v on one Hessian each for all kv heads (`attention_hessians`)."""
    from smolconvert.model.reference import ReferenceDecoder

    spec = model.spec
    n, ctx = len(windows), len(windows[0]) if windows else 0
    if n == 0 or ctx == 0 or any(len(w) != ctx for w in windows):
        raise ValueError("GPTQ needs one or more calibration windows of one length")
    with torch.device("meta"):
        dec = ReferenceDecoder(spec)
    dec.inv_freq = dec._inv_freq()
    _load(dec.model.norm, "model.norm", model.weights)
    tokens = n * ctx

    def quantize(
        names: list[str], xs: list[torch.Tensor], heads: dict[str, list[torch.Tensor]] | None = None
    ) -> None:
        """Quantize `names` on the Hessian of their inputs xs, or on one Hessian per head for the
        names in `heads`; the decoder continues with the quantized weights."""
        hessian = sum((gram(x) for x in xs), torch.zeros(1, dtype=torch.float64)) / tokens
        params = [dec.get_parameter(name) for name in names]
        weights = [p.detach().numpy() for p in params]
        segments: list[Segments] = []
        for name, w in zip(names, weights, strict=True):
            per_head = (heads or {}).get(name)
            if per_head is None:
                segments.append([(len(w), hessian)])
            else:
                segments.append([(len(w) // len(per_head), h) for h in per_head])
        for name, t in quantize_group(names, weights, segments).items():
            param = dec.get_parameter(name)
            param.data.copy_(t.reshape(param.shape))

    ids = torch.tensor([list(w) for w in windows])
    # the fp32 embedding only while it is read (1 GB at SmolLM3-3B), again for a tied head
    _load(dec.model.embed_tokens, "model.embed_tokens", model.weights)
    hs = [dec.model.embed_tokens(ids[i : i + batch]) for i in range(0, n, batch)]
    dec.model.embed_tokens.to_empty(device="meta")
    cos, sin, mask = dec.rope_and_mask(  # one window's; broadcast over the batch
        torch.ones((1, ctx), dtype=torch.long), torch.arange(ctx)[None], torch.float32
    )
    with progress.bar(spec.n_layers + 1, "gptq layers") as bar:
        layer: Any  # a reference DecoderLayer (ModuleList items type as Module)
        for i, layer in enumerate(dec.model.layers):
            p, att, mlp = f"model.layers.{i}", layer.self_attn, layer.mlp
            _load(layer, p, model.weights)
            xs = [layer.input_layernorm(h) for h in hs]
            hk, hv = attention_hessians(att, xs, cos, sin, mask, pooled)
            qkv = [f"{p}.self_attn.{t}_proj.weight" for t in "qkv"]
            quantize(qkv, xs, heads={qkv[1]: hk, qkv[2]: hv})
            contexts: list[torch.Tensor] = []  # o_proj's inputs, caught on the way in
            hook = att.o_proj.register_forward_pre_hook(lambda _, a, out=contexts: out.append(a[0]))
            try:
                for x in xs:
                    empty = dec.empty_past(len(x))[0]
                    att(x, cos, sin, mask, empty, empty)
            finally:
                hook.remove()
            quantize([f"{p}.self_attn.o_proj.weight"], contexts)
            hs = [h + att.o_proj(c) for h, c in zip(hs, contexts, strict=True)]
            xs = [layer.post_attention_layernorm(h) for h in hs]
            quantize([f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"], xs)
            acts = [torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x) for x in xs]
            quantize([f"{p}.mlp.down_proj.weight"], acts)
            hs = [h + mlp.down_proj(a) for h, a in zip(hs, acts, strict=True)]
            del xs, contexts, acts
            layer.to_empty(device="meta")  # its quantized weights are the caller's now
            bar.update(1)
        head = "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
        if spec.tie_word_embeddings:
            _load(dec.model.embed_tokens, "model.embed_tokens", model.weights)
        else:
            _load(dec.lm_head, "lm_head", model.weights)
        quantize([head], [dec.model.norm(h) for h in hs])
        bar.update(1)
    return tokens


def _load(module: torch.nn.Module, prefix: str, source: Any) -> None:
    """Give `module` (on the meta device) its fp32 weights from `source`, a WeightSource."""
    module.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(source.get(f"{prefix}.{name}").float())
