"""experiments/figures.py: a grid's size and tile positions, a layout's box drawn where the box is, and a
loss-curve PNG."""
import numpy as np
from PIL import Image

import data
from experiments import figures


def test_image_grid_places_tiles_by_hand():
    tiles = [Image.new("RGB", (4, 3), (10 * k, 0, 0)) for k in range(5)]
    g = data.image_grid(tiles, ncol=2, pad=1)
    assert g.size == (2 * (4 + 1) + 1, 3 * (3 + 1) + 1)                   # 3 rows of 2
    a = np.asarray(g)
    assert tuple(a[1, 1]) == (0, 0, 0) and tuple(a[1, 6]) == (10, 0, 0)  # tiles 0 and 1 on row 0
    # tile 4, then the fill
    assert tuple(a[9, 1]) == (40, 0, 0) and tuple(a[9, 6]) == (255, 255, 255)


def test_draw_layout_outlines_the_box_at_its_pixels():
    im = np.zeros((8, 8, 3), np.uint8)
    out = np.asarray(data.draw_layout(im, [[0.25, 0.25, 0.75, 0.75]], [0], ["c"], difficulty=[2],
                                      scale=2))
    assert out.shape == (16, 16, 3)
    red = (out == (255, 0, 0)).all(-1)                                    # [hard]: red
    assert red[4, 4:12].all() and red[11, 4:12].all() and red[4:12, 4].all() and red[4:12, 11].all()
    assert not red[:4].any() and not red[12:].any()


def test_loss_curve_writes_a_png(tmp_path):
    figures.loss_curve({"loss": ([1, 2, 3], [1.0, 0.5, 0.25])}, tmp_path / "l.png")
    assert Image.open(tmp_path / "l.png").size == (720, 400)
