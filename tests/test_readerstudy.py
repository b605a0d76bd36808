"""The reader study plans a fair, reproducible study, checks answers, scores them and logs them safely."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from lesionstudio.app.readerstudy import (
    CSV_COLUMNS,
    Answer,
    ReaderStudyError,
    Session,
    Trial,
    answers_csv,
    append_log,
    draw_plan,
    plan_trials,
    summarize,
    wilson_interval,
)

FILES = [f"data/img_{i:02d}.png" for i in range(20)]


def test_same_inputs_give_the_same_plan_and_the_seed_matters():
    plan = plan_trials(FILES, 12, seed=7)
    assert plan == plan_trials(FILES, 12, seed=7)
    assert plan == plan_trials([Path(f) for f in FILES], 12, seed=7)
    assert plan != plan_trials(FILES, 12, seed=8)


def test_plan_counts_order_and_draws():
    plan = plan_trials(FILES, 10, seed=3, synthetic_fraction=0.3)
    assert [t.index for t in plan] == list(range(10))
    real = [t for t in plan if t.truth == "real"]
    synthetic = [t for t in plan if t.truth == "synthetic"]
    assert len(synthetic) == 3 and len(real) == 7
    assert all(t.real_path in FILES and t.seed is None for t in real)
    assert len({t.real_path for t in real}) == 7  # without replacement
    assert all(t.real_path is None and isinstance(t.seed, int) for t in synthetic)
    assert len({t.seed for t in synthetic}) == 3
    assert [t.truth for t in plan] != ["synthetic"] * 3 + ["real"] * 7  # shuffled, not grouped


def test_plan_uses_every_file_once_when_there_are_just_enough():
    files = FILES[:5] + FILES[:2]  # duplicates do not count as extra images
    plan = plan_trials(files, 10, seed=0)
    assert sorted(t.real_path for t in plan if t.truth == "real") == sorted(FILES[:5])


@pytest.mark.parametrize(
    "files, n, fraction, message",
    [
        (FILES[:4], 10, 0.5, "5 real trials need 5 different real images; only 4"),
        (FILES[:2] * 3, 10, 0.5, "only 2"),
        ([], 4, 0.5, "none were given"),
        (FILES, 1, 0.5, "at least 2 trials"),
        (FILES, 10, 1.5, "between 0 and 1"),
    ],
)
def test_plan_rejects_bad_input(files, n, fraction, message):
    with pytest.raises(ReaderStudyError, match=message):
        plan_trials(files, n, seed=0, synthetic_fraction=fraction)


@pytest.mark.parametrize("confidence", [0, 6, 2.5, True, "3", None])
def test_confidence_must_be_a_whole_number_from_1_to_5(confidence):
    with pytest.raises(ReaderStudyError, match="confidence must be a whole number from 1"):
        Answer(0, "real", "real", confidence)


@pytest.mark.parametrize("answer", ["maybe", "", None, "reals"])
def test_answer_must_be_real_or_synthetic(answer):
    with pytest.raises(ReaderStudyError, match="answer must be 'real' or 'synthetic'"):
        Answer(0, "real", answer, 3)


def test_answer_is_normalised():
    a = Answer(2, "synthetic", "  Real ", 4.0, reader="  dr. A  ")
    assert (a.answer, a.confidence, a.reader, a.correct) == ("real", 4, "dr. A", False)
    assert isinstance(a.confidence, int)
    assert Answer(2, "synthetic", "SYNTHETIC", 1, reader="   ").reader == "anonymous"
    assert Answer(2, "synthetic", "synthetic", 5).correct
    assert a.timestamp.endswith("+00:00")  # ISO, UTC


@pytest.mark.parametrize("reader", ["=HYPERLINK(1)", "+1", "@x", "a\nb", "x" * 65])
def test_reader_ids_that_could_break_the_log_are_refused(reader):
    with pytest.raises(ReaderStudyError, match="reader id"):
        Session(plan_trials(FILES, 4, seed=0), reader=reader)


def play(session: Session, wrong_synthetic: int) -> None:
    """Answer every real trial correctly and all but ``wrong_synthetic`` synthetic ones."""
    confidences = iter([5, 4, 3, 2, 1, 3])
    missed = 0
    while (trial := session.current()) is not None:
        answer = trial.truth
        if trial.truth == "synthetic" and missed < wrong_synthetic:
            answer, missed = "real", missed + 1
        session.answer(answer, next(confidences))


def test_a_full_session_gives_the_right_summary():
    session = Session(plan_trials(FILES, 6, seed=11), reader="reader 1")
    assert not session.finished and session.current() == session.trials[0]
    play(session, wrong_synthetic=2)
    assert session.finished and session.current() is None
    assert [a.trial for a in session.answers] == list(range(6))
    assert {a.reader for a in session.answers} == {"reader 1"}

    s = summarize(session.answers)
    assert (s.overall.n, s.overall.correct) == (6, 4)
    assert s.overall.accuracy == pytest.approx(4 / 6)
    assert (s.real.n, s.real.correct, s.real.accuracy) == (3, 3, 1.0)
    assert (s.synthetic.n, s.synthetic.correct) == (3, 1)
    assert s.synthetic.accuracy == pytest.approx(1 / 3)
    assert s.overall.interval == pytest.approx((0.3000, 0.9032), abs=1e-3)
    assert s.mean_confidence == pytest.approx(3.0)


def test_answering_after_the_end_is_refused():
    session = Session(plan_trials(FILES, 2, seed=0))
    session.answer("real", 3)
    session.answer("synthetic", 3)
    with pytest.raises(ReaderStudyError, match="finished"):
        session.answer("real", 3)
    assert len(session.answers) == 2


def test_a_bad_answer_does_not_advance_the_session():
    session = Session(plan_trials(FILES, 4, seed=0))
    with pytest.raises(ReaderStudyError):
        session.answer("real", 9)
    assert session.answers == [] and session.current() == session.trials[0]


def test_wilson_interval_known_values():
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ReaderStudyError):
        wilson_interval(11, 10)


def test_markdown_report():
    assert summarize([]).markdown() == "No answers yet."
    answers = [Answer(i, "real", "real" if i < 8 else "synthetic", 4) for i in range(10)]
    s = summarize(answers)
    assert s.synthetic.n == 0 and s.synthetic.accuracy is None
    text = s.markdown()
    assert "| All images | 10 | 8 | 80.0% (49.0–94.3%) |" in text
    assert "| Synthetic images | 0 | 0 | – |" in text
    assert "50% accuracy means readers cannot tell real from synthetic" in text
    assert "Mean confidence: 4.0 / 5." in text


def answers_for(reader: str) -> list[Answer]:
    return [
        Answer(0, "real", "synthetic", 2, reader=reader, timestamp="2024-05-01T10:00:00+00:00"),
        Answer(1, "synthetic", "synthetic", 5, reader=reader, timestamp="2024-05-01T10:00:07+00:00"),
    ]


def test_csv_round_trips():
    answers = answers_for('Dr. "Q", dermatology')
    rows = list(csv.DictReader(io.StringIO(answers_csv(answers))))
    assert rows == [
        {
            "reader": 'Dr. "Q", dermatology',
            "trial": "0",
            "truth": "real",
            "answer": "synthetic",
            "confidence": "2",
            "correct": "0",
            "timestamp": "2024-05-01T10:00:00+00:00",
        },
        {
            "reader": 'Dr. "Q", dermatology',
            "trial": "1",
            "truth": "synthetic",
            "answer": "synthetic",
            "confidence": "5",
            "correct": "1",
            "timestamp": "2024-05-01T10:00:07+00:00",
        },
    ]


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_append_log_appends_across_calls(tmp_path: Path):
    log = tmp_path / "answers.csv"
    first, second = answers_for("a"), answers_for("b")
    for a in first:
        append_log(log, a)
    before = log.read_bytes()
    for a in second:
        append_log(log, a)
    assert log.read_bytes().startswith(before)
    assert log.read_text().count("reader,trial") == 1
    rows = read_log(log)
    assert [(r["reader"], r["trial"], r["correct"]) for r in rows] == [
        ("a", "0", "0"),
        ("a", "1", "1"),
        ("b", "0", "0"),
        ("b", "1", "1"),
    ]
    assert list(rows[0]) == list(CSV_COLUMNS)


def test_append_log_writes_the_header_into_an_empty_file(tmp_path: Path):
    log = tmp_path / "answers.csv"
    log.touch()
    append_log(log, answers_for("a")[0])
    assert [r["reader"] for r in read_log(log)] == ["a"]


def test_append_log_starts_a_new_line_after_a_cut_row(tmp_path: Path):
    log = tmp_path / "answers.csv"
    append_log(log, answers_for("a")[0])
    with open(log, "ab") as f:
        f.write(b"a,1,synth")  # a crash mid-row
    append_log(log, answers_for("b")[1])
    rows = read_log(log)
    assert rows[-1]["reader"] == "b" and rows[-1]["timestamp"] == "2024-05-01T10:00:07+00:00"
    assert len(rows) == 3


@pytest.mark.parametrize("content", [b"name,score\r\nx,1\r\n", b"\x89PNG\r\n\x1a\n\x00\x00", b"no newline at all"])
def test_append_log_refuses_another_file_and_leaves_it_unchanged(tmp_path: Path, content: bytes):
    other = tmp_path / "other.csv"
    other.write_bytes(content)
    with pytest.raises(ReaderStudyError, match="not a reader-study log"):
        append_log(other, answers_for("a")[0])
    assert other.read_bytes() == content


def test_append_log_refuses_a_folder(tmp_path: Path):
    with pytest.raises(ReaderStudyError, match="is a folder"):
        append_log(tmp_path, answers_for("a")[0])
    assert list(tmp_path.iterdir()) == []


def test_trial_is_immutable():
    trial = Trial(0, "real", real_path="x.png")
    with pytest.raises(AttributeError):
        trial.index = 1  # type: ignore[misc]


def test_check_log_accepts_new_empty_and_own_logs_only(tmp_path: Path):
    from lesionstudio.app.readerstudy import check_log

    check_log(tmp_path / "new.csv")  # not there yet
    (tmp_path / "empty.csv").write_text("")
    check_log(tmp_path / "empty.csv")
    ours = tmp_path / "ours.csv"
    append_log(ours, Answer(0, "real", "real", 3, "r"))
    check_log(ours)
    (tmp_path / "other.csv").write_text("name,score\na,1\n")
    with pytest.raises(ReaderStudyError):
        check_log(tmp_path / "other.csv")
    with pytest.raises(ReaderStudyError):
        check_log(tmp_path)
    with pytest.raises(ReaderStudyError, match="does not exist"):
        check_log(tmp_path / "no" / "such" / "log.csv")


def test_the_draw_plan_draws_the_first_synthetic_images_first_then_the_rest_in_order():
    trials = plan_trials(FILES, 20, seed=3)
    synthetic = [t for t in trials if t.real_path is None]
    first, *rest = draw_plan(trials, ahead=2, chunk=2)
    assert first == [t for t in synthetic if t.index <= 2]
    assert [t for batch in [first, *rest] for t in batch] == synthetic  # each once, in trial order
    assert all(1 <= len(batch) <= 2 for batch in rest) and all(t.index > 2 for batch in rest for t in batch)
    assert draw_plan(trials, ahead=len(trials), chunk=1) == [synthetic]  # all drawn up front
    with pytest.raises(ValueError, match="chunk"):
        draw_plan(trials, ahead=2, chunk=0)


def test_draws_ahead_wait_only_for_the_batches_due():
    from concurrent.futures import Future

    from lesionstudio.app.ui import DrawsAhead, PendingDraw

    def pending(indices: list[int]) -> PendingDraw:
        return PendingDraw([Trial(i, "synthetic", seed=i) for i in indices], Future())

    early, late = pending([3, 5]), pending([8])
    draws = DrawsAhead(limit=2)
    study = draws.add([early, late])
    early.images.set_result({3: "image 3", 5: "image 5"})
    assert draws.collect(study, upto=4) == {3: "image 3", 5: "image 5"}  # late is not waited for
    assert draws.collect(study, upto=4) == {}  # collected once
    late.images.set_exception(ReaderStudyError("the sampler failed"))
    with pytest.raises(ReaderStudyError, match="failed"):
        draws.collect(study, upto=8)
    first = draws.add([pending([1])])
    draws.add([])
    draws.add([])
    assert draws.collect(first, upto=9) == {}  # past the limit the oldest study is dropped
