"""``bench/end_to_end.py`` runs end to end on a small slice of the digits data: the table and the JSON agree."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def end_to_end(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("end_to_end", "accuracy_vs_t"):
        sys.modules.pop(name, None)
    import end_to_end

    return end_to_end


def test_sj_sfn_against_if_on_digits(end_to_end, tmp_path, capsys: pytest.CaptureFixture) -> None:
    rc = end_to_end.main(["--models", "digits", "--images", "96", "--batch", "48", "--max-steps", "8", "--repeats", "1",
                          "--cache", str(tmp_path / "cache"), "--out", str(tmp_path), "--quiet"])  # fmt: skip
    assert rc == 0
    (row,) = json.loads((tmp_path / "end_to_end.json").read_text())["rows"]
    assert row["model"] == "digits" and row["images"] == 96
    assert sorted(int(t) for t in row["if_curve"]) == [1, 2, 4, 8]
    assert row["sfn_accuracy"] >= row["ann_accuracy"] - 3  # T = 1 keeps the ANN's accuracy on these images
    assert row["if_curve"]["1"]["accuracy"] < row["ann_accuracy"] - 20  # IF at one step does not
    assert all(row["if_curve"][str(t)]["seconds"] > 0 for t in (1, 2, 4, 8)) and row["sfn_seconds"] > 0
    first = next((t for t in (1, 2, 4, 8) if row["if_curve"][str(t)]["accuracy"] >= row["ann_accuracy"] - 0.5), None)
    assert row["if_matched"] == (first is not None) and row["if_steps"] == (first or 8)
    step = row["if_curve"][str(row["if_steps"])]  # the IF figures reported are those of the T it needs
    assert (row["if_accuracy"], row["if_seconds"]) == (step["accuracy"], step["seconds"])
    assert row["speedup"] == pytest.approx(row["if_seconds"] / row["sfn_seconds"])
    table = capsys.readouterr().out
    assert "| digits | 96 |" in table and ("> 8" in table) == (not row["if_matched"])


def test_bad_arguments_are_refused(end_to_end) -> None:
    with pytest.raises(SystemExit):
        end_to_end.main(["--images", "0"])
