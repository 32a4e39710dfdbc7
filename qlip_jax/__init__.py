"""qlip-jax: QLIP (prompt-adaptive activation precision for text-to-image diffusion) in JAX/Flax.

Packages: ``quant`` (traced-bit fake quantization, quantizer state, BitOPs, calibration),
``models`` (SD v1 UNet/VAE/CLIP in Flax and diffusers-format weight I/O), ``sampling`` (functional
schedulers and the jitted, schedule-driven text-to-image loop), ``data`` (procedural captioned scenes,
CLIP tokenizer), ``metrics`` (scene parser, alignment), ``training`` (checkpointing, pretraining steps).
"""

__version__ = "0.1.0"
