"""The gaze-supervision benchmark, reduced: the pipeline gives the table, and the shortcut costs.

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
def test_reduced_benchmark_shows_the_shortcut_cost_and_writes_the_table(tmp_path):
    bench = load_benchmark()
    configs = ["ceiling", "classifier", "set1 guided_backprop", "rrr"]
    argv = ["--images", "300", "--size", "64", "--epochs", "3", "--seeds", "0",
            "--configs", *configs, "--work", str(tmp_path / "work"), "--out", str(tmp_path)]
    report = bench.main(argv)

    summary = report["summary"]
    assert set(summary) == set(configs)
    # What makes the benchmark meaningful: trained on the shortcut, the same classifier scores
    # lower on test images where the marker no longer follows the label.
    assert summary["ceiling"]["test_auc_mean"] > summary["classifier"]["test_auc_mean"]
    # ... because it looks at the marker corners more than the classifier that never saw one.
    assert summary["classifier"]["corner_share"] > summary["ceiling"]["corner_share"]
    for name in ("set1 guided_backprop", "rrr"):
        entry = summary[name]
        point, lo, hi = entry["diff_vs_classifier"]
        assert lo <= point <= hi
        assert math.isfinite(entry["gap_recovered"])
        run = next(r for r in report["runs"] if r["config"] == name)
        for when in ("init", "best"):
            terms = run["grad_norms"][when]
            assert set(terms) == {"cls", "map_gaze" if name != "rrr" else "rrr"}
            assert all(t["norm"] > 0 and -1 <= t["cos_cls"] <= 1 for t in terms.values())

    table = (tmp_path / "gaze_supervision.md").read_text()
    for name in configs:
        assert f"| {name} |" in table
    assert "gap recovered" in table and "Shortcut cost" in table
    assert json.loads((tmp_path / "gaze_supervision.json").read_text())["summary"] == \
        json.loads(json.dumps(summary))

    # Finished runs are kept: a second invocation continues instead of training again.
    again = bench.main(argv)
    assert again["summary"]["classifier"]["test_auc"] == summary["classifier"]["test_auc"]
