"""Disk full or unwritable cache/storage: refused with a clear error before any work is lost.

Unwritable folders: a path below a regular file (NotADirectoryError), which fails for root too
(CI runs as root, and chmod does not stop root). A full disk: the process's RLIMIT_FSIZE set
below the size of the file being written, with SIGXFSZ ignored, so the write raises
OSError(EFBIG, "File too large") instead of killing the process: the same OSError path as
ENOSPC, without a privileged mount. The commands run in a subprocess with that limit
(`preexec_fn`); the unit tests lower the limit in this process for one call only.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from data_fixtures import fake_images, tables, write_release
from helpers import gazetune

from search.service import resume_search, run_search
from search.settings import SearchSettings
from trainable import train
from trainable.checkpoint import load_best, load_torch, save_best
from trainable.data import load_cache, prepare
from trainable.errors import GazetuneError
from trainable.files import WriteError, atomic_write, check_writable

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def file_size_limit(nbytes: int):
    """Writes beyond `nbytes` into any file raise OSError(EFBIG) in this process, for a while."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def gazetune_out_of_disk(*args: str, file_limit: int, cwd: Path) -> subprocess.CompletedProcess:
    """`conftest.gazetune`, in a process (and its workers) that cannot grow a file past
    `file_limit` bytes."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited by exec and by the workers
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run([sys.executable, "-m", "search", *args], cwd=cwd, capture_output=True,
                          text=True, preexec_fn=limit, check=False)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden temporaries included) by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.fixture
def release(tmp_path) -> tuple[Path, Path]:
    """Twelve tiny images: at 64 px an entry is about 20 kB, the dataset about 250 kB."""
    return write_release(tmp_path / "release", tables(fake_images(12)))


def test_unwritable_folders_are_refused_before_any_work(release, small_cache, tmp_path):
    egd, mimic = release
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    cache = blocker / "cache"
    result = gazetune("prepare", "--egd-root", str(egd), "--mimic-root", str(mimic),
                      "--cache", str(cache), cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # One line and no progress bar: refused before the first image was decoded.
    assert result.stderr.strip() == (f"gazetune prepare: cache folder {cache} is not writable: "
                                     f"Not a directory"), result.stderr

    workdir = tmp_path / "work"
    workdir.mkdir()
    storage = blocker / "ray_results"
    result = gazetune("search", "--name", "s", "--cache", str(small_cache), "--storage",
                      str(storage), cwd=workdir, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"gazetune search: search storage (--storage) {storage} "
                                     f"is not writable: Not a directory"), result.stderr
    assert list(workdir.iterdir()) == []  # refused before Ray, MLflow or Tune wrote anything

    store = blocker / "mlflow.db"
    settings = SearchSettings(name="s", cache=str(small_cache), storage=str(tmp_path / "rr"),
                              tracking_uri=f"sqlite:///{store}")
    with pytest.raises(WriteError, match=f"MLflow store folder .* {blocker} is not writable: "
                                         f"{blocker} is a file, not a folder"):
        run_search(settings, workdir=workdir)
    with pytest.raises(WriteError, match=f"checkpoint folder {blocker}/ck is not writable: "
                                         f"Not a directory"):
        check_writable(blocker / "ck", "checkpoint folder")
    assert list(workdir.iterdir()) == []
    with pytest.raises(GazetuneError, match=f"search settings {storage}/s/gazetune.json cannot be "
                                        f"read: Not a directory"):
        resume_search("s", storage=str(storage), workdir=workdir)


def test_train_refuses_an_unwritable_checkpoint_folder(small_cache, tmp_path):
    folder = tmp_path / "a-file" / "ck"
    (tmp_path / "a-file").write_text("not a folder")
    result = gazetune("train", f"cache={small_cache}", f"checkpoint_dir={folder}", "epochs=1",
                      "n_boot=50", "figures=0", "batch_size=16", "threads=1", cwd=tmp_path,
                      check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert last_line(result.stderr) == (f"gazetune train: checkpoint folder {folder} is not "
                                        f"writable: Not a directory"), result.stderr
    assert "epoch 1" not in result.stdout  # refused before the first epoch


def test_prepare_out_of_disk_keeps_the_cache_and_every_entry(release, tmp_path):
    egd, mimic = release
    cache = tmp_path / "cache"
    args = ["prepare", "--egd-root", str(egd), "--mimic-root", str(mimic), "--cache", str(cache),
            "--sigma", "20", "--workers", "2"]
    prepare(egd, mimic, cache, size=16, sigma=20.0, workers=1)
    complete = snapshot(cache)

    # A rebuild at 64 px: each entry (~20 kB) fits, the dataset (~250 kB) does not.
    result = gazetune_out_of_disk(*args, "--size", "64", file_limit=100_000, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert last_line(result.stderr).startswith(
        f"gazetune prepare: cannot write {cache / 'dataset.npz'}: File too large (the entries "
        f"written so far are kept"), result.stderr
    now = snapshot(cache)
    assert {k: v for k, v in now.items() if not k.startswith("entries/")} == {
        k: v for k, v in complete.items() if not k.startswith("entries/")}  # old cache intact
    assert not any(".tmp" in name for name in now)  # nothing half-written, under any name
    assert len(now) == len(complete) + 12  # the new entries are there, complete
    assert load_cache(cache).images.shape == (12, 16, 16)

    rerun = prepare(egd, mimic, cache, size=64, sigma=20.0, workers=1)  # room again
    assert (rerun.decoded, rerun.reused) == (0, 12)  # nothing decoded before was lost
    assert load_cache(cache).images.shape == (12, 64, 64)

    # An entry (~20 kB) that does not fit: the first failure stops the workers.
    entries = snapshot(cache / "entries")
    result = gazetune_out_of_disk(*args, "--size", "48", file_limit=8_000, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = last_line(result.stderr)
    assert message.startswith(f"gazetune prepare: cannot write {cache / 'entries'}/"), message
    assert ".npz: File too large (the entries written so far are kept" in message
    assert snapshot(cache / "entries") == entries  # no entry, half-written or whole, added
    assert load_cache(cache).images.shape == (12, 64, 64)


@pytest.mark.slow  # two one-epoch trainings: 35 s on the shared 2-core CPU
def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(small_cache, tmp_path):
    folder = tmp_path / "ck"
    quick = ["loss_set=classifier", "epochs=1", "n_boot=50", "figures=0", "batch_size=16",
             "threads=1"]
    train({**dict(item.split("=") for item in quick), "cache": str(small_cache),
           "checkpoint_dir": str(folder)})
    before = snapshot(folder)

    # The classifier's weights (~16 MB) do not fit; the MLflow store (< 1 MB) does.
    result = gazetune_out_of_disk("train", f"cache={small_cache}", f"checkpoint_dir={folder}",
                                  *quick, "seed=1", file_limit=8_000_000, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert last_line(result.stderr) == (f"gazetune train: cannot write {folder}/best/model.pt: "
                                        f"File too large"), result.stderr
    assert snapshot(folder) == before  # no temporary left, nothing replaced
    _state, config, metrics = load_best(folder)
    assert config["seed"] == 0 and metrics["epoch"] == 1
    assert load_torch(folder / "state.pt")["epoch"] == 1


def test_atomic_writes_name_the_file_and_keep_the_previous_one(tmp_path):
    best = tmp_path / "ck"
    save_best(best, {"w": torch.zeros(4)}, {"lr": 0.1}, {"epoch": 1})
    before = snapshot(best)
    # The weights and the config fit, the metrics do not: none of the three is replaced.
    with file_size_limit(20_000), pytest.raises(WriteError) as caught:
        save_best(best, {"w": torch.ones(4)}, {"lr": 0.2}, {"epoch": 2, "note": "x" * 30_000})
    assert str(caught.value) == f"cannot write {best}/best/metrics.json: File too large"
    assert snapshot(best) == before  # no temporary left either
    state, config, metrics = load_best(best)
    assert torch.equal(state["w"], torch.zeros(4)) and (config, metrics) == ({"lr": 0.1},
                                                                             {"epoch": 1})

    target = tmp_path / "below-a-file" / "x.json"
    (tmp_path / "below-a-file").write_text("")
    with pytest.raises(WriteError, match=f"cannot write {target}: {target.parent} is a file, "
                                         f"not a folder"):
        atomic_write(target, lambda tmp: tmp.write_text("{}"))

    # Created as open() creates files (the umask applies), not owner-only like mkstemp's.
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write(tmp_path / "shared.json", lambda tmp: tmp.write_text("{}"))
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o666 & ~umask
