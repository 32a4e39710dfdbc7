"""The QLIP selector: T2Q (text -> predicted quality), Q2B (quality -> per-layer, per-step bits) and
schedule export/import."""

from qlip_jax.selector.q2b import (
    Q2B, Q2BConfig, bit_penalty, hard_indices, q2b_probs, select_schedule, step_groups, ste_onehot,
)
from qlip_jax.selector.schedule_io import (
    dumps_schedule, load_schedule_json, load_schedule_npy, save_schedule_json, save_schedule_npy,
    schedule_from_json, schedule_to_json,
)
from qlip_jax.selector.t2q import T2Q, average_ranks, pearson, spearman, t2q_loss

__all__ = [
    "Q2B", "Q2BConfig", "T2Q", "average_ranks", "bit_penalty", "dumps_schedule", "hard_indices",
    "load_schedule_json", "load_schedule_npy", "pearson", "q2b_probs", "save_schedule_json",
    "save_schedule_npy", "schedule_from_json", "schedule_to_json", "select_schedule", "spearman",
    "step_groups", "ste_onehot", "t2q_loss",
]
