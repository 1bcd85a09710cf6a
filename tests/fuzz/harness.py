"""Running a fuzz property: bounded per example, reproducible in CI, time-bounded on demand.

The property is the same for every reader: a mutated input either loads or raises a
SmolconvertError, within EXAMPLE_SECONDS and EXAMPLE_MEMORY_MB, and what it loads keeps the
reader's promises (checked by the reader function in cases.py). Two modes:

- CI (default): `max_examples` per test, `derandomize=True` (the same examples on every run),
  no example database;
- long (`SMOLCONVERT_FUZZ_SECONDS=300`): each test runs for that many seconds, in rounds of
  random examples with a fresh printed seed each. A new failure is shrunk by hypothesis and kept as
  tests/fuzz/regressions/<reader>/<signature>.json (replayed by test_regressions.py); a failure
  whose signature is already kept is counted and not shrunk again, so the run goes on exploring.
  The counts (examples tried, failures new and known) are printed at the end (`pytest -s`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import resource
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st
from hypothesis.control import current_build_context
from hypothesis.errors import HypothesisWarning

from smolconvert.errors import SmolconvertError
from tests.fuzz import readers as R

REGRESSIONS = Path(__file__).parent / "regressions"
EXAMPLE_SECONDS = 20.0  # a tiny input read in more than this is a hang
EXAMPLE_MEMORY_MB = 512  # growth of the process's peak RSS allowed while reading one tiny input
ROUND_EXAMPLES = 300  # examples per round in long mode (each round a fresh seed)


def fuzz_seconds() -> float:
    return float(os.environ.get("SMOLCONVERT_FUZZ_SECONDS", "0") or 0)


class Hang(Exception):
    """Raised by the alarm when one example runs longer than EXAMPLE_SECONDS."""


@contextlib.contextmanager
def bounded(seconds: float = EXAMPLE_SECONDS, memory_mb: int = EXAMPLE_MEMORY_MB) -> Iterator[None]:
    """Fail an example that runs past `seconds` (an alarm) or grows the peak RSS past
    EXAMPLE_MEMORY_MB, and silence the warnings a careless input rightly causes."""

    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"one example ran longer than {seconds:.0f} s")

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024 - before
    assert grown <= memory_mb, f"one example grew the peak RSS by {grown} MB"


def signature(exc: BaseException) -> str:
    """What makes two failures the same bug: the exception type, the innermost smolconvert frame
    and the innermost frame (file and function; no line numbers, which move with every edit)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/smolconvert/" in f.filename]

    def where(f: traceback.FrameSummary) -> str:
        parts = Path(f.filename).parts
        for anchor in ("smolconvert", "site-packages", "tests"):
            if anchor in parts:
                parts = parts[len(parts) - parts[::-1].index(anchor) - 1 :]
                break
        else:
            parts = parts[-1:]  # the standard library: the file name is enough
        return f"{'/'.join(parts)}:{f.name}"

    inner = where(frames[-1]) if frames else "?"
    outer = where(ours[-1]) if ours else inner
    return f"{type(exc).__name__} in {outer}" + ("" if outer == inner else f" via {inner}")


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(p for p in keep.split("-") if p)[:80]


def known_signatures(reader: str) -> set[str]:
    return {json.loads(p.read_text())["signature"] for p in (REGRESSIONS / reader).glob("*.json")}


def save_regression(reader: str, case: dict[str, Any], exc: BaseException) -> Path:
    sig = signature(exc)
    digest = hashlib.sha256(json.dumps(case, sort_keys=True).encode()).hexdigest()[:8]
    path = REGRESSIONS / reader / f"{_slug(sig)}-{digest}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "reader": reader,
        **case,
        "signature": sig,
        "found": f"{type(exc).__name__}: {str(exc)[:300]}",
        "status": "open",
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def minimise(reader: str, bases: Any, recipe: dict[str, Any], sig: str) -> dict[str, Any]:
    """Drop ops one at a time while the same failure still happens (hypothesis's shrinker keeps
    ops that do not matter when the list of choices behind them cannot shrink further)."""
    ops = list(recipe["ops"])
    i = 0
    while i < len(ops) and len(ops) > 1:
        trial = ops[:i] + ops[i + 1 :]
        try:
            R.play(reader, bases, recipe["base"], trial)
        except SmolconvertError:
            pass
        except BaseException as exc:  # noqa: BLE001
            if signature(exc) == sig and getattr(exc, "recipe", {}).get("ops") == trial:
                ops = trial
                continue
        i += 1
    return {"base": recipe["base"], "ops": ops}


@dataclass
class Stats:
    reader: str
    examples: int = 0
    loaded: int = 0  # examples the reader accepted (and whose promises held)
    refused: int = 0  # examples refused with a SmolconvertError
    rounds: int = 0
    seeds: list[int] = field(default_factory=list)
    new: list[str] = field(default_factory=list)  # failures found in this run
    known_hits: int = 0
    saved: list[Path] = field(default_factory=list)

    def line(self, seconds: float) -> str:
        return (
            f"fuzz {self.reader}: {self.examples} examples in {seconds:.0f} s "
            f"({self.rounds} rounds; {self.loaded} loaded, {self.refused} refused), "
            f"new failures {len(self.new)}, hits of kept failures {self.known_hits}"
        )


def run(
    reader: str,
    strategy: st.SearchStrategy[tuple[str, list[dict[str, Any]]]],
    bases: Any,
    ci_examples: int,
    example_seconds: float = EXAMPLE_SECONDS,
    example_memory_mb: int = EXAMPLE_MEMORY_MB,
) -> Stats:
    """Fuzz `reader` (cases.READERS, or "config_spec") on (base, ops) cases drawn from
    `strategy`, in CI or long mode (module docstring)."""
    seconds = fuzz_seconds()
    stats = Stats(reader)
    skip = known_signatures(reader) if seconds else set()

    def prop(case: tuple[str, list[dict[str, Any]]]) -> None:
        stats.examples += 1
        try:
            with bounded(example_seconds, example_memory_mb):
                R.play(reader, bases, *case)
            stats.loaded += 1
        except SmolconvertError:
            stats.refused += 1
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - a Rust panic is a BaseException
            sig = signature(exc)
            if sig in skip:
                stats.known_hits += 1
                return
            recipe = getattr(exc, "recipe", {"base": case[0], "ops": case[1]})
            note(f"signature: {sig}")
            note(f"recipe: {json.dumps(recipe)}")
            if seconds and current_build_context().is_final:
                saved = save_regression(reader, minimise(reader, bases, recipe, sig), exc)
                stats.saved.append(saved)
                note(f"kept as {saved}")
            if not isinstance(exc, Exception):
                raise RuntimeError(f"{type(exc).__name__}: {exc}") from exc
            raise

    common: dict[str, Any] = dict(
        deadline=None,
        database=None,
        print_blob=False,
        suppress_health_check=list(HealthCheck),
    )
    # the strategies sample from a few hundred named GGUF sites: hypothesis warns that their
    # repr is long whenever it reports a case
    warnings.filterwarnings("ignore", "Generating overly large repr", HypothesisWarning)
    start = time.monotonic()
    if not seconds:
        settings(max_examples=ci_examples, derandomize=True, **common)(given(strategy)(prop))()
        print(f"\n{stats.line(time.monotonic() - start)}", file=sys.stderr)
        return stats
    failures = []
    while time.monotonic() - start < seconds:
        round_seed = random.SystemRandom().getrandbits(32)
        stats.seeds.append(round_seed)
        stats.rounds += 1
        test = seed(round_seed)(
            settings(max_examples=ROUND_EXAMPLES, derandomize=False, **common)(
                given(strategy)(prop)
            )
        )
        try:
            test()
        except Exception as exc:  # a new failure, shrunk and kept; go on exploring
            failures.append(f"seed {round_seed}: {type(exc).__name__}: {str(exc)[:2000]}")
            stats.new.append(str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            skip.update(known_signatures(reader))
    print(f"\n{stats.line(time.monotonic() - start)}", file=sys.stderr)
    for path in stats.saved:
        print(f"  kept {path.relative_to(REGRESSIONS.parents[2])}", file=sys.stderr)
    assert not failures, "\n".join(failures)
    return stats
