"""Convert a checkpoint (hub id or local folder) into a hybrid one, verified, written atomically.

What `convert_checkpoint` does, in order:

1. Cheap checks first (nothing is loaded yet): OUTPUT does not exist (or `force`), SOURCE is a model folder or a
   reachable hub id, transformers knows its architecture, its heads divide its hidden size, the hybrid settings
   are valid, and its weights are safetensors (pickled `.bin` weights only with `allow_pickle`).
2. A local safetensors folder whose tensors are named as the model names them is converted streamed, in constant
   memory (`streaming.convert_streamed`: its shards are checked for NaN/inf and reused as they are). Other sources
   (hub ids, pickled weights, older layouts), `local_layers`, a `dtype` other than the stored one, or
   `streaming=False` take the in-memory path: steps 3 to 5.
3. Load the host model in float32 with the Auto class of the task, and `convert` it.
4. Verify on a short fixed batch (tokenized text when the source has a tokenizer, else fixed ids; the second row
   is padded) that the converted model's outputs equal the host's (max abs difference <= `VERIFY_TOLERANCE`).
5. Write model (safetensors, in `dtype`: by default the dtype the source is stored in), tokenizer and a model card
   into a temporary folder beside OUTPUT and rename it into place. Any failure, or Ctrl-C, removes the temporary
   folder; an existing OUTPUT (with `force`) is replaced only once the new folder is complete.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from .calibration import calibration_ids, choose_local_layers, layer_scores
from .conversion import check_host_class, check_setting_names, convert
from .errors import MissingInputError, UsageError
from .loading import (
    DTYPES,
    SAFETENSORS_DTYPES,
    check_weights,
    load_model,
    load_source_config,
    stored_dtype,
    stored_values,
)
from .model.configuration_hybrid import HYBRID_PREFIX
from .model.modeling_hybrid import hybrid_layers, self_attention_modules
from .publishing import check_output, output_lock, save_model
from .settings import SETTINGS, check_settings
from .streaming import NotStreamable, convert_streamed, streaming_refusal
from .tasks import TASKS, choose_task, model_classes
from .verification import VERIFY_TOLERANCE, VerificationError, max_output_difference, output_mask, verification_batch

logger = logging.getLogger(__name__)


@dataclass
class ConversionReport:
    """What `convert_checkpoint` did.

    Attributes:
        source: the SOURCE as given (hub id or folder).
        architecture: the host `model_type` (e.g. `"llama"`).
        source_class: the host class loaded (e.g. `"LlamaForCausalLM"`).
        model_class: the hybrid class written (e.g. `"HybridLlamaForCausalLM"`).
        task: the task of both classes (`"causal_lm"`, `"base"`, ...).
        layers_converted: number of attention layers made hybrid.
        layers_total: number of attention layers of the model.
        parameters_added: parameters of the hybrid model minus those of the host.
        parameters_total: parameters of the hybrid model.
        max_difference: max abs difference of the outputs (logits, or last hidden state) over real tokens;
            `None` when verification was skipped.
        verification_tokens: number of real (unpadded) tokens verification ran on.
        tokenizer_saved: whether the source's tokenizer was written beside the model.
        output: the folder written.
        local_layers: the layers made local-only (no global attention); their outputs differ from the host's, so
            `max_difference` is then reported, not held to the tolerance.
        layer_scores: the calibration score of every layer when `local_layers` was chosen by calibration.
        dtype: the dtype of the weights written (e.g. `"bfloat16"`).
        streamed: whether the conversion was streamed (host shards reused, `streaming.convert_streamed`).
    """

    source: str
    architecture: str
    source_class: str
    model_class: str
    task: str
    layers_converted: int
    layers_total: int
    parameters_added: int
    parameters_total: int
    max_difference: float | None
    verification_tokens: int
    tokenizer_saved: bool
    output: Path
    local_layers: list[int] | None = None
    layer_scores: list[float] | None = None
    dtype: str = "float32"
    streamed: bool = False

    def summary(self) -> str:
        """A few lines for people: what was converted, how, and where it went."""
        host_parameters = self.parameters_total - self.parameters_added
        share = 100.0 * self.parameters_added / host_parameters if host_parameters else 0.0
        if self.max_difference is None:
            verification = "skipped"
        elif self.local_layers:
            verification = (
                f"max |difference| {self.max_difference:.3g} over {self.verification_tokens} tokens (not exact: "
                "local-only layers change the function until a recovery fine-tune)"
            )
        else:
            verification = (
                f"max |difference| {self.max_difference:.3g} over {self.verification_tokens} tokens "
                f"(tolerance {VERIFY_TOLERANCE:g})"
            )
        lines = [
            f"source:       {self.source}",
            f"architecture: {self.architecture} ({self.source_class} -> {self.model_class})",
            f"layers:       {self.layers_converted} of {self.layers_total} converted"
            + (f", {len(self.local_layers)} of them local-only: {self.local_layers}" if self.local_layers else ""),
            f"parameters:   +{self.parameters_added:,} ({share:.2f}% of {host_parameters:,})",
            f"verification: {verification}",
            f"tokenizer:    {'saved' if self.tokenizer_saved else 'none (the source has no usable tokenizer)'}",
            f"weights:      {self.dtype}, "
            + ("streamed (host shards reused as they are)" if self.streamed else "converted in memory"),
            f"output:       {self.output}",
        ]
        return "\n".join(lines)

    def model_card(self, config) -> dict:
        """The arguments of `cards.write_model_card` for the converted folder: the hybrid settings of `config` (the
        hybrid model's config, or a composite model's text config) and what the conversion did."""
        verification = "skipped" if self.max_difference is None else self.max_difference
        summary = {
            "training": "none yet: converted, it computes what the host model computes",
            "layers made hybrid": f"{self.layers_converted} of {self.layers_total}",
            "parameters added": self.parameters_added,
            "verification (max abs output difference)": verification,
        }
        if self.local_layers:
            summary["training"] = "none yet: its local-only layers need a recovery fine-tune"
            summary["local-only layers"] = ", ".join(map(str, self.local_layers))
        if self.layer_scores:
            summary["calibration scores (per layer, lower: less change when local-only)"] = ", ".join(
                f"{i}: {score:.4g}" for i, score in enumerate(self.layer_scores)
            )
        return dict(
            base_model=self.source,
            settings={name: getattr(config.get_text_config(), name) for name in SETTINGS},
            training_summary=summary,
            model_id=self.output.name,
        )


def convert_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    force: bool = False,
    allow_pickle: bool = False,
    task: str | None = None,
    verify: bool | str = True,
    streaming: bool | None = None,
    dtype: str | torch.dtype = "auto",
    calibration: str | os.PathLike | None = None,
    local_fraction: float = 0.5,
    calibration_tokens: int = 2048,
    **settings,
) -> ConversionReport:
    """Convert the checkpoint SOURCE (hub id or local folder) into a hybrid checkpoint in the folder OUTPUT.

    Args:
        source: a hub model id or a local model folder whose attention goes through transformers' attention
            interface.
        output: the folder to write; must not exist unless `force`.
        force: replace an existing `output` (only once the new one is complete).
        allow_pickle: accept pickled `pytorch_model.bin` weights when the source has no safetensors.
        task: `"base"`, `"causal_lm"`, `"masked_lm"` or `"sequence_classification"`; by default the task of the
            source's `config.architectures[0]`, else `causal_lm` for decoders and `base` for encoders.
        verify: check that the converted model's outputs equal the source's (max abs difference <= 1e-4); when
            streamed, `"slice"` (or True: a one-layer slice at each end) or `"full"` (the whole model).
        streaming: None (default): a local safetensors folder is converted streamed, its host shards written
            unchanged (hard-linked or copied) beside one new shard, in constant memory (`streaming.convert_streamed`),
            and other sources in memory. True: the same, with a warning when a source is converted in memory. False:
            in memory.
        dtype: the dtype of the weights written: `"auto"` (default: the dtype the source is stored in, as
            transformers' `dtype="auto"`), `"float32"`, `"bfloat16"`, `"float16"` (or the torch dtype). Verification
            runs in float32 whatever it is. A dtype other than the stored one is converted in memory.
        calibration: a text file to choose the local-only layers on, with `local_layers="auto"`: the
            `local_fraction` of the layers whose output changes least when they go local-only
            (`calibration.layer_scores` on its first `calibration_tokens` tokens).
        local_fraction: share of the layers made local-only with `local_layers="auto"`.
        calibration_tokens: how many tokens of `calibration` to score the layers on.
        **settings: hybrid settings (see `HybridSettings`); a `None` value means the default. `local_layers` may
            also be `"auto"` (with `calibration`).

    Returns:
        A `ConversionReport`.

    Raises:
        UsageError (a ValueError; `MissingInputError`, `OutputExistsError`...): bad input, one-line messages.
        UnsupportedHostError (a ValueError): the architecture cannot be made hybrid; the message says why.
        VerificationError: the converted model's outputs differ; nothing is written.
    """
    start = time.perf_counter()
    source = os.fspath(source)
    output = Path(output).expanduser()
    settings = {name: value for name, value in settings.items() if value is not None}
    check_setting_names(settings)  # TypeError, as for `convert`
    if task is not None and task not in TASKS:
        raise UsageError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    calibration_text = _calibration_text(settings, calibration, local_fraction, calibration_tokens)
    if dtype != "auto" and dtype not in DTYPES and dtype not in DTYPES.values():
        raise UsageError(f"`dtype` must be one of auto, {', '.join(DTYPES)}, got {dtype!r}")

    check_output(output, force, source)
    config = load_source_config(source)
    if config.model_type.startswith(HYBRID_PREFIX):
        raise UsageError(f"source {source!r} is already a hybrid model (model_type {config.model_type!r})")
    check_settings({k: v for k, v in settings.items() if v != "auto"}, config)  # out of range: before any weight
    task = choose_task(config, task)
    check_host_class(getattr(transformers, model_classes(config.model_type)[task]))  # UnsupportedHostError: why
    check_weights(source, allow_pickle)
    requested = None if dtype == "auto" else DTYPES.get(dtype, dtype)
    dtype = requested or stored_dtype(source, config)

    with output_lock(output):  # held from loading to writing; a busy or unwritable output fails here
        check_output(output, force, source)  # again: another run may have written it meanwhile
        if streaming is not False:
            host_class = getattr(transformers, model_classes(config.model_type)[task])
            report = _convert_streamed(source, output, config, host_class, task, settings, force, verify, requested,
                                       required=streaming is True)  # fmt: skip
            if report is not None:
                logger.info("Done in %.1f s", time.perf_counter() - start)
                return report
        model, tokenizer = load_model(source, task, config=config, tokenizer_required=False, allow_pickle=allow_pickle)
        logger.info("Loaded %s from %s (float32; written in %s)", type(model).__name__, source, _name(dtype))

        if calibration_text is not None:
            if tokenizer is None:
                raise UsageError(f"--local-layers auto needs the source's tokenizer, and {source!r} has none")
            settings.update(_calibrated(model, calibration_ids(calibration_text, tokenizer, calibration_tokens),
                                        settings, local_fraction))  # fmt: skip
        hybrid = convert(model, **settings)
        logger.info("Converted to %s", type(hybrid).__name__)
        report = _verified_report(source, output, config, task, model, hybrid.eval(), tokenizer, verify, dtype)
        del model
        with torch.no_grad():
            _cast(hybrid, dtype)  # verified in float32, written in `dtype`
            logger.info("Writing %s", output)
            save_model(output, hybrid, tokenizer, force, card=report.model_card(hybrid.config))
    logger.info("Done in %.1f s", time.perf_counter() - start)
    return report


def _calibrated(model, ids: torch.Tensor, settings: dict, fraction: float) -> dict:
    """`local_layers` (the `fraction` of the layers of lowest `calibration.layer_scores` on `ids`) and the scores."""
    logger.info("Scoring %d layers on %d calibration tokens", len(self_attention_modules(model)), ids.shape[1])
    scores = layer_scores(model, ids, **{k: v for k, v in settings.items() if k != "local_layers"})
    return dict(local_layers=choose_local_layers(scores, fraction), layer_scores=scores)


def _verified_report(source, output, config, task, model, hybrid, tokenizer, verify, dtype) -> ConversionReport:
    """The `ConversionReport` of the in-memory conversion of `model` into `hybrid`, verified (`_verify`) unless not
    `verify`; the weights are to be written in `dtype`."""
    max_difference, tokens = _verify(model, hybrid, config, tokenizer) if verify else (None, 0)
    host_parameters, hybrid_parameters = model.num_parameters(), hybrid.num_parameters()
    return ConversionReport(
        source=source,
        architecture=config.model_type,
        source_class=type(model).__name__,
        model_class=type(hybrid).__name__,
        task=task,
        layers_converted=len(hybrid_layers(hybrid)),
        layers_total=len(self_attention_modules(hybrid)),
        parameters_added=hybrid_parameters - host_parameters,
        parameters_total=hybrid_parameters,
        max_difference=max_difference,
        verification_tokens=tokens,
        tokenizer_saved=tokenizer is not None,
        output=output.absolute(),
        local_layers=hybrid.hybrid_settings.local_layers,
        layer_scores=hybrid.hybrid_settings.layer_scores,
        dtype=_name(dtype),
    )


def _verify(model, hybrid, config, tokenizer) -> tuple[float, int]:
    """`(max |difference|, tokens)` of the outputs of the host and the hybrid model on `verification_batch`; a
    `VerificationError` past `VERIFY_TOLERANCE` (not with local-only layers, which change the outputs)."""
    batch = verification_batch(config, tokenizer, model.main_input_name)
    tokens = int(output_mask(batch).sum())
    max_difference = max_output_difference(model, hybrid, batch)
    logger.info("Verification: max |difference| %.3g over %d tokens", max_difference, tokens)
    if not max_difference <= VERIFY_TOLERANCE and not hybrid.hybrid_settings.local_layers:  # also catches nan
        raise VerificationError(
            f"the converted model's outputs differ from the source's by {max_difference:.3g} "
            f"(tolerance {VERIFY_TOLERANCE:g}); nothing was written"
        )
    return max_difference, tokens


def _calibration_text(settings: dict, calibration, fraction: float, tokens: int) -> str | None:
    """The calibration text when `local_layers` is `"auto"` (checked, before anything is loaded); else None."""
    if settings.get("local_layers") != "auto":
        if calibration is not None:
            raise UsageError("--calibration chooses the local-only layers: give it with --local-layers auto")
        return None
    if calibration is None:
        raise UsageError("--local-layers auto needs --calibration FILE, a text to score the layers on")
    choose_local_layers([], fraction)  # a fraction out of [0, 1] fails here
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2:
        raise UsageError(f"`calibration_tokens` must be an integer >= 2, got {tokens!r}")
    path = Path(calibration).expanduser()
    if not path.is_file():
        raise MissingInputError(f"calibration text {str(calibration)!r} is not a file")
    return path.read_text(encoding="utf-8", errors="replace")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cast(model, dtype: torch.dtype) -> None:
    """Cast `model` to `dtype`, refusing weights it cannot hold (infinite once cast, e.g. beyond float16's 65504;
    the loader has refused non-finite ones before): a one-line error naming the argument."""
    model.to(dtype)
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UsageError(
                f"`dtype` {_name(dtype)} (--dtype) cannot hold {name}: its values overflow; choose float32 or bfloat16"
            )


def _convert_streamed(
    source, output, config, host_class, task, settings, force, verify, dtype, required
) -> ConversionReport | None:
    """`streaming.convert_streamed`, or None when the source needs the in-memory path: local-only layers to choose
    and verify on the whole model, a `dtype` (None: as stored) other than the stored one, a source that is no local
    safetensors folder or whose tensors are not named as the model's (`NotStreamable`). The reason is logged, as a
    warning when streaming was `required`."""
    stored = {SAFETENSORS_DTYPES.get(name) for name in stored_values(source) or {}} - {None}
    reason = streaming_refusal(source)
    if settings.get("local_layers"):
        reason = "local-only layers are chosen and verified on the whole model"
    elif getattr(config, "is_encoder_decoder", False) or config.get_text_config() is not config:
        reason = "encoder-decoder and composite models are verified on the whole model"
    elif reason is None and dtype is not None and stored != {dtype}:
        reason = f"the weights are stored in {', '.join(sorted(map(_name, stored)))}, to be written in {_name(dtype)}"
    if reason is None:
        mode = {True: "slice", False: "none"}.get(verify, verify)
        try:
            return convert_streamed(source, output, config, host_class, task, settings, force, verify=mode)
        except NotStreamable as error:
            reason = str(error)
    logger.log(logging.WARNING if required else logging.INFO, "Converting in memory: %s", reason)
    return None
