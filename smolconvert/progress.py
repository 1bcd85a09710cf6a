"""Progress for long work: bars and step lines on stderr, quiet when stderr is not a terminal."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
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


@contextlib.contextmanager
def library_notes_off() -> Iterator[None]:
    """torch.export, torchao and ExecuTorch warn and log on every run about their own internals
    (deprecations, buffer mutation); none of it is the user's to act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loggers = [logging.root, logging.getLogger("torch")]  # torch has its own handler
        levels = [log.level for log in loggers]
        for log in loggers:
            log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for log, level in zip(loggers, levels, strict=True):
                log.setLevel(level)


@contextlib.contextmanager
def native_stderr_off() -> Iterator[None]:
    """Native code writes to file descriptor 2 directly; point it at /dev/null for a moment."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
