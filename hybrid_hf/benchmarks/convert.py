"""Benchmark of `hybrid-hf convert` on a large checkpoint: streamed (constant memory) against in memory.

    python -m hybrid_hf.benchmarks.convert [--layers 42] [--hidden 1024] [--out bench_output] [--keep]

Writes a synthetic Llama-shaped checkpoint with random float32 weights in two or more safetensors shards (about
2.2 GB, 2.0 GiB, with the defaults) and a tiny one of the same family under a temporary folder, converts each with
and without
`--streaming`, each command in a child process of its own, and reports wall time and peak resident memory (the
child's `ru_maxrss`). The tiny checkpoint's peak is the fixed cost of Python, torch and transformers; what the large
one adds to it is what the conversion itself holds. Then the logits of both large outputs on a short input are
compared. The temporary folder is deleted at the end (unless `--keep`). Results: `OUT/convert.json` and
`OUT/convert.md`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

# Runs one command as its child and prints the child's peak resident memory (kB on Linux) and wall time.
_MEASURE = textwrap.dedent(
    """
    import json, resource, subprocess, sys, time
    start = time.perf_counter()
    status = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"status": status, "wall_s": wall, "peak_kb": peak_kb}))
    """
)


def llama_config(layers: int, hidden: int, vocab: int = 32000):
    """A Llama config with Llama-2-like proportions: 64-wide heads, a quarter as many KV heads, MLP 2.75x wide."""
    from transformers import LlamaConfig

    heads = hidden // 64
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def write_random_checkpoint(folder: Path, config, max_shard_bytes: int, seed: int = 0) -> int:
    """Save a model of `config` with random float32 weights, shard by shard (one shard in memory at a time), the
    way `save_pretrained` lays it out. Returns the bytes of tensor data written."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        layout = LlamaForCausalLM(config).state_dict()
    split = split_torch_state_dict_into_shards(layout, max_shard_size=max_shard_bytes)
    generator = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    for filename, names in split.filename_to_tensors.items():
        shard = {}
        for name in names:
            shape = layout[name].shape
            shard[name] = (
                torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=generator) * 0.02
            )
        save_file(shard, folder / filename, metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(folder)
    return sum(t.numel() * 4 for t in layout.values())


def measure(command: list[str]) -> dict:
    """Run `command` in a fresh child process; its wall time and peak resident memory."""
    result = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    if measured["status"] != 0:
        raise RuntimeError(f"{' '.join(command)} failed with status {measured['status']}")
    return {"wall_s": measured["wall_s"], "peak_mib": measured["peak_kb"] / 1024}


def logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True).eval()
    with torch.no_grad():
        return model(ids).logits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hybrid_hf.benchmarks.convert", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--layers", type=int, default=42, help="decoder layers of the large checkpoint")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the large checkpoint")
    parser.add_argument("--shard-gb", type=float, default=1.2, help="largest shard, in GB")
    parser.add_argument("--out", type=Path, default=Path("bench_output"), help="folder for convert.{json,md}")
    parser.add_argument("--tmp", type=Path, default=None, help="where the checkpoints go (default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="hybrid-bench-convert-", dir=args.tmp))
    convert = [sys.executable, "-m", "hybrid_hf", "convert"]
    settings = ["--max-span", "64", "--ramp", "16"]
    rows = []
    try:
        sizes = {
            "tiny": write_random_checkpoint(root / "tiny", llama_config(2, 64, vocab=1000), int(args.shard_gb * 1e9)),
            "large": write_random_checkpoint(
                root / "large", llama_config(args.layers, args.hidden), int(args.shard_gb * 1e9)
            ),
        }
        shards = len(list((root / "large").glob("*.safetensors")))
        for checkpoint in ("tiny", "large"):
            for mode, flags in (("streamed", ["--streaming"]), ("in memory", [])):
                output = root / f"{checkpoint}-{mode.replace(' ', '-')}"
                measured = measure([*convert, str(root / checkpoint), str(output), *settings, *flags])
                rows.append(
                    {"checkpoint": checkpoint, "mode": mode, "checkpoint_mib": sizes[checkpoint] / 2**20, **measured}
                )
                print(rows[-1], flush=True)
        fixed = {row["mode"]: row["peak_mib"] for row in rows if row["checkpoint"] == "tiny"}
        for row in rows:
            row["above_fixed_mib"] = row["peak_mib"] - fixed[row["mode"]]
            row["above_fixed_share"] = row["above_fixed_mib"] / row["checkpoint_mib"]
        ids = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(0))
        difference = float((logits(root / "large-streamed", ids) - logits(root / "large-in-memory", ids)).abs().max())
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)

    summary = {
        "rows": rows,
        "large_shards": shards,
        "logits_max_abs_difference": difference,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "convert.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "| checkpoint | MiB | mode | wall (s) | peak RSS (MiB) | above the tiny run (MiB) | share of the checkpoint |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['checkpoint']} | {row['checkpoint_mib']:,.0f} | {row['mode']} | {row['wall_s']:.1f} | "
            f"{row['peak_mib']:,.0f} | {row['above_fixed_mib']:,.0f} | {100 * row['above_fixed_share']:.1f}% |"
        )
    lines.append(
        f"\nLarge checkpoint: {shards} shards. Max abs difference of the logits (streamed vs in memory, "
        f"16 tokens): {difference:g}."
    )
    (args.out / "convert.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
