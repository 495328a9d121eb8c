"""Patient-level train/validation/test split, reproducing the dataset authors' rule.

`cxr-eye-gaze/eye-gaze-dataset:Experiments/utils/dataset.py:split_dataset` shuffles the unique
patient ids (in order of first appearance in the master sheet) with Python's `random.seed(42)`,
then takes round(0.8 n) patients for training, round(0.5 (n - n_train)) for validation and the
rest for test. Reproducing it exactly keeps results comparable with theirs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "val", "test")


def patient_split(patient_ids: Sequence, seed: int = 42) -> np.ndarray:
    """Split code per row (0 train, 1 val, 2 test), all images of a patient in one split.

    Args:
        patient_ids: one patient id per image row, in master-sheet order.
        seed: the seed of Python's `random` (the authors used 42).

    Returns:
        int8 array shaped like `patient_ids`.
    """
    unique = list(dict.fromkeys(patient_ids))  # order of first appearance, like pandas.unique
    rng = random.Random(seed)  # same stream as random.seed(seed); random.shuffle(...)
    rng.shuffle(unique)
    n_train = round(0.8 * len(unique))
    n_val = round(0.5 * (len(unique) - n_train))
    code = {pid: TRAIN for pid in unique[:n_train]}
    code.update({pid: VAL for pid in unique[n_train : n_train + n_val]})
    code.update({pid: TEST for pid in unique[n_train + n_val :]})
    return np.array([code[pid] for pid in patient_ids], dtype=np.int8)
