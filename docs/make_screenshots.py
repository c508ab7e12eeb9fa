"""Take the screenshots of docs/napari.md from a real napari session.

Run from the repository root (a few minutes on a laptop CPU; trainings are short and the
models small, so the pictures show the workflow, not the quality a real run reaches)::

    xvfb-run -a .venv/bin/python docs/make_screenshots.py

It opens the synthetic sample data, drives the dock widgets through their public methods
(as a user clicking them would) and writes one PNG per step into ``docs/images/``. With
``--sic-flow FLOW.safetensors`` (a WPPFlow trained on SiC ×4) it also shoots its calibrated
std against hr_SiC and the suitability map of lr_SiC_x4 on the real SiC data
(``--only-sic``: those two alone).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path(__file__).resolve().parent / "images"
WINDOW = (1500, 960)
DOCK_WIDTH = 430
#: Largest PNG written (bytes); bigger screenshots are colour-quantised, then downscaled.
MAX_BYTES = 300_000
LR = "synthetic LR stack (x4)"
REFERENCE = "synthetic HR reference"
TRUTH = "synthetic HR truth"


# --------------------------------------------------------------------------- Qt helpers
def process_events(ms: int = 50) -> None:
    """Let Qt handle pending events for about ``ms`` milliseconds."""
    from qtpy.QtTest import QTest

    QTest.qWait(ms)


def wait_for_layout(widget: Any, timeout_s: float = 5.0) -> None:
    """Wait until every word-wrapped label of ``widget`` got the height its text needs."""
    from qtpy.QtWidgets import QLabel

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        process_events(30)
        labels = [label for label in widget.findChildren(QLabel) if label.isVisible()]
        if all(label.height() >= label.heightForWidth(label.width()) for label in labels):
            break
    process_events(200)


def run_and_wait(start: Callable[[], Any], signal: Any, timeout_s: float) -> Any:
    """Call ``start`` (which starts a worker) and run Qt until ``signal`` fires; its value."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    values: list[Any] = []

    def done(value: Any = None) -> None:
        values.append(value)
        loop.quit()

    signal.connect(done)
    try:
        if start() is None:
            raise SystemExit("the widget refused to start (see the error above)")
        QTimer.singleShot(int(timeout_s * 1000), loop.quit)
        loop.exec()
    finally:
        signal.disconnect(done)
    if not values:
        raise SystemExit(f"no result after {timeout_s:.0f} s")
    if values[0] is None:
        raise SystemExit("the job failed (see the error above)")
    return values[0]


def save_png(image: np.ndarray, path: Path, max_bytes: int = MAX_BYTES) -> None:
    """Write an RGB(A) screenshot as PNG, colour-quantised or downscaled to ``max_bytes``."""
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    picture.save(path, optimize=True)
    if path.stat().st_size <= max_bytes:
        return
    quantised = picture.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=0)
    scale = 1.0
    while True:
        size = (round(picture.width * scale), round(picture.height * scale))
        candidate = quantised
        if scale < 1.0:
            resized = picture.resize(size, Image.Resampling.LANCZOS)
            candidate = resized.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=0)
        candidate.save(path, optimize=True)
        if path.stat().st_size <= max_bytes or scale < 0.5:
            return
        scale *= 0.9


# --------------------------------------------------------------------------- session
class Session:
    """A napari window with one napari-wpp dock widget shown at a time."""

    def __init__(self, out: Path) -> None:
        import napari

        self.out = out
        self.viewer = napari.Viewer(title="napari-wpp")
        self.viewer.window.resize(*WINDOW)
        self.docks: dict[str, Any] = {}
        self._errors: list[str] = []
        from napari.utils.notifications import NotificationSeverity, notification_manager

        def report(notification: Any) -> None:
            if notification.severity >= NotificationSeverity.WARNING:
                message = str(notification.message)
                self._errors.append(message)
                print(f"napari: {message}", file=sys.stderr)

        notification_manager.notification_ready.connect(report)

    def widget(self, name: str) -> Any:
        """Open (or show again) the dock widget ``name``, hiding the others."""
        for dock in self.docks.values():
            dock.hide()
        if name not in self.docks:
            dock, widget = self.viewer.window.add_plugin_dock_widget("napari-wpp", name)
            dock.setMinimumWidth(DOCK_WIDTH)
            self.docks[name] = dock
        dock = self.docks[name]
        dock.show()
        return dock.widget()

    def show_only(self, names: list[str]) -> None:
        """Make exactly the layers ``names`` visible and select the last one."""
        for layer in self.viewer.layers:
            layer.visible = layer.name in names
        if names:
            self.viewer.layers.selection.active = self.viewer.layers[names[-1]]

    def fit(self, names: list[str]) -> None:
        """Fit the view to the layers ``names``."""
        self.viewer.reset_view(layers=[self.viewer.layers[n] for n in names], margin=0.04)

    def fit_plane(self, name: str, margin: float = 0.04) -> None:
        """Centre and zoom the 2D view on layer ``name`` (works with layers of other ndim,
        where ``reset_view(layers=...)`` does not)."""
        extent = np.asarray(self.viewer.layers[name].extent.world)[:, -2:]
        size = np.maximum(extent[1] - extent[0], 1e-6)
        canvas = np.asarray(self.viewer.window._qt_viewer.canvas.size, dtype=float)  # (h, w)
        self.viewer.scene.camera.center = tuple(float(v) for v in (extent[0] + extent[1]) / 2)
        self.viewer.scene.camera.zoom = float((1 - 2 * margin) * np.min(canvas / size))

    def shoot(self, filename: str, widget: Any | None = None) -> Path:
        """Screenshot of the whole window (canvas and docks) into ``out/filename``."""
        process_events(100)
        if widget is not None:
            wait_for_layout(widget)
        image = self.viewer.screenshot(canvas_only=False, flash=False)
        path = self.out / filename
        save_png(image, path)
        print(f"wrote {path} ({image.shape[1]}×{image.shape[0]}, {path.stat().st_size:,} B)")
        return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder of the PNGs")
    parser.add_argument("--net-steps", type=int, default=150, help="WPPNet training steps")
    parser.add_argument("--flow-steps", type=int, default=40, help="WPPFlow training steps")
    parser.add_argument("--samples", type=int, default=16, help="posterior samples K")
    parser.add_argument(
        "--sic-flow",
        type=Path,
        help="a WPPFlow trained on SiC ×4 (docs/benchmarks.md, 'WPPFlow'): also shoot its "
        "calibrated std and the suitability map on the real SiC data",
    )
    parser.add_argument(
        "--only-sic", action="store_true", help="only the SiC pictures (with --sic-flow)"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only_sic:
        if args.sic_flow is None:
            parser.error("--only-sic needs --sic-flow FLOW.safetensors")
        return take_sic_screenshots(Session(args.out), args.sic_flow, args.samples)
    with tempfile.TemporaryDirectory(prefix="napari-wpp-shots-") as folder:
        return take_screenshots(args, Path(folder))


def take_screenshots(args: argparse.Namespace, models: Path) -> int:
    """The session itself; model files go to the folder ``models``."""
    session = Session(args.out)
    viewer = session.viewer

    # 1. the sample data, from File → Open Sample → napari WPP
    viewer.open_sample("napari-wpp", "synthetic_material")
    viewer.dims.set_point(0, 12.0)
    session.show_only([REFERENCE, LR])
    session.fit([REFERENCE, LR])
    session.shoot("01_sample_data.png")

    # 2. reference region (a rectangle on the HR reference) and the ×4 Gaussian operator
    reference = session.widget("Reference & operator")
    corners = np.array([[24.0, 296.0], [24.0, 504.0], [232.0, 504.0], [232.0, 296.0]])
    viewer.add_shapes(
        [corners],
        shape_type="rectangle",
        name="reference region",
        edge_color="cyan",
        face_color="transparent",
        edge_width=2,
    )
    reference.settings.reference_shapes = "reference region"
    if reference.use_as_reference() is None or reference.use_parametric_operator() is None:
        raise SystemExit("could not set the reference or the operator")
    session.show_only([REFERENCE, LR, "reference region"])
    session.fit_plane(REFERENCE)  # the dock narrowed the canvas: show the whole region
    session.shoot("02_reference_operator.png", reference)

    # 3. a short WPPNet training with the live loss plot and the preview layer
    train = session.widget("Train")
    s = train.settings
    s.model = "wppnet"
    s.budget_unit = "steps"
    s.budget = args.net_steps
    s.batch_size = 4
    s.crop_size = 25
    s.n_reference_patches = 2000
    s.preview_every = max(1, min(10, args.net_steps))
    s.save_path = str(models / "wppnet.safetensors")
    s.model_options = {"features": 16, "blocks": 4}
    s.config_overrides = {"patches_per_step": 4000}
    run_and_wait(train.start, train.training_finished, timeout_s=1800)
    session.show_only([LR, f"{LR} preview"])
    session.fit([LR])
    session.shoot("03_train.png", train)

    # 4. superresolve the whole stack with the session's WPPNet (overlays the LR stack)
    superresolve = session.widget("Superresolve")
    superresolve.settings.extent = "stack"
    run_and_wait(superresolve.run, superresolve.superresolve_finished, timeout_s=600)
    session.show_only([LR, f"{LR} superresolved"])
    viewer.layers[LR].visible = False
    session.fit([LR])
    session.shoot("04_superresolve.png", superresolve)

    # 5. a short WPPFlow training, then posterior mean and std of the current slice
    train = session.widget("Train")
    s.model = "wppflow"
    s.budget = args.flow_steps
    s.preview_every = 0
    s.save_path = str(models / "wppflow.safetensors")
    s.model_options = {
        "steps": 2,
        "hidden": 16,
        "cond_features": 8,
        "mean_features": 16,
        "mean_blocks": 4,
    }
    run_and_wait(train.start, train.training_finished, timeout_s=1800)
    uncertainty = session.widget("Uncertainty")
    uncertainty.settings.k = args.samples
    uncertainty.settings.keep_samples = True
    uncertainty.settings.overlay_std = False  # the std map alone, opaque over the mean
    run_and_wait(uncertainty.run, uncertainty.uncertainty_finished, timeout_s=600)
    session.show_only([f"{LR} mean", f"{LR} std"])
    session.fit_plane(f"{LR} std")
    session.shoot("05_uncertainty.png", uncertainty)

    if args.sic_flow is not None:
        return take_sic_screenshots(session, args.sic_flow, args.samples)
    viewer.close()
    return 0


def take_sic_screenshots(session: Session, flow: Path, samples: int) -> int:
    """The calibrated std of a SiC ×4 WPPFlow against hr_SiC, and the suitability map of
    lr_SiC_x4 against ref_SiC (real data from ``benchmarks/shared_data.py``'s folder)."""
    import imageio.v3 as iio

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from shared_data import DATA_ROOT

    sic = DATA_ROOT / "sic"
    viewer = session.viewer
    viewer.layers.clear()
    viewer.dims.ndisplay = 2
    viewer.add_image(iio.imread(sic / "ref_SiC.png"), name="ref_SiC")
    viewer.add_image(iio.imread(sic / "hr_SiC.png"), name="hr_SiC")
    # the ×4 LR grid over hr_SiC: the flow's output pixel j is hr_SiC's pixel j
    viewer.add_image(
        iio.imread(sic / "lr_SiC_x4.png"), name="lr_SiC_x4", scale=(4, 4), translate=(1.5, 1.5)
    )

    # 6. posterior mean and calibrated std of the whole LR image, against hr_SiC
    uncertainty = session.widget("Uncertainty")
    if uncertainty.load_model(flow) is None:
        raise SystemExit(f"could not load {flow}")
    uncertainty.settings.input_layer = "lr_SiC_x4"
    uncertainty.settings.truth_layer = "hr_SiC"
    uncertainty.settings.k = samples
    uncertainty.settings.keep_samples = False
    uncertainty.settings.overlay_std = False
    run_and_wait(uncertainty.run, uncertainty.uncertainty_finished, timeout_s=1800)
    std = next(name for name in viewer.layers if name.name.startswith("lr_SiC_x4 calibrated"))
    session.show_only(["lr_SiC_x4 mean", std.name])
    session.fit_plane(std.name)
    session.shoot("06_uncertainty_sic.png", uncertainty)

    # 7. how well ref_SiC explains lr_SiC_x4 (the suitability layer over the LR image)
    reference = session.widget("Reference & operator")
    s = reference.settings
    s.reference_layer = "ref_SiC"
    s.scale, s.sigma, s.kernel_size, s.anchor, s.padding = 4, 2.0, 16, "corner", "circular"
    s.check_lr_layer = "lr_SiC_x4"
    if reference.use_as_reference() is None or reference.use_parametric_operator() is None:
        raise SystemExit("could not set the SiC reference or the operator")
    worker = reference.checks.map_suitability()
    if worker is None:
        raise SystemExit("could not start the suitability map")
    deadline = time.monotonic() + 1800
    while reference.checks.worker is not None and time.monotonic() < deadline:
        process_events(200)
    session.show_only(["lr_SiC_x4", "lr_SiC_x4 suitability"])
    session.fit_plane("lr_SiC_x4")
    session.shoot("07_suitability_sic.png", reference)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
