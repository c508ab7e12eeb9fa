"""Model files: one ``.safetensors`` file with JSON metadata, never unpickled."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_wpp.core.errors import InputError

if TYPE_CHECKING:
    from napari_wpp.core.training import TrainingState
from napari_wpp.io.files import atomic_write, json_default, one_line

#: File suffix of model files.
MODEL_SUFFIX = ".safetensors"
#: Name in the ``format`` entry of the metadata and the current format version.
MODEL_FORMAT = "napari-wpp-model"
MODEL_FORMAT_VERSION = 1
#: Key of the JSON metadata in the safetensors header.
MODEL_METADATA_KEY = "napari_wpp"
#: Model files keep at most this many per-step history records (evenly thinned).
MAX_HISTORY = 2000


def _cpu_copy(tensor: Any) -> Any:
    """A detached, contiguous CPU copy that shares no memory with ``tensor``."""
    return tensor.detach().to("cpu").contiguous().clone()


def _plain_json(obj: Any) -> Any:
    """JSON-ready copy of ``obj``: arrays and tensors as lists, non-finite floats as ``None``."""
    plain = json.loads(json.dumps(obj, default=json_default))

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return clean(plain)


def _thin_history(history: list[dict[str, float]], limit: int = MAX_HISTORY) -> list[dict]:
    """At most ``limit`` evenly spaced records, always keeping the first and the last."""
    n = len(history)
    if n <= limit:
        return list(history)
    keep = np.unique(np.round(np.linspace(0, n - 1, limit)).astype(int))
    return [history[int(i)] for i in keep]


def save_model(path: str | Path, state: TrainingState, include_training_state: bool = True) -> Path:
    """Write a trained model as one self-describing ``.safetensors`` file, atomically.

    Tensors are stored as ``model.<name>`` (weights), ``prior.<i>.<name>`` (ψ states),
    ``optimizer.<param index>.<name>`` (Adam moments) and ``rng``; everything else goes as
    JSON into the header metadata under ``"napari_wpp"`` (format and package version, model
    kind and configuration, operator, λ, training configuration, step, normalisation,
    optimizer parameter groups, thinned loss history, creation time).

    Parameters
    ----------
    path
        Target file ending in ``.safetensors``; its directory must exist.
    state
        A :class:`napari_wpp.core.training.TrainingState`; it is not modified.
    include_training_state
        ``False`` leaves out ψ, optimizer and random state: a small file that can be used
        for prediction but not to resume training.

    Returns
    -------
    Path
        The written file.
    """
    import torch
    from safetensors.torch import save_file

    import napari_wpp

    path = Path(path).expanduser()
    if path.suffix.lower() != MODEL_SUFFIX:
        raise InputError(
            f"cannot write model file {path.name}: model files end in {MODEL_SUFFIX}, "
            f"use a name like {path.stem or 'model'}{MODEL_SUFFIX}"
        )
    if not hasattr(state, "model") or not hasattr(state.model, "state_dict"):
        raise InputError("save_model needs a TrainingState with a model: pass a training state")

    tensors: dict[str, Any] = {}
    for name, value in state.model.state_dict().items():
        tensors[f"model.{name}"] = _cpu_copy(value)
    priors = list(state.priors or []) if include_training_state else []
    for i, prior in enumerate(priors):
        for name, value in prior.items():
            tensors[f"prior.{i}.{name}"] = _cpu_copy(value)
    optimizer_meta = None
    if include_training_state and state.optimizer is not None:
        extra: dict[str, dict[str, Any]] = {}
        for index, param_state in state.optimizer.get("state", {}).items():
            for name, value in param_state.items():
                if hasattr(value, "detach"):
                    tensors[f"optimizer.{int(index)}.{name}"] = _cpu_copy(value)
                else:
                    extra.setdefault(str(int(index)), {})[name] = value
        optimizer_meta = {
            "param_groups": state.optimizer.get("param_groups", []),
            "extra_state": extra,
        }
    if include_training_state and state.rng is not None:
        tensors["rng"] = _cpu_copy(state.rng)

    model_config = dict(state.model_config or {})
    operator = state.operator
    scale = model_config.get("scale", operator.get("scale") if isinstance(operator, dict) else None)
    history = list(state.history or [])
    meta = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "napari_wpp_version": napari_wpp.__version__,
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kind": str(state.kind),
        "scale": scale,
        "model_config": model_config,
        "operator": operator,
        "lam": state.lam,
        "config": state.config,
        "step": int(state.step),
        "elapsed_s": float(state.elapsed_s),
        "normalisation": state.normalisation,
        "training_state": bool(include_training_state),
        "n_priors": len(priors),
        "optimizer": optimizer_meta,
        "history": _thin_history(history),
        "history_length": len(history),
        "mean_frozen": bool(state.mean_frozen),
        "calibration": getattr(state, "calibration", None),
    }
    text = json.dumps(_plain_json(meta), allow_nan=False, separators=(",", ":"))

    def writer(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata={MODEL_METADATA_KEY: text})

    return atomic_write(path, writer)


def _check_model_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"model file {path} does not exist: check the path")
    if not path.is_file():
        raise InputError(f"{path} is not a file: give the path of a {MODEL_SUFFIX} model file")
    return path


def _parse_model_metadata(path: Path, header: dict[str, str] | None) -> dict[str, Any]:
    """Validate the ``napari_wpp`` header entry of a safetensors file and return it."""
    foreign = (
        f"{path.name} is not a napari-wpp model file (no {MODEL_METADATA_KEY} metadata): "
        "train one with `napari-wpp train`"
    )
    if not header or MODEL_METADATA_KEY not in header:
        raise InputError(foreign)
    damaged = f"{path.name} has damaged napari-wpp metadata"
    try:
        meta = json.loads(header[MODEL_METADATA_KEY])
    except (json.JSONDecodeError, TypeError) as exc:
        raise InputError(f"{damaged} ({one_line(exc)}): save or train the model again") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise InputError(foreign)
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(f"{damaged} (format version {version!r}): save or train the model again")
    if version > MODEL_FORMAT_VERSION:
        import napari_wpp

        raise InputError(
            f"{path.name} uses model file format version {version}, but napari-wpp "
            f"{napari_wpp.__version__} reads up to version {MODEL_FORMAT_VERSION}: "
            "update napari-wpp"
        )
    required = {"kind": str, "model_config": dict, "step": int}
    for key, kind in required.items():
        if not isinstance(meta.get(key), kind):
            raise InputError(
                f"{damaged} (entry {key!r} missing or invalid): save or train the model again"
            )
    return meta


def _open_model_file(path: Path, with_tensors: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metadata and (optionally) all tensors of a model file, via ``safe_open`` only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata()
            meta = _parse_model_metadata(path, header)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()} if with_tensors else {}
    except InputError:
        raise
    except MemoryError:
        raise InputError(f"{path.name} is too large to load into memory") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file for the user
        raise InputError(
            f"cannot read model file {path.name} ({one_line(exc)}): it is truncated, damaged "
            f"or not a {MODEL_SUFFIX} file; save or train the model again"
        ) from None
    return meta, tensors


def read_model_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a model file, without reading its tensors.

    Returns
    -------
    dict
        ``format``, ``format_version``, ``napari_wpp_version``, ``kind``, ``scale``,
        ``model_config``, ``operator``, ``lam``, ``config``, ``step``, ``elapsed_s``,
        ``normalisation``, ``training_state``, ``n_priors``, ``optimizer`` (parameter groups),
        ``history`` (thinned), ``history_length``, ``mean_frozen`` (a WPPFlow past its mean
        warm-up), ``created``.

    Raises
    ------
    InputError
        Missing, truncated, corrupt or foreign file, or a format version this package cannot
        read.
    """
    path = _check_model_path(path)
    meta, _ = _open_model_file(path, with_tensors=False)
    return meta


def _damaged(path: Path, what: str) -> InputError:
    """The error of a model file whose metadata does not hold together."""
    return InputError(
        f"model file {path.name} has damaged metadata: {what}; save or train the model again"
    )


def _prior_count(path: Path, meta: dict[str, Any], tensors: dict[str, Any]) -> int:
    """Number of ψ states, derived from the tensors and checked against the metadata."""
    indices = set()
    for key in tensors:
        head, _, rest = key.partition(".")
        index = rest.partition(".")[0]
        if head == "prior" and index.isdigit():
            indices.add(int(index))
    count = max(indices) + 1 if indices else 0
    stated = meta.get("n_priors", 0)
    if not isinstance(stated, int) or isinstance(stated, bool) or stated != count:
        raise _damaged(path, f"n_priors is {stated!r} but the file holds {count} ψ states")
    if len(indices) != count:
        raise _damaged(path, f"the ψ states are numbered {sorted(indices)[:5]}…, not 0…{count - 1}")
    return count


def _check_model_config(
    path: Path, kind: str, model_config: dict[str, Any], weights: dict[str, Any]
) -> None:
    """Bound every value of ``model_config`` by what the stored weights can hold.

    A count of repeated parts (blocks, steps, …) cannot exceed the number of weight tensors,
    a width cannot exceed the largest weight tensor: a crafted file cannot make the model
    builder spend minutes or gigabytes before the shapes are compared.
    """
    from napari_wpp.core.models import MODEL_COUNT_OPTIONS

    n_tensors = len(weights)
    largest = max((int(v.numel()) for v in weights.values()), default=0)
    counts = MODEL_COUNT_OPTIONS.get(kind, ())
    for name, value in model_config.items():
        if isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        if not isinstance(value, (int, float)):
            raise _damaged(path, f"model_config {name} is {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise _damaged(path, f"model_config {name} is {value!r}")
        limit = n_tensors if name in counts else largest
        if abs(value) > max(limit, 64):
            raise _damaged(
                path, f"model_config {name} = {value!r} does not fit the {n_tensors} stored tensors"
            )


def _expected_shapes(path: Path, kind: str, model_config: dict[str, Any]) -> dict[str, Any]:
    """Parameter and buffer shapes of the configured model, built on the meta device."""
    import torch

    from napari_wpp.core.models import build_model

    try:
        with torch.device("meta"):
            model = build_model(kind, **model_config)
    except (InputError, ValueError, TypeError, RuntimeError) as exc:
        raise InputError(
            f"{path.name} has an invalid {kind} configuration {model_config} "
            f"({one_line(exc)}): save or train the model again"
        ) from None
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def _split_tensors(
    path: Path, tensors: dict[str, Any], n_priors: int
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[int, dict[str, Any]], Any]:
    weights: dict[str, Any] = {}
    priors: list[dict[str, Any]] = [{} for _ in range(n_priors)]
    optimizer: dict[int, dict[str, Any]] = {}
    rng = None
    for key, value in tensors.items():
        head, _, rest = key.partition(".")
        ok = True
        if head == "model" and rest:
            weights[rest] = value
        elif head in ("prior", "optimizer") and rest:
            index, _, name = rest.partition(".")
            ok = index.isdigit() and bool(name)
            if ok and head == "prior":
                ok = int(index) < n_priors
                if ok:
                    priors[int(index)][name] = value
            elif ok:
                optimizer.setdefault(int(index), {})[name] = value
        elif key == "rng":
            rng = value
        else:
            ok = False
        if not ok:
            raise InputError(
                f"{path.name} holds an unexpected tensor {key!r}: the file is damaged or was "
                "edited; save or train the model again"
            )
    return weights, priors, optimizer, rng


def _optimizer_state(
    path: Path, opt_meta: Any, opt_tensors: dict[int, dict[str, Any]]
) -> dict[str, Any] | None:
    """torch's optimizer ``state_dict`` from its metadata and tensors (``None``: not saved)."""
    if not isinstance(opt_meta, dict):
        if opt_tensors:
            raise InputError(
                f"{path.name} holds optimizer tensors without their parameter groups: the file "
                "is damaged; save the model again"
            )
        return None
    state: dict[int, dict[str, Any]] = {i: dict(v) for i, v in opt_tensors.items()}
    extra = opt_meta.get("extra_state") or {}
    groups_meta = opt_meta.get("param_groups") or []
    if not isinstance(extra, dict) or not isinstance(groups_meta, list):
        raise _damaged(path, "the optimizer entry is not the saved layout")
    for index, values in extra.items():
        if not str(index).isdigit() or not isinstance(values, dict):
            raise _damaged(path, f"optimizer state {index!r} is not a parameter index")
        state.setdefault(int(index), {}).update(values)
    groups = []
    for group in groups_meta:
        if not isinstance(group, dict):
            raise _damaged(path, "an optimizer parameter group is not a record")
        groups.append(
            {
                key: (tuple(value) if isinstance(value, list) and key != "params" else value)
                for key, value in group.items()
            }
        )
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def load_model(path: str | Path, device: str = "cpu") -> TrainingState:
    """Read a model file written by :func:`save_model` (never unpickles anything).

    Parameters
    ----------
    path
        ``.safetensors`` model file.
    device
        Device of the returned model (``"cpu"``, ``"cuda"``, ``"auto"``, ...). ψ states,
        optimizer and random state stay on the CPU.

    Returns
    -------
    TrainingState
        The model rebuilt from its kind and configuration, with its weights, in eval mode;
        ``priors``, ``optimizer`` (torch's ``state_dict`` layout) and ``rng`` when the file
        holds the training state (else ``[]``, ``None``, ``None``).

    Raises
    ------
    InputError
        Missing, truncated, corrupt or foreign file, unknown format version or model kind,
        or weights that do not fit the model configuration.
    """
    from napari_wpp.core.devices import resolve_device
    from napari_wpp.core.models import MODEL_KINDS, build_model
    from napari_wpp.core.training import TrainingState

    path = _check_model_path(path)
    target = resolve_device(device)
    meta, tensors = _open_model_file(path, with_tensors=True)
    kind, model_config = meta["kind"], meta["model_config"]
    if kind == "wppflow" and isinstance(model_config, dict):
        model_config.setdefault("edge_shifts", 0)  # files from before EdgeShift steps
        model_config.setdefault("edge_gain", 1.0)  # files from before their gain
    if kind not in MODEL_KINDS:
        raise InputError(
            f"{path.name} holds a model of unknown kind {kind!r}: update napari-wpp "
            f"(this version knows {', '.join(MODEL_KINDS)})"
        )
    n_priors = _prior_count(path, meta, tensors)
    weights, priors, opt_tensors, rng = _split_tensors(path, tensors, n_priors)
    _check_model_config(path, kind, model_config, weights)
    expected = _expected_shapes(path, kind, model_config)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(
        k for k in set(expected) & set(weights) if expected[k] != tuple(weights[k].shape)
    )
    if missing or unexpected or wrong:
        parts = []
        problems = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        for label, names in problems:
            if names:
                more = f" and {len(names) - 3} more" if len(names) > 3 else ""
                parts.append(f"{label}: {', '.join(names[:3])}{more}")
        raise InputError(
            f"the weights in {path.name} do not fit its {kind} configuration {model_config} "
            f"({'; '.join(parts)}): the file is damaged or was edited; save the model again"
        )
    optimizer = _optimizer_state(path, meta.get("optimizer"), opt_tensors)
    elapsed_s = meta.get("elapsed_s") or 0.0
    lam = meta.get("lam")
    history = meta.get("history") or []
    if isinstance(elapsed_s, bool) or not isinstance(elapsed_s, (int, float)):
        raise _damaged(path, f"elapsed_s is {elapsed_s!r}")
    if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float))):
        raise _damaged(path, f"lam is {lam!r}")
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise _damaged(path, "history is not a list of records")

    model = build_model(kind, **model_config)  # the shapes fit: as large as the file
    model.load_state_dict(weights, strict=True)
    if getattr(model, "denoise_block", 0):
        from napari_wpp.core.lr_denoise import check_noise_variance

        try:
            check_noise_variance(model.noise_variance.numpy())
        except InputError as exc:
            raise InputError(
                f"model file {path.name} holds an invalid LR noise model ({exc}): the file is "
                "damaged; save or train the model again"
            ) from None
    model.to(target).eval()

    return TrainingState(
        kind=kind,
        model=model,
        model_config=model_config,
        operator=meta.get("operator") or {},
        lam=float(lam) if lam is not None else 0.0,
        config=meta.get("config") or {},
        step=meta["step"],
        elapsed_s=float(elapsed_s),
        normalisation=meta.get("normalisation"),
        priors=priors,
        optimizer=optimizer,
        rng=rng,
        history=list(history),
        mean_frozen=meta.get("mean_frozen") is True,
        calibration=meta.get("calibration") if isinstance(meta.get("calibration"), dict) else None,
    )
