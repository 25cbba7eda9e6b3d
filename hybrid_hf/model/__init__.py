"""The model code: the three files here travel with every converted checkpoint.

`save_pretrained` copies them beside the weights, so `from_pretrained(..., trust_remote_code=True)` loads a hybrid
model where hybrid_hf is not installed. They therefore import only the standard library, `torch`, `transformers`
and each other (`from .sibling import name`):

- `hybrid_attention.py`: the math on `(B, H, N, D)` tensors: the banded local-attention kernel, its dense
  reference, the span temperature, the prefix mean and the span predictor.
- `configuration_hybrid.py`: the hybrid settings and the config class of a hybrid model, made from its host's.
- `modeling_hybrid.py`: the `"hybrid"` attention function registered with transformers, the decoding state kept
  in the cache, and the hybrid model classes, made from their host's.
"""
