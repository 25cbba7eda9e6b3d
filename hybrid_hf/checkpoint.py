"""Convert a checkpoint (hub id or local folder) into a hybrid one, verified, written atomically.

What `convert_checkpoint` does, in order:

1. Cheap checks first (nothing is loaded yet): OUTPUT does not exist (or `force`), SOURCE is a model folder or a
   reachable hub id, transformers knows its architecture, its heads divide its hidden size, the hybrid settings
   are valid, and its weights are safetensors (pickled `.bin` weights only with `allow_pickle`).
2. Load the host model in float32 with the Auto class of the task, and `convert` it.
3. Verify on a short fixed batch (tokenized text when the source has a tokenizer, else fixed ids; the second row
   is padded) that the converted model's outputs equal the host's (max abs difference <= `VERIFY_TOLERANCE`).
4. Write model (safetensors), tokenizer and a model card into a temporary folder beside OUTPUT and rename it into
   place. Any
   failure, or Ctrl-C, removes the temporary folder; an existing OUTPUT (with `force`) is replaced only once the
   new folder is complete.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from .conversion import check_host_class, check_setting_names, convert
from .errors import UsageError
from .loading import check_weights, load_model, load_source_config
from .model.configuration_hybrid import HYBRID_PREFIX
from .model.modeling_hybrid import hybrid_layers, self_attention_modules
from .publishing import check_output, output_lock, save_model
from .settings import SETTINGS, check_settings
from .streaming import NotStreamable, convert_streamed, streaming_refusal
from .tasks import TASKS, choose_task, model_classes
from .verification import VERIFY_TOLERANCE, VerificationError, max_output_difference, verification_batch

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

    def summary(self) -> str:
        """A few lines for people: what was converted, how, and where it went."""
        host_parameters = self.parameters_total - self.parameters_added
        share = 100.0 * self.parameters_added / host_parameters if host_parameters else 0.0
        if self.max_difference is None:
            verification = "skipped"
        else:
            verification = (
                f"max |difference| {self.max_difference:.3g} over {self.verification_tokens} tokens "
                f"(tolerance {VERIFY_TOLERANCE:g})"
            )
        lines = [
            f"source:       {self.source}",
            f"architecture: {self.architecture} ({self.source_class} -> {self.model_class})",
            f"layers:       {self.layers_converted} of {self.layers_total} converted",
            f"parameters:   +{self.parameters_added:,} ({share:.2f}% of {host_parameters:,})",
            f"verification: {verification}",
            f"tokenizer:    {'saved' if self.tokenizer_saved else 'none (the source has no usable tokenizer)'}",
            f"output:       {self.output}",
        ]
        return "\n".join(lines)

    def model_card(self, config) -> dict:
        """The arguments of `cards.write_model_card` for the converted folder: the hybrid settings of `config` (the
        hybrid model's config) and what the conversion did."""
        verification = "skipped" if self.max_difference is None else self.max_difference
        return dict(
            base_model=self.source,
            settings={name: getattr(config, name) for name in SETTINGS},
            training_summary={
                "training": "none yet: converted, it computes what the host model computes",
                "layers made hybrid": f"{self.layers_converted} of {self.layers_total}",
                "parameters added": self.parameters_added,
                "verification (max abs output difference)": verification,
            },
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
    streaming: bool = False,
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
        verify: check that the converted model's outputs equal the source's (max abs difference <= 1e-4); with
            `streaming`, `"slice"` (or True: a one-layer slice at each end) or `"full"` (the whole model).
        streaming: for a local safetensors folder, write the host shards unchanged (hard-linked or copied) beside one
            new shard, in constant memory (`streaming.convert_streamed`); other sources are converted in memory,
            with a message.
        **settings: hybrid settings (see `HybridSettings`); a `None` value means the default.

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

    check_output(output, force, source)
    config = load_source_config(source)
    if config.model_type.startswith(HYBRID_PREFIX):
        raise UsageError(f"source {source!r} is already a hybrid model (model_type {config.model_type!r})")
    check_settings(settings, config)  # settings out of range, before loading any weight
    task = choose_task(config, task)
    check_host_class(getattr(transformers, model_classes(config.model_type)[task]))  # UnsupportedHostError: why
    check_weights(source, allow_pickle)

    with output_lock(output):  # held from loading to writing; a busy or unwritable output fails here
        check_output(output, force, source)  # again: another run may have written it meanwhile
        if streaming:
            host_class = getattr(transformers, model_classes(config.model_type)[task])
            report = _convert_streamed(source, output, config, host_class, task, settings, force, verify)
            if report is not None:
                logger.info("Done in %.1f s", time.perf_counter() - start)
                return report
        model, tokenizer = load_model(source, task, config=config, tokenizer_required=False, allow_pickle=allow_pickle)
        logger.info("Loaded %s from %s (float32)", type(model).__name__, source)

        hybrid = convert(model, **settings)
        logger.info("Converted to %s", type(hybrid).__name__)
        hybrid.eval()

        max_difference, tokens = None, 0
        if verify:
            batch = verification_batch(config, tokenizer)
            tokens = int(batch["attention_mask"].sum())
            max_difference = max_output_difference(model, hybrid, batch)
            logger.info("Verification: max |difference| %.3g over %d tokens", max_difference, tokens)
            if not max_difference <= VERIFY_TOLERANCE:  # also catches nan
                raise VerificationError(
                    f"the converted model's outputs differ from the source's by {max_difference:.3g} "
                    f"(tolerance {VERIFY_TOLERANCE:g}); nothing was written"
                )

        host_parameters, hybrid_parameters = model.num_parameters(), hybrid.num_parameters()
        report = ConversionReport(
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
        )
        del model
        with torch.no_grad():
            logger.info("Writing %s", output)
            save_model(output, hybrid, tokenizer, force, card=report.model_card(hybrid.config))
    logger.info("Done in %.1f s", time.perf_counter() - start)
    return report


def _convert_streamed(source, output, config, host_class, task, settings, force, verify) -> ConversionReport | None:
    """`streaming.convert_streamed`, or None (with a message) when the source needs the in-memory path."""
    reason = streaming_refusal(source)
    if reason is None:
        mode = {True: "slice", False: "none"}.get(verify, verify)
        try:
            return convert_streamed(source, output, config, host_class, task, settings, force, verify=mode)
        except NotStreamable as error:
            reason = str(error)
    logger.warning("Converting in memory: %s", reason)
    return None
