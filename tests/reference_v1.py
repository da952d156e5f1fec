"""Builders of tiny random reference (diffusers) Qwen-Image v1 pipelines, saved in the diffusers layout. Test-only code.

One set of components (tokenizer, processor, Qwen2.5-VL, RGB VAE, transformer) serves the t2i, Edit and Edit-Plus
folders; Layered has its own RGBA VAE and Layer3D transformer. Every folder is written by `save_pretrained` and
its model_index names transformers' processor class (the saved object is that class minus its video part).
"""

import json
from pathlib import Path

import torch

from tests.reference import CORPUS, QWEN_SCHEDULER, perturb

Z = 8  # latent channels: not 4, or the Layered reference mistakes an RGBA image for latents
TEXT_HIDDEN = 32
T2I_SYSTEM = ("Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships "
              "of the objects and background:")
EDIT_SYSTEM = ("Describe the key features of the input image (color, shape, size, texture, objects, background), then "
               "explain how the user's text instruction should alter or modify the image. Generate a new image that "
               "meets the user's requirements while maintaining consistency with the original input where appropriate.")
V1_CORPUS = CORPUS + [T2I_SYSTEM, EDIT_SYSTEM, "You are a helpful assistant. Image Annotator write an image caption",
                      "Picture 1: Picture 2: Picture 3:"]
LAYERED_SCHEDULER = {**QWEN_SCHEDULER, "time_shift_type": "linear", "shift_terminal": None}


def tiny_v1_processor():
    """Qwen2-VL processor (image-only variant, patch 14) around a small BPE tokenizer with Qwen's specials."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from qimg.models.conditioner import image_only
    from qimg.tiny.tokenizer import CHAT_TEMPLATE, qwen_tokenizer, train_bpe

    tok = qwen_tokenizer(*train_bpe(V1_CORPUS, 500))
    patch, merge = 14, 2
    ip = Qwen2VLImageProcessorPil(patch_size=patch, temporal_patch_size=2, merge_size=merge,
                                  min_pixels=(patch * merge) ** 2, max_pixels=(patch * merge) ** 2 * 1024)
    return image_only(Qwen2VLProcessor)(image_processor=ip, tokenizer=tok, chat_template=CHAT_TEMPLATE)


def tiny_qwen25vl(tokenizer, hidden: int = TEXT_HIDDEN, seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         pad_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>")),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    perturb(model, scale=0.05, seed=seed)
    return model


def _vae(channels: int, seed: int):
    import diffusers

    g = torch.Generator().manual_seed(seed + channels)
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLQwenImage(
        base_dim=8, z_dim=Z, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True],
        input_channels=channels, latents_mean=(0.3 * torch.randn(Z, generator=g)).tolist(),
        latents_std=(1 + torch.rand(Z, generator=g)).tolist())
    perturb(vae, seed=seed)
    return vae.eval()


def _transformer(seed: int, **flags):
    import diffusers

    torch.manual_seed(seed)
    model = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * Z, out_channels=Z, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(4, 6, 6), **flags)
    perturb(model, seed=seed)
    return model.eval()


def v1_parts(seed: int = 0) -> dict:
    processor = tiny_v1_processor()
    return {"processor": processor, "tokenizer": processor.tokenizer,
            "text_encoder": tiny_qwen25vl(processor.tokenizer, seed=seed), "vae": _vae(3, seed),
            "transformer": _transformer(seed)}


def _save(pipe, folder, processor: bool):
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    if processor:
        index_path = Path(folder, "model_index.json")
        index = json.loads(index_path.read_text())
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
        index_path.write_text(json.dumps(index, indent=2))
    return pipe


def build_t2i(folder, parts: dict):
    import diffusers

    pipe = diffusers.QwenImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), vae=parts["vae"],
        text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], transformer=parts["transformer"])
    return _save(pipe, folder, processor=False)


def build_edit(folder, parts: dict, *, plus: bool, zero_cond_t: bool = False):
    import diffusers

    transformer = parts["transformer"]
    if zero_cond_t:  # same weights, the Edit-2511 flag on
        transformer = _transformer(0, zero_cond_t=True)
        transformer.load_state_dict(parts["transformer"].state_dict())
    cls = diffusers.QwenImageEditPlusPipeline if plus else diffusers.QwenImageEditPipeline
    pipe = cls(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), vae=parts["vae"],
               text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], processor=parts["processor"],
               transformer=transformer)
    return _save(pipe, folder, processor=True)


def build_layered(folder, parts: dict, seed: int = 0):
    """Layered: shares the tokenizer/processor/VLM with `parts`; its own RGBA VAE and Layer3D transformer."""
    import diffusers

    # Captioning generates up to 512 tokens; every token ending the caption keeps it at one token (both sides read
    # the saved generation config, so the comparison is unchanged).
    parts["text_encoder"].generation_config.eos_token_id = list(range(len(parts["tokenizer"])))
    pipe = diffusers.QwenImageLayeredPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**LAYERED_SCHEDULER), vae=_vae(4, seed + 1),
        text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], processor=parts["processor"],
        transformer=_transformer(seed + 1, use_additional_t_cond=True, use_layer3d_rope=True))
    return _save(pipe, folder, processor=True)
