"""What a person sees on the terminal: counts in words, warnings in one line, progress.

Only the command line installs the warning format (:func:`install_warning_format`); the
library leaves Python's warnings machinery as the caller set it.
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any
from typing import TextIO

# Words whose plural is not the word plus "s" or "es".
# Irregular plurals of the words babysit counts ("epoch" ends in "ch" but takes "s").
_PLURALS = {"is": "are", "was": "were", "has": "have", "epoch": "epochs"}


def plural(n: int | float, word: str, many: str | None = None) -> str:
    """``n`` and ``word`` agreeing: plural(1, "epoch") is "1 epoch", plural(3, "epoch")
    "3 epochs"; ``many`` gives an irregular plural. A float prints as given (1.5 epochs)."""
    if n == 1:
        form = word
    elif many is not None:
        form = many
    elif word in _PLURALS:
        form = _PLURALS[word]
    else:
        form = word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")
    return f"{n} {form}"


def epoch_tested(final: dict[str, Any]) -> str:
    """Which epoch's weights the final tested, from the summary's final entry: "at epoch
    16 of 20" (the best epoch on validation, of the epochs run); "after 20 epochs" for a run
    that stored no best epoch."""
    best, run = final.get("best_epoch"), final.get("epochs")
    if best is None:
        return f"after {plural(run, 'epoch')}" if run is not None else ""
    return f"at epoch {best} of {run if run is not None else '?'}"


def duration(seconds: float) -> str:
    """A duration as a person reads it: 48 s, 2m05s, 1h30m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def shown_range(values: list[Any]) -> str:
    """A searched range as words: ``[0.001, 0.1]`` for numbers, ``none or cosine`` for a
    categorical's choices (the schedule)."""
    if values and all(isinstance(v, str) for v in values):
        return " or ".join(values)
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


def shown_params(params: dict[str, Any], sep: str = " ") -> str:
    """A trial's params as the verdicts print them: ``lr 0.001, weight_decay 1e-05,
    dropout 0.3, schedule cosine`` (``sep="="``: ``lr=0.001, ...``)."""
    return ", ".join(
        f"{k}{sep}{v:.3g}" if isinstance(v, (int, float)) else f"{k}{sep}{v}"
        for k, v in params.items()
    )


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    # Python's default shows the file, the line number, the category and the source line:
    # two lines that point into babysit's code, when what the user needs is the message.
    out = file if file is not None else sys.stderr
    text = " ".join(str(message).split()) or category.__name__
    try:
        out.write(f"warning: {text}\n")
        out.flush()
    except (OSError, ValueError):
        pass  # a closed stderr: nowhere to say it, as with Python's own showwarning


def install_warning_format() -> None:
    """Warnings that reach the terminal print as one line ``warning: <message>``."""
    warnings.showwarning = _one_line_warning


class Progress:
    """One progress display per stage on stderr, silent under ``quiet``.

    The display starts at the first report, so it begins where the stage stands (trials
    or epochs a previous run stored count as done, and the rate counts only this run's),
    and nothing is drawn before work starts. On a terminal it is a tqdm bar; otherwise
    (a log file, a pipe, a test) one plain line per finished trial or epoch, since a
    bar's carriage-return frames make an unreadable log. Under a --budget, ``ends`` (Unix
    time) is when the run's budget is spent, and each line (or the bar) says the time left.
    """

    def __init__(
        self,
        desc: str,
        unit: str,
        quiet: bool = False,
        stream: TextIO | None = None,
        ends: float | None = None,
    ) -> None:
        self.ends = ends
        self.desc = desc
        self.unit = unit
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.bar: Any = None
        self.shown: tuple[int, int] | None = None
        self.t0 = time.perf_counter()

    def _tty(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    def to(self, n: int, total: int, *_: Any) -> None:
        """The stage has ``n`` of ``total`` trials (or epochs) done."""
        if self.quiet:
            return
        n = min(n, total)
        if self.shown == (n, total):
            return  # a poll while other processes run the last trials: nothing new
        first = self.shown is None
        self.shown = (n, total)
        if first:
            self.t0 = time.perf_counter()  # the time since work started, not construction
        if self._tty():
            self._draw(n, total)
            return
        said = f"{n}/{plural(total, self.unit)}"
        if first and n > 0:
            said += " already done"
        elif not first:
            said += f" ({time.perf_counter() - self.t0:.0f} s)"
        if self.ends is not None:
            said += f"; {self.left()} left of the budget"
        print(f"{self.desc}: {said}", file=self.stream, flush=True)

    def _draw(self, n: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=n,
                desc=self.desc,
                unit=self.unit,
                file=self.stream,
                leave=False,
                dynamic_ncols=True,
            )
            return
        self.bar.total = total
        self.bar.update(n - self.bar.n)
        if self.ends is not None:
            self.bar.set_postfix_str(f"{self.left()} left of the budget")

    def left(self) -> str:
        """The budget's time left, in words."""
        return duration((self.ends or 0.0) - time.time())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
