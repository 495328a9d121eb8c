"""`gazetune bench --quick`: one real smoke run prints every figure of the performance section."""

import re

import pytest
import torch

from search.cli import build_parser

RATIO_LINES = [
    "ratio set1 guided_backprop, fast path",
    "ratio set1 deconvnet, fast path",
    "ratio set3 guided_backprop, fast path",
    "ratio set3 deconvnet, fast path",
    "ratio data handling / plain train step",
    "ratio bootstrap speed-up",
    "ratio validation+figures / epoch, plain training",
    "ratio validation+figures / epoch, set3 guided_backprop fast training",
    "projected GPU-hours, every trial set1/set3, full budget",
    "projected GPU-hours, paper space (2/5 set1/set3, 1/5 set2, 2/5 plain), full budget",
    "projected GPU-hours, paper space, ASHA stops ~half the budget",
]


# About 50 s of CPU (1 thread): over the default suite's budget.
@pytest.mark.slow
def test_quick_bench_prints_every_ratio(capsys):
    args = build_parser().parse_args(["bench", "--quick", "--size", "64", "--batch", "2",
                              "--device", "cpu", "--threads", "1"])
    threads = torch.get_num_threads()
    try:
        assert args.func(args) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert out.startswith("device: CPU ")
    lines = out.splitlines()
    for prefix in RATIO_LINES:
        found = [line for line in lines if line.startswith(prefix)]
        assert len(found) == 1, f"missing or repeated: {prefix!r}\n{out}"
        assert re.search(r"\d+(\.\d+)?(x|%)|\d+\.\d+-\d+\.\d+", found[0]), found[0]
    # The CPU run says what it could not measure rather than printing a made-up figure.
    assert "packing: needs CUDA (not measured here)" in lines
    assert "compile: skipped (--quick)" in lines
    # Every measured ratio is a finite positive number.
    for value in re.findall(r": (\d+\.?\d*)(?:x|%)", out):
        assert 0 < float(value) < float("inf")
