"""No hidden CPU assumptions: a training step of a converted model (hybrid and local-only layers) runs on fake tensors.

Under `FakeTensorMode` tensors have shapes, dtypes and devices but no values, so reading one (`.item()`, `.tolist()`,
`int(t)`, a Python `if` on a tensor, a boolean-mask index) raises; a tensor made on the CPU and mixed with the model's
tensors on a (fake) CUDA device raises; and `NoHostCopy` refuses a copy from the device to the host. The training step
(gradients tracked) reads nothing, but for one documented read: with a padding mask and attention sinks, the sinks'
extent (`sink_positions`, once per forward), so the padded cases run with `sink_tokens=0`. (`band_reach`, the other
documented read, is at eager inference only.)
A fake CUDA device needs no GPU; the backward runs on it only where CUDA is available (autograd's engine sets the real
device up), else on the fake CPU.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import batch, tiny_host
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from hybrid_hf import convert, hybrid_layers


class NoHostCopy(TorchDispatchMode):
    """Raises on any copy of a tensor from a non-CPU device to the CPU (a device-to-host transfer and sync)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and isinstance(out, torch.Tensor):
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            if isinstance(source, torch.Tensor) and source.device.type != "cpu" and out.device.type == "cpu":
                raise AssertionError(f"{func}: a copy from {source.device} to the host")
        return out


def fake_model(model: torch.nn.Module, mode: FakeTensorMode, device: str) -> torch.nn.Module:
    """`model` with every parameter and buffer replaced by a fake tensor on `device` (in place)."""
    for module in model.modules():
        for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is None:
                continue
            source = tensor.detach()
            with mode:
                fake = mode.from_tensor(source, static_shapes=True).to(device)
            if name in module._parameters:
                module._parameters[name] = torch.nn.Parameter(fake, requires_grad=tensor.requires_grad)
            else:
                module._buffers[name] = fake
    return model


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("padding,sinks", [(None, 2), ("right", 0), ("left", 0)], ids=["sinks", "right", "left"])
def test_training_step_reads_no_tensor_value(device, padding, sinks):
    """Layer 0 hybrid, layer 1 local-only, layer 2 hybrid; forward with labels and backward, on fake tensors."""
    hybrid = convert(tiny_host("llama", num_hidden_layers=3), local_layers=[1], max_span=4, ramp=2, sink_tokens=sinks)
    assert [layer.local_only for layer in hybrid_layers(hybrid)] == [False, True, False]
    hybrid.train()
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    fake_model(hybrid, mode, device)
    input_ids, mask = batch("llama", length=20, padding=padding)
    with mode, NoHostCopy():
        input_ids = mode.from_tensor(input_ids).to(device)
        mask = mode.from_tensor(mask).to(device) if padding else None
        out = hybrid(input_ids=input_ids, attention_mask=mask, labels=input_ids, use_cache=False)
        assert out.loss.shape == () and out.loss.device.type == device and out.loss.requires_grad
        if device == "cpu" or torch.cuda.is_available():
            out.loss.backward()
            for layer in hybrid_layers(hybrid):
                assert layer.span_predictor.proj.weight.grad is not None
                assert layer.span_predictor.proj.weight.grad.device.type == device
