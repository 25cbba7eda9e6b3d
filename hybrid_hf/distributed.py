"""Training with FSDP through accelerate: on the CPU too, and saving the sharded model.

`accelerate launch` with FSDP (`--use_fsdp`, or `configs/fsdp2.yaml`) tells the processes through environment
variables. accelerate (1.x) turns them into FSDP only on GPUs and other accelerators: on the CPU its processes
form a gloo group for plain data parallelism and the FSDP settings are dropped. PyTorch's FSDP2 (`fully_shard`)
shards on the CPU as well, so `shard_on_cpu` marks accelerate's state as FSDP there before the Trainer asks for it.

Under FSDP every process holds a part of each parameter, so the full weights must be gathered before they can be
written; and FSDP2's `fully_shard` changes the class of the modules it shards (`FSDPHybridLlamaForCausalLM`), whose
name and module would then go into the saved `auto_map`. The first process therefore saves an unsharded model of
the original class that holds the gathered weights.
"""

from __future__ import annotations

import os

import torch


def shard_on_cpu() -> bool:
    """Under `accelerate launch` with FSDP on the CPU (several processes, gloo), let accelerate shard with FSDP as it
    does on GPUs instead of falling back to plain data parallelism. Call it before the `Trainer` (or `Accelerator`)
    is made. Returns whether it did."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    state = Accelerator(cpu=True).state  # shared by every `Accelerator` of the process, the Trainer's too
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # its settings come from the same environment variables
    state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP  # where accelerate records it too on GPUs
    return True


def sharding(trainer) -> str | None:
    """`"FSDP2"` (or `"FSDP1"`) when the Trainer shards its model with FSDP, else None."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    return f"FSDP{getattr(trainer.accelerator.state.fsdp_plugin, 'fsdp_version', 1)}"


def gathered_state_dict(trainer, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of `model` (the Trainer's model, or its merged form), on the CPU. Every process must call
    this (the parameters are gathered from all of them)."""
    return trainer.accelerator.get_state_dict(model)


def unsharded_model_class(model: torch.nn.Module) -> type[torch.nn.Module]:
    """The class `model` had before FSDP2's `fully_shard` (itself when it was not sharded)."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


def unsharded_copy(model, state_dict: dict[str, torch.Tensor]):
    """A model of `model`'s original class and config holding `state_dict` (the gathered weights, not copied), in
    eval mode, to save with `save_pretrained`. A PEFT model's adapters are merged into it (`merge_and_unload`)."""
    from accelerate import init_empty_weights

    peft_config = getattr(model, "peft_config", None)
    base = model.get_base_model() if peft_config is not None else model
    with init_empty_weights(include_buffers=False):  # parameters come from `state_dict`; buffers are made as usual
        copy = unsharded_model_class(base)(base.config)
        if peft_config is not None:
            from peft import get_peft_model

            copy = get_peft_model(copy, peft_config["default"])
    copy.load_state_dict(state_dict, assign=True)
    if peft_config is not None:
        copy = copy.merge_and_unload()
    copy.tie_weights()
    if getattr(base, "generation_config", None) is not None:
        copy.generation_config = base.generation_config
    return copy.eval()
