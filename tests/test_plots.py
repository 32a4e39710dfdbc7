import numpy as np
from PIL import Image

from qlip_jax.plots import heatmap, scatter
from qlip_jax.quant.groups import group_indices, layer_group, step_groups


def test_heatmap_colours_follow_values(tmp_path):
    values = np.array([[0.0, 1.0], [0.5, 0.25]])
    path = heatmap(str(tmp_path / "h.png"), values, ["a", "b"], ["0", "1"], "t", cell=20)
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    left = 8 + 6 * 1
    centre = lambda i, j: img[24 + i * 20 + 10, left + j * 20 + 10]
    # the viridis ramp: low end dark purple (blue > red), high end yellow (red, green high; blue low)
    lo, hi = centre(0, 0), centre(0, 1)
    assert lo[2] > lo[1] and hi[0] > 200 and hi[1] > 200 and hi[2] < 100
    assert centre(1, 0).sum() != centre(1, 1).sum()


def test_scatter_writes_png(tmp_path):
    path = scatter(str(tmp_path / "s.png"), {"a": (np.arange(5), np.arange(5) ** 2), "b": ([1, 2], [3, 1])},
                   "x", "y", "title", lines=True)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (360, 480, 3) and (img != 255).any()


def test_layer_groups():
    names = ["conv_in", "down_blocks.0.resnets.0.conv1",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
             "down_blocks.0.attentions.0.proj_in", "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
             "up_blocks.2.upsamplers.0.conv", "conv_out"]
    assert [layer_group(n) for n in names] == ["conv_in", "down0/res", "down0/cross", "down0/self", "down0/self",
                                               "mid/ff", "up2/res", "conv_out"]
    g = group_indices(names)
    assert g["down0/self"].tolist() == [3, 4] and list(g)[0] == "conv_in"
    parts = step_groups(26, 5)
    assert sum(len(p) for p in parts) == 26 and parts[0][0] == 0 and parts[-1][-1] == 25
