"""The patient split reproduces the dataset authors' literal code, rounding included."""

import random

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from trainable.data.split import TEST, TRAIN, VAL, patient_split


def authors_split(df: pd.DataFrame) -> tuple[list, list, list]:
    """`eye-gaze-dataset:Experiments/utils/dataset.py:split_dataset`, as written there."""
    pid = list(df["patient_id"].unique())
    random.seed(42)
    random.shuffle(pid)
    n_train = round(0.8 * len(pid))
    n_dev = round(0.5 * (len(pid) - n_train))
    return pid[:n_train], pid[n_train : n_train + n_dev], pid[n_train + n_dev :]


def codes_from_authors(patient_ids: list) -> np.ndarray:
    state = random.getstate()  # the authors' code reseeds the global generator
    try:
        train, dev, test = authors_split(pd.DataFrame({"patient_id": patient_ids}))
    finally:
        random.setstate(state)
    code = {**dict.fromkeys(train, TRAIN), **dict.fromkeys(dev, VAL), **dict.fromkeys(test, TEST)}
    return np.array([code[p] for p in patient_ids], dtype=np.int8)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(10_000_000, 10_000_060), min_size=1, max_size=200))
def test_split_equals_the_authors_code(patient_ids):
    # Repeated ids (patients with several images) and every list length, odd remainders too.
    assert np.array_equal(patient_split(patient_ids), codes_from_authors(patient_ids))


def test_release_sized_split_has_the_authors_counts():
    # 1,083 images of 1,038 patients -> 830 / 104 / 104 patients.
    rng = np.random.default_rng(0)
    patients = [str(p) for p in rng.choice(np.arange(10**7, 2 * 10**7), 1038, replace=False)]
    rows = patients + list(rng.choice(patients, 45))
    codes = patient_split(rows)
    per_patient = {p: c for p, c in zip(rows, codes, strict=True)}
    assert [list(per_patient.values()).count(c) for c in (TRAIN, VAL, TEST)] == [830, 104, 104]
    assert np.array_equal(codes, codes_from_authors(rows))


def test_rounding_is_pythons_round_half_to_even():
    # 13 patients: round(0.8 * 13) = 10, then round(0.5 * 3) = round(1.5) = 2, leaving 1 for test;
    # 7 patients: round(5.6) = 6, round(0.5) = 0 (half to even), leaving 1 for test.
    assert np.bincount(patient_split(list(range(13))), minlength=3).tolist() == [10, 2, 1]
    assert np.bincount(patient_split(list(range(7))), minlength=3).tolist() == [6, 0, 1]


def test_all_images_of_a_patient_share_a_split_and_globals_are_untouched():
    ids = ["a", "b", "a", "c", "d", "b", "e", "f", "g", "h", "i", "j", "a"]
    state = random.getstate()
    codes = patient_split(ids)
    assert random.getstate() == state
    for patient in set(ids):
        assert len({codes[i] for i, p in enumerate(ids) if p == patient}) == 1


def test_the_permutation_depends_only_on_first_appearance_order():
    # The authors read patient_id as int, we keep strings: the shuffle cannot tell them apart.
    ints = [15, 11, 15, 19, 12, 18, 11, 14, 13, 17, 16]
    assert np.array_equal(patient_split(ints), patient_split([str(i) for i in ints]))
