"""Milliseconds per move of the perception ↔ fidelity slider on a 600² slice, in napari.

Run under a display (``xvfb-run -a python benchmarks/bench_transport_slider.py``). A real
napari viewer shows a 600 × 600 uint8 result (``hr_SiC.png`` blurred, or a random texture when
../shared/data is absent) and, as a second case, the middle slice of a 10 × 600 × 600 stack;
the Superresolve widget's :class:`~napari_wpp.widgets._transport_panel.TransportPanel` is
attached with ``ref_SiC.png`` as reference and prepared. Then the slider is moved through
``--moves`` α values and the script prints, as median and 90th percentile:

* the blend alone (``x + (1 − α)·D``, clip, back to uint8),
* one move as the slider does it (blend, write into the layer, ``layer.refresh()``),
* one move plus the Qt event processing that draws the canvas,
* napari alone: ``layer.refresh()`` and the draw of the unchanged layer (the floor of any
  live update on this machine: under xvfb the canvas is drawn by Mesa's software renderer).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from scipy.ndimage import gaussian_filter
from shared_data import DATA_ROOT


def images() -> tuple[np.ndarray, np.ndarray, str]:
    sic = DATA_ROOT / "sic"
    if (sic / "hr_SiC.png").is_file():
        from PIL import Image

        hr = np.asarray(Image.open(sic / "hr_SiC.png"), np.float64)
        ref = np.asarray(Image.open(sic / "ref_SiC.png"), np.uint8)
        return gaussian_filter(hr, 1.5).astype(np.uint8), ref, "hr_SiC blurred (σ 1.5)"
    rng = np.random.default_rng(0)
    noise = gaussian_filter(rng.normal(size=(2, 600, 600)), (0, 2, 2))
    scaled = np.clip(128 + 600 * noise, 0, 255).astype(np.uint8)
    return scaled[0], scaled[1], "random texture"


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return f"median {statistics.median(values):6.2f} ms, p90 {p90:6.2f} ms"


def measure(viewer, layer, ref_name: str, moves: int, axis: int | None) -> None:
    from qtpy.QtWidgets import QApplication

    from napari_wpp.widgets._transport_panel import TransportPanel

    panel = TransportPanel(viewer)
    panel.attach(layer, {"low": 0.0, "high": 255.0, "dtype": "uint8"}, axis)
    panel.reference.value = ref_name
    start = time.perf_counter()
    panel.prepare()
    print(f"  prepare (fit, transport, distance curve): {time.perf_counter() - start:.2f} s")
    alphas = np.linspace(-0.5, 1.5, moves)
    blend, move, drawn = [], [], []
    app = QApplication.instance()
    for alpha in alphas:
        t0 = time.perf_counter()
        panel.blended(float(alpha))
        blend.append(1000 * (time.perf_counter() - t0))
        t0 = time.perf_counter()
        panel.set_alpha(float(alpha))
        move.append(1000 * (time.perf_counter() - t0))
        app.processEvents()
        drawn.append(1000 * (time.perf_counter() - t0))
    print(f"  blend only            {summary(blend)}")
    print(f"  move (write, refresh) {summary(move)}")
    print(f"  move + draw           {summary(drawn)}")
    baseline = []
    for _ in alphas:  # what napari alone costs: refresh and draw the unchanged layer
        t0 = time.perf_counter()
        layer.refresh()
        app.processEvents()
        baseline.append(1000 * (time.perf_counter() - t0))
    print(f"  napari refresh + draw of the same layer, no blend {summary(baseline)}")
    panel.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moves", type=int, default=60)
    args = parser.parse_args()
    import napari

    result, ref, what = images()
    viewer = napari.Viewer(show=True)
    viewer.add_image(ref, name="REF")
    layer = viewer.add_image(result.copy(), name="result", contrast_limits=(0, 255))
    print(f"600 × 600 uint8 result ({what}), napari {napari.__version__}")
    measure(viewer, layer, "REF", args.moves, None)
    stack = np.stack([result] * 10)
    viewer.layers.remove(layer)
    layer = viewer.add_image(stack, name="stack", contrast_limits=(0, 255))
    viewer.dims.set_point(0, 5)
    print("10 × 600 × 600 uint8 stack, middle slice shown")
    measure(viewer, layer, "REF", args.moves, 0)
    viewer.close()


if __name__ == "__main__":
    main()
