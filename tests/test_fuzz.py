"""Fuzzing the readers: every mutated DICOM or table either loads or raises the project's error.

Inputs derive from a small synthetic release and from public real files (pydicom's and
pydicom-data's): byte flips, truncations, cut and inserted bytes, header fields set to edge
values (sizes, bit depths, photometric interpretation, transfer syntax, pixel data length,
window, rescale, LUT descriptors), and for the CSV tables rewritten cells (non-numeric, empty,
huge, unicode, quotes), dropped, renamed and extra columns, short and long rows, other
encodings. The property:

- a DICOM loads as a finite float32 image in [0, 1] of its declared Rows x Columns, or raises
  a `DataError` whose message names the file;
- `read_release` returns records with usable labels, unique ids and finite fixations, or raises
  a `DataError` naming the table (or folder) at fault;
- nothing else: no other exception type, no crash of the process, no hang.

Each input is judged in a child process (`Sandbox`) with a time and memory limit, so that a
crash or a hang is an outcome to report rather than the end of the run. This suite runs a few
hundred inputs; `python benchmarks/fuzz_readers.py` runs thousands with the same machinery
(tests/fuzzing.py) and prints the outcome histogram.
"""

from __future__ import annotations

import pytest
from fuzzing import (
    BUG,
    CRASH,
    DICOM_SEEDS,
    FAILURES,
    FUZZ,
    HANG,
    LOADED,
    REFUSED,
    DicomCase,
    TableCase,
    Workspace,
    dicom_cases,
    table_cases,
)
from hypothesis import given, settings


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    space = Workspace.create(tmp_path_factory.mktemp("fuzz"))
    yield space
    space.sandbox.close()


@settings(FUZZ, max_examples=400)
@given(case=dicom_cases())
def test_a_mutated_dicom_loads_or_raises_a_data_error_naming_it(workspace, case):
    verdict, detail = workspace.run_dicom(case)
    assert verdict not in FAILURES, f"{verdict}: {detail}"


@settings(FUZZ, max_examples=200)
@given(case=table_cases())
def test_mutated_tables_load_or_raise_a_data_error_naming_the_table(workspace, case):
    verdict, detail = workspace.run_tables(case)
    assert verdict not in FAILURES, f"{verdict}: {detail}"


def test_the_seeds_load_and_the_judge_tells_failures_apart(workspace):
    """The fuzzer's own check: unmutated seeds load; a crash, a hang and a foreign exception
    are reported as such (so a passing fuzz run means something)."""
    for name in DICOM_SEEDS:
        assert workspace.run_dicom(DicomCase(name)) == (LOADED, ""), name
    assert workspace.run_tables(TableCase(with_subset=True)) == (LOADED, "every row")
    sandbox = workspace.sandbox
    assert sandbox.judge("dicom", str(workspace.folder / "absent.dcm")) == (
        REFUSED, "no such DICOM file")
    assert sandbox.judge("release", "/absent", "/absent", None) == (REFUSED, "no such file")
    verdict, detail = sandbox.judge("dicom", None)
    assert verdict == BUG and detail.startswith("TypeError")
    assert sandbox.judge("crash")[0] == CRASH
    assert sandbox.judge("hang", timeout_s=1.0) == (HANG, "no answer within 1 s")
    assert workspace.run_dicom(DicomCase("CT_small.dcm")) == (LOADED, "")  # restarted


@pytest.mark.parametrize("case, reason", [
    # A Rust codec (pylibjpeg-rle) panics: pyo3's PanicException is no Exception subclass.
    (DicomCase("MR_small_RLE.dcm", edits=(("fill", 3484, b"\x00", 1),)),
     "cannot decode the pixel data"),
    # NaN and infinite windows or slopes pass pydicom and made NaN images.
    (DicomCase("RG1 crop", fields=(("set", "WindowWidth", "inf"),)),
     "the modality/VOI transform gives non-finite values"),
    (DicomCase("CT_small.dcm", fields=(("set", "RescaleSlope", "nan"),)),
     "the modality/VOI transform gives non-finite values"),
])
def test_inputs_that_fuzzing_found_are_refused_by_name(workspace, case, reason):
    assert workspace.run_dicom(case) == (REFUSED, reason)


def test_a_corrupt_element_is_an_unreadable_header(workspace):
    """Found by fuzzing: pydicom parses lazily, so a corrupt element raised NotImplementedError
    wherever it was first read. Here Rows gets VR bytes that name no VR."""
    data = workspace.dicoms["CT_small.dcm"]
    at = data.index(b"\x28\x00\x10\x00US")
    path = workspace.folder / "case.dcm"
    path.write_bytes(data[:at + 4] + b"\x49\xc8" + data[at + 6:])
    assert workspace.sandbox.judge("dicom", str(path)) == (REFUSED, "unreadable DICOM header")
