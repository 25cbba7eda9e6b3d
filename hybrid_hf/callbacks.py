"""Trainer callbacks for hybrid models: the learned spans and temperatures in every log, and a stop on a NaN loss.

trainer = Trainer(model=model, args=..., train_dataset=...)
add_span_logging(trainer)       # span/temperature per layer in every log; the console shows their means
trainer.train()
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from .model.hybrid_attention import span_temperature
from .model.modeling_hybrid import hybrid_layers


class SpanLoggingCallback(TrainerCallback):
    """Adds the learned spans and temperatures of the training forwards to every Trainer log.

    At each `on_log`, for every hybrid layer `i` (zero-padded to two digits) the mean over the training forwards
    since the previous log of:

    - `span/layer_ii`: the span `s * max_span`, in tokens;
    - `temperature/layer_ii`: the local-softmax temperature `tau_min + (tau_max - tau_min) * s`;
    - `span/layer_ii/head_h`: the span of head `h` (with `span_per_head=True` and `per_head=True`);
    - `span/mean`, `temperature/mean`: the means of the layer values.

    Values are collected by forward hooks on each layer's `span_predictor` (registered in `on_train_begin`, removed
    in `on_train_end`), detached and summed on the model's device, read back only when logging. Only forwards in
    training mode count (evaluation forwards are skipped). Every token position is averaged with equal weight:
    padding positions are *not* excluded (the hook sees the span scale, not the mask); for encoders, whose span is
    one per sequence, sequences count equally. Recomputed forwards under gradient checkpointing count twice with
    the same values, which leaves the means unchanged. Under DDP each process reports the spans of its own batches
    (no communication); the loggers write those of process zero.

    Where the values go (checked against transformers 5.x `Trainer.log`): `Trainer.log` appends a *copy* of the
    logs to `state.log_history` and then calls the callbacks' `on_log` in order with the same `logs` dict. This
    callback adds its values to `logs` (seen by every callback after it: the progress bar / printer, which the
    Trainer always adds last) and to the `state.log_history` entry of this log. Reporting integrations
    (`report_to`: TensorBoard, W&B, MLflow...) are created *before* the callbacks passed to `Trainer(callbacks=...)`,
    so they would miss the values: use `add_span_logging(trainer)`, which puts this callback first, and has the
    console show only the means (`console_logs`).
    """

    def __init__(self, per_head: bool = True):
        self.per_head = per_head
        self._handles: list = []
        self._stats: dict[int, list] = {}  # layer_idx -> [sum of s per head (tensor), token count, layer]

    # -- hooks -----------------------------------------------------------------------------------------------

    def _hook(self, layer):
        def record(module, inputs, output) -> None:
            if not layer.training:
                return
            scale = output.detach()  # (B, H, N) or (B, 1, N); (B, *, 1) for encoders
            sums = scale.float().sum(dim=(0, 2))
            entry = self._stats.get(layer.layer_idx)
            if entry is None:
                self._stats[layer.layer_idx] = [sums, scale.shape[0] * scale.shape[2], layer]
            else:
                entry[0] = entry[0] + sums
                entry[1] += scale.shape[0] * scale.shape[2]

        return record

    def attach(self, model) -> None:
        """Register the hooks on `model`'s hybrid layers (done by `on_train_begin`)."""
        self.detach()
        self._stats.clear()
        for layer in hybrid_layers(model):
            self._handles.append(layer.span_predictor.register_forward_hook(self._hook(layer)))

    def detach(self) -> None:
        """Remove the hooks (done by `on_train_end`)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def summary(self, reset: bool = True) -> dict[str, float]:
        """The log entries for the forwards recorded so far (empty when none); `reset` starts a new period."""
        values: dict[str, float] = {}
        spans, temperatures = [], []
        for layer_idx in sorted(self._stats):
            sums, count, layer = self._stats[layer_idx]
            if count == 0:
                continue
            config = layer.config
            scale = (sums / count).cpu().tolist()  # per head (or one shared value)
            mean_scale = sum(scale) / len(scale)
            span = mean_scale * config.max_span
            temperature = span_temperature(mean_scale, config.tau_min, config.tau_max)
            name = f"layer_{layer_idx:02d}"
            values[f"span/{name}"] = span
            values[f"temperature/{name}"] = temperature
            if self.per_head and len(scale) > 1:
                for head, value in enumerate(scale):
                    values[f"span/{name}/head_{head}"] = value * config.max_span
            spans.append(span)
            temperatures.append(temperature)
        if spans:
            values["span/mean"] = sum(spans) / len(spans)
            values["temperature/mean"] = sum(temperatures) / len(temperatures)
        if reset:
            self._stats.clear()
        return values

    # -- Trainer events --------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.attach(model)

    def on_train_end(self, args, state, control, **kwargs):
        self.detach()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        values = self.summary()
        if not values:
            return
        logs.update(values)
        # `Trainer.log` appended `{**logs, "step": global_step}` just before calling `on_log`.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)


def console_logs(logs: dict[str, Any]) -> dict[str, Any]:
    """`logs` without the per-layer and per-head span values: loss, learning rate, `span/mean`,
    `temperature/mean`..."""
    return {key: value for key, value in logs.items() if "/layer_" not in key}


class SpanProgressCallback(ProgressCallback):
    """The Trainer's progress bar, printing each log as `console_logs` shortens it (one short line per log)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=console_logs(logs or {}), **kwargs)


class SpanPrinterCallback(PrinterCallback):
    """The Trainer's log printer (used with `disable_tqdm=True`), printing each log as `console_logs` shortens it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=console_logs(logs or {}), **kwargs)


def add_span_logging(trainer, per_head: bool = False) -> SpanLoggingCallback:
    """Add a `SpanLoggingCallback` to `trainer` as its *first* callback, so that every logger sees the values, and
    have the console show only their means.

    (`Trainer(callbacks=[...])` places user callbacks after the `report_to` integrations, which log in their own
    `on_log` before a later callback could add anything.) The Trainer's progress bar or log printer is replaced by
    `SpanProgressCallback` or `SpanPrinterCallback`, which leave the per-layer values out of the console line; the
    integrations and `state.log_history` still get all of them. Returns the callback.
    """
    callback = SpanLoggingCallback(per_head=per_head)
    trainer.callback_handler.callbacks.insert(0, callback)
    for printer, short_printer in ((ProgressCallback, SpanProgressCallback), (PrinterCallback, SpanPrinterCallback)):
        if trainer.pop_callback(printer) is not None:
            trainer.add_callback(short_printer)
    return callback


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop training at the end of the first step whose training loss is NaN or infinite, without saving it.

    The loss of every training forward is read by a forward hook on the model (one scalar read per step). After
    training, `step` is that step (None if every loss was finite) and `loss` its value: `finetune` reports them.
    """

    def __init__(self):
        self.step: int | None = None
        self.loss: float | None = None
        self._last: torch.Tensor | None = None
        self._handle = None

    def _record(self, module, inputs, output) -> None:
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if module.training and loss is not None:
            self._last = loss.detach()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._handle = model.register_forward_hook(self._record)

    def on_step_end(self, args, state, control, **kwargs):
        if self._last is not None and self.step is None and not torch.isfinite(self._last).all():
            self.step, self.loss = state.global_step, float(self._last.float().mean())
            control.should_training_stop = True
            control.should_save = False  # a diverged model is no checkpoint to resume from

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
