"""Input pipeline throughput at 224x224 on a generated JPEG tree (~500x375 photos-like images):
DALI ("betanas_fast") vs the PIL/torch DataLoader ("torch_dataloader") with the same number of
threads / workers, for the epoch loaders and for the random-access splits the search engine uses; the
DALI GPU decoder when a GPU is present. Images/s are printed under the ratio tables."""
import os
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from betanas_fast.data import imagenet as inet

NUM_CLASSES, PER_CLASS = 10, int(os.environ.get("BETANAS_BENCH_IMAGES_PER_CLASS", "32"))
RESOLUTION, BATCH = 224, 32
WORKERS = int(os.environ.get("BETANAS_BENCH_WORKERS", "2"))


@pytest.fixture(scope="session")
def jpeg_tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bench_imagenet"))
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    for c in range(NUM_CLASSES):
        d = os.path.join(root, "train", f"n{c:08d}")
        os.makedirs(d)
        for i in range(PER_CLASS):
            # Smooth structure plus noise: JPEG sizes (~60-100 kB) in ImageNet's range.
            f = rng.uniform(0.01, 0.05, 3)
            img = 127 + 100 * np.sin(x[..., None] * f + y[..., None] * f[::-1] + rng.uniform(0, 6, 3))
            img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(d, f"img_{i}.JPEG"), quality=90)
    return root


@pytest.fixture(scope="session")
def index(jpeg_tree, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("bench_cache") / "index.json")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idx = inet.build_index(jpeg_tree, cache=cache, workers=WORKERS, verbose=False)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    inet.build_index(jpeg_tree, cache=cache, verbose=False)
    warm = time.perf_counter() - t0
    idx.timings = (cold, warm)
    return idx


def test_index_time(index, report_line):
    cold, warm = index.timings
    report_line(f"- index: {len(index.train)} JPEGs ~500x375 validated in {cold:.2f} s with {WORKERS} threads "
                f"({len(index.train) / cold:.0f} files/s); reuse of the cached index: {warm * 1e3:.1f} ms")


def _epoch(loader, device=None):
    def run():
        n = 0
        for x, y in loader:
            n += len(y)
        if device == "cuda":
            torch.cuda.synchronize()
        return n
    return run


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("impl", ["betanas_fast", "torch_dataloader"])
def test_epoch_loader(index, record, benchmark, report_line, impl, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if impl == "betanas_fast":
        pytest.importorskip("nvidia.dali")
    kind = "dali" if impl == "betanas_fast" else "folder"
    loader = inet.make_loader(index, train=True, batch_size=BATCH, resolution=RESOLUTION, loader=kind,
                              workers=WORKERS, device=device if kind == "dali" else None)
    run = _epoch(loader, device)
    if kind == "folder" and device == "cuda":
        def run():  # the fallback decodes on the CPU, then copies
            for x, _ in loader:
                x.cuda(non_blocking=True)
            torch.cuda.synchronize()
    record("train loader 224", {"device": device, "workers": WORKERS, "batch": BATCH}, impl, run)
    images = len(loader) * BATCH
    report_line(f"- train loader, {impl} ({kind}, {device}, {WORKERS} workers): "
                f"{images / benchmark.stats.stats.median:.0f} images/s")


@pytest.mark.parametrize("impl", ["betanas_fast", "torch_dataloader"])
def test_random_access_split(index, record, benchmark, report_line, impl):
    if impl == "betanas_fast":
        pytest.importorskip("nvidia.dali")
        from betanas_fast.data.imagenet.dali import DaliSplit
        split = DaliSplit(index, range(len(index.train)), RESOLUTION, threads=WORKERS)
    else:
        split = inet.FolderSplit(index, range(len(index.train)), RESOLUTION, threads=WORKERS)
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))
    batches = [order[i:i + BATCH] for i in range(0, len(order) - BATCH + 1, BATCH)]
    gen = torch.Generator().manual_seed(0)

    def run():
        for b in batches:
            split.batch(b, True, gen)

    record("random-access split 224 (engine's batch())", {"threads": WORKERS, "batch": BATCH}, impl, run)
    report_line(f"- random-access split, {impl}: {len(batches) * BATCH / benchmark.stats.stats.median:.0f} images/s")
