"""Task heads that build their base model through `AutoModel` (Llama's classification and question-answering heads)
made from a hybrid config alone, in a process where no hybrid class was registered with the Auto classes."""

import subprocess
import sys
import textwrap

import pytest

CHECK = textwrap.dedent(
    """
    import torch, transformers, hybrid_hf

    fields = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0)
    for head in ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering"):
        torch.manual_seed(0)
        model = getattr(hybrid_hf, f"HybridLlama{head}")(hybrid_hf.HybridLlamaConfig(**fields, max_span=4, ramp=2))
        assert type(model.base_model).__name__ == "HybridLlamaModel", type(model.base_model)
        host = getattr(transformers, f"Llama{head}")(transformers.LlamaConfig(**fields)).eval()
        missing, unexpected = host.load_state_dict(model.state_dict(), strict=False)
        assert not missing and all("span_predictor" in k or ".mix." in k for k in unexpected), (missing, unexpected)
        ids = torch.randint(3, 99, (2, 9))
        with torch.no_grad():
            ours, theirs = model.eval()(ids), host(ids)
        for name in ("logits", "start_logits", "end_logits"):
            if name in theirs:
                torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=0)
    print("ok")
    """
)


@pytest.mark.slow
def test_llama_heads_from_a_hybrid_config_alone():
    """A fresh process: nothing registered the hybrid classes with the Auto classes beforehand. At conversion values
    (`mix = [0 | I]`) each head computes what the host head with the same weights computes."""
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
