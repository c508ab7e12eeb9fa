"""The "Perception ↔ fidelity" panel: move a superresolved layer along α, live.

After a superresolution the panel is attached to the output layer. :meth:`TransportPanel.
prepare` (in a thread worker from the button and after a run, so the viewer stays responsive)
caches, for the slice on screen, the result ``x`` and ``D = T(x) − x`` on the [0, 1]
scale (``T``: the Gaussian patch transport of :mod:`napari_wpp.core.transport`, from a
transport file or fitted on that slice and the reference layer), the patch distance of the
blend on a grid of α, and, when the LR layer and operator are known, the data residual of
``x`` and ``D``. Every move of the slider then costs one multiply-add on the slice (the blend
``x + (1 − α)·D`` and its residual are affine in α) and one refresh of the layer; only the
shown slice changes (the slice's own result is restored when another slice is prepared or the
panel detaches). :meth:`TransportPanel.export` writes every slice at the chosen α (the job of
``napari-wpp transport apply``: a zarr array slab by slab, or a TIFF).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import ComboBox, FloatSlider, LineEdit, PushButton
from qtpy.QtWidgets import QGroupBox, QHBoxLayout, QVBoxLayout, QWidget

from napari_wpp.core.config import TransportSpec, bounds, default_of
from napari_wpp.core.errors import InputError
from napari_wpp.widgets._layers import current_index, full_resolution, greyscale_images
from napari_wpp.widgets._layout import ask_file_path, note_label, shrinkable

__all__ = ["TransportPanel"]

#: α grid of the cached patch-distance curve (interpolated on every move).
ALPHA_GRID = np.linspace(*bounds(TransportSpec, "alpha"), 81)
NO_REFERENCE = "(none)"


class TransportPanel(QGroupBox):
    """Perception ↔ fidelity slider over one superresolved layer (see the module doc)."""

    def __init__(self, viewer: Any) -> None:
        super().__init__("Perception ↔ fidelity")
        self.viewer = viewer
        self.target: dict[str, Any] | None = None
        self.cache: dict[str, Any] | None = None
        self._workers: list[Any] = []
        self.preparing: Any = None  # the worker preparing a slice, if any
        self._reference_cache: dict[str, Any] = {}
        self.reference = shrinkable(ComboBox(label="Reference", choices=self._reference_names))
        self.transport_file = LineEdit(label="Transport file")
        self.transport_file.native.setPlaceholderText("(fit on the shown slice)")
        low, high = bounds(TransportSpec, "alpha")
        self.slider = FloatSlider(min=low, max=high, step=0.01, value=1.0, label="α")
        self.slider.tooltip = "1: the network's result (fidelity); 0: fully transported to the "
        self.slider.tooltip += "reference's patch statistics (perception)"
        self.prepare_button = PushButton(text="Prepare shown slice")
        self.default_button = PushButton(text="Default α")
        self.export_button = PushButton(text="Export at α…")
        self.readout = note_label("Superresolve first; the slider then moves the result.")
        self.prepare_button.changed.connect(lambda *_: self._guarded(self.prepare, True))
        self.default_button.changed.connect(lambda *_: self._guarded(self.use_default_alpha))
        self.export_button.changed.connect(lambda *_: self._guarded(self._ask_export))
        self.slider.changed.connect(lambda value: self._guarded(self.set_alpha, value))
        column = QVBoxLayout(self)
        for part in (self.reference, self.transport_file, self.slider):
            row = QWidget()
            line = QHBoxLayout(row)
            line.setContentsMargins(0, 0, 0, 0)
            line.addWidget(note_label(part.label))
            line.addWidget(part.native, 1)
            column.addWidget(row)
        buttons = QWidget()
        line = QHBoxLayout(buttons)
        line.setContentsMargins(0, 0, 0, 0)
        for button in (self.prepare_button, self.default_button, self.export_button):
            line.addWidget(button.native)
        column.addWidget(buttons)
        column.addWidget(self.readout)
        self._update_controls()

    # ------------------------------------------------------------------ state
    def _reference_names(self, *_args: Any) -> list[str]:
        names = [layer.name for layer in greyscale_images(self.viewer)]
        return [NO_REFERENCE] + names

    def _update_controls(self) -> None:
        attached = self.target is not None
        ready = self.cache is not None and self.preparing is None
        self.prepare_button.enabled = attached and self.preparing is None
        self.slider.enabled = self.default_button.enabled = ready
        self.export_button.enabled = ready

    def _guarded(self, method: Any, *args: Any) -> Any:
        from napari_wpp.widgets._notify import notify_error

        try:
            return method(*args)
        except Exception as exc:  # noqa: BLE001 - shown as a notification
            notify_error(exc)
            return None

    def attach(
        self,
        layer: Any,
        normalisation: dict[str, Any],
        axis: int | None = None,
        lr_layer: Any = None,
        operator: Any = None,
    ) -> None:
        """Follow ``layer`` (a superresolved layer whose [0, 1] scale is ``normalisation``);
        ``axis``: its slice axis (3D), ``lr_layer``/``operator``: for the data residual."""
        self.detach()
        self.target = {
            "layer": layer,
            "normalisation": dict(normalisation),
            "axis": axis,
            "lr_layer": lr_layer,
            "operator": operator,
        }
        self.reference.reset_choices()
        self.readout.setText("Choose a reference (or a transport file) and prepare the slice.")
        self._update_controls()

    def detach(self) -> None:
        """Put the prepared slice back as it was and forget the layer."""
        self._restore()
        self.target = self.cache = None
        self.preparing = None  # a running preparation finds the target gone and is dropped
        self._update_controls()

    def _restore(self) -> None:
        if self.cache is not None and self.target is not None:
            self._write(self.cache["original"])

    # ------------------------------------------------------------------ preparing
    def _transport_source(self) -> dict[str, Any]:
        """What the transport comes from: the chosen file, or the reference layer's data."""
        path = self.transport_file.value.strip()
        if path:
            return {"file": path}
        name = self.reference.value
        if not name or name == NO_REFERENCE or name not in self.viewer.layers:
            raise InputError(
                "no reference for the transport: choose a reference layer or a transport file"
            )
        source = full_resolution(self.viewer.layers[name])
        key = (name, id(source), default_of(TransportSpec, "patch_size"))
        if self._reference_cache.get("key") == key:
            return {"name": name, "reference": self._reference_cache}
        return {"name": name, "key": key, "data": source}

    @staticmethod
    def _content(source: dict[str, Any], x01: np.ndarray, norm: Any) -> tuple[Any, dict]:
        """The transport (the file, or fitted on ``x01`` and the reference) and the
        reference's statistics and band (computed once per reference layer)."""
        if "file" in source:
            from napari_wpp.io.transport import read_transport

            return read_transport(source["file"]), {}
        from napari_wpp.core.patch_distance import reference_band
        from napari_wpp.core.transport import GaussianTransport, patch_statistics
        from napari_wpp.io.transport import TransportFile
        from napari_wpp.jobs.transport import transport_normalisation

        p = default_of(TransportSpec, "patch_size")
        ref = source.get("reference")
        if ref is None:  # the reference's statistics and band
            data = np.asarray(source["data"])
            if data.ndim == 3:
                picks = np.linspace(0, len(data) - 1, min(4, len(data))).astype(int)
                data = data[np.unique(picks)]
            ref01 = transport_normalisation(data).apply(data)
            ref = {
                "key": source["key"],
                "stats": patch_statistics(ref01, p),
                "band": reference_band(ref01, p).to_dict(),
            }
        transport = GaussianTransport.fit(patch_statistics(x01, p), ref["stats"])
        name = source["name"]
        content = TransportFile(
            transport, norm.to_dict(), ref["band"], {"reference": f"layer {name}"}
        )
        return content, ref

    def _slice_index(self) -> tuple[Any, ...]:
        assert self.target is not None
        layer, axis = self.target["layer"], self.target["axis"]
        if layer.ndim == 2:
            return (Ellipsis,)
        index: list[Any] = [slice(None)] * 3
        index[axis] = current_index(layer, self.viewer, axis)
        return tuple(index)

    def prepare(self, background: bool = False) -> Any:
        """Cache the shown slice, its transport and readouts; show it at the slider's α.

        With ``background`` the work runs in a thread worker (returned; the controls wait
        for it), else here.
        """
        from napari_wpp.core.intensity import Normalisation
        from napari_wpp.jobs.transport import transport_normalisation

        if self.target is None:
            raise InputError("nothing to transport: superresolve an image first")
        if self.preparing is not None:
            raise InputError("the shown slice is being prepared: wait for it")
        layer = self.target["layer"]
        if not isinstance(layer.data, np.ndarray):
            raise InputError(
                "the live preview needs a result in memory (this one is a zarr array): "
                "superresolve the shown slice, or export the zarr result with Export at α"
            )
        self._restore()
        self.cache = None
        where = self._slice_index()
        original = np.array(layer.data[where])
        recorded = Normalisation.from_dict(self.target["normalisation"])
        norm = transport_normalisation(original, recorded.to_dict())
        source = self._transport_source()
        residual = self._residual_inputs(where)
        target = self.target

        def compute() -> tuple[dict[str, Any], dict[str, Any]]:
            return self._prepared(where, original, norm, source, residual)

        def install(result: tuple[dict[str, Any], dict[str, Any]]) -> None:
            self.preparing = None
            if self.target is not target:  # detached or re-attached meanwhile
                self._update_controls()
                return
            cache, reference = result
            if reference:
                self._reference_cache = reference
            self.cache = cache
            self._update_controls()
            self.set_alpha(self.slider.value)

        if not background:
            install(compute())
            return None
        from napari.qt.threading import create_worker

        worker = create_worker(compute)
        worker.returned.connect(install)
        worker.errored.connect(self._prepare_failed)
        worker.finished.connect(lambda: self._workers.remove(worker))
        self._workers.append(worker)
        self.preparing = worker
        self.readout.setText("Preparing the shown slice (transport and patch distances)…")
        self._update_controls()
        worker.start()
        return worker

    def _prepare_failed(self, exc: BaseException) -> None:
        from napari_wpp.widgets._notify import notify_error

        self.preparing = None
        self._update_controls()
        self.readout.setText("Preparing failed; see the notification.")
        notify_error(exc)

    @classmethod
    def _prepared(
        cls, where: Any, original: np.ndarray, norm: Any, source: dict, residual: dict
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The cache of a slice (no Qt: runs in a worker) and the reference's statistics."""
        from napari_wpp.core.patch_distance import blend_distances

        x01 = norm.apply(original)
        content, reference = cls._content(source, x01, norm)
        delta = content.transport.apply(x01) - x01
        distances = blend_distances(x01, x01 + delta, content.transport.target, ALPHA_GRID)
        cache = {
            "where": where,
            "original": original,
            "x": x01,
            "delta": delta,
            "norm": norm,
            "content": content,
            "distances": distances,
            "middle": ((content.band or {}).get("gelbrich") or {}).get("middle"),
        }
        cache.update(cls._residual_parts(x01, delta, norm, **residual))
        return cache, reference

    def _residual_inputs(self, where: Any) -> dict[str, Any]:
        """The LR slice and operator of the data residual (empty without them)."""
        lr_layer, operator = self.target["lr_layer"], self.target["operator"]
        if lr_layer is None or operator is None or lr_layer.ndim != self.target["layer"].ndim:
            return {}
        return {"lr": np.asarray(full_resolution(lr_layer)[where]), "operator": operator}

    @staticmethod
    def _residual_parts(
        x01: np.ndarray, delta: np.ndarray, norm: Any, lr: Any = None, operator: Any = None
    ) -> dict:
        """``f(x) − y`` and ``A·D`` of the slice away from the LR border (empty without the LR
        slice or operator)."""
        if lr is None or operator is None:
            return {}
        import torch

        from napari_wpp.core.patch_distance import estimate_noise
        from napari_wpp.jobs.transport import lr_normalisation

        lr01 = lr_normalisation(lr, norm).apply(lr, clip=False)
        with torch.no_grad():
            fx = operator(torch.from_numpy(x01)).numpy()
            moved = operator(torch.from_numpy(x01 + delta)).numpy() - fx
        if fx.shape != lr01.shape:
            return {}
        inside = operator.interior_mask(fx.shape).numpy()  # as data_rms: no padded border
        return {
            "residual": (fx - lr01)[inside],
            "moved": moved[inside],
            "noise": estimate_noise(lr01),
        }

    # ------------------------------------------------------------------ moving
    def blended(self, alpha: float) -> np.ndarray:
        """The prepared slice at ``alpha`` in the layer's dtype."""
        c = self.cache
        assert c is not None
        out = c["x"] + np.float32(1.0 - alpha) * c["delta"]
        np.clip(out, 0.0, 1.0, out=out)
        return c["norm"].invert(out)

    def set_alpha(self, alpha: float) -> float:
        """Show the prepared slice at ``alpha``; returns the milliseconds it took."""
        if self.cache is None:
            return 0.0
        start = time.perf_counter()
        self._write(self.blended(float(alpha)))
        elapsed = 1000.0 * (time.perf_counter() - start)
        self.readout.setText(self.readout_text(float(alpha)))
        return elapsed

    def _write(self, image: np.ndarray) -> None:
        layer = self.target["layer"]
        where = self.cache["where"] if self.cache is not None else (Ellipsis,)
        layer.data[where] = image
        layer.refresh()

    def readouts(self, alpha: float) -> dict[str, float | None]:
        """Patch distance (Gelbrich, per pixel), data rms and noise at ``alpha``."""
        c = self.cache
        assert c is not None
        out: dict[str, float | None] = {
            "alpha": alpha,
            "patch_distance": float(np.interp(alpha, ALPHA_GRID, c["distances"])),
            "band_middle": c["middle"],
            "data_rms": None,
            "noise": c.get("noise"),
        }
        if "residual" in c:
            r = c["residual"] + np.float32(1.0 - alpha) * c["moved"]
            out["data_rms"] = float(np.sqrt(np.mean(r.astype(np.float64) ** 2)))
        return out

    def readout_text(self, alpha: float) -> str:
        r = self.readouts(alpha)
        band = (self.cache["content"].band or {}).get("gelbrich") or {}
        text = f"α {alpha:.2f} · patch distance {r['patch_distance']:.4f}"
        if band:
            text += f" (reference to itself {band['low']:.4f}–{band['high']:.4f}, "
            text += f"middle {band['middle']:.4f})"
        if r["data_rms"] is not None:
            text += f"\ndata rms {r['data_rms']:.4f} = {r['data_rms'] / r['noise']:.2f}× the "
            text += f"noise {r['noise']:.4f} (estimated from the LR slice)"
        return text

    def default_alpha(self) -> float:
        """The largest α in [0, 1] whose patch distance meets the band's middle."""
        from napari_wpp.core.patch_distance import default_alpha

        c = self.cache
        if c is None:
            raise InputError("prepare the shown slice first")
        if c["middle"] is None:
            return 0.75
        return default_alpha(ALPHA_GRID, c["distances"], float(c["middle"]))

    def use_default_alpha(self) -> float:
        alpha = round(self.default_alpha(), 2)
        self.slider.value = alpha  # moves the layer through the slider's signal
        return alpha

    # ------------------------------------------------------------------ export
    def _ask_export(self) -> None:
        path = ask_file_path(self, "Export at α to", True, "TIFF or zarr (*.tif *.zarr)", "a.tif")
        if path:
            self.export(path)

    def export(self, path: str | Path, start: bool = True) -> Any:
        """Write every slice at the slider's α to ``path`` (.tif or .zarr) in a worker
        (started unless ``start`` is false: then the caller starts it)."""
        from napari.qt.threading import create_worker

        from napari_wpp.jobs.transport import apply_transport_job

        if self.cache is None or self.target is None:
            raise InputError("prepare the shown slice first")
        out = Path(path).expanduser()
        if out.suffix.lower() not in (".tif", ".tiff", ".zarr"):
            raise InputError(f"export {out.name} must end in .tif, .tiff or .zarr")
        if not out.parent.is_dir():
            raise InputError(f"folder {out.parent} does not exist: create it or choose another")
        layer = self.target["layer"]
        data = np.array(layer.data) if isinstance(layer.data, np.ndarray) else layer.data
        if isinstance(layer.data, np.ndarray):
            data[self.cache["where"]] = self.cache["original"]  # the volume as predicted
        spec = TransportSpec(alpha=float(self.slider.value))
        axis = self.target["axis"] or 0
        content = self.cache["content"]

        def job() -> Any:
            yield from apply_transport_job(spec, content, data, out, axis)

        worker = create_worker(job)
        worker.finished.connect(lambda: self._workers.remove(worker))
        worker.errored.connect(self._export_failed)
        worker.returned.connect(lambda *_: self.readout.setText(f"Exported {out}"))
        self._workers.append(worker)
        if start:
            worker.start()
        return worker

    def _export_failed(self, exc: BaseException) -> None:
        from napari_wpp.widgets._notify import notify_error

        notify_error(exc)
