"""Fuzz the DICOM and CSV readers with thousands of mutated inputs.

Run: `python benchmarks/fuzz_readers.py [--dicoms 3000] [--tables 2000] [--seed 0] [--full]`.
Uses the machinery of `tests/test_fuzz.py`, kept in `tests/fuzzing.py` (the seeds, the
mutations and the judge in a child process); `--full` adds the full-size public chest radiograph
(RG1, 1955 x 1841, uncompressed and JPEG 2000) to the DICOM seeds. Prints, per reader, the
number of inputs, the time, and the histogram of outcomes: loaded, refused with a `DataError`
(by reason), and the failures (any other exception, a crash, a hang), each failure with the case
that caused it. Exits 1 if any.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import fuzzing


def fuzz(name: str, strategy, run, examples: int, rng_seed: int) -> tuple[Counter, list, float]:
    """Run `examples` cases drawn from `strategy`; the outcome histogram, failures, seconds."""
    outcomes: Counter = Counter()
    failures: list = []

    # Generation only: nothing is replayed or shrunk, every failure is kept and reported.
    @seed(rng_seed)
    @settings(fuzzing.FUZZ, max_examples=examples, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def campaign(case):
        verdict, detail = run(case)
        outcomes[f"{verdict}: {detail}" if detail else verdict] += 1
        if verdict in fuzzing.FAILURES:
            failures.append((case, verdict, detail))
        done = sum(outcomes.values())
        if done % 250 == 0:
            print(f"  {name}: {done} inputs, {time.perf_counter() - start:.0f} s", flush=True)

    start = time.perf_counter()
    campaign()
    return outcomes, failures, time.perf_counter() - start


def report(name: str, outcomes: Counter, failures: list, seconds: float) -> None:
    total = sum(outcomes.values())
    print(f"\n{name}: {total} inputs in {seconds:.1f} s ({total / seconds:.1f} per s), "
          f"{len(failures)} failure(s)")
    for outcome, count in outcomes.most_common():
        print(f"  {count:>6}  {outcome}")
    for case, verdict, detail in failures[:20]:
        print(f"  FAILURE {verdict}: {detail}\n    case: {case}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dicoms", type=int, default=3000, help="mutated DICOM files")
    parser.add_argument("--tables", type=int, default=2000, help="mutated sets of tables")
    parser.add_argument("--seed", type=int, default=0, help="the campaign's random seed")
    parser.add_argument("--full", action="store_true",
                        help="also mutate the full-size RG1 radiograph (slow: 1-3 s a decode)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a hang")
    args = parser.parse_args()

    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}; per-input timeout {args.timeout:g} s")
    found = 0
    with tempfile.TemporaryDirectory(prefix="gazetune-fuzz-") as folder:
        space = fuzzing.Workspace.create(Path(folder), full=args.full, timeout_s=args.timeout)
        try:
            seeds = tuple(space.dicoms)
            for name, strategy, run, examples in (
                ("read_dicom", fuzzing.dicom_cases(seeds), space.run_dicom, args.dicoms),
                ("read_release", fuzzing.table_cases(), space.run_tables, args.tables),
            ):
                if examples:
                    outcomes, failures, seconds = fuzz(name, strategy, run, examples, args.seed)
                    report(name, outcomes, failures, seconds)
                    found += len(failures)
        finally:
            space.sandbox.close()
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
