"""Time and peak memory of refusing crafted model files (issue 14: < 2 s, < 300 MB).

A tiny WPPNet file is saved, then copies with crafted metadata (``features = 4000``,
``blocks = 3e6``, ``n_priors = 1e9``) and a WPPFlow copy with ``edge_shifts = 2e5``. Each is
loaded with :func:`napari_wpp.io.load_model` in a fresh subprocess, which prints the load's
wall time (after the imports; with them in the second column) and its peak resident memory,
next to the same process loading the valid file (the baseline: Python, torch and the
package alone take most of it).

    python benchmarks/bench_model_file_checks.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys, time
begin = time.perf_counter()
from napari_wpp import io
from napari_wpp.core import models, training  # noqa: F401  (torch; imports not timed below)
from napari_wpp.core.errors import InputError
start = time.perf_counter()
try:
    io.load_model(sys.argv[1])
    outcome = "loaded"
except InputError as exc:
    outcome = "refused: " + str(exc)[:90]
print(json.dumps({"seconds": time.perf_counter() - start, "outcome": outcome,
                  "with_imports": time.perf_counter() - begin,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_files(folder: Path) -> dict[str, Path]:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from napari_wpp import io
    from napari_wpp.core.models import build_model
    from napari_wpp.core.training import TrainingState

    def state(kind: str, config: dict) -> TrainingState:
        model = build_model(kind, **config)
        return TrainingState(kind=kind, model=model, model_config=model.config(), operator={},
                             lam=0.02, config={}, step=1, elapsed_s=1.0, normalisation=None,
                             priors=[{"psi": torch.zeros(40)}], optimizer=None, rng=None,
                             history=[])  # fmt: skip

    net = io.save_model(folder / "valid.safetensors", state("wppnet", {"features": 16}))
    flow = io.save_model(
        folder / "flow.safetensors",
        state("wppflow", {"steps": 1, "hidden": 8, "cond_features": 4, "mean_features": 8}),
    )

    def crafted(src: Path, name: str, edit) -> Path:
        with safe_open(str(src), framework="pt") as handle:
            meta = json.loads(handle.metadata()["napari_wpp"])
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        edit(meta)
        save_file(tensors, str(folder / name), metadata={"napari_wpp": json.dumps(meta)})
        return folder / name

    return {
        "valid WPPNet (baseline)": net,
        "features = 4000": crafted(net, "f.safetensors", lambda m: m["model_config"].update(
            features=4000)),
        "blocks = 3e6": crafted(net, "b.safetensors", lambda m: m["model_config"].update(
            blocks=3_000_000)),
        "n_priors = 1e9": crafted(net, "p.safetensors", lambda m: m.update(n_priors=10**9)),
        "valid WPPFlow (baseline)": flow,
        "flow edge_shifts = 2e5": crafted(flow, "e.safetensors", lambda m: m["model_config"].update(
            edge_shifts=200_000)),
    }  # fmt: skip


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(Path(tmp))
        print(f"{'file':28s} {'load s':>7s} {'+import':>7s} {'peak MB':>8s}  outcome")
        for label, path in files.items():
            out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True,
                                 text=True, check=True)  # fmt: skip
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{label:28s} {row['seconds']:7.2f} {row['with_imports']:7.2f} "
                f"{row['peak_mb']:8.0f}  {row['outcome']}"
            )


if __name__ == "__main__":
    main()
