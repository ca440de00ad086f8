"""The pictures: a layout drawn on its image, grids of them, and loss curves (PIL only; matplotlib is not a
runtime dependency). Every figure the project writes (grids, loss curves, the easy/hard comparisons) is made
from these.

    python data.py show --data shapes             # docs/shapes_grid.png: 16 layouts drawn on their images
"""
import math

import numpy as np
from PIL import Image, ImageDraw


PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


DIFFICULTY_COLOURS = {1: (0, 220, 0), 2: (255, 0, 0)}  # [easy] green, [hard] red


def draw_layout(image, boxes, labels, class_names, difficulty=None, scale=4):
    """uint8 (H, W, 3) image + boxes in [0, 1] -> PIL image enlarged `scale` times with boxes and names.
    Colour is per class, or green/red for [easy]/[hard] when difficulty is given."""
    im = Image.fromarray(np.asarray(image)).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    d = ImageDraw.Draw(im)
    W, H = im.size
    for k, (box, c) in enumerate(zip(np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(labels).reshape(-1))):
        code = int(difficulty[k]) if difficulty is not None else 0
        colour = DIFFICULTY_COLOURS.get(code, PALETTE[int(c) % len(PALETTE)])
        x0, y0, x1, y1 = box * [W, H, W, H]
        d.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=1)
        d.text((x0 + 2, y0 + 1), class_names[int(c)][:6], fill=colour)
    return im


def image_grid(images, ncol=4, pad=2, fill=(255, 255, 255)):
    """List of equally sized PIL images -> one grid image."""
    w, h = images[0].size
    nrow = math.ceil(len(images) / ncol)
    grid = Image.new("RGB", (ncol * (w + pad) + pad, nrow * (h + pad) + pad), fill)
    for i, im in enumerate(images):
        grid.paste(im, (pad + (i % ncol) * (w + pad), pad + (i // ncol) * (h + pad)))
    return grid


def loss_curve(curves, path, title="training loss", smooth=0.95):
    """A PNG of one or more loss curves {name: (steps, values)} against step, log-y: the raw values light, an
    exponential moving average dark, one colour per curve."""
    W, H, L, R, T, B = 720, 400, 60, 150, 30, 40
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.text((L, 8), title, fill="black")
    curves = {k: (np.asarray(s, np.float64), np.log10(np.clip(np.asarray(v, np.float64), 1e-6, None)))
              for k, (s, v) in curves.items() if len(s) >= 2}
    if curves:
        lo = min(v.min() for _, v in curves.values())
        hi = max(v.max() for _, v in curves.values()) + 1e-9
        s0 = min(s[0] for s, _ in curves.values())
        s1 = max(s[-1] for s, _ in curves.values()) + 1e-9

        def px(s, v):
            return L + (s - s0) / (s1 - s0) * (W - L - R), T + (hi - v) / (hi - lo) * (H - T - B)
        colours = [(20, 60, 160), (200, 60, 20), (20, 140, 60), (140, 40, 160), (120, 120, 120)]
        for k, ((st, v), c) in enumerate(zip(curves.items(), colours)):
            steps, y = v
            ema, e = [], y[0]
            for val in y:
                e = smooth * e + (1 - smooth) * val
                ema.append(e)
            d.line([px(a, b) for a, b in zip(steps, y)], fill=tuple(255 - (255 - ch) // 3 for ch in c))
            d.line([px(a, b) for a, b in zip(steps, ema)], fill=c, width=2)
            d.text((W - R + 10, T + 16 * k), f"{st} ({10 ** ema[-1]:.3g})", fill=c)
        for v in np.linspace(lo, hi, 5):   # y ticks (loss values, log scale)
            d.text((4, px(s0, v)[1] - 6), f"{10 ** v:.3g}", fill="black")
        for st in np.linspace(s0, s1, 5):  # x ticks (steps)
            d.text((px(st, lo)[0] - 10, H - B + 8), f"{int(st)}", fill="black")
    d.rectangle([L, T, W - R, H - B], outline="black")
    im.save(path)
