"""From the released files to arrays: EGD-CXR tables, DICOM decoding, gaze heatmaps, the cache.

Light on purpose (numpy, pandas, pydicom, Pillow): no torch, so data preparation runs anywhere.
"""

from trainable.data.cache import Cache, PrepareSummary, load_cache, prepare
from trainable.data.dicom import read_dicom
from trainable.data.egd import ImageRecord, Release, Skip, read_release
from trainable.data.heatmaps import fixation_map, static_heatmap, temporal_heatmaps
from trainable.data.split import patient_split

__all__ = [
    "Cache",
    "ImageRecord",
    "PrepareSummary",
    "Release",
    "Skip",
    "fixation_map",
    "load_cache",
    "patient_split",
    "prepare",
    "read_dicom",
    "read_release",
    "static_heatmap",
    "temporal_heatmaps",
]
