"""A tiny dependency-free progress bar on stderr (tqdm's look, none of its weight).

    for i in Progress(range(n), desc="sampling"):
        ...
    bar = Progress(batches, total=n, desc="train"); bar.set_postfix(loss=0.12)

On a terminal the line is redrawn in place; otherwise (logs, CI) a full line is
printed at most every ``log_interval`` seconds and once at the end.
"""
import sys
import time


def _fmt_time(seconds):
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Wrap an iterable; show n/total, a bar, rate, elapsed time, ETA and postfix fields."""

    def __init__(self, iterable, total=None, desc="", file=None, width=24, log_interval=5.0, disable=False):
        self.iterable = iterable
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.desc = desc
        self.file = sys.stderr if file is None else file
        self.width = width
        self.disable = disable
        self.tty = hasattr(self.file, "isatty") and self.file.isatty()
        self.interval = 0.1 if self.tty else log_interval
        self.postfix = {}
        self.n = 0
        self.shown = -1
        self.start = self.last = None

    def set_postfix(self, **fields):
        """Fields shown after the rate, e.g. ``loss=0.123``; floats are printed with 4 significant digits."""
        self.postfix.update(fields)

    @property
    def elapsed(self):
        return 0.0 if self.start is None else time.perf_counter() - self.start

    def line(self):
        el = self.elapsed
        rate = self.n / el if el > 0 else 0.0
        parts = [self.desc] if self.desc else []
        if self.total:
            filled = min(self.width, int(self.width * self.n / self.total))    # a loop may run past total
            parts.append(f"{self.n}/{self.total} [{'#' * filled}{'.' * (self.width - filled)}]")
        else:
            parts.append(f"{self.n}")
        parts.append(f"{rate:.2f} it/s" if rate >= 1 or rate == 0 else f"{1 / rate:.2f} s/it")
        eta = (self.total - self.n) / rate if self.total and rate > 0 and self.n <= self.total else None
        parts.append(f"{_fmt_time(el)}<{_fmt_time(eta) if eta is not None else '?'}")
        parts += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.postfix.items()]
        return " ".join(parts)

    def _draw(self, force=False, final=False):
        now = time.perf_counter()
        if not (force or final) and now - self.last < self.interval:
            return
        if final and not self.tty and self.shown == self.n:
            return
        self.last, self.shown = now, self.n
        if self.tty:
            self.file.write("\r" + self.line() + ("\n" if final else ""))
        else:
            self.file.write(self.line() + "\n")
        self.file.flush()

    def __iter__(self):
        if self.disable:
            yield from self.iterable
            return
        self.start = self.last = time.perf_counter()
        if self.tty:
            self._draw(force=True)
        try:
            for item in self.iterable:
                yield item
                self.n += 1
                self._draw()
        finally:
            self._draw(final=True)
