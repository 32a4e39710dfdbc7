"""Training utilities shared by the pretraining, calibration and selector programs."""

from qlip_jax.training.checkpoint import Checkpointer, ema_update

__all__ = ["Checkpointer", "ema_update"]
