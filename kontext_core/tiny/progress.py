"""A dependency-free progress bar: in place on a terminal, one line every few seconds in a log file."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, start: int = 0, stream=None, every_s: float = 10.0):
        self.total, self.desc, self.n, self.start_n = total, desc, start, start
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = self.last = time.time()
        self.every_s = every_s if not self.tty else 0.2
        self.postfix = ""

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if postfix:
            self.postfix = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
        now = time.time()
        if now - self.last >= self.every_s or self.n >= self.total:
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        done = self.n - self.start_n
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        frac = self.n / max(self.total, 1)
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        line = (f"{self.desc} [{bar}] {self.n}/{self.total} {100 * frac:5.1f}% {rate:.2f} it/s "
                f"eta {eta / 60:.1f} min {self.postfix}")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and self.n >= self.total:
            self.stream.write("\n")
        self.stream.flush()
