"""Layer groups of a UNet registry, for sensitivity studies and schedule heatmaps.

A group is a block (``down_blocks.1``, ``mid_block``, ``up_blocks.2``, or a top-level layer such as
``conv_in``) and a role inside it: ``res`` (resnet convs, time projections, shortcuts, resamplers),
``self`` (self-attention and the transformer's in/out projections), ``cross`` (cross-attention, the
only layers that read the text), ``ff`` (the GEGLU feed-forward).
"""

from __future__ import annotations

import numpy as np


def layer_group(name: str) -> str:
    """Group label of a registry name, e.g. ``'up_blocks.1.attentions.0...attn2.to_k'`` -> ``'up1/cross'``."""
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        block = f"{parts[0].split('_')[0]}{parts[1]}"
    elif parts[0] == "mid_block":
        block = "mid"
    else:
        return parts[0]
    if ".attn2." in name:
        role = "cross"
    elif ".ff." in name:
        role = "ff"
    elif ".attentions." in name:
        role = "self"
    else:
        role = "res"
    return f"{block}/{role}"


def group_indices(names) -> dict[str, np.ndarray]:
    """``{group: int [n] registry positions}`` in first-appearance order."""
    out: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        out.setdefault(layer_group(n), []).append(i)
    return {g: np.asarray(v) for g, v in out.items()}


def step_groups(num_steps: int, num_groups: int) -> list[np.ndarray]:
    """Consecutive step index ranges splitting ``num_steps`` into ``num_groups`` near-equal parts."""
    return [a for a in np.array_split(np.arange(num_steps), min(num_groups, num_steps))]
