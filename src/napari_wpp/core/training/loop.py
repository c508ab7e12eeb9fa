"""The training loop: step a :class:`~napari_wpp.core.training.setup.TrainingRun` and yield
its events."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from napari_wpp.core.config.training import TrainSpec as TrainingConfig
from napari_wpp.core.distributed import DataParallel
from napari_wpp.core.errors import DivergenceError
from napari_wpp.core.metrics import psnr
from napari_wpp.core.operators import ForwardOperator
from napari_wpp.core.training import events
from napari_wpp.core.training.losses import LossTerms
from napari_wpp.core.training.setup import (
    CHANNELS_LAST,
    TrainingRun,
    data_parallel_modules,
    setup_run,
)

__all__ = ["run_training", "train"]

# what rank 0 decides before every step
_GO_ON, _BUDGET_DONE, _STOP_ASKED = 0, 1, 2


def _initialise_on(model: torch.nn.Module, z: torch.Tensor, lr: torch.Tensor) -> None:
    """Run the flow once on a whole step's batch if a data-dependent initialisation waits.

    ActNorm layers set themselves from their first training batch; under data parallelism
    every rank runs that first batch in full, so all ranks (and one process with the whole
    batch) start from the same parameters.
    """
    from napari_wpp.core.models.flow_blocks import ActNorm

    waiting = [m for m in model.modules() if isinstance(m, ActNorm) and not bool(m.initialized)]
    if waiting:
        with torch.no_grad():
            model(z, lr)


def _decide(run: TrainingRun, stop: threading.Event | None) -> tuple[int, float]:
    """Go on, or stop (budget spent, stop asked), and the budget's fraction spent."""
    if run.budget.exhausted(run.step):
        decision, fraction = _BUDGET_DONE, 1.0
    elif stop is not None and stop.is_set():
        decision, fraction = _STOP_ASKED, 1.0
    else:
        decision, fraction = _GO_ON, run.budget.fraction(run.step)
    if run.dp.active:  # rank 0's clock and stop event decide for all ranks
        decision, fraction = run.dp.main_decision(decision, fraction)
    return decision, fraction


def _step(
    run: TrainingRun, trained: Callable[[str], torch.nn.Module], mean_phase: bool
) -> list[float]:
    """One optimiser step; returns the logged terms averaged over all processes."""
    device, q = run.device, run.scale
    full_batch, prior = run.next_batch()
    batch = (full_batch[run.share] if run.dp.active else full_batch).to(device)
    if CHANNELS_LAST.get(device.type, False):
        batch = batch.contiguous(memory_format=torch.channels_last)
    run.optimizer.zero_grad(set_to_none=True)
    # a WPPNet, or the flow's mean network during its warm-up, trains with the WPPNet loss
    if mean_phase or not run.flow:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.use_amp):
            hr = trained("mean" if mean_phase else "model")(batch)
        loss = run.mean_loss if mean_phase else run.loss
        terms: LossTerms = loss(hr.float(), batch, prior, run.generator)
    else:
        full_z = torch.randn(
            (full_batch.shape[0], 1, batch.shape[2] * q, batch.shape[3] * q),
            generator=run.generator,
        )
        if run.dp.active:
            # data-dependent initialisations (ActNorm) see the whole step's batch
            _initialise_on(run.model, full_z.to(device), full_batch.to(device))
        z = (full_z[run.share] if run.dp.active else full_z).to(device)
        hr, logdet = trained("model")(z, batch)
        loss = run.loss
        terms = loss(hr.float(), batch, prior, run.generator, logdet)
    logged = run.dp.all_reduce_mean(torch.stack([v.detach().double() for v in terms.logged()]))
    values = [float(v) for v in logged.cpu()]
    if not math.isfinite(values[2]):
        weight = "ρ (--rho)" if run.flow else "λ (--lambda)"
        raise DivergenceError(
            f"training diverged at step {run.step + 1} (loss {values[2]}): lower {weight}, "
            "use a larger --batch-size or another --seed; checkpoints written before are kept"
        )
    terms.scaled.backward()
    loss.clip_gradients(run.model.parameters(), run.step + 1)
    run.optimizer.step()
    return values


def _validation_psnr(run: TrainingRun) -> float | None:
    """PSNR of the validation pair on validation steps (rank 0 only), else ``None``."""
    every = run.config.validate_every
    if run.validation is None or not every or not run.dp.is_main or run.step % every:
        return None
    lr, hr = run.validation
    out = run.run_model(lr)[0, 0].cpu().numpy()
    return psnr(np.clip(out, 0, 1), hr, crop=40 if min(out.shape) > 160 else 0)


def train(
    lr_data: np.ndarray,
    reference: np.ndarray | list[np.ndarray],
    operator: ForwardOperator,
    config: TrainingConfig | None = None,
    stop: threading.Event | None = None,
    resume: events.TrainingState | None = None,
    normalisation: dict | None = None,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    preview_input: np.ndarray | None = None,
    data_parallel: DataParallel | None = None,
) -> Iterator[events.TrainingEvent]:
    """Train a WPPNet or a WPPFlow on LR data without paired HR data.

    Parameters
    ----------
    lr_data
        2D LR image, 3D stack of slices or of small crops; float32 normalised units.
    reference
        HR reference in normalised units: a 2D image, a 3D volume, or a list of regions
        (their patches are pooled).
    operator
        Forward operator f of the LR data.
    config
        Parameters; defaults when ``None``. Ignored (the saved one is used) when resuming,
        except for the budget, device and event intervals.
    stop
        Set it from any thread to stop after the current step; the final event still carries
        the state.
    resume
        A state from a checkpoint or final event of an earlier run.
    normalisation
        Intensity normalisation of the data (recorded in the state).
    validation
        Optional ``(lr, hr)`` pair in normalised units; PSNR every ``validate_every`` steps.
    preview_input
        LR image for previews (default: the first slice of the data, at most 64×64).
    data_parallel
        This process's place in a data-parallel run (default: that of an initialised
        ``torch.distributed`` process group, else one process). Every rank draws the same
        ``W · batch_size`` crops (and flow noise) from the shared seed and trains on its own
        ``batch_size`` of them; the network is wrapped in ``DistributedDataParallel``, ψ
        steps use the argmin counts of all ranks, and rank 0 decides when to stop. W ranks
        thus reproduce one process with W times the batch and the patches per step. Only
        rank 0 yields previews, validation PSNRs and checkpoints; every rank yields the
        progress (all-reduced losses) and the final event.

    Yields
    ------
    TrainingProgress, TrainingPreview, TrainingCheckpoint, then one TrainingFinished.
    """
    run = setup_run(
        lr_data,
        reference,
        operator,
        config,
        stop,
        resume,
        normalisation=normalisation,
        validation=validation,
        preview_input=preview_input,
        data_parallel=data_parallel,
    )
    config, dp, budget = run.config, run.dp, run.budget
    stopped_early = False
    last_checkpoint = time.perf_counter()
    run.model.train()
    if run.mean_frozen:
        run.model.mean_net.requires_grad_(False)
    trained = data_parallel_modules(run.model, run.device, dp)
    device_text = str(run.device) + (f" ×{dp.world_size}" if dp.active else "")
    step_times: deque[float] = deque([time.perf_counter()], maxlen=events.RATE_WINDOW + 1)
    while True:
        decision, fraction = _decide(run, stop)
        if decision == _STOP_ASKED:
            stopped_early = True
        if decision != _GO_ON:
            break
        mean_phase = bool(run.warmup) and not run.mean_frozen and fraction < run.warmup
        if run.warmup and not mean_phase and not run.mean_frozen:
            run.freeze_mean()
        run.set_learning_rate(fraction, mean_phase)
        values = _step(run, trained, mean_phase)
        run.step += 1
        step_times.append(time.perf_counter())
        record: dict[str, Any] = {
            "step": run.step,
            "elapsed_s": budget.elapsed(),
            "data_term": values[0],
            "wpp_term": values[1],
            "loss": values[2],
        }
        if len(values) > 3:
            record["logdet"] = values[3]
        val_psnr = _validation_psnr(run)
        if val_psnr is not None:
            record["psnr"] = val_psnr
        run.history.append(record)
        yield events.TrainingProgress(
            step=run.step,
            elapsed_s=record["elapsed_s"],
            data_term=record["data_term"],
            wpp_term=record["wpp_term"],
            loss=record["loss"],
            fraction=budget.fraction(run.step),
            psnr=val_psnr,
            logdet=record.get("logdet"),
            phase=("mean warm-up" if mean_phase else "spread") if run.warmup else None,
            steps_per_s=events.steps_per_second(step_times),
            device=device_text,
            total_steps=budget.max_steps,
        )
        if not dp.is_main:  # previews and checkpoints are rank 0's
            continue
        if config.preview_every and run.step % config.preview_every == 0:
            image = run.run_model(run.preview)[0, 0].cpu().numpy().astype(np.float32)
            yield events.TrainingPreview(step=run.step, elapsed_s=budget.elapsed(), image=image)
        due = bool(config.checkpoint_every) and run.step % config.checkpoint_every == 0
        if config.checkpoint_minutes:
            due = due or time.perf_counter() - last_checkpoint >= 60.0 * config.checkpoint_minutes
        if due:
            last_checkpoint = time.perf_counter()
            yield events.TrainingCheckpoint(state=run.snapshot())
    yield events.TrainingFinished(state=run.snapshot(), stopped_early=stopped_early)


def run_training(
    lr_data: np.ndarray,
    reference: np.ndarray | list[np.ndarray],
    operator: ForwardOperator,
    config: TrainingConfig | None = None,
    **options: Any,
) -> events.TrainingFinished:
    """Run :func:`train` to the end and return its final event."""
    final = None
    for event in train(lr_data, reference, operator, config, **options):
        if isinstance(event, events.TrainingFinished):
            final = event
    assert final is not None
    return final
