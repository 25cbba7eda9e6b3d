"""The hybrid settings as command-line flags: one table, the same flags and help text in every command.

Each field of `HybridSettings` that a user chooses when converting becomes a flag of the same name (`max_span` ->
`--max-span`), typed from the field's default. A flag left out means "the default" (or, for a model that is
already hybrid, "keep its value").
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from .conversion import check_setting_names, hybrid_config_from
from .errors import UsageError, validation_message
from .model.configuration_hybrid import UPPER_BOUNDS, HybridSettings

#: field of `HybridSettings` -> help text of its flag
SETTINGS = {
    "max_span": "longest local span, in tokens",
    "ramp": "width of the soft edge of the span mask, in tokens",
    "tau_min": "local softmax temperature at the shortest span",
    "tau_max": "local softmax temperature at the longest span",
    "span_per_head": "one span per token and head (--no-span-per-head: one per token, shared by its heads)",
    "hybrid_layers": "comma-separated indices of the layers to make hybrid, e.g. 0,1,2, 'all' or 'none'",
    "initial_span": "initial span as a fraction of --max-span, in (0, 1)",
    "span_loss_coef": "weight of the span penalty mean(span) / max_span added to the loss",
    "local_layers": "comma-separated indices of the layers to make local-only (no global attention: cheaper at long "
    "context, not exact until fine-tuned), or 'auto' to choose them on --calibration text",
    "sink_tokens": "first tokens of a sequence every query of a local-only layer reads (attention sinks)",
    "max_crop": "most tokens a cache crop may remove at once (assisted and prompt-lookup decoding)",
}
#: the settings that shape the new parameters: they apply only when a host model is converted
CONVERSION_SETTINGS = tuple(name for name in SETTINGS if name != "span_loss_coef")


def flag(name: str) -> str:
    """`"max_span"` -> `"--max-span"`."""
    return "--" + name.replace("_", "-")


def _indices(text: str, words: str) -> list[int]:
    if not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*,?\s*", text):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer indices like 0,1,2 (or {words}), got {text!r}"
        )
    return [int(part) for part in text.split(",") if part.strip()]


def layer_list(text: str) -> list[int] | None:
    """Parse `--hybrid-layers`: comma-separated indices, `all` (None) or `none` (`[]`: with local-only layers, the
    other layers stay the host's)."""
    word = text.strip().lower()
    if word in ("all", "none"):
        return None if word == "all" else []
    return _indices(text, "'all' or 'none'")


def local_layer_list(text: str) -> list[int] | str:
    """Parse `--local-layers`: comma-separated indices, `none` (`[]`), or `auto` (chosen by calibration)."""
    word = text.strip().lower()
    if word in ("auto", "none"):
        return "auto" if word == "auto" else []
    return _indices(text, "'none' or 'auto'")


def add_setting_arguments(parser: argparse.ArgumentParser, title: str = "hybrid settings") -> None:
    """Add a flag for every setting of `SETTINGS` to `parser`, in an argument group called `title`."""
    group = parser.add_argument_group(f"{title} (defaults: those of HybridSettings)")
    for name, help_text in SETTINGS.items():
        default = getattr(HybridSettings, name)
        flags = list(dict.fromkeys([flag(name), f"--{name}"]))  # `--max-span` and transformers' `--max_span`
        if name in ("hybrid_layers", "local_layers"):
            parse = layer_list if name == "hybrid_layers" else local_layer_list
            group.add_argument(*flags, dest=name, type=parse, metavar="I,J,...", help=help_text)
        elif isinstance(default, bool):
            group.add_argument(
                *flags, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            group.add_argument(
                *flags,
                dest=name,
                type=type(default),
                metavar="X" if isinstance(default, float) else "N",
                help=f"{help_text} (default {default}"
                + (f", at most {UPPER_BOUNDS[name]:g})" if name in UPPER_BOUNDS else ")"),
            )


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (flags left out are not in the result)."""
    return {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}


def check_settings(settings: dict[str, Any], host_config=None) -> None:
    """Validate `settings` (against `host_config`'s layers and positions when given) before any weight is loaded;
    a bad value is a `UsageError` naming the setting."""
    check_setting_names(settings)
    if settings.get("local_layers") == "auto":
        raise UsageError(
            "--local-layers auto is chosen on calibration text by `hybrid-hf convert ... --calibration FILE`; "
            "convert first, then fine-tune the converted folder"
        )
    try:
        if host_config is None:
            HybridSettings(**settings)
        else:
            hybrid_config_from(host_config, **settings)
    except UsageError:
        raise
    except ValueError as error:
        raise UsageError(validation_message(error)) from error
