"""Figures beyond a layout drawn on its image (data.draw_layout, data.image_grid): loss curves and
the method as a diagram (PIL only; matplotlib is not a runtime dependency).

    python -m experiments.figures                 # docs/pipeline.png: the method as a diagram (README)
"""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def loss_curve(curves, path, title="training loss", smooth=0.95):
    """A PNG of one or more loss curves {name: (steps, values)} against step, log-y: the raw values
    light, an exponential moving average dark, one colour per curve."""
    W, H, L, R, T, B = 720, 400, 60, 150, 30, 40
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.text((L, 8), title, fill="black")
    curves = {k: (np.asarray(s, np.float64),
                  np.log10(np.clip(np.asarray(v, np.float64), 1e-6, None)))
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
            d.line([px(a, b) for a, b in zip(steps, y)],
                   fill=tuple(255 - (255 - ch) // 3 for ch in c))
            d.line([px(a, b) for a, b in zip(steps, ema)], fill=c, width=2)
            d.text((W - R + 10, T + 16 * k), f"{st} ({10 ** ema[-1]:.3g})", fill=c)
        for v in np.linspace(lo, hi, 5):   # y ticks (loss values, log scale)
            d.text((4, px(s0, v)[1] - 6), f"{10 ** v:.3g}", fill="black")
        for st in np.linspace(s0, s1, 5):  # x ticks (steps)
            d.text((px(st, lo)[0] - 10, H - B + 8), f"{int(st)}", fill="black")
    d.rectangle([L, T, W - R, H - B], outline="black")
    im.save(path)


# --------------------------------------------------------------------------------------------------
# The method as a picture (README): drawn here so that it changes with the code's names, not by hand

PIPELINE = [  # (column, row, text); arrows join the first row's boxes in order and the pairs in
              # PIPELINE_LINKS
    (0, 0, "real images + layouts\ndata.py"),
    (1, 0, "detector, trained on them\nperceptive/detector.py"),
    (2, 0, "[easy] / [hard] per object:\nconf > gamma, IoU > beta\nperception.assign_attributes"),
    (3, 0, "\"An image with star <l3,5>\n<l12,15> [hard], ...\"\ndata.LayoutTokenizer"),
    (3, 1, "layout encoder + UNet\neps_theta(x_t, t, tokens)\nunet.py"),
    (2, 1, "L_simple = |eps - eps_theta|^2\ndiffusion.loss_simple"),
    (2, 2,
     "mask head on the decoder:\nL_p = sqrt(alpha_bar_t)(L_m + L_d)\nperception.perception_loss"),
    (1, 1, "L = L_simple + lambda L_p\ntrain.train_step"),
    (0, 3, "your layouts, every object\n[easy] or [hard]"),
    (1, 3, "sampling with guidance\nsample.generate"),
    (2, 3, "labelled images + masks\n(COCO, YOLO folders)"),
    (3, 3, "detector training data;\nits AP on them: experiments/"),
]
PIPELINE_LINKS = [(3, 4), (4, 5), (4, 6), (5, 7), (6, 7), (8, 9), (9, 10), (10, 11)]
# per row: data, training, training, generation
PIPELINE_FILLS = ((230, 240, 255), (255, 240, 225), (255, 240, 225), (230, 250, 230))


def pipeline_diagram(path, box=(250, 64), gap=(40, 36)):
    """The pipeline of PIPELINE as a PNG: the attribute (top row), training (middle rows),
    generation (bottom)."""
    font = ImageFont.load_default(size=13)
    W, H = 4 * box[0] + 5 * gap[0], 4 * box[1] + 5 * gap[1]
    im = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(im)
    rect = [(gap[0] + c * (box[0] + gap[0]), gap[1] + r * (box[1] + gap[1])) for c, r,
            _ in PIPELINE]

    def centre(i):
        return rect[i][0] + box[0] / 2, rect[i][1] + box[1] / 2

    links = [(i, i + 1) for i in range(3)] + PIPELINE_LINKS
    for a, b in links:   # an arrow from box a's edge to box b's edge
        (xa, ya), (xb, yb) = centre(a), centre(b)
        dx, dy = xb - xa, yb - ya
        k = min(box[0] / 2 / abs(dx) if dx else 1e9, box[1] / 2 / abs(dy) if dy else 1e9)
        p, q = (xa + k * dx, ya + k * dy), (xb - k * dx, yb - k * dy)
        d.line([p, q], fill=(90, 90, 90), width=2)
        ang = math.atan2(q[1] - p[1], q[0] - p[0])
        d.polygon([q, (q[0] - 9 * math.cos(ang - 0.4), q[1] - 9 * math.sin(ang - 0.4)),
                   (q[0] - 9 * math.cos(ang + 0.4), q[1] - 9 * math.sin(ang + 0.4))],
                  fill=(90, 90, 90))
    for (x, y), (c, r, text) in zip(rect, PIPELINE):
        fill = PIPELINE_FILLS[r]
        d.rounded_rectangle([x, y, x + box[0], y + box[1]], 8, fill=fill, outline=(60, 60, 60),
                            width=1)
        d.multiline_text((x + box[0] / 2, y + box[1] / 2), text, fill=(0, 0, 0), font=font,
                         anchor="mm",
                         align="center")
    im.save(path)
    return im


if __name__ == "__main__":
    pipeline_diagram("docs/pipeline.png")
    print("wrote docs/pipeline.png")
