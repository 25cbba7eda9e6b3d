"""The core install at work: convert a tiny Llama, save it, load it back with remote code, same logits.

    python tests/core_check.py OUTPUT            # where only the core is installed (`pip install .`): `make core`
    python tests/core_check.py OUTPUT --block    # anywhere: the optional dependencies made unimportable first

Exits non-zero on any failure, or when an optional dependency is importable (without `--block`) or was imported.
"""

import argparse
import importlib.util
import sys

# tqdm is no optional dependency: transformers itself needs it.
OPTIONAL = ("accelerate", "peft", "datasets", "matplotlib", "gguf")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--block", action="store_true", help="make the optional dependencies unimportable first")
    args = parser.parse_args()
    if args.block:
        for name in OPTIONAL:
            sys.modules[name] = None  # as if not installed: importing it fails, transformers finds no spec
    else:
        installed = [name for name in OPTIONAL if importlib.util.find_spec(name) is not None]
        assert not installed, f"not a core install: {installed} installed"

    import torch
    import transformers

    import hybrid_hf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    host = transformers.LlamaForCausalLM(config).eval()
    hybrid = hybrid_hf.convert(host, max_span=8, ramp=4)
    hybrid.save_pretrained(args.output)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(args.output, trust_remote_code=True).eval()
    ids = torch.randint(0, 99, (1, 12))
    with torch.no_grad():
        assert torch.equal(host(ids).logits, loaded(ids).logits), "the saved hybrid model computes something else"
    imported = [name for name in OPTIONAL if sys.modules.get(name) is not None]
    assert not imported, f"the core imported optional dependencies: {imported}"
    print("core install: converted, saved and loaded a hybrid Llama")


if __name__ == "__main__":
    main()
