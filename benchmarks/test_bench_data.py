"""Input pipeline throughput at 224x224 on a generated JPEG tree (~500x375 photos-like images), as the
search reads it: a `BatchStream` (decoding ahead in its thread) over the random-access split, DALI's
("betanas_fast") and the PIL fallback's ("betanas_fast_folder"), against a torch DataLoader with
torchvision's transforms ("torch_dataloader"), all with the same number of threads / workers and the same
training augmentation; the DALI GPU decoder when a GPU is present. Every batch ends on the device in the engine's
layout (runs.runtime.model_memory_format: channels_last), as Search._next_batch hands it to the model. Each round
reads one epoch in steady state (the stream and the loader's workers persist across rounds, as they do in a run).
Images/s are printed under the ratio tables."""
import os
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from betanas_fast.data import BatchOrder
from betanas_fast.data import imagenet as inet
from betanas_fast.data.stream import BatchStream
from betanas_fast.runs.runtime import model_memory_format

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


def _stream(split, device):
    """The search's training stream over `split`: (next batch on `device`, close)."""
    stream = BatchStream(split, BatchOrder(len(split), BATCH, seed=0), train=True,
                         generator=torch.Generator().manual_seed(0))

    def next_batch():
        x, _ = stream.next()
        # the fallback decodes on the CPU, then copies
        return x.to(device, non_blocking=True).contiguous(memory_format=model_memory_format(torch.device(device)))

    return next_batch, stream.close


class FileDataset(torch.utils.data.Dataset):
    def __init__(self, paths, labels, transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), self.labels[i]


def _dataloader(index, device):
    """What a PyTorch user would write: a DataLoader with WORKERS worker processes applying torchvision's
    transforms to the same files (shuffled, last batch dropped), iterated epoch after epoch."""
    T = pytest.importorskip("torchvision.transforms")
    transform = T.Compose([T.RandomResizedCrop(RESOLUTION), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    files = FileDataset(index.paths("train"), index.train.labels, transform)
    loader = torch.utils.data.DataLoader(files, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=WORKERS,
                                         persistent_workers=WORKERS > 0, generator=torch.Generator().manual_seed(0))

    def epochs():
        while True:
            yield from loader

    batches = epochs()

    def next_batch():
        x, _ = next(batches)
        return x.to(device, non_blocking=True).contiguous(memory_format=model_memory_format(torch.device(device)))

    def close():
        nonlocal loader
        batches.close()
        loader = None  # the last reference: its persistent workers shut down with it

    return next_batch, close


# GPU cases carry the `cuda` marker (`pytest benchmarks/ -m cuda` selects them) and skip without a GPU.
CUDA = (pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("impl", ["betanas_fast", "betanas_fast_folder", "torch_dataloader"])
def test_batch_stream(index, record, benchmark, report_line, impl, device):
    positions = range(len(index.train))
    if impl == "betanas_fast":
        pytest.importorskip("nvidia.dali")
        from betanas_fast.data.imagenet.dali import DaliSplit
        device_id = torch.cuda.current_device() if device == "cuda" else None
        next_batch, close = _stream(DaliSplit(index, positions, RESOLUTION, threads=WORKERS, device_id=device_id),
                                    device)
    elif impl == "betanas_fast_folder":
        next_batch, close = _stream(inet.FolderSplit(index, positions, RESOLUTION, threads=WORKERS), device)
    else:
        next_batch, close = _dataloader(index, device)
    steps = len(positions) // BATCH

    def run():
        for _ in range(steps):
            next_batch()
        if device == "cuda":
            torch.cuda.synchronize()

    try:
        record("train batch stream 224 (the search's input)", {"device": device, "threads": WORKERS, "batch": BATCH},
               impl, run)
    finally:
        close()
    report_line(f"- train batch stream, {impl} ({device}, {WORKERS} threads/workers): "
                f"{steps * BATCH / benchmark.stats.stats.median:.0f} images/s")
