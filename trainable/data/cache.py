"""Prepare once, train many times: decoded images, gaze maps, labels and split on disk.

Layout of a cache folder:

    entries/<key>.npz   one image: resized image, static heatmap, fixation counts. The key
                        hashes everything the entry depends on (DICOM path, mtime and size, the
                        image's fixations, the parameters, PREPROCESS_VERSION), so a rerun
                        decodes only what changed.
    dataset.npz         all images stacked, loaded without pickle by `load_cache`.
    manifest.json       version, parameters, input hash, counts, the uid salt, skipped inputs
                        (a DICOM path in a reason is replaced by the image's uid: paths hold
                        MIMIC subject and study ids).

Every file is written to a temporary name in its folder and renamed into place
(`trainable.files.atomic_write`), so a killed prepare, or one that ran out of disk, leaves
only complete files under their real names; the dataset and its manifest move into place
together. A dataset and its manifest carry the same input hash: a pair from different runs is
refused. An unwritable cache folder is refused before anything is decoded.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from trainable.config import CLASS_NAMES
from trainable.data.dicom import read_dicom
from trainable.data.egd import SYNTHETIC_MARK, ImageRecord, Release, Skip, read_release
from trainable.data.heatmaps import SIGMA, fixation_map, static_heatmap
from trainable.data.split import SPLIT_NAMES
from trainable.errors import CacheError, DataError
from trainable.files import (
    WriteError,
    atomic_write,
    atomic_write_all,
    check_writable,
    opened,
    remove_stale_temporaries,
)

PREPROCESS_VERSION = 1
DATASET, MANIFEST, ENTRIES = "dataset.npz", "manifest.json", "entries"
ARRAYS = ("images", "heatmaps", "fixations", "labels", "split", "uids")
UID_HEX = 16  # 64 bits of a salted SHA-256: unique among thousands of images, not reversible


@dataclass(frozen=True, eq=False)
class Cache:
    """A prepared dataset in memory, each array contiguous and ready to move to a device.

    Shape:
        images, heatmaps [N, S, S] float16 in [0, 1]; fixations [N, S, S] uint8 counts;
        labels [N, 3] uint8 one-hot (Normal, CHF, pneumonia); split [N] int8 (0 train,
        1 val, 2 test); uids [N] str.
    """

    images: np.ndarray
    heatmaps: np.ndarray
    fixations: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    uids: np.ndarray  # salted SHA-256 prefixes of the dicom ids: no identifier leaves the cache
    manifest: dict

    def indices(self, split_name: str) -> np.ndarray:
        """Row indices of one split ('train', 'val' or 'test'). Shape: [n] int64."""
        if split_name not in SPLIT_NAMES:
            raise KeyError(f"unknown split {split_name!r}; expected one of {SPLIT_NAMES}")
        return np.flatnonzero(self.split == SPLIT_NAMES.index(split_name))

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class PrepareSummary:
    """What `prepare` did; `skipped` is empty when every input was used."""

    cache: Path
    written: bool  # False when on_error="fail" and an input was skipped
    images: int
    counts: dict  # {split: {class: n, ..., "total": n}}
    skipped: list[Skip]
    decoded: int
    reused: int
    seconds: float

    def __str__(self) -> str:
        work = f"decoded {self.decoded}, reused {self.reused}, {self.seconds:.1f} s"
        lines = [f"prepare: {self.images} images in {self.cache} ({work})"]
        for split in SPLIT_NAMES:
            per_class = ", ".join(f"{name} {self.counts[split][name]}"
                                  for name in CLASS_NAMES)
            lines.append(f"  {split:<5} {self.counts[split]['total']:>5} ({per_class})")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} input(s):")
            lines += [f"  {skip}" for skip in self.skipped]
        if not self.written:
            lines.append("cache not written: inputs were skipped and on_error is 'fail'")
        return "\n".join(lines)


def prepare(
    egd_root: str | Path,
    mimic_root: str | Path,
    cache: str | Path,
    size: int = 224,
    subset: str | Path | None = None,
    on_error: str = "skip",
    workers: int = 0,
    sigma: float = SIGMA,
) -> PrepareSummary:
    """Decode the release once into a cache folder; print and return a summary.

    Args:
        egd_root: folder with `master_sheet.csv` and `fixations.csv`.
        mimic_root: the MIMIC-CXR 2.0.0 folder holding `files/` (see `read_release`).
        cache: the cache folder (created).
        size: side of the square images and maps (the aspect ratio is not kept, like the
            reference's resize).
        subset: optional file of image names to keep (`filenames.csv`).
        on_error: "skip" writes the cache from the usable inputs; "fail" writes nothing when
            an input had to be skipped (entries already decoded are kept for the rerun).
        workers: decoding processes; 0 for one per core, 1 to decode in this process.
        sigma: the gaze blur in original pixels (the reference's 150 suits ~3000-pixel
            images; on images a few hundred pixels high it covers half the image).

    Returns:
        The summary; the caller decides what a skipped input means (the CLI exits non-zero
        for on_error="fail").

    Raises:
        DataError: a missing table or required column, a subset name not in the master sheet,
            or no usable image at all.
        WriteError: the cache folder is not writable (before any decoding), or a write failed
            (disk full): entries written before it are kept for the rerun, and a complete cache
            already in the folder is left as it was.
    """
    _check_prepare_options(size, sigma, workers)
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', not {on_error!r}")
    started = time.perf_counter()
    cache = Path(cache)
    release = read_release(egd_root, mimic_root, subset)  # a bad table fails before any write
    for folder in (cache, cache / ENTRIES):
        check_writable(folder, "cache folder")
    remove_stale_temporaries(cache, cache / ENTRIES)  # what a killed prepare left
    params = {"size": size, "sigma": sigma, "resize": "PIL bilinear, antialiased",
              "version": PREPROCESS_VERSION}

    tasks, skipped = _plan(release, cache / ENTRIES, params)
    input_hash = _input_hash(params, tasks, skipped)
    try:
        manifest = _read_manifest(cache)
    except CacheError:  # rewritten below
        manifest = {}
    if manifest.get("input_hash") == input_hash and (cache / DATASET).is_file():
        summary = _summary_from(manifest, cache, reused=len(tasks), started=started)
        print(summary)
        return summary

    pending = [(record, entry) for record, entry in tasks if not entry.is_file()]
    with _entries_kept():
        failures = _build_entries(pending, size, sigma, workers or os.cpu_count() or 1,
                                  len(tasks))
    entries, used = [], []
    for record, entry in tasks:
        if record.dicom_id in failures:
            skipped.append(Skip(record.source, failures[record.dicom_id]))
            continue
        entries.append(_load_entry(entry, record, size, sigma))
        used.append(record)
    if not used:
        raise DataError(f"no usable image in {egd_root}: " + "; ".join(map(str, skipped[:3])))

    salt = manifest.get("salt") or secrets.token_hex(16)  # kept across reruns: uids stay put
    dataset = _stack(entries, used, salt)
    uid_of = {str(r.dicom): _uid(salt, r.dicom_id) for r in release.records}
    counts = _counts(dataset["labels"], dataset["split"])
    summary = PrepareSummary(
        cache=cache, written=not (skipped and on_error == "fail"), images=len(used),
        counts=counts, skipped=skipped, decoded=len(pending), reused=len(tasks) - len(pending),
        seconds=time.perf_counter() - started,
    )
    if summary.written:
        manifest = {
            "version": PREPROCESS_VERSION, "params": params, "input_hash": input_hash,
            "salt": salt, "images": len(used), "labels": list(CLASS_NAMES), "counts": counts,
            "synthetic": (Path(egd_root) / SYNTHETIC_MARK).is_file(),
            "skipped": [_without_paths(s, uid_of) for s in skipped],
            "ignored_fixation_rows": release.ignored_fixation_rows,
            "off_image_fixations": release.off_image_fixations,
        }
        text = json.dumps(manifest, indent=2).encode()
        # Together: a failed write (disk full) leaves the previous dataset and manifest as a
        # pair; the manifest moves last, so a manifest is only ever beside its own dataset.
        with _entries_kept():
            atomic_write_all({
                cache / DATASET: opened(lambda f: np.savez(f, input_hash=input_hash,
                                                           **dataset)),
                cache / MANIFEST: opened(lambda f: f.write(text)),
            })
    print(summary)
    return summary


def load_cache(path: str | Path) -> Cache:
    """Load a prepared cache folder (without unpickling anything).

    Raises:
        CacheError: a missing or partial cache, a corrupt file, or a manifest from another
            PREPROCESS_VERSION; the message names the path.
    """
    path = Path(path)
    for name in (MANIFEST, DATASET):
        if not (path / name).is_file():
            raise CacheError(f"{path}: no {name}, not a prepared cache (run `gazetune prepare`)")
    manifest = _read_manifest(path)
    if manifest.get("version") != PREPROCESS_VERSION:
        raise CacheError(
            f"{path}: cache version {manifest.get('version')!r}, this code reads version "
            f"{PREPROCESS_VERSION} (run `gazetune prepare` again)"
        )
    try:
        data = np.load(path / DATASET, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # e.g. a .npy renamed
            raise ValueError("a single array, not an npz archive")  # noqa: TRY004  (a file
            # that is not what it should be: refused below like every unreadable cache)
        with data:
            arrays = {name: data[name] for name in (*ARRAYS, "input_hash")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise CacheError(f"{path / DATASET}: incomplete or corrupt ({err})") from err
    if str(arrays.pop("input_hash")) != manifest.get("input_hash"):
        raise CacheError(f"{path}: {DATASET} and {MANIFEST} come from different prepare runs")
    _check_arrays(path / DATASET, arrays)
    if manifest.get("images") != len(arrays["labels"]):
        raise CacheError(f"{path}: {MANIFEST} says {manifest.get('images')!r} images, "
                         f"{DATASET} holds {len(arrays['labels'])} (run `gazetune prepare` again)")
    if manifest.get("counts") != _counts(arrays["labels"], arrays["split"]):
        raise CacheError(f"{path}: {MANIFEST}'s counts do not match {DATASET}'s labels and "
                         f"split (run `gazetune prepare` again)")
    return Cache(**arrays, manifest=manifest)


# Rank and dtype kind of each array (f: float, u: unsigned, i: signed, U: text).
ARRAY_KINDS = {"images": (3, "f"), "heatmaps": (3, "f"), "fixations": (3, "u"),
               "labels": (2, "u"), "split": (1, "i"), "uids": (1, "U")}


def _check_arrays(where: Path, arrays: dict[str, np.ndarray]) -> None:
    """Shapes, kinds and values a training can rely on; one line naming the array if not."""
    for name, (rank, kind) in ARRAY_KINDS.items():
        array = arrays[name]
        if array.ndim != rank or array.dtype.kind != kind:
            raise CacheError(f"{where}: array {name!r} is {array.dtype} of rank {array.ndim}, "
                             f"expected rank {rank} of kind {kind!r}")
    n = len(arrays["labels"])
    if len({len(array) for array in arrays.values()}) != 1:
        raise CacheError(f"{where}: arrays of different lengths")
    size = arrays["images"].shape[1:]
    if size[0] != size[1] or arrays["heatmaps"].shape[1:] != size or \
            arrays["fixations"].shape[1:] != size:
        raise CacheError(f"{where}: images, heatmaps and fixations must be square and of one "
                         f"size, found {arrays['images'].shape[1:]}, "
                         f"{arrays['heatmaps'].shape[1:]}, {arrays['fixations'].shape[1:]}")
    labels = arrays["labels"]
    if labels.shape[1:] != (len(CLASS_NAMES),) or (n and not (labels.sum(1) == 1).all()):
        raise CacheError(f"{where}: labels must be one-hot over {', '.join(CLASS_NAMES)} (each "
                         f"row one 1), found shape {labels.shape} with row sums "
                         f"{sorted(set(labels.sum(1).tolist()))[:5]}")
    if not np.isin(arrays["split"], (0, 1, 2)).all():
        raise CacheError(f"{where}: split codes must be 0 (train), 1 (val) or 2 (test)")
    for name in ("images", "heatmaps"):
        values = arrays[name]
        if values.size and not (np.isfinite(values).all() and values.min() >= 0
                                and values.max() <= 1):
            raise CacheError(f"{where}: {name} must be finite and in [0, 1]")


def input_hash(path: str | Path) -> str | None:
    """The hash of everything a cache was prepared from (images, labels, split, parameters)."""
    return _read_manifest(Path(path)).get("input_hash")


def prepared_size(path: str | Path) -> int | None:
    """The image size a cache was prepared at (`prepare --size`); None if unknown."""
    try:
        size = (_read_manifest(Path(path)).get("params") or {}).get("size")
    except CacheError:
        return None
    return size if isinstance(size, int) else None


def data_origin(path: str | Path) -> str:
    """What a cache was prepared from, for reports: "synthetic", "real" or "unknown"."""
    try:
        manifest = _read_manifest(Path(path))
    except CacheError:
        return "unknown"
    synthetic = manifest.get("synthetic")
    return "unknown" if synthetic is None else ("synthetic" if synthetic else "real")


def check_splits(path: str | Path, splits: tuple[str, ...] = ("train", "val"),
                 counts: dict | None = None) -> None:
    """Refuse a cache whose `splits` lack a class, before any training or evaluation.

    Training must see every class, and a one-vs-rest AUC (with its bootstrap interval) needs at
    least one image of the class and one of the others in the split it is computed on.

    Args:
        path: the cache folder (named in the message).
        splits: the splits to check.
        counts: `{split: {class: n}}`; default: the manifest's (the search's driver reads only
            the manifest; `load_cache` has checked that it matches the arrays).

    Raises:
        CacheError: one line naming the split, the classes it lacks and what to do.
    """
    counts = counts if counts is not None else _read_manifest(Path(path)).get("counts") or {}
    for split in splits:
        have = counts.get(split, {})
        missing = [name for name in CLASS_NAMES if have.get(name, 0) < 1]
        if missing:
            held = ", ".join(f"{name} {have.get(name, 0)}" for name in CLASS_NAMES)
            name = {"train": "training", "val": "validation"}.get(split, split)
            what = "training" if split == "train" else f"a {name} AUC with an interval"
            raise CacheError(
                f"{path}: the {name} split has no {' and no '.join(missing)} image ({held}); "
                f"{what} needs every class: prepare more images (the 80/10/10 patient split "
                f"puts about a tenth in validation and in test: 100 or more balanced images)")


def build_entry(record: ImageRecord, size: int, sigma: float, target: Path) -> str | None:
    """Decode one image and write its entry; the reason it failed, or None.

    Runs in a worker process: everything it needs travels in its arguments.
    """
    try:
        image = read_dicom(record.dicom)
    except DataError as err:
        return str(err)
    points, _ = record.on_image(image.shape)
    if len(points) == 0:
        height, width = image.shape
        return (f"{record.dicom}: no fixation inside the {height}x{width} image "
                f"({len(record.points)} beyond its edges)")
    out = (size, size)
    arrays = {
        "image": model_input(image, size),
        "heatmap": static_heatmap(points, image.shape, sigma, out).astype(np.float16),
        "fixations": fixation_map(points, image.shape, out),
    }
    atomic_write(target, opened(lambda f: np.savez(f, **arrays)))
    return None


def model_input(image: np.ndarray, size: int) -> np.ndarray:
    """A decoded radiograph (`read_dicom`) as the cache stores it and a model takes it.

    Shape:
        [H, W] in [0, 1] -> [size, size] float16 in [0, 1] (resized without keeping the aspect
        ratio, like the reference).
    """
    return _resize(image, (size, size)).astype(np.float16)


def read_model_input(path: str | Path, size: int) -> np.ndarray:
    """One DICOM decoded and resized exactly as `prepare` does it (`gazetune predict`).

    Raises:
        DataError: the file cannot be decoded (see `read_dicom`); the message names it.
    """
    return model_input(read_dicom(path), size)


def _plan(release: Release, entries: Path, params: dict) -> tuple[list, list[Skip]]:
    """Each record with the entry file it needs, and the inputs skipped so far."""
    tasks, skipped = [], list(release.skipped)
    for record in release.records:
        try:
            stat = record.dicom.stat()
        except OSError:
            skipped.append(Skip(record.source, f"{record.dicom}: no such DICOM file"))
            continue
        tasks.append((record, entries / f"{_entry_key(record, stat, params)}.npz"))
    return tasks, skipped


def _build_entries(
    pending: list, size: int, sigma: float, workers: int, total: int
) -> dict[str, str]:
    """Build the missing entries in parallel; the failure reason per dicom id.

    The processes are the parallelism: each keeps one BLAS thread, since a threaded BLAS on
    the small products of `static_heatmap` spends 100x longer waking threads than computing.
    """
    failures = {}
    with tqdm(total=total, initial=total - len(pending), desc="prepare", unit="image") as bar:
        if workers == 1 or len(pending) <= 1:
            with threadpool_limits(1):
                for record, entry in pending:
                    if (reason := build_entry(record, size, sigma, entry)) is not None:
                        failures[record.dicom_id] = reason
                    bar.update()
            return failures
        with ProcessPoolExecutor(min(workers, len(pending)), initializer=_one_thread) as pool:
            futures = {pool.submit(build_entry, record, size, sigma, entry): record
                       for record, entry in pending}
            try:
                for future in as_completed(futures):
                    if (reason := future.result()) is not None:
                        failures[futures[future].dicom_id] = reason
                    bar.update()
            except BaseException:
                pool.shutdown(cancel_futures=True)  # a full disk: no point decoding the rest
                raise
    return failures


def _one_thread() -> None:
    threadpool_limits(1)


def _load_entry(
    entry: Path, record: ImageRecord, size: int, sigma: float
) -> dict[str, np.ndarray]:
    """An entry's arrays; one damaged on disk since it was written is built again."""
    arrays = _read_entry(entry, size)
    if arrays is None:
        reason = build_entry(record, size, sigma, entry)
        arrays = _read_entry(entry, size) if reason is None else None
        if arrays is None:
            raise CacheError(f"{entry}: unreadable, and building it again failed ({reason})")
    return arrays


def _read_entry(entry: Path, size: int) -> dict[str, np.ndarray] | None:
    try:
        with np.load(entry, allow_pickle=False) as data:
            arrays = {name: data[name] for name in ("image", "heatmap", "fixations")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return arrays if all(a.shape == (size, size) for a in arrays.values()) else None


def _uid(salt: str, dicom_id: str) -> str:
    return hashlib.sha256(f"{salt}:{dicom_id}".encode()).hexdigest()[:UID_HEX]


def _without_paths(skip: Skip, uid_of: dict[str, str]) -> dict:
    """A skipped input for the manifest: each DICOM path (it holds the MIMIC subject and study
    ids) replaced by the image's uid; the terminal summary keeps the path for the user."""
    source, reason = skip.source, skip.reason
    for path, uid in uid_of.items():
        source, reason = source.replace(path, f"image {uid}"), reason.replace(path, f"image {uid}")
    return {"source": source, "reason": reason}


def _stack(entries: list[dict], records: list[ImageRecord], salt: str) -> dict[str, np.ndarray]:
    uids = [_uid(salt, r.dicom_id) for r in records]
    return {
        "images": np.stack([e["image"] for e in entries]),
        "heatmaps": np.stack([e["heatmap"] for e in entries]),
        "fixations": np.stack([e["fixations"] for e in entries]),
        "labels": np.eye(len(CLASS_NAMES), dtype=np.uint8)[[r.label for r in records]],
        "split": np.array([r.split for r in records], dtype=np.int8),
        "uids": np.array(uids, dtype=f"<U{UID_HEX}"),
    }


def _resize(image: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize; Pillow widens the filter when shrinking, so it is antialiased.

    Shape:
        [H, W] -> out_size.
    """
    resized = Image.fromarray(image.astype(np.float32)).resize(
        out_size[::-1], Image.Resampling.BILINEAR
    )
    return np.clip(np.asarray(resized), 0.0, 1.0)


def _entry_key(record: ImageRecord, stat: os.stat_result, params: dict) -> str:
    what = {"dicom": str(record.dicom), "mtime_ns": stat.st_mtime_ns, "bytes": stat.st_size,
            **params}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(record.points, dtype=np.float64).tobytes())
    return digest.hexdigest()[:32]


def _input_hash(params: dict, tasks: list, skipped: list[Skip]) -> str:
    """Everything the dataset depends on: entries, labels, split, ids and skipped inputs."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for record, entry in tasks:
        digest.update(f"{entry.stem} {record.dicom_id} {record.label} {record.split}\n".encode())
    for skip in skipped:
        digest.update(f"{skip}\n".encode())
    return digest.hexdigest()


def _counts(labels: np.ndarray, split: np.ndarray) -> dict:
    counts = {}
    for code, name in enumerate(SPLIT_NAMES):
        per_class = labels[split == code].sum(axis=0)
        counts[name] = {label: int(n) for label, n in zip(CLASS_NAMES, per_class, strict=True)}
        counts[name]["total"] = int(per_class.sum())
    return counts


def _summary_from(manifest: dict, cache: Path, reused: int, started: float) -> PrepareSummary:
    return PrepareSummary(
        cache=cache, written=True, images=manifest["images"], counts=manifest["counts"],
        skipped=[Skip(**s) for s in manifest["skipped"]], decoded=0, reused=reused,
        seconds=time.perf_counter() - started,
    )


def _check_prepare_options(size, sigma, workers) -> None:
    """Refuse options outside their range before any reading or writing (one line each)."""
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 4096:
        raise DataError(f"prepare: --size must be an integer in [8, 4096] pixels, got {size!r}")
    if not isinstance(sigma, (int, float)) or not 0 < sigma <= 10_000:  # NaN fails too
        raise DataError(f"prepare: --sigma must be in (0, 10000] original pixels, got {sigma!r} "
                        f"(0 would give every image an all-zero gaze map)")
    if isinstance(workers, bool) or not isinstance(workers, int) or not 0 <= workers <= 1024:
        raise DataError(f"prepare: --workers must be in [0, 1024] (0: one per core), "
                        f"got {workers!r}")


def _read_manifest(cache: Path) -> dict:
    try:
        manifest = json.loads((cache / MANIFEST).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise CacheError(f"{cache / MANIFEST}: unreadable manifest ({err})") from err
    if not isinstance(manifest, dict):
        raise CacheError(f"{cache / MANIFEST}: not a manifest (a JSON object is expected, "
                         f"found {type(manifest).__name__})")
    return manifest


@contextmanager
def _entries_kept():
    """A failed write (disk full) also says that no decoded entry is lost."""
    try:
        yield
    except WriteError as err:
        raise WriteError(f"{err} (the entries written so far are kept: run prepare again once "
                         f"there is room)") from None

