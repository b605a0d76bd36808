"""A "Real or synthetic?" reader study: the plan, the answers, the score and the log.

A reader sees one image per trial, real (drawn from the data) or synthetic (generated from a
seed), says which it is and how sure they are (1-5). Accuracy near 50% means readers cannot
tell generated lesions from real ones; each accuracy comes with a Wilson score interval so
that a handful of answers is not read as more than it is. Pure logic: the app's tab renders
the images and wires these calls.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
import os
import random
import threading
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REAL = "real"
SYNTHETIC = "synthetic"
TRUTHS = (REAL, SYNTHETIC)
CONFIDENCE_RANGE = (1, 5)
ANONYMOUS = "anonymous"
MAX_READER_LENGTH = 64
CSV_COLUMNS = ("reader", "trial", "truth", "answer", "confidence", "correct", "timestamp")
SEED_LIMIT = 2**31  # synthetic seeds are drawn from [0, SEED_LIMIT)

_log_lock = threading.Lock()  # one appender at a time, so two first answers do not both write the header


class ReaderStudyError(ValueError):
    """Input the reader study cannot accept, with a message meant for the user."""


@dataclass(frozen=True)
class Trial:
    """One image to judge: a real file, or a synthetic image generated from ``seed``."""

    index: int
    truth: str
    real_path: str | None = None
    seed: int | None = None


def plan_trials(
    real_files: Sequence[str | Path], n_trials: int, seed: int, synthetic_fraction: float = 0.5
) -> list[Trial]:
    """``round(n_trials * synthetic_fraction)`` synthetic trials and the rest real, in a shuffled order.

    Real images are drawn without replacement; synthetic seeds are distinct. Everything follows
    from ``seed``, so the same inputs give the same plan (and every reader can see the same study).
    """
    if n_trials < 2:
        raise ReaderStudyError(f"A study needs at least 2 trials, not {n_trials}.")
    if not 0.0 <= synthetic_fraction <= 1.0:
        raise ReaderStudyError(f"The synthetic fraction must be between 0 and 1, not {synthetic_fraction}.")
    files = list(dict.fromkeys(str(f) for f in real_files))  # duplicates would repeat an image
    if not files:
        raise ReaderStudyError("The study needs real images to show, and none were given.")
    n_synthetic = round(n_trials * synthetic_fraction)
    n_real = n_trials - n_synthetic
    if len(files) < n_real:
        raise ReaderStudyError(f"{n_real} real trials need {n_real} different real images; only {len(files)} given.")
    rng = random.Random(seed)
    truths = [SYNTHETIC] * n_synthetic + [REAL] * n_real
    rng.shuffle(truths)
    reals = iter(rng.sample(files, n_real))
    seeds = iter(rng.sample(range(SEED_LIMIT), n_synthetic))
    return [
        Trial(i, REAL, real_path=next(reals)) if truth == REAL else Trial(i, SYNTHETIC, seed=next(seeds))
        for i, truth in enumerate(truths)
    ]


def draw_plan(trials: Sequence[Trial], ahead: int, chunk: int) -> list[list[Trial]]:
    """The synthetic trials in the batches they are drawn in: first those among the first
    ``ahead`` + 1 trials (drawn before the study starts), then the rest in order, ``chunk`` at
    a time, drawn while the reader answers. Showing trial t waits for every batch that holds
    a trial up to t + ``ahead``, whether t itself is real or synthetic: a wait then says little
    about the image it comes before."""
    if ahead < 0 or chunk < 1:
        raise ValueError("ahead must be at least 0 and chunk at least 1")
    synthetic = [t for t in trials if t.real_path is None]
    first = [t for t in synthetic if t.index <= ahead]
    rest = synthetic[len(first) :]
    return [first] + [rest[i : i + chunk] for i in range(0, len(rest), chunk)]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def normalize_reader(reader: str | None) -> str:
    """The reader id as stored: stripped, ``anonymous`` when empty; refused if it could act as a
    spreadsheet formula or break a CSV row when the log is opened elsewhere."""
    reader = (reader or "").strip()
    if not reader:
        return ANONYMOUS
    if len(reader) > MAX_READER_LENGTH:
        raise ReaderStudyError(f"The reader id is {len(reader)} characters long; the limit is {MAX_READER_LENGTH}.")
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in reader):
        raise ReaderStudyError("The reader id may not contain control characters or line breaks.")
    if reader[0] in "=+-@":
        raise ReaderStudyError("The reader id may not start with =, +, - or @.")
    return reader


def _choice(value: str, what: str) -> str:
    choice = value.strip().lower() if isinstance(value, str) else value
    if choice not in TRUTHS:
        raise ReaderStudyError(f"The {what} must be 'real' or 'synthetic', not {value!r}.")
    return choice


def _confidence(value: object) -> int:
    lo, hi = CONFIDENCE_RANGE
    ok = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not ok or not lo <= int(value) <= hi:
        raise ReaderStudyError(
            f"The confidence must be a whole number from {lo} (a guess) to {hi} (sure), not {value!r}."
        )
    return int(value)


@dataclass(frozen=True)
class Answer:
    """A reader's verdict on one trial; inputs are checked and normalised on construction."""

    trial: int
    truth: str
    answer: str
    confidence: int
    reader: str = ANONYMOUS
    timestamp: str = field(default_factory=_now)  # ISO 8601, UTC

    def __post_init__(self) -> None:
        object.__setattr__(self, "truth", _choice(self.truth, "truth"))
        object.__setattr__(self, "answer", _choice(self.answer, "answer"))
        object.__setattr__(self, "confidence", _confidence(self.confidence))
        object.__setattr__(self, "reader", normalize_reader(self.reader))

    @property
    def correct(self) -> bool:
        return self.answer == self.truth


@dataclass
class Session:
    """One reader working through a plan, one answer per trial, in order."""

    trials: list[Trial]
    reader: str = ANONYMOUS
    answers: list[Answer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reader = normalize_reader(self.reader)

    @property
    def finished(self) -> bool:
        return len(self.answers) >= len(self.trials)

    def current(self) -> Trial | None:
        """The trial waiting for an answer, or None when every trial is answered."""
        return None if self.finished else self.trials[len(self.answers)]

    def answer(self, answer: str, confidence: int) -> Answer:
        """Record the reader's answer to the current trial and move on."""
        trial = self.current()
        if trial is None:
            raise ReaderStudyError(f"The study is finished: all {len(self.trials)} trials are answered.")
        result = Answer(trial.index, trial.truth, answer, confidence, self.reader)
        self.answers.append(result)
        return result


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (95% for z=1.96); (0, 1) when n is 0.

    Unlike the normal approximation it stays inside [0, 1] and is honest at small n and near 0% or 100%.
    """
    if n < 0 or not 0 <= k <= n:
        raise ReaderStudyError(f"Need 0 <= k <= n, got k={k}, n={n}.")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True)
class Score:
    """Correct answers out of ``n``, with the accuracy and its 95% Wilson interval."""

    n: int
    correct: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.n if self.n else None

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)

    def cell(self) -> str:
        """Accuracy as a percentage with its interval, for a report."""
        if self.accuracy is None:
            return "–"
        lo, hi = self.interval
        return f"{100 * self.accuracy:.1f}% ({100 * lo:.1f}–{100 * hi:.1f}%)"


@dataclass(frozen=True)
class Summary:
    """The study's score overall and per true class, plus the mean confidence (None without answers)."""

    overall: Score
    real: Score
    synthetic: Score
    mean_confidence: float | None

    def markdown(self) -> str:
        """A short report: a table of accuracies with 95% intervals and how to read them."""
        if not self.overall.n:
            return "No answers yet."
        rows = [("All images", self.overall), ("Real images", self.real), ("Synthetic images", self.synthetic)]
        lines = ["| Shown | Answers | Correct | Accuracy (95% interval) |", "|---|---:|---:|---|"]
        lines += [f"| {name} | {s.n} | {s.correct} | {s.cell()} |" for name, s in rows]
        return "\n".join(
            lines
            + [
                "",
                f"Mean confidence: {self.mean_confidence:.1f} / {CONFIDENCE_RANGE[1]}.",
                "",
                "50% accuracy means readers cannot tell real from synthetic images; "
                "an interval that contains 50% is consistent with guessing.",
            ]
        )


def _score(answers: list[Answer]) -> Score:
    return Score(len(answers), sum(a.correct for a in answers))


def summarize(answers: Iterable[Answer]) -> Summary:
    """Score a set of answers (one reader's or everyone's)."""
    answers = list(answers)
    confidence = sum(a.confidence for a in answers) / len(answers) if answers else None
    return Summary(
        _score(answers),
        _score([a for a in answers if a.truth == REAL]),
        _score([a for a in answers if a.truth == SYNTHETIC]),
        confidence,
    )


def _row(answer: Answer) -> list[object]:
    a = answer
    return [a.reader, a.trial, a.truth, a.answer, a.confidence, int(a.correct), a.timestamp]


def answers_csv(answers: Iterable[Answer]) -> str:
    """The answers as CSV text with a header row (columns: :data:`CSV_COLUMNS`), for download."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    writer.writerows(_row(a) for a in answers)
    return buf.getvalue()


def _csv_line(values: Sequence[object]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerow(values)
    return buf.getvalue().encode("utf-8")


def _check_header(path: Path, first_line: bytes) -> None:
    try:
        header = next(csv.reader([first_line.decode("utf-8")]), [])
    except (UnicodeDecodeError, csv.Error):
        header = None
    if header is None or tuple(header) != CSV_COLUMNS:
        raise ReaderStudyError(f"{path} is not a reader-study log (its first line is not the expected header).")


def check_log(path: str | Path) -> None:
    """Raise ReaderStudyError unless ``path`` can take this log's rows (new, empty or a log of ours);
    the app checks at start-up so that no answer is refused later."""
    path = Path(path)
    if path.is_dir():
        raise ReaderStudyError(f"{path} is a folder, not a reader-study log file.")
    if not path.parent.is_dir():
        raise ReaderStudyError(f"{path}: the folder {path.parent} does not exist.")
    if path.is_file():
        with open(path, "rb") as f:
            first = f.readline(4096)
        if first:
            _check_header(path, first)


def append_log(path: str | Path, answer: Answer) -> None:
    """Append one answer to the CSV log at ``path``, writing the header only if the file is new or empty.

    Existing content is never truncated or rewritten: the file is opened for appending and the
    row is flushed and fsynced, so an answer that was acknowledged survives a crash. A file whose
    first line is not this log's header is refused (and left unchanged).
    """
    path = Path(path)
    if path.is_dir():
        raise ReaderStudyError(f"{path} is a folder, not a reader-study log file.")
    with _log_lock, open(path, "a+b") as f:
        f.seek(0)
        first = f.readline(4096)
        data = b""
        if not first:
            data = _csv_line(CSV_COLUMNS)
        else:
            _check_header(path, first)
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a row cut short by a crash: start on a fresh line
                data = b"\r\n"
        f.write(data + _csv_line(_row(answer)))
        f.flush()
        os.fsync(f.fileno())
