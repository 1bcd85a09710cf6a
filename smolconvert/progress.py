"""Progress for long work: bars and step lines on stderr, quiet when stderr is not a terminal."""

from __future__ import annotations

import sys
import time
from typing import Any


def bar(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        file=sys.stderr,
        leave=False,
        unit="win",
        disable=not sys.stderr.isatty(),
    )


class Steps:
    """One line per step with the elapsed time: `[  12.3s] scoring reference`."""

    def __init__(self, quiet: bool = False) -> None:
        self.start = time.perf_counter()
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(
                f"[{time.perf_counter() - self.start:7.1f}s] {message}", file=sys.stderr, flush=True
            )
