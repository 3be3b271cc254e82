"""Progress for long data preparation (downloads, parsing, partitioning), and number formatting.

Data code calls these instead of ``tqdm`` directly, so that progress looks the same everywhere and stays
silent where it should: on ranks other than 0, with ``FL_LIGHTNING_PROGRESS=0``, and when stderr is not a
terminal (CI logs) unless ``FL_LIGHTNING_PROGRESS=1`` forces it on::

    from fl_lightning.progress import byte_progress, progress, stage

    with byte_progress("femnist.tar.gz", total=length) as bar:       # a download: bytes, rate, ETA
        while chunk := response.read(1 << 20):
            out.write(chunk)
            bar.update(len(chunk))
    for writer in progress(writers, desc="parsing FEMNIST", unit="writer"):   # countable work
        ...
    with stage("partitioning digits into 100 clients"):              # one step: reported only if slow
        ...
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from tqdm import tqdm

__all__ = ["byte_progress", "format_bits", "progress", "progress_enabled", "stage"]

T = TypeVar("T")
ENV = "FL_LIGHTNING_PROGRESS"
_BIT_UNITS = ("b", "kb", "Mb", "Gb", "Tb", "Pb")


def format_bits(bits: float) -> str:
    """Bits with a decimal SI prefix, three significant digits: ``950 b``, ``1.2 Mb``, ``37.5 Gb``."""
    value = float(bits)
    unit = 0
    while abs(value) >= 999.5 and unit < len(_BIT_UNITS) - 1:
        value /= 1000.0
        unit += 1
    if unit == 0:
        return f"{value:.0f} b"
    return f"{value:.3g} {_BIT_UNITS[unit]}"


def progress_enabled() -> bool:
    """Whether progress is shown: rank 0 only, never with ``FL_LIGHTNING_PROGRESS=0``, always with ``=1``,
    otherwise when stderr is a terminal."""
    rank = os.environ.get("LOCAL_RANK") or os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    if rank != "0":
        return False
    flag = os.environ.get(ENV, "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    return sys.stderr.isatty()


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """``iterable`` with a progress bar (see :func:`progress_enabled`); ``total`` defaults to ``len()``."""
    with tqdm(iterable, desc=desc, total=total, unit=unit, disable=not progress_enabled(), leave=False) as bar:
        yield from bar


@contextmanager
def stage(desc: str, after: float = 1.0) -> Iterator[None]:
    """A step without countable progress. Fast steps print nothing; one still running after ``after`` seconds
    prints ``desc ...`` then, when it ends, ``desc: done in 12.3 s`` (on stderr, when progress is enabled).
    ``after=0`` announces the step at once."""
    if not progress_enabled():
        yield
        return
    start = time.perf_counter()
    announced = threading.Event()

    def announce() -> None:
        announced.set()
        print(f"{desc} ...", file=sys.stderr, flush=True)

    timer = threading.Timer(after, announce)
    timer.daemon = True
    if after <= 0:
        announce()
    else:
        timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if timer.is_alive():
            timer.join()
        if announced.is_set():
            print(f"{desc}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


@contextmanager
def byte_progress(desc: str, total: int | None = None) -> Iterator[tqdm]:
    """A bar counting bytes (a download, an extraction): call ``bar.update(len(chunk))``; ``total`` in bytes
    when known (e.g. the ``Content-Length`` header), else the bar shows the count and the rate."""
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
              disable=not progress_enabled(), leave=False) as bar:
        yield bar
