"""The quality protocol: the same tokens, windows and metrics for every artifact.

The evaluation text is tokenized once with the reference tokenizer and cut into non-overlapping
windows of `ctx` tokens; as in llama.cpp's perplexity tool, the logits of rows ctx/2 .. ctx-2 are
scored (each predicts the next token). Per scored position the candidate's distribution is compared
with the reference's: perplexity, KL divergence (mean, p99, max) and top-1 agreement. Reference
log-probabilities are computed once per (model, text, ctx, windows) and reused within the process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from smolconvert.errors import ConfigError
from smolconvert.texts import EvalText, load_text

Logits = Callable[[Sequence[int]], NDArray[np.float32]]


def load_eval_text(path: str | Path | None) -> EvalText:
    return load_text(path)


def make_windows(
    token_ids: Sequence[int], ctx: int, n_windows: int, bos: int | None = None
) -> list[list[int]]:
    """Non-overlapping windows of ctx tokens; given a bos id, each starts with it (llama.cpp)."""
    if ctx < 8:
        raise ConfigError(f"ctx must be at least 8 tokens, got {ctx}")
    available = len(token_ids) // ctx
    if available == 0:
        raise ConfigError(
            f"the evaluation text has {len(token_ids)} tokens, fewer than one window of ctx={ctx}; "
            "use a longer text or a smaller --ctx"
        )
    out = []
    for w in range(min(available, n_windows)):
        window = list(token_ids[w * ctx : (w + 1) * ctx])
        if bos is not None:
            window[0] = bos
        out.append(window)
    return out


def tokenize_windows(tokenizer: Any, text: EvalText, ctx: int, n_windows: int) -> list[list[int]]:
    """Tokenize only as much text as the windows need (~4 chars a token, doubled for safety)."""
    need = ctx * n_windows
    chars = need * 8
    while True:
        ids = tokenizer.encode(text.text[:chars])
        if len(ids) >= need + 1 or chars >= len(text.text):
            break
        chars *= 2
    bos = tokenizer.special.bos if tokenizer.special.add_bos else None
    return make_windows(ids, ctx, n_windows, bos)


def scored_rows(ctx: int) -> slice:
    """Rows of a window's logits that are scored: ctx/2 .. ctx-2 (row t predicts token t+1)."""
    return slice(ctx // 2, ctx - 1)


@dataclass(frozen=True)
class QualityMetrics:
    n_windows: int
    ctx: int
    n_scored: int
    ppl: float
    ppl_reference: float
    ppl_ratio: float
    kld_mean: float
    kld_p99: float
    kld_max: float
    top1: float  # fraction of positions where candidate and reference agree on the argmax

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReferenceScores:
    """Reference log-probabilities (float32) of the scored rows of every window, plus targets."""

    windows: list[list[int]]
    logprobs: list[torch.Tensor]  # per window (n_scored, vocab)
    nll: NDArray[np.float64]  # (n_windows * n_scored,)


_REFERENCE_CACHE: dict[tuple[str, ...], ReferenceScores] = {}


def cached_reference_scores(key: tuple[str, ...]) -> ReferenceScores | None:
    return _REFERENCE_CACHE.get(key)


def reference_scores(
    key: tuple[str, ...], windows: list[list[int]], logits: Logits, progress: Any = None
) -> ReferenceScores:
    """Reference log-probs for `windows`, computed once per key (model hash, text hash, ctx, n)."""
    if key in _REFERENCE_CACHE:
        return _REFERENCE_CACHE[key]
    _REFERENCE_CACHE.clear()  # one reference at a time: each costs n_scored * vocab * 4 bytes
    ctx = len(windows[0])
    rows = scored_rows(ctx)
    logprobs, nll = [], []
    for window in windows:
        lp = torch.log_softmax(torch.from_numpy(np.asarray(logits(window)))[rows].float(), dim=-1)
        targets = torch.tensor(window[rows.start + 1 :])
        nll.append(-lp.gather(1, targets[:, None])[:, 0].double().numpy())
        logprobs.append(lp)
        if progress is not None:
            progress(1)
    scores = ReferenceScores(windows, logprobs, np.concatenate(nll))
    _REFERENCE_CACHE[key] = scores
    return scores


def compare(reference: ReferenceScores, logits: Logits, progress: Any = None) -> QualityMetrics:
    """Score a candidate's logits on the reference's windows."""
    ctx = len(reference.windows[0])
    rows = scored_rows(ctx)
    kld, nll, agree = [], [], []
    for window, ref_lp in zip(reference.windows, reference.logprobs, strict=True):
        lp = torch.log_softmax(torch.from_numpy(np.asarray(logits(window)))[rows].float(), dim=-1)
        targets = torch.tensor(window[rows.start + 1 :])
        nll.append(-lp.gather(1, targets[:, None])[:, 0].double().numpy())
        ref64 = ref_lp.double()
        kld.append((ref64.exp() * (ref64 - lp.double())).sum(-1).numpy())
        agree.append((lp.argmax(-1) == ref_lp.argmax(-1)).numpy())
        if progress is not None:
            progress(1)
    kl = np.concatenate(kld)
    ppl = float(np.exp(np.concatenate(nll).mean()))
    ppl_ref = float(np.exp(reference.nll.mean()))
    return QualityMetrics(
        n_windows=len(reference.windows),
        ctx=ctx,
        n_scored=int(kl.size),
        ppl=ppl,
        ppl_reference=ppl_ref,
        ppl_ratio=ppl / ppl_ref,
        kld_mean=float(kl.mean()),
        kld_p99=float(np.percentile(kl, 99)),
        kld_max=float(kl.max()),
        top1=float(np.concatenate(agree).mean()),
    )
