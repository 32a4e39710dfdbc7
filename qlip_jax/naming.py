"""Parameter naming shared by weight I/O and the quantizer registry.

Our Flax modules are named so that a module path maps one-to-one onto the PyTorch (diffusers /
transformers) parameter path: list members are Flax's automatic ``name_N`` for a list attribute
``name`` assigned in ``setup``, and become ``name.N`` in PyTorch. Only the list attributes below are
rewritten, so names such as ``linear_1`` (a plain attribute in diffusers) stay as they are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

#: Attributes that are ``nn.ModuleList``/``nn.Sequential`` in the PyTorch models.
LIST_ATTRIBUTES = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers",
    "upsamplers", "layers", "to_out", "net",
})

_LIST_MEMBER = re.compile(r"^(?P<attr>[A-Za-z_]+?)_(?P<idx>\d+)$")


def flax_to_torch_path(path: Sequence[str]) -> str:
    """``('down_blocks_0', 'resnets_1', 'conv1')`` -> ``'down_blocks.0.resnets.1.conv1'``."""
    parts = []
    for seg in path:
        m = _LIST_MEMBER.match(seg)
        if m and m.group("attr") in LIST_ATTRIBUTES:
            parts += [m.group("attr"), m.group("idx")]
        else:
            parts.append(seg)
    return ".".join(parts)


def modules_by_name(tree: dict) -> dict[str, dict]:
    """Every sub-dict of a nested Flax tree, keyed by its PyTorch module path.

    ``{'down_blocks_0': {'resnets_0': {'conv1': {...}}}}`` -> ``{'down_blocks.0': ...,
    'down_blocks.0.resnets.0': ..., 'down_blocks.0.resnets.0.conv1': {...}}``.
    """
    out: dict[str, dict] = {}

    def walk(node, path):
        for key, value in node.items():
            if isinstance(value, dict):
                sub = path + (key,)
                out[flax_to_torch_path(sub)] = value
                walk(value, sub)

    walk(tree, ())
    return out
