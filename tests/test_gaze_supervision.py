"""The gaze-supervision benchmark, reduced: the pipeline gives the table of both selections, the
shortcut costs, and a second invocation reuses the finished runs.

`benchmarks/gaze_supervision.py` is not a package module; it is loaded from its file.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gaze_supervision.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("gaze_supervision", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_reduced_benchmark_scores_both_selections_and_writes_the_table(tmp_path):
    bench = load_benchmark()
    configs = ["ceiling", "classifier", "swap", "swap clean", "gaze mask"]
    argv = ["--images", "300", "--size", "64", "--epochs", "3", "--seeds", "0",
            "--configs", *configs, "--work", str(tmp_path / "work"), "--out", str(tmp_path)]
    report = bench.main(argv)

    assert {"images", "size", "seeds", "encoder", "shortcut", "epochs", "machine",
            "multiplicity", "chosen", "configurations"} <= set(report)
    assert (report["images"], report["size"], report["seeds"]) == (300, 64, [0])
    rows = report["configurations"]
    assert set(rows) == {name + suffix for name in configs for suffix in ("", "@gaze")}
    for row, entry in rows.items():
        assert {"recovered", "recovered_ci", "seeds", "test_auc", "clean_cost",
                "selection"} <= set(entry)
        assert entry["selection"] == ("gaze_validation" if row.endswith("@gaze")
                                      else "validation")
        assert entry["seeds"] == [0]
        lo, hi = entry["recovered_ci"]
        assert lo <= hi
    # What makes the benchmark meaningful: trained on the shortcut, the same classifier scores
    # lower on test images where the marker no longer follows the label ...
    assert rows["ceiling"]["test_auc"] > rows["classifier"]["test_auc"]
    # ... and moving the marker to a class's training corner moves the classifier towards it.
    assert rows["classifier"]["marker_pull"] > rows["ceiling"]["marker_pull"]
    # The references are selected by validation for every row: they score 0 and 1.
    assert rows["classifier"]["recovered"] == 0 and rows["ceiling"]["recovered"] == 1
    for row in ("swap", "swap@gaze"):
        assert math.isfinite(rows[row]["clean_cost"])
        assert rows[row]["clean_counterpart"] == row.replace("swap", "swap clean")
    assert rows["swap clean"]["clean_cost"] is None  # a clean-release row is not a candidate
    # The upper bound sees every image through one fixed gaze region that holds no marker
    # pixel: the marker corners get no gradient, and pasting the marker changes nothing.
    assert report["gaze_region"]["marker_share"] == 0 and 0 < report["gaze_region"]["area"] < 1
    for row in ("gaze mask", "gaze mask@gaze"):
        assert rows[row]["corner_share"] == 0 and abs(rows[row]["marker_pull"]) < 1e-6
        assert rows[row]["clean_cost"] is None
    # Candidates: the shortcut rows but the reference (classifier@gaze, swap, swap@gaze).
    assert report["multiplicity"] == 3

    # Selection reads validation only: each selection's epoch is the first best of its score.
    for run in report["runs"]:
        for selection, key in (("validation", "val/auc/mean"),
                               ("gaze_validation", "val/gaze_auc/mean")):
            scores = [e[key] for e in run["epochs"]]
            assert run[selection]["epoch"] == 1 + scores.index(max(scores))

    written = json.loads((tmp_path / "gaze_supervision.json").read_text())
    assert written["configurations"] == json.loads(json.dumps(rows))
    table = (tmp_path / "gaze_supervision.md").read_text()
    for row in rows:
        assert f"| {row} | {rows[row]['selection']} |" in table
    assert "Shortcut cost" in table and "Multiplicity" in table and "Goal" in table

    # Finished runs are kept: a second invocation continues instead of training again.
    again = bench.main(argv)
    assert json.dumps(again["configurations"]) == json.dumps(rows)
    assert again["wall_minutes"] < report["wall_minutes"]
