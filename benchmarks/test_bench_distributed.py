"""The search across processes (torchrun, 2 gloo processes on this CPU), measured in worker processes
(dist_worker.py) whose medians are filed here:

- weight-gradient averaging: the engine's design (one flat all-reduce over the gradients of exactly the
  modules the step ran, known on every rank from the shared paths) against torch DDP with
  find_unused_parameters=True (which walks the autograd graph every step to find the unused paths), both
  next to the same step without any averaging. Benchmark supernet, global batch 64, 1 thread per process.
- the scale rehearsal: a few iterations of the engine on the mobile space at 224x224 from a generated
  ImageNet-layout JPEG folder (DALI's CPU pipeline when installed, else the PIL loader), global batch 8,
  with the step's composition from the engine's timer: data wait vs compute vs communication.

The pytest-benchmark time of each test is the whole torchrun launch (one round); the per-step medians come
from the workers."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 900


def torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.join(HERE, "dist_worker.py"), *args]
    # a session of its own: on timeout the workers die with the agent instead of holding the pipes open
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    assert p.returncode == 0, out[-3000:] + err[-3000:]


def test_gradient_sync_overhead(benchmark, record_measured, report_line, tmp_path):
    out = tmp_path / "sync.json"
    benchmark.pedantic(lambda: torchrun("sync", str(out)), rounds=1, iterations=1)
    m = json.loads(out.read_text())
    suite = "Phase-1 step under torchrun, 2 gloo processes, benchmark supernet, global batch 64"
    for impl, key in (("betanas_fast", "betanas_fast"), ("ddp_find_unused", "ddp_find_unused"),
                      ("no averaging", "local")):
        # without averaging: a lower bound (not the same work), listed as a variant, not a baseline
        record_measured(suite, {"averaging": "weight gradients"}, impl, m[key],
                        role="variant" if key == "local" else None)
    ours, ddp = m["betanas_fast"] - m["local"], m["ddp_find_unused"] - m["local"]
    report_line(f"- gradient averaging, 2 gloo processes: step {m['local'] * 1e3:.1f} ms without averaging; "
                f"+{ours * 1e3:.1f} ms with the engine's sync over the step's modules "
                f"({ours / m['local']:.1%}), +{ddp * 1e3:.1f} ms with DDP find_unused_parameters=True "
                f"({ddp / m['local']:.1%})")
    assert m["betanas_fast"] > 0 and m["ddp_find_unused"] > 0


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """An ImageNet-layout folder of photo-sized JPEGs (4 classes x 16)."""
    root = tmp_path_factory.mktemp("rehearsal_imagenet")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    for c in range(4):
        d = root / "train" / f"n{c:08d}"
        d.mkdir(parents=True)
        for i in range(16):
            f = rng.uniform(0.01, 0.05, 3)
            img = 127 + 100 * np.sin(xx[..., None] * f + yy[..., None] * f[::-1] + rng.uniform(0, 6, 3))
            img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"img_{i}.JPEG", quality=90)
    return str(root)


@pytest.mark.parametrize("prefetch", [2, 0])
def test_scale_rehearsal(benchmark, report_line, tmp_path, jpeg_folder, prefetch):
    from betanas_fast.data.imagenet import dali_available
    loader = os.environ.get("BETANAS_REHEARSAL_LOADER") or ("dali" if dali_available() else "torchvision")
    out = tmp_path / "rehearsal.json"
    iterations = int(os.environ.get("BETANAS_REHEARSAL_ITERATIONS", "5"))
    benchmark.pedantic(lambda: torchrun("rehearsal", str(out), jpeg_folder, loader, str(iterations), str(prefetch)),
                       rounds=1, iterations=1)
    m = json.loads(out.read_text())
    parts = m["parts"]
    data = parts["data"]
    comm = sum(parts[p] for p in m["communication"])
    compute = sum(parts.values()) - data - comm
    step = m["wall"]
    how = f"{prefetch} batches decoded ahead" if prefetch else "decoded on demand (--prefetch 0)"
    lines = [f"- scale rehearsal, {how}: mobile space at 224x224, {m['world']} gloo processes x {m['local_batch']} "
             f"images, {loader} loader, 1 thread each, {iterations} iterations (1 Phase-1 + 1 Phase-2 step): "
             f"{step:.2f} s per iteration; data wait {data / step:.1%}, compute {compute / step:.1%}, "
             f"communication {comm / step:.1%}, other {max(step - data - comm - compute, 0) / step:.1%}",
             "  - parts (s/iteration): " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items() if v)]
    for line in lines:
        report_line(line)
    assert data < step and compute > 0
