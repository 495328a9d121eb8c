"""The default GPU share of a trial follows the image size and the GPU's memory."""

import pytest

from search.packing import default_gpu_share, smallest_gpu_memory_gib, trial_memory_gib


def test_trial_memory_grows_with_pixels_and_batch():
    base = trial_memory_gib(224, 32)
    assert 5 < base < 8  # 2.4 GiB plain step x saliency peak + CUDA context
    assert trial_memory_gib(448, 32) == pytest.approx(4 * (base - 0.6) + 0.6)
    assert trial_memory_gib(224, 64) == pytest.approx(2 * (base - 0.6) + 0.6)


@pytest.mark.parametrize("size, batch, gib, share", [
    (224, 32, 80, 0.25),   # the paper's setting on an H100: four trials, the measured packing
    (224, 32, 141, 0.25),  # never more than four, however large the GPU
    (512, 32, 80, 0.5),    # 5x the pixels: two fit
    (224, 32, 16, 0.5),    # a T4/V100: two
    (512, 32, 16, 1.0),    # does not fit at all: the whole GPU, and the trial's own OOM message
    (64, 8, 16, 0.25),
])
def test_default_share(size, batch, gib, share):
    assert default_gpu_share(size, batch, gib) == share


def test_smallest_gpu_of_the_cluster():
    def node(gpus, kind=None, alive=True):
        resources = {"CPU": 8.0, "GPU": float(gpus)}
        if kind:
            resources[f"accelerator_type:{kind}"] = 1.0
        return {"Alive": alive, "Resources": resources}

    assert smallest_gpu_memory_gib([node(0)]) is None  # CPU-only cluster
    assert smallest_gpu_memory_gib([node(0), node(8, "H100"), node(4, "A100-80G")]) == 80
    assert smallest_gpu_memory_gib([node(8, "H200"), node(1, "T4")]) == 16
    assert smallest_gpu_memory_gib([node(8, "H200"), node(1, "T4", alive=False)]) == 141
    assert smallest_gpu_memory_gib([node(2)]) == 16  # no type detected: assume a small GPU
    assert smallest_gpu_memory_gib([node(1, "MI300X")]) == 16  # a type we do not know


def test_the_search_reads_the_image_size_from_the_cache(small_cache):
    from search.ray_session import _image_size

    assert _image_size(str(small_cache)) == 64
    assert _image_size("s3://bucket/cache") == 224
