"""Run under `accelerate launch --config_file configs/fsdp2.yaml` (2 processes): how FSDP2 shards a hybrid model.

Writes `ARGV[1]/rank{N}.json` with, per decoder layer, whether the layer is a `fully_shard` unit, the local and full
shapes of its hybrid parameters, and their shapes while that one layer is unsharded (`FSDPModule.unshard`) beside
those of the next layer's.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from tiny_models import tiny_llama
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

import hybrid_hf
from hybrid_hf.distributed import shard_on_cpu

HYBRID = ("span_predictor.proj.weight", "span_predictor.proj.bias", "mix.weight")


def shapes(layer) -> dict[str, list[int]]:
    """Local shapes of a decoder layer's hybrid parameters (the shard under FSDP, the whole while unsharded)."""
    attention = layer.self_attn
    found = {}
    for name in HYBRID:
        parameter = attention.get_parameter(name)
        local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
        found[name] = list(local.shape)
    return found


def main() -> None:
    assert shard_on_cpu()
    accelerator = Accelerator(cpu=True)
    model = hybrid_hf.convert(tiny_llama(), max_span=8, ramp=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    layers = list(model.model.layers)
    report = {"world": accelerator.num_processes, "layers": []}
    for index, layer in enumerate(layers):
        other = layers[(index + 1) % len(layers)]
        entry = {
            "fsdp_unit": isinstance(layer, FSDPModule),
            "dtensor": all(isinstance(layer.self_attn.get_parameter(name), DTensor) for name in HYBRID),
            "full": {name: list(layer.self_attn.get_parameter(name).shape) for name in HYBRID},
            "sharded": shapes(layer),
        }
        layer.unshard()
        entry["unsharded"], entry["other_meanwhile"] = shapes(layer), shapes(other)
        layer.reshard()
        report["layers"].append(entry)
    Path(sys.argv[1], f"rank{accelerator.process_index}.json").write_text(json.dumps(report))
    accelerator.wait_for_everyone()  # no process leaves while the other is still in a collective
    accelerator.end_training()  # the process group is destroyed before the interpreter exits


if __name__ == "__main__":
    main()
