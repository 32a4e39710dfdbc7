"""Model configs as data: the miniature Stable Diffusion trained and shipped by this project.

Each preset is the set of config.json dicts (diffusers/transformers field names) of the four parts,
so it builds through exactly the same code path as a real SD v1 folder.

``mini-sd`` (64x64 RGB images, 8x8x4 latents): the SD v1 architecture scaled down. VAE with four
levels (factor 8) like SD's; UNet with cross-attention down/up blocks, an attention mid block and a
plain block at the lowest resolution, like SD's (three levels instead of four); a 4-layer CLIP text
transformer over the real CLIP BPE vocabulary (77 tokens).

``mini-sd-s``: ``mini-sd`` with the UNet and the text encoder at half width (same VAE, so latents and a
trained VAE carry over), about a quarter of a diffusion training step's FLOPs (8.8 against 32.4 GFLOP
at batch 32, ``benchmarks/training.py``); made for issue #4's 90-minute training budget (README).

``mini-sd-m``: ``mini-sd-s`` with the UNet at three quarters of ``mini-sd``'s width (48-96-96 channels;
same text encoder and VAE): 14.3 GFLOP a step at batch 32, 1.25 times ``mini-sd-s``'s time here
(``benchmarks/training.py``), to test whether ``mini-sd-s``'s plateau is the UNet's capacity (README #4).

``mini-sd-t``: ``mini-sd-s``'s UNet widths with ``mini-sd``'s full text encoder (cross-attention over
128-wide text states): 19.0 GFLOP a step at batch 32, 1.34 times ``mini-sd-s``'s time here, to test
whether the plateau is the text encoder's capacity (README #4).

``tiny`` is for tests: the same structure at the smallest widths that still exercise every code path.
"""

from __future__ import annotations

import copy

_SCHEDULER = {  # Stable Diffusion v1's scheduler_config.json (PNDM/PLMS, scaled-linear betas)
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "set_alpha_to_one": False,
    "steps_offset": 1, "skip_prk_steps": True, "clip_sample": False, "timestep_spacing": "leading",
}

PRESETS = {
    "mini-sd": {
        "vae": {
            "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 64,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [16, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8,
            "scaling_factor": 1.0,  # replaced by 1 / std of the training latents after VAE training
        },
        "unet": {
            "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
            "block_out_channels": [64, 128, 128],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 128, "attention_head_dim": 4, "norm_num_groups": 16,
        },
        "text_encoder": {
            "vocab_size": 49408, "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
            "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
            "projection_dim": 128, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
        },
        "scheduler": _SCHEDULER,
    },
    "tiny": {
        "vae": {
            "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 32,
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
            "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
            "scaling_factor": 1.0,
        },
        "unet": {
            "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
            "block_out_channels": [16, 32],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 16, "attention_head_dim": 2, "norm_num_groups": 8,
        },
        "text_encoder": {
            "vocab_size": 49408, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
            "projection_dim": 16, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
        },
        "scheduler": _SCHEDULER,
    },
}


def _variant(base: str, **overrides: dict) -> dict:
    """A copy of preset ``base`` with some fields of some parts replaced: ``unet={...}`` etc."""
    d = copy.deepcopy(PRESETS[base])
    for part, fields in overrides.items():
        unknown = set(fields) - set(d[part])
        if unknown:
            raise ValueError(f"preset '{base}' has no {part} field(s) {sorted(unknown)}")
        d[part].update(fields)
    return d


PRESETS["mini-sd-s"] = _variant(
    "mini-sd",
    unet={"block_out_channels": [32, 64, 64], "cross_attention_dim": 64, "attention_head_dim": 2,
          "norm_num_groups": 8},
    text_encoder={"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2, "projection_dim": 64},
)

PRESETS["mini-sd-m"] = _variant(
    "mini-sd-s",
    unet={"block_out_channels": [48, 96, 96]},
)

PRESETS["mini-sd-t"] = _variant(
    "mini-sd",
    unet={"block_out_channels": [32, 64, 64], "attention_head_dim": 2, "norm_num_groups": 8},
)


def preset(name: str) -> dict:
    """A deep copy of a preset's config dicts: ``{'vae', 'unet', 'text_encoder', 'scheduler'}``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; available: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
