"""Tiny random host models, for tests: any model type of the installed transformers, from one set of small sizes."""

from __future__ import annotations

import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from hybrid_hf import hybrid_layers
from hybrid_hf.tasks import model_classes

VOCAB = 99
SEQ = 24

#: small sizes every family understands (through its config's attribute map); families add their own below
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
#: a `_FAMILY` value that leaves a `TINY` (or `TOWER`) field out, for configs that refuse it (Funnel's layers come in
#: blocks)
OMIT = object()
#: multi-head latent attention (DeepSeek-V2/V3 and kin): the rotary embedding reads `head_dim`, the query's rope part;
#: as many key-value heads as query heads (the latent is expanded to every head)
_MLA = dict(head_dim=4, num_key_value_heads=4)
#: Mamba-2 mixers (Bamba, GraniteMoeHybrid): heads times their width equal to `mamba_expand` times `hidden_size`
_MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=8, mamba_d_state=16, mamba_chunk_size=16)
#: each of BLT's four transformers
_BLT_PART = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    hidden_size_global=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=8,
    max_position_embeddings=256,
)
#: encoder-decoders of the BART kind: both stacks small, with heads that divide `d_model`
_SEQ2SEQ = dict(
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
)

#: a tiny SAM image encoder (DeepSeek-OCR 2, Unlimited-OCR)
_SAM = dict(
    hidden_size=32,
    output_channels=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=64,
    patch_size=16,
    window_size=2,
    global_attn_indexes=[1],
    mlp_dim=64,
    downsample_channels=[32, 32],
)

#: per-family sizes beside `TINY`, after transformers' own model tests (their `ModelTester`s) or the family's config
#: defaults scaled down: layer kinds that make one tiny layer of each, sub-sizes that must agree with `TINY`'s
_FAMILY = {
    "gpt2": dict(bos_token_id=0, eos_token_id=0),
    "roberta": dict(pad_token_id=1),
    # multi-head latent attention
    "axk1": dict(_MLA, n_group=1, topk_group=1),
    "axk2": _MLA,
    "deepseek_v2": dict(_MLA, n_routed_experts=4, num_experts_per_tok=2),
    "deepseek_v3": _MLA,
    "deepseek_v32": _MLA,
    "glm4_moe_lite": _MLA,
    "glm_moe_dsa": _MLA,
    "longcat_flash": dict(_MLA, moe_topk=2),
    "youtu": _MLA,
    # linear-attention hybrids whose attention layers are latent attention
    "bailing_hybrid": dict(num_key_value_heads=4),
    "kimi_linear": dict(num_key_value_heads=4),
    # mixtures of experts whose routing sizes have no default or exceed `_shrink`'s
    "dots1": dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1),
    "ernie4_5_moe": dict(moe_k=2),
    # DBRX: its attention and experts configured apart (the experts' width copied from `d_model` before `hidden_size`
    # is mapped onto it); its attention reads `rope_theta` and clips query/key/value
    "dbrx": dict(
        d_model=32,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2),
    ),
    # attention interleaved with other layers: one tiny layer of each kind, attention included
    "bamba": dict(_MAMBA2, attn_layer_indices=[1]),
    "granitemoehybrid": dict(_MAMBA2, layer_types=["linear_attention", "full_attention"]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    # transformers 5.25: NVFP4 key/value rounding needs head_dim % 16 == 0; a sliding and an indexed layer
    "kolibri1_1": dict(
        head_dim=16, num_attention_heads=2, num_key_value_heads=1, sliding_window=8,
        layer_types=["sliding_attention", "indexed_attention"], index_layers=[1], kv_source_layers=[0, 1],
        mlp_only_layers=[0], mlp_only_intermediate_size=64, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, index_num_heads=2, index_topk=8, index_pool_size=64,
        index_num_local_tokens=4, index_num_sink_tokens=2, index_compression=4,
    ),  # fmt: skip
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"], lru_width=32),
    # Zamba shares one attention block between its hybrid layers: two of them
    "zamba": dict(num_hidden_layers=3, layers_block_type=["linear_attention", "hybrid", "hybrid"], mamba_d_state=16),
    "zamba2": dict(layers_block_type=["linear_attention", "hybrid"], mamba_d_state=16, adapter_rank=8),
    "gemma3n_text": dict(
        layer_types=["sliding_attention", "full_attention"],
        num_kv_shared_layers=0,
        activation_sparsity_pattern=[0.0, 0.0],
        vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=8,
        laurel_rank=8,
    ),
    # Cohere Compass's text model: rotary sliding layers (three M-RoPE sections), full layers without positions
    "cohere_compass_text": dict(
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
        rope_parameters={
            "sliding_attention": dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1]),
            "full_attention": None,
        },
    ),
    "qwen4_exp_text": dict(
        layer_types=["linear_attention", "indexed_attention"],
        linear_conv_kernel_dim=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        hc_count=2,
        hc_lowrank=8,
        ple_embed_dim=16,
        ple_conv_kernel_size=2,
        heads_per_ngram=2,
        ngram_vocab_size_base=31,
        make_ngram_vocab_size_divisible_by=8,
        split_ngram_parts=4,
        indexer_n_heads=2,
        indexer_kv_heads=1,
        indexer_head_dim=8,
        indexer_budget=4,
        indexer_compress_ratio=2,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=8,
    ),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=8),
    # pure state-space models
    "mamba2": dict(num_heads=8, n_groups=1, state_size=16, chunk_size=16),
    # xLSTM rounds its query/key width up to a multiple of 64, which must also be `hidden_size * qk_dim_factor`
    "xlstm": dict(hidden_size=128, embedding_dim=128, num_heads=4, chunk_size=8),
    # heads that must all be key-value heads
    "esmc": dict(num_key_value_heads=4),
    "dots3_note_text": dict(num_key_value_heads=4),
    # embeddings beside the token embedding, small
    "gemma4_text": dict(vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8),
    "luke": dict(entity_vocab_size=10, entity_emb_size=16),
    "roc_bert": dict(
        pronunciation_vocab_size=VOCAB, shape_vocab_size=VOCAB, pronunciation_embed_dim=16, shape_embed_dim=16
    ),
    "mobilebert": dict(embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16),
    "squeezebert": dict(embedding_size=32),
    "xmod": dict(default_language="en_XX"),
    "neomme": dict(head_dim=16),  # a quarter of it rotated on the full-attention layers: a multiple of 4
    "funnel": dict(num_hidden_layers=OMIT, block_sizes=[1, 1], d_head=8, n_head=4, d_inner=64),
    "xlnet": dict(max_position_embeddings=OMIT, d_head=8),
    "reformer": dict(
        attn_layers=["local", "lsh"],
        attention_head_size=8,
        axial_pos_shape=[4, 8],
        axial_pos_embds_dim=[16, 16],
        feed_forward_size=64,
        local_attn_chunk_length=4,
        lsh_attn_chunk_length=4,
        num_buckets=2,
    ),
    "perceiver": dict(
        d_latents=32,
        d_model=32,
        num_latents=8,
        num_self_attends_per_block=2,
        num_self_attention_heads=4,
        num_cross_attention_heads=4,
        max_position_embeddings=SEQ,
    ),
    # composite models: facts of their parts (`text_config` and `TOWER`-sized towers) where the defaults do not fit
    "gemma4_unified_text": dict(vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8),
    "gemma4_assistant": dict(
        text_config=dict(model_type="gemma4_text", hidden_size_per_layer_input=0, vocab_size_per_layer_input=0)
    ),
    "dots3_note": dict(
        vision_config=dict(mlp_layer_types=["dense", "dense"], adapter_in_dim=32, adapter_out_dim=32),
        audio_config=dict(adapter_input_size=32, adapter_out_dim=32, downsample_hidden_size=16, conv_output_size=64),
    ),
    "emu3": dict(
        vocabulary_map={"<image>": 97, "<|extra_200|>": 98},
        vq_config=dict(
            codebook_size=16, base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[]
        ),
    ),
    "gemma4_unified": dict(
        vision_config=dict(mm_embed_dim=32, mm_posemb_size=8, output_proj_dims=32),
    ),
    "chameleon": dict(
        vocabulary_map={"<image>": 97},
        vq_config=dict(
            num_embeddings=16, base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[]
        ),
    ),
    # Evolla: a protein encoder (a `TOWER`) read through a small resampler and aligner
    "evolla": dict(
        aligner_num_add_layers=1,
        resampler_depth=1,
        resampler_dim_head=8,
        resampler_heads=4,
        resampler_num_latents=4,
    ),
    # BLIP-2 and InstructBLIP: a `TOWER`-sized Q-Former with a tiny vocabulary of its own
    **dict.fromkeys(
        ("blip-2", "instructblip", "instructblipvideo"),
        dict(num_query_tokens=4, qformer_config=dict(vocab_size=VOCAB)),
    ),
    "janus": dict(
        vision_config=dict(projection_dim=32),
        vq_config=dict(
            num_embeddings=16,
            base_channels=32,
            channel_multiplier=[1, 1],
            num_res_blocks=1,
            latent_channels=32,
            projection_dim=32,
            image_token_embed_dim=32,
        ),
    ),
    "muse_glimmer": dict(out_hidden_size=32, projector_hidden_size=32),
    # Florence-2: a DaViT tower of two stages, its sizes one per stage
    "florence2": dict(
        vision_config=dict(
            depths=[1, 1],
            patch_size=[7, 3],
            patch_stride=[4, 2],
            patch_padding=[3, 1],
            patch_prenorm=[False, True],
            embed_dim=[16, 32],
            num_heads=[2, 4],
            num_groups=[2, 4],
            num_attention_heads=OMIT,  # heads per stage in `num_heads`
            hidden_size=OMIT,
            head_dim=OMIT,
            projection_dim=32,
            window_size=4,
        )
    ),
    # Mistral 4 and Mistral Large 4's text model: multi-head latent attention
    "mistral4": _MLA,
    "mistral_large4": dict(text_config=_MLA),
    # Unlimited-OCR: a SAM image encoder beside a CLIP-like one
    "unlimited_ocr": dict(
        text_config=dict(mlp_layer_types=["dense", "sparse"], num_experts_per_tok=2),
        vision_config=dict(
            sam_config=_SAM,
            encoder_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
            ),
        ),
    ),
    # DeepSeek-OCR 2: a SAM image encoder read by a small language-model encoder
    "deepseek_ocr2": dict(
        text_config=dict(mlp_layer_types=["dense", "sparse"], num_experts_per_tok=2),
        vision_config=dict(
            sam_config=_SAM,
            encoder_config=dict(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=256,
                layer_types=["full_attention", "full_attention"],
            ),
        ),
    ),
    # T5Gemma 2: an encoder (a Gemma 3 text model with a vision tower) and a decoder, each a tiny model of its own
    "t5gemma2": dict(encoder=dict(model_type="t5gemma2_encoder"), decoder=dict(model_type="t5gemma2_decoder")),
    # sizes of a tower or text model that must agree with the other parts
    # Apertus 1.5: image and audio codes follow each other inside the tiny vocabulary; its WavTokenizer has no
    # projection around the codes
    "apertus1p5": dict(
        image_token_offset=60,
        audio_token_offset=76,
        vision_config=dict(
            codebook_size=16,
            latent_channels=32,
            base_channels=32,
            channel_multiplier=[1, 1],
            num_res_blocks=1,
            attn_resolutions=[],
            spatial_scale_factor=2,
        ),
        audio_config=dict(codebook_dim=32, codebook_size=16),
    ),
    **dict.fromkeys(("inkling2", "inkling2_loop"), dict(vision_config=dict(text_hidden_size=32))),
    "ovis2_5": dict(vision_config=dict(vocab_size=256)),  # its visual vocabulary (transformers 5.25)
    "glm5_next": dict(text_config=dict(num_key_value_heads=4, qk_rope_head_dim=0)),  # DSA layers: no rotary part
    "diffusion_gemma": dict(text_config=dict(num_experts=4, top_k_experts=2, moe_intermediate_size=16)),
    "muse_spark": dict(
        out_hidden_size=32,
        projector_hidden_size=32,
        text_config=dict(moe_hidden_size=64),
        audio_config=dict(num_hidden_layers=4, hidden_sizes=[8, 16, 32, 32], depths=[1, 1, 1, 1]),  # one per stage
    ),
    "molmo2": dict(
        vision_config=dict(image_size=[32, 32]),
        adapter_config=dict(
            vision_feature_layer=[-1, -2],
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=8,
            intermediate_size=64,
            text_hidden_size=32,
        ),
    ),
    "nemotron_h_omni": dict(
        projector_hidden_size=32,
        vision_hidden_size=32,
        vision_config=dict(video_temporal_patch_size=2, max_img_size=64),
        audio_config=dict(projection_hidden_size=32, projection_bias=False),
    ),
    "step3p7": dict(text_config=dict(sliding_window=8)),
    # ERNIE 4.5 VL: M-RoPE sections (height, width, temporal) over half the tiny head
    "ernie4_5_vl_moe": dict(
        text_config=dict(
            moe_k=2, rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2])
        )
    ),
    "granite4_vision": dict(
        downsample_rate="1/2",
        deepstack_layer_map=[[0, 0], [1, 1]],
        spatial_target_layers=[0, 1, 0, 1],
        vision_config=dict(hidden_size=64),  # its Q-Former has one head per 64 of the tower's width
    ),
    # M-RoPE sections (temporal, height, width) over half the tiny rotated head
    **dict.fromkeys(
        ("cosmos3_edge", "paddleocr_vl", "hunyuan_vl", "qwen2_vl", "qwen2_5_vl"),
        dict(text_config=dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1]))),
    ),
    # the Omni thinkers' generation reads the vision start token, which their configs leave unset
    "qwen2_5_omni_thinker": dict(
        vision_start_token_id=96,
        text_config=dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1])),
    ),
    "qwen3_omni_moe_thinker": dict(vision_start_token_id=96),
    "hy_v4_vl": dict(
        text_config=dict(
            qk_rope_head_dim=8, rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1])
        )
    ),
    # GLM-4V and kin: three M-RoPE sections (temporal, height, width) over half the rotated head
    **dict.fromkeys(
        ("glm4v", "glm46v", "glm_ocr", "glmga"),
        dict(text_config=dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1]))),
    ),
    "glm4v_moe": dict(
        text_config=dict(
            head_dim=16,
            rope_parameters=dict(
                rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5, mrope_section=[2, 1, 1]
            ),
        )
    ),
    # BLT: a byte-level model of four small transformers (patcher, local encoder and decoder, global)
    "blt": dict(
        encoder_hash_byte_group_size=[3, 4],
        encoder_hash_byte_group_vocab=VOCAB,
        **dict.fromkeys(("patcher_config", "encoder_config", "decoder_config", "global_config"), _BLT_PART),
    ),
    # encoder-decoders
    **dict.fromkeys(
        ("bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "mbart", "mvp", "pegasus", "plbart"),
        _SEQ2SEQ,
    ),
    # T5 and kin: `num_hidden_layers` sets the encoder's layers, the decoder's are apart
    **dict.fromkeys(("t5", "mt5", "umt5", "longt5", "switch_transformers"), dict(num_decoder_layers=2)),
    # special token ids of their own, inside the tiny vocabulary
    "marian": dict(_SEQ2SEQ, decoder_start_token_id=0),
    "whisper": dict(
        _SEQ2SEQ,
        num_mel_bins=8,
        max_source_positions=SEQ,
        max_target_positions=256,
        decoder_start_token_id=3,
        begin_suppress_tokens=None,
    ),
    "prophetnet": dict(
        num_hidden_layers=OMIT,
        num_encoder_layers=2,
        num_decoder_layers=2,
        num_encoder_attention_heads=4,
        num_decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
    ),
}

#: the families the detailed tests run on: (model_type, tasks)
FAMILIES = {
    "llama": ("causal_lm", "base"),
    "mistral": ("causal_lm", "base"),
    "qwen2": ("causal_lm", "base"),
    "qwen3": ("causal_lm", "base"),
    "gpt2": ("causal_lm", "base"),
    "bert": ("base", "masked_lm", "sequence_classification"),
    "roberta": ("base", "masked_lm", "sequence_classification"),
}
ALL_CLASSES = [(model_type, task) for model_type, tasks in FAMILIES.items() for task in tasks]
DECODERS = [name for name, tasks in FAMILIES.items() if "causal_lm" in tasks]
ENCODERS = [name for name, tasks in FAMILIES.items() if "causal_lm" not in tasks]


#: the parts of a composite model beside its text model, built small: the text-only checks never run them
TOWER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    depth=2,
    num_attention_heads=4,
    num_heads=4,
    num_key_value_heads=4,
    head_dim=8,
    embed_dim=32,
    out_hidden_size=32,
    image_size=32,
    patch_size=8,
)
#: the sub-configs `TOWER` sizes: a composite's vision towers, audio tower, image tokenizer, protein encoder, Q-Former
_TOWERS = (
    "vision_config",
    "high_res_vision_config",
    "audio_config",
    "vq_config",
    "protein_encoder_config",
    "qformer_config",
)


def _tiny_parts(config_class, fields: dict) -> dict:
    """The sub-configs of a composite family, tiny: its text config from the text family's own tiny config (with the
    family's `text_config` facts), a part the family names with a `model_type` from that family's tiny config, its
    towers from `TOWER` (with the family's facts for each)."""
    parts = {}
    for name in getattr(config_class, "sub_configs", None) or {}:
        given = fields.get(name)
        if given is not None and not isinstance(given, dict):
            continue  # a config object, used as it is
        if name == "text_config":
            given = dict(given or {})
            parts[name] = tiny_config(given.pop("model_type", None) or _text_model_type(config_class), **given)
        elif given is not None and "model_type" in given:  # a whole model of its own (T5Gemma 2's encoder and decoder)
            given = dict(given)
            parts[name] = tiny_config(given.pop("model_type"), **given)
        elif name in _TOWERS:
            parts[name] = {key: value for key, value in {**TOWER, **(given or {})}.items() if value is not OMIT}
    return parts


def _defaults(config_class) -> dict:
    """The family's default config as a dict; empty for a config that does not build from its defaults alone."""
    try:
        return config_class().to_dict()
    except Exception:  # an assistant model's config wants its target's text config
        return {}


def _text_model_type(config_class) -> str:
    spec = config_class.sub_configs["text_config"]
    return getattr(spec, "model_type", "") or config_class().text_config.model_type


#: multi-head latent attention (DeepSeek-V2/V3 and kin): query/key halves and the value width, small and consistent
_LATENT = dict(qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, kv_lora_rank=16, q_lora_rank=16)


def _is_attention_kind(layer_type) -> bool:
    """Whether a `layer_types` entry is softmax attention (full, sliding, chunked), not linear attention."""
    return "attention" in str(layer_type) and "linear" not in str(layer_type)


def tiny_config(model_type: str, **overrides):
    """The family's config at the `TINY` sizes, with its `_FAMILY` facts and `overrides`; a composite model's text
    config is the tiny config of its text family and its other parts (vision, audio) are `TOWER`-sized."""
    config_class = CONFIG_MAPPING[model_type]
    fields = {**TINY, **_FAMILY.get(model_type, {}), **overrides}
    fields = {name: value for name, value in fields.items() if value is not OMIT}
    fields.update(_tiny_parts(config_class, fields))
    if "qk_rope_head_dim" in _defaults(config_class):
        fields = {**_LATENT, **fields}
    try:
        config = config_class(**fields)
    except AttributeError:  # a config whose head_dim is computed, not set (Falcon)
        fields.pop("head_dim")
        config = config_class(**fields)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and "layer_types" not in overrides and not any(map(_is_attention_kind, types)):
        # A family that interleaves attention with other layers (LFM's convolutions) and starts with those: one layer
        # of each of its kinds, in its own order, so that the tiny model has attention to convert.
        kinds = list(dict.fromkeys(config_class().layer_types))
        if any(map(_is_attention_kind, kinds)):
            config = config_class(**{**fields, "num_hidden_layers": len(kinds), "layer_types": kinds})
    return _shrink(config, overrides)


def _shrink(config, keep):
    """Size fields that families name their own way (experts, their widths, extra layers) set small too."""
    for name, value in vars(config).items():
        if name in keep or isinstance(value, bool) or not isinstance(value, int):
            continue
        if any(word in name for word in ("intermediate", "ffn_dim", "d_ff", "inner")) and value > 64:
            setattr(config, name, 64)
        elif "expert" in name and value > 4 and not any(word in name for word in ("per_tok", "top", "group")):
            setattr(config, name, 4)
        elif "expert" in name and value > 2 and any(word in name for word in ("per_tok", "top")):
            setattr(config, name, 2)
        elif name == "rotary_dim" and value > 8:  # at most the head size (GPT-J, CodeGen)
            setattr(config, name, 8)
    return config


def tiny_host(model_type: str, task: str | None = None, seed: int = 0, **overrides):
    """A random host model in eval mode; `task` defaults to the causal LM of a decoder family, else the base model."""
    classes = model_classes(model_type)
    task = task or ("causal_lm" if "causal_lm" in classes and "masked_lm" not in classes else "base")
    torch.manual_seed(seed)
    model = getattr(transformers, classes[task])(tiny_config(model_type, **overrides))
    return model.eval()


def tiny_llama(layers: int = 2, seed: int = 0):
    """A random Llama causal LM in eval mode, of the `TINY` sizes with `layers` layers, whose special token ids are
    those of `word_tokenizer` (and of the tokenizers trained in `test_training`): <pad> 1, <s> 2, </s> 3."""
    return tiny_host("llama", seed=seed, num_hidden_layers=layers, pad_token_id=1, bos_token_id=2, eos_token_id=3)


def perturb(model, seed: int = 1, scale: float = 0.3) -> None:
    """Move the hybrid parameters off their conversion values, so the local branch and the span matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in hybrid_layers(model):
            for param in (layer.mix.weight, layer.span_predictor.proj.weight):
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def batch(model_type: str, batch_size: int = 2, length: int = SEQ, padding: str | None = None, seed: int = 0):
    """`(input_ids, attention_mask)` with the second row padded on the left or right by 5 tokens."""
    generator = torch.Generator().manual_seed(seed)
    low = 3 if model_type == "roberta" else 1  # RoBERTa's positions depend on pad_token_id=1
    input_ids = torch.randint(low, VOCAB, (batch_size, length), generator=generator)
    mask = torch.ones_like(input_ids)
    if padding == "left":
        mask[-1, :5] = 0
    elif padding == "right":
        mask[-1, -5:] = 0
    pad_id = 1 if model_type == "roberta" else 0
    input_ids = input_ids.masked_fill(mask == 0, pad_id)
    return input_ids, mask


def outputs_of(model, input_ids, attention_mask=None) -> torch.Tensor:
    """The model's main output tensor: logits for heads, last hidden state for base models."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return out.logits if "logits" in out else out.last_hidden_state


#: words of `TEXT` and of `word_tokenizer`
WORDS = "the cat sat on a mat and dog ran in park king queen play act scene night day old young".split()
#: a repetitive training text for tiny models (a few hundred tokens)
TEXT = " .\n".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(8)) for i in range(60)) + " .\n"


def word_tokenizer():
    """A word-level tokenizer of `WORDS`, built offline (ids below `VOCAB`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3, ".": 4, **{w: i + 5 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
