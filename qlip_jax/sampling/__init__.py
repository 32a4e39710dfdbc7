"""Sampling: functional schedulers (and, in :mod:`qlip_jax.sampling.pipeline`, the jitted sampler).

Only the scheduler names are re-exported here: ``qlip_jax.models.sd`` imports
``qlip_jax.sampling.schedulers`` and the pipeline imports ``qlip_jax.models.sd``, so importing the
pipeline from this ``__init__`` would be circular.
"""

from qlip_jax.sampling.schedulers import (
    KINDS,
    DDIMCoeffs,
    DDIMState,
    DPMSolverCoeffs,
    DPMSolverState,
    PLMSCoeffs,
    PLMSState,
    Scheduler,
    SchedulerConfig,
    add_noise,
    ddim_update,
    init_state,
    make_alphas_cumprod,
    make_betas,
    make_scheduler,
    step,
    velocity,
)

__all__ = [
    "KINDS", "DDIMCoeffs", "DDIMState", "DPMSolverCoeffs", "DPMSolverState", "PLMSCoeffs", "PLMSState",
    "Scheduler", "SchedulerConfig", "add_noise", "ddim_update", "init_state", "make_alphas_cumprod",
    "make_betas", "make_scheduler", "step", "velocity",
]
