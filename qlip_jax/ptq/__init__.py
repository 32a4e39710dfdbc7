"""PTQ methods: they run the model (and its sampler) to fit a quantizer of the core (:mod:`qlip_jax.quant`).

``calibration`` (min-max, MSE/percentile clipping, TDQ-style per-step ranges; calibration data from the
sampler), ``reconstruction`` (Q-Diffusion's block-wise AdaRound/LSQ), ``ptqd`` (PTQD's correction tables,
applied at sampling time by :mod:`qlip_jax.sampling.correction`), ``persist`` (a quantizer folder on disk).
"""
