"""Helpers for building the reference (diffusers) side of parity tests. Test-only code."""

import torch


def perturb(module: torch.nn.Module, scale: float = 0.02, seed: int = 0) -> None:
    """Add small noise to every parameter so zero-initialised weights do not make paths trivially equal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


CORPUS = [
    "Comprehend and analyze the provided prompt.",
    "a large red circle in the center on a blue background",
    "a small green square in the top left corner and a large yellow triangle on the right on a black background",
    "make the red circle green", "remove the blue square", "change the background to white",
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships",
    "Picture 1: Picture 2: the user's text instruction should alter or modify the image.",
    "system user assistant",
]


def tiny_processor(patch_size: int = 16):
    """A Qwen-VL processor (image-only variant) with a small BPE tokenizer carrying Qwen's special tokens."""
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from qimg.models.conditioner import image_only
    from qimg.tiny.tokenizer import CHAT_TEMPLATE, qwen_tokenizer, train_bpe

    tok = qwen_tokenizer(*train_bpe(CORPUS, 400))
    merge = 2
    ip = Qwen2VLImageProcessorPil(patch_size=patch_size, temporal_patch_size=2, merge_size=merge,
                                  min_pixels=(patch_size * merge) ** 2, max_pixels=(patch_size * merge) ** 2 * 4096)
    return image_only(Qwen3VLProcessor)(image_processor=ip, tokenizer=tok, chat_template=CHAT_TEMPLATE)


def tiny_qwen3vl(tokenizer, hidden: int = 32, seed: int = 0):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [4, 2, 2], "mrope_interleaved": True},
                         pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                           num_position_embeddings=64, deepstack_visual_indexes=[1]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config).eval()


QWEN_SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 0.9, "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02,
                  "time_shift_type": "exponential"}


def build_reference_21(folder, *, vae_channels: int = 4, causal_condition: bool = True, seed: int = 0):
    """Save a tiny random `QwenImage21Pipeline` in the diffusers layout at `folder`; returns the pipeline."""
    import json
    from pathlib import Path

    import diffusers

    processor = tiny_processor()
    text_encoder = tiny_qwen3vl(processor.tokenizer, seed=seed)
    z = 16
    g = torch.Generator().manual_seed(seed)
    vae = diffusers.AutoencoderKLQwenImage21(
        base_dim=8, decoder_base_dim=12, z_dim=z, dim_mult=[1, 2, 4, 4, 4], num_res_blocks=1,
        temperal_downsample=[False, True, True, True], in_channels=vae_channels, out_channels=vae_channels,
        latents_mean=(0.3 * torch.randn(z, generator=g)).tolist(), latents_std=(1 + torch.rand(z, generator=g)).tolist())
    transformer = diffusers.QwenImage21Transformer2DModel(
        num_layers=2, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6), in_channels=z,
        out_channels=z, context_in_dim=32, causal_condition=causal_condition)
    for module in (vae, transformer):
        perturb(module, seed=seed)
    pipe = diffusers.QwenImage21Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), vae=vae.eval(),
        text_encoder=text_encoder, processor=processor, transformer=transformer.eval())
    pipe.save_pretrained(folder)
    # Name the processor as a real checkpoint does (the saved object is transformers' class minus its video part).
    index_path = Path(folder, "model_index.json")
    index = json.loads(index_path.read_text())
    index["processor"] = ["transformers", "Qwen3VLProcessor"]
    index_path.write_text(json.dumps(index, indent=2))
    return pipe
