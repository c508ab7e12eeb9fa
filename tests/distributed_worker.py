"""Data-parallel training runs for tests/test_distributed.py.

Launched by ``python -m torch.distributed.run --nproc-per-node W tests/distributed_worker.py
OUT``: every rank trains each case of :data:`CASES` with the per-rank batch and writes
``OUT/<case>-rank<r>.pt`` with the progress history, ψ and the final weights. The test runs
the one-process reference with :func:`run_case` itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from napari_wpp.core import distributed
from napari_wpp.core.training import TrainingConfig, TrainingProgress, train
from napari_wpp.data import synthetic_material

MODEL_OPTIONS = {
    "wppnet": {"features": 8, "blocks": 2, "offset": 0.5},
    "wppflow": {"steps": 1, "hidden": 8, "cond_features": 4, "mean_features": 8, "mean_blocks": 1},
}
#: (name, model, ψ mode, patches per step and rank) of the compared runs
CASES = (
    ("wppnet-shared", "wppnet", "shared", 300),
    ("wppnet-per-batch", "wppnet", "per_batch", 0),
    ("wppflow", "wppflow", "shared", 300),
)
#: LR crops per step and rank
BATCH_SIZE = 2


def run_case(
    model: str, psi_mode: str, batch_size: int, patches: int, dp: distributed.DataParallel
) -> dict:
    """Train one tiny case; the history, ψ, weights and configuration of the run."""
    m = synthetic_material(shape=(4, 48, 48), scale=2, noise=0.01, seed=3)
    lr = m.lr.astype(np.float32) / 255.0
    ref = m.reference.astype(np.float32) / 255.0
    config = TrainingConfig(
        model=model,
        steps=4,
        batch_size=batch_size,
        crop_size=12,
        n_reference_patches=200,
        psi_passes=2,
        patches_per_step=patches,
        psi_mode=psi_mode,
        n_fixed_batches=2,
        mean_warmup=0.5 if model == "wppflow" else 0.0,
        model_options=dict(MODEL_OPTIONS[model]),
        device="cpu",
        mixed_precision="off",
    )
    events = list(train(lr, ref, m.operator, config, data_parallel=dp))
    final = events[-1].state
    progress = [e for e in events if isinstance(e, TrainingProgress)]
    return {
        "world_size": dp.world_size,
        "history": [(e.data_term, e.wpp_term, e.loss) for e in progress],
        "devices": [e.device for e in progress],
        "psi": [p["psi"] for p in final.priors],
        "weights": final.model.state_dict(),
        "config": final.config,
    }


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dp = distributed.init_from_environment("cpu")
    for name, model, psi_mode, patches in CASES:
        result = run_case(model, psi_mode, BATCH_SIZE, patches, dp)
        torch.save(result, out / f"{name}-rank{dp.rank}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
