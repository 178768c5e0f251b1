"""How many GPU-hours the paper's ImageNet search takes with this package, from one GPU (CUDA only).

The engine's own Phase-1 and Phase-2 steps on the mobile space at 224x224, batch 256 per GPU, bf16
autocast (`--amp`; Phase 2 in fp32 unless --phase2-amp, as the engine runs it), on synthetic tensors (the
embedded digits upscaled to 224x224: the data wait is not measured here, only the model), timed with
the engine's step timer (device synchronised at each part's ends). Then, for the schedule of the
`imagenet` preset (global batch B = 1024, E = 120 epochs, phase ratio r = 5, warm-up W = 40 epochs,
50,000 held-out images out of ImageNet's 1,281,167):

    S1 = E * floor((1,281,167 - 50,000) / B)            weight steps
    S2 = ceil(S1 / r) * (E - W) / E                       α steps (after the warm-up)
    GPU-hours = (B / 256) * (S1 * t1 + S2 * t2) / 3600    t1, t2: seconds of one step at 256 per GPU

that is, B / 256 GPUs each doing a 256 share in t1 / t2 with communication hidden or free (a lower bound:
the gloo rehearsal on CPU prints what communication and waiting add)."""
import math
import os
import statistics
import tempfile

import pytest
import torch

from betanas_fast.search import Search, SearchConfig
from betanas_fast.search.config import load_preset
from betanas_fast.runs.timing import StepTimer

IMAGENET_TRAIN = 1_281_167
PER_GPU = int(os.environ.get("BETANAS_PROJECTION_BATCH", "256"))
STEPS = int(os.environ.get("BETANAS_PROJECTION_STEPS", "10"))


def projected_gpu_hours(t1: float, t2: float, schedule: dict, per_gpu: int = PER_GPU) -> dict:
    b, e, r, w = schedule["batch_size"], schedule["epochs"], schedule["phase_ratio"], schedule["warmup_epochs"]
    s1 = e * ((IMAGENET_TRAIN - schedule["heldout"]) // b)
    s2 = math.ceil(s1 / r) * (e - w) / e
    gpus = b / per_gpu
    return {"weight_steps": s1, "alpha_steps": s2, "gpus": gpus,
            "gpu_hours": gpus * (s1 * t1 + s2 * t2) / 3600}


def measure(schedule: dict, t1: list, t2: list, device: str = "cuda") -> None:
    """Appends the seconds of the engine's Phase-1 and Phase-2 steps (after 2 warm-up pairs) to t1, t2."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SearchConfig(space="mobile", resolution=224, batch_size=PER_GPU, heldout_batch_size=PER_GPU, heldout=300,
                           val=0, epochs=100, warmup_epochs=0, phase_ratio=1, amp=True, device=device,
                           progress=False, plots=False, tensorboard=False, out=os.path.join(tmp, "run"),
                           label_smoothing=schedule["label_smoothing"], seed=0)
        s = Search(cfg)
        s._build()
        timer = StepTimer(sync=torch.cuda.synchronize if device == "cuda" else None)
        s.timer = timer
        for i in range(STEPS + 2):
            timer.reset()
            s.phase1_step()
            p1 = sum(v for k, v in timer.seconds.items() if k.startswith("phase1/"))
            timer.reset()
            s.phase2_step()
            p2 = sum(v for k, v in timer.seconds.items() if k.startswith("phase2/"))
            if i >= 2:  # warm-up: cuDNN autotuning, first allocations
                t1.append(p1)
                t2.append(p2)
        s.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_projected_gpu_hours(benchmark, record_measured, report_line):
    schedule = load_preset("imagenet")
    t1, t2 = [], []
    benchmark.pedantic(lambda: measure(schedule, t1, t2), rounds=1, iterations=1)
    t1, t2 = statistics.median(t1), statistics.median(t2)
    peak = torch.cuda.max_memory_allocated() / 2**30
    p = projected_gpu_hours(t1, t2, schedule)
    suite = "ImageNet-shaped search steps on one GPU (mobile space, 224x224, bf16 autocast)"
    record_measured(suite, {"step": f"phase 1, batch {PER_GPU}"}, "betanas_fast", t1)
    record_measured(suite, {"step": f"phase 2, batch {PER_GPU}"}, "betanas_fast", t2)
    report_line(f"- projected GPU-hours of the paper's schedule on {torch.cuda.get_device_name()}: "
                f"{p['gpu_hours']:.0f} ({p['weight_steps']} weight steps x {t1 * 1e3:.0f} ms + {p['alpha_steps']:.0f} "
                f"α steps x {t2 * 1e3:.0f} ms, on {p['gpus']:.0f} GPUs of {PER_GPU}; peak memory {peak:.1f} GiB; "
                f"the paper: 160 V100 GPU-hours)")
    assert t1 > 0 and t2 > 0
