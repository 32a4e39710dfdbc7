"""qlip-jax: QLIP (prompt-adaptive activation precision for text-to-image diffusion) in JAX/Flax.

Packages, lowest layer first (``tests/test_layers.py`` keeps imports pointing down):
``quant`` (the core: traced-bit fake quantization, quantized layers, quantizer state, registry, BitOPs,
integer weight codes), ``data`` (data sources: prompt files, reference images, the procedural scenes; CLIP
tokenizer), ``models`` (SD UNet/VAE/CLIP in Flax, diffusers-format weight I/O), ``sampling`` (functional
schedulers, the jitted schedule-driven text-to-image loop, the PTQD correction it applies),
``training`` (checkpointing, pretraining steps), ``metrics`` (FID/sFID, GIQA, CLIP score, scene parser),
``ptq`` (the PTQ methods that run the model: calibration, Q-Diffusion reconstruction, PTQD estimation,
the saved quantizer folder), ``selector`` (T2Q/Q2B), then ``evaluation``, ``programs`` and ``cli``.
"""

__version__ = "0.1.0"
