"""The reports of a run: the main job's summary (`summary_text`, printed by detdiff.py), and the
evaluation's RUN/metrics.json as RUN/report.md, one section per part of docs/paper.md section 4 (and
the two beyond it), ending with the paper's claims as this run answers them.

    python -m experiments.evaluate --run runs/shapes   # writes RUN/metrics.json and, from it, RUN/report.md
    python -m experiments.report A/metrics.json B/metrics.json   # the ablation table: a row per scored
                                                                 # run, then a row per setting over its seeds
"""
import sys

import numpy as np

from config import DataError, read_json
from experiments import ablations
from sample import MODES
from train import TrainConfig


def fmt(v, nd=3):
    return "-" if v is None else f"{v:.{nd}f}"


def claims(M):
    """The paper's claims as this run answers them: (claim, measured, holds), holds None where the
    claim is a number to read, not a comparison. No thresholds of this project's own:
    docs/experiments.md holds the studies."""
    out = []
    if M.get("real_map50"):
        ratio = M["fidelity_map50"] / M["real_map50"]
        out.append(("the detector finds the generated objects (fidelity_map50 / real_map50)",
                    f"{ratio:.2f}", None))
    if "easy_ap50" in M:
        d = M["easy_ap50"] - M["hard_ap50"]
        out.append(("all-[easy] images are detected better than all-[hard] (easy_ap50 - hard_ap50)",
                    f"{d:+.3f}",
                    d > 0))
    if "trainability" in M:
        T = M["trainability"]
        best = max((k for k in T["runs"] if k != "real"), key=lambda k: T[k]["mean"], default=None)
        if best:
            d = T[best]["mean"] - T["real"]["mean"]
            out.append((f"generated data trains a better detector (best: {best}, minus real only)",
                        f"{d:+.3f} (spread {T[best]['std']:.3f} / {T['real']['std']:.3f})", d > 0))
    return out


def report(M):
    """RUN/metrics.json -> report.md: a header, then the paper's parts, the experiments, what is
    beyond the paper."""
    meta, L = M["meta"], []
    L += [f"# detdiff evaluation of `{meta['run']}`", "",
          f"Generator: {meta['generator_steps']} steps ({meta['generator_minutes']} min), "
          f"{meta['image_size']} px. Sampling: {meta['sampler']}, guidance {meta['guidance']}"
          + (f", {meta['sec_per_image']} s per image" if "sec_per_image" in meta else "") + ". "
          f"{meta.get('n_layouts', 0)} val layouts. Seconds per part (the latest run of each): "
          + ", ".join(f"{k} {v:.0f}" for k, v in meta["seconds"].items() if k != "total") + ".", ""]
    if meta.get("parts_left"):
        L += [f"**Unfinished**: written before {', '.join(meta['parts_left'])} ran (an evaluation "
              "cut off part-way keeps the parts it finished).", ""]
    L += paper_parts(M, meta) + experiments(M, meta) + beyond_the_paper(M, meta)
    return "\n".join(L)


def paper_parts(M, meta):
    """Sections 1-3: layout fidelity, FID, easy vs hard."""
    L = []
    if "fidelity_map50" in M:
        L += ["## 1. Layout fidelity (the paper's YOLO score)", "",
              "The run's detector, trained on real images, on the real val images and on images "
              "generated for the same layouts (origin attributes), scored against the layouts.", "",
              "| images | n | mAP | AP50 | AP75 |", "|---|---|---|---|---|",
              f"| real val (the ceiling) | {meta['n_layouts']} | {fmt(M['real_map'])} | "
              f"{fmt(M['real_map50'])} | {fmt(M['real_map75'])} |",
              f"| generated | {meta['n_layouts']} | {fmt(M['fidelity_map'])} | "
              f"{fmt(M['fidelity_map50'])} | {fmt(M['fidelity_map75'])} |", ""]
    if "fid" in M:
        L += ["## 2. FID", "",
              f"FID {fmt(M['fid'], 2)} ({meta['notes'].get('fid', '')}). With a few hundred images "
              "FID is biased upwards; compare numbers made with the same n.", ""]
    if "easy_ap50" in M:
        L += ["## 3. Easy vs hard", "",
              "The same layouts and noise; only the attribute tokens change. The paper's claim: "
              "easy > hard.", "",
              "| attributes | detector AP50 |", "|---|---|"]
        L += [f"| {m} | {fmt(M[m + '_ap50'])} |" for m in ("easy", "origin", "hard")]
        if "easy_hard" in M:
            e = M["easy_hard"]
            L += ["", f"Attribute guidance w_d {meta.get('attr_guidance', 1.0):g}. Noise seeds "
                      f"{', '.join(map(str, e['noise_seeds']))} (AP50s are their mean): easy - "
                      f"hard {e['easy_minus_hard']['mean']:+.3f}, std "
                      f"{e['easy_minus_hard']['std']:.3f} over the seeds."]
        L += ["", "![easy / hard](easy_hard_eval.png)", "",
              "Rows: real val images; generated with origin, all-easy and all-hard attributes "
              "(easy boxes green, hard red).", ""]
    return L


def experiments(M, meta):
    """Sections 4-5: trainability and the ablations."""
    L = []
    if "trainability" in M:
        T = M["trainability"]
        protocol = T.get("protocol", "earlier")
        real_what = {"paper": "the whole training split",
                     "low_data": "the training images the generator trained on (--train-subset)"}.get(
            protocol, "a random subset of the training split, while the generator saw all of it")
        L += ["## 4. Trainability", "",
              f"Protocol {protocol}: detectors ({T['det_steps']} steps each, seeds: {T['seeds']}; the "
              f"seed sets the initialisation and batches) trained on {T['real_images']} real images, "
              f"{real_what}, alone and with generated images (layouts drawn from the same real "
              f"images; mixed: each object [hard] with probability 0.5), scored on the real val "
              f"split; mean +- std over the seeds.", "",
              "| training data | real | generated | mAP | AP50 | AP75 | AP50 vs real |",
              "|---|---|---|---|---|---|---|"]
        for name in T["runs"]:
            row = T.get("rows", {}).get(name) or dict(AP50=T[name])       # older metrics: AP50 only
            gen = T["generated_images"].get(name, 0)
            delta = "" if name == "real" else f"{T[name]['mean'] - T['real']['mean']:+.3f}"
            label = "real only" if name == "real" else "real + " + name.replace("_", " ")
            cells = " | ".join(f"{fmt(row[m]['mean'])} +- {fmt(row[m]['std'])}" if m in row else "-"
                               for m in ("mAP", "AP50", "AP75"))
            L.append(f"| {label} | {T['real_images']} | {gen} | {cells} | {delta} |")
        if T.get("filter"):
            f = T["filter"]
            L += ["",
                  f"Class filter: a generated all-hard image is kept when the crop classifier "
                  f"gives every object its layout class with probability >= {f['min_prob']}; "
                  f"{f['kept']} of {f['of']} kept (the first fraction's set)."]
        if T.get("figure"):
            L += ["", f"![the generated training sets]({T['figure']['file']})", "",
                  f"Rows: the first 8 images of each generated set ({', '.join(T['figure']['rows'])}), "
                  f"the same layouts and noise in every row; boxes coloured by class."]
        L.append("")
    if "ablations" in M:
        L += ["## 5. Ablations", "",
              "Each generator trained with the same budget (steps unless --ablation-minutes); "
              f"fidelity as in part 1, at attribute guidance w_d "
              f"{meta.get('attr_guidance', 1.0):g} and, for generators with the attribute, at w_d "
              f"1 (plain guidance).", "",
              "| setting | lambda | attribute | steps | minutes | fidelity AP50 | at w_d 1 | "
              "fidelity mAP | FID |",
              "|---|---|---|---|---|---|---|---|---|"]
        for name, r in M["ablations"].items():
            L.append(f"| {name} | {r['pal_weight']:g} | {'on' if r['attributes'] else 'off'} | "
                     f"{r['steps']} | {r['minutes']} | {fmt(r['fidelity_map50'])} | "
                     f"{fmt(r.get('fidelity_map50_plain'))} | {fmt(r['fidelity_map'])} | "
                     f"{fmt(r['fid'], 2)} |")
        L.append("")
    return L


def beyond_the_paper(M, meta):
    """Sections 6-7 (class consistency, exported masks) and the paper's claims."""
    L = []
    if "crop_acc_real" in M:
        L += ["## 6. Class consistency (beyond the paper)", "",
              "A crop classifier trained on real object crops; its accuracy on the objects of each "
              "image set. A [hard] object the classifier calls another class is a wrong label.", "",
              "| objects | crop accuracy |", "|---|---|",
              f"| real val (the ceiling) | {fmt(M['crop_acc_real'])} |"]
        L += [f"| generated, {m} | {fmt(M['crop_acc_' + m])} |" for m in MODES]
        L.append("")
    if "mask_iou_head" in M or "masks" in meta["notes"]:
        L += ["## 7. Exported instance masks (sample.py --masks head)", "",
              "Each object's mask from the perception head against the object the image drew "
              "(segmented inside its box by colour contrast with a ring just outside it); the "
              "filled box (--masks box) beside it, and the same segmenter on real val images "
              "against their true masks.", "",
              "| masks | IoU with the drawn object |", "|---|---|",
              f"| generated: perception head | {fmt(M.get('mask_iou_head'))} |",
              f"| generated: filled box | {fmt(M.get('mask_iou_box'))} |",
              f"| real val: true masks (the segmenter's own accuracy) | "
              f"{fmt(M.get('mask_iou_real_gt'))} |",
              f"| real val: filled box | {fmt(M.get('mask_iou_real_box'))} |", "",
              meta["notes"].get("masks", ""), ""]
    t = claims(M)
    if t:
        L += ["## The paper's claims on this run", "", "| claim | measured | holds |",
              "|---|---|---|"]
        L += [f"| {what} | {val} | {'-' if ok is None else 'yes' if ok else '**no**'} |" for what,
              val, ok in t]
        L.append("")
    return L


def summary_text(s):
    """The main job's summary (RUN/summary.json, detdiff.py) as the lines it prints at the end."""
    lines = [f"== summary of {s['run']} =="]
    if "detector" in s:
        d = s["detector"]
        lines.append(f"detector   val mAP {d['mAP']:.3f}  AP50 {d['AP50']:.3f}  AP75 "
                     f"{d['AP75']:.3f}  "
                     + (f"(given: {d['source']})" if d.get("source") else f"(trained in "
                                                                          f"{d['seconds']:.0f}s)"))
    if "attributes" in s:
        a = s["attributes"]
        per = a["per_nuisance"] or a["per_category"]
        lines.append(f"attributes {100 * a['hard_fraction']:.1f}% hard; per "
                     f"{'nuisance' if a['per_nuisance'] else 'category'}"
                     ": " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in per.items()))
        if a.get("warning"):
            lines.append(f"           {a['warning']}")
    if "autoencoder" in s:
        a = s["autoencoder"]
        lines.append(f"autoencoder latents {a['latent_shape']}, val PSNR {a['psnr_val']:.2f} dB, "
                     f"scale {a['scale']}, trained in {a['seconds']:.0f}s")
    if "generator" in s:
        g = s["generator"]
        lines.append(f"generator  {g['steps']} steps in {g['minutes']:.1f} min ({g['img_s']} img/s"
                     + (f", {g['dtype']}" if g.get("dtype") else "") + "), "
                     f"loss {g['loss_last100']}" + (f" (L_p {g['l_p_last100']})" if g["l_p_last100"] is not None
                                                     else " (no perception loss)") + " over the "
                                                                                     "last 100 steps")
    if "fidelity" in s and "generated" not in s["fidelity"]:
        lines.append(f"fidelity   {s['fidelity']['note']}")
    elif "fidelity" in s:
        f = s["fidelity"]
        lines.append(f"fidelity   detector AP50 on {f['n_layouts']} val layouts: generated "
                     f"{f['generated']['AP50']:.3f} vs real {f['real']['AP50']:.3f} (mAP "
                     f"{f['generated']['mAP']:.3f} vs {f['real']['mAP']:.3f}); "
                     f"{f['sec_per_img']:.3f} s per image")
    lines.append("time       " + ", ".join(f"{k} {v:.0f}s" for k, v in s["seconds"].items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The ablation table: one row per generator scored on its own (docs/experiments.md, "Ablations at
# 5000 steps"), from the metrics.json `experiments.evaluate --parts fidelity,easy_hard,fid,crops,
# trainability --gen-modes origin` writes

ABLATION_HEADER = ("| setting | lambda | attribute | conditioning | generator seed (trained in) | steps | "
                   "AP50 (mAP) on generated, of real | FID | crop accuracy origin / easy / hard | "
                   "AP50 easy / hard (easy - hard) | trainability mAP: real only, + origin |\n"
                   + "|---" * 11 + "|")


def setting_name(g):
    """The ablation row a generator's settings make, named as `ablations.ablation_settings` names
    it around today's default lambda (both on, loss off, attribute off, both off, lambda X)."""
    attr = g["attributes"] != "none"
    base = dict(pal_weight=TrainConfig.pal_weight, attributes="auto")
    mine = dict(pal_weight=g["pal_weight"], attributes="auto" if attr else "none")
    for name, overrides in ablations.ablation_settings(base).items():
        if {**base, **overrides} == mine:
            return name
    return f"lambda {g['pal_weight']:g}" if attr else "attribute off"


def origin_trainability(M):
    """The trainability part's real-only and + origin mAP rows ({mean, std}), or None where the
    metrics hold no such pair."""
    R = M.get("trainability", {}).get("rows", {})
    return (R["real"]["mAP"], R["origin"]["mAP"]) if {"real", "origin"} <= set(R) else None


def ablation_row(M):
    """One markdown row of the ablation table from a scored run's metrics; '-' where a part is
    missing, and in the easy / hard columns of a generator without the attribute."""
    meta, g = M["meta"], M["meta"]["generator"]
    train, pair = "-", origin_trainability(M)
    if pair:
        (r, o), n = pair, M["trainability"]["generated_images"]["origin"]
        train = f"{r['mean']:.3f} +- {r['std']:.3f}, + {n}: {o['mean']:.3f} +- {o['std']:.3f}"
    fidelity = (f"{fmt(M['fidelity_map50'])} ({fmt(M.get('fidelity_map'))}) of "
                f"{fmt(M['real_map50'])}" if "fidelity_map50" in M else "-")
    # a generator trained without the attribute never learned [easy] / [hard]: only its origin
    # images (every object [none], as it trained) are in its own distribution
    on = g["attributes"] != "none"
    crops = " / ".join(fmt(M.get(f"crop_acc_{m}")) if on or m == "origin" else "-"
                       for m in ("origin", "easy", "hard"))
    easy_hard = (f"{fmt(M['easy_ap50'])} / {fmt(M['hard_ap50'])} "
                 f"({M['easy_ap50'] - M['hard_ap50']:+.3f})" if "easy_ap50" in M and on else "-")
    seed = f"{g['seed']} ({g['dtype']})" if g.get("dtype") else str(g["seed"])  # dtype: newer files
    return (f"| {setting_name(g)} | {g['pal_weight']:g} | {'on' if on else 'off'} | {g['cond']} | "
            f"{seed} | {meta['generator_steps']} | {fidelity} | {fmt(M.get('fid'), 1)} | {crops} | "
            f"{easy_hard} | {train} |")


SEEDS_HEADER = ("| setting | conditioning | steps | generator seeds | AP50 on generated | FID | "
                "crop accuracy origin | easy - hard AP50 | trainability mAP: + origin minus real only |\n"
                + "|---" * 9 + "|")


def mean_std(values, nd=3):
    """'mean +- std' over generator seeds (numpy's std, ddof 0, as the claims table uses); the value
    alone from one seed; '-' when no seed measured it."""
    v = [x for x in values if x is not None]
    if len(v) < 2:
        return fmt(v[0] if v else None, nd)
    return f"{np.mean(v):.{nd}f} +- {np.std(v):.{nd}f}"


def seed_rows(Ms):
    """One markdown row per setting (name, conditioning, steps) over its generator seeds: the
    numbers the ablation table's rows give, as mean +- std across the seeds."""
    groups = {}
    for M in Ms:
        g = M["meta"]["generator"]
        groups.setdefault((setting_name(g), g["cond"], M["meta"]["generator_steps"]), []).append(M)

    def gain(M):                                  # trainability: + origin minus real only, mAP
        pair = origin_trainability(M)
        return pair[1]["mean"] - pair[0]["mean"] if pair else None

    rows = []
    for (name, cond, steps), group in groups.items():
        on = group[0]["meta"]["generator"]["attributes"] != "none"
        seeds = ", ".join(str(M["meta"]["generator"]["seed"]) for M in group)
        cells = [mean_std([M.get("fidelity_map50") for M in group]),
                 mean_std([M.get("fid") for M in group], nd=1),
                 mean_std([M.get("crop_acc_origin") for M in group]),
                 mean_std([M["easy_ap50"] - M["hard_ap50"] if "easy_ap50" in M else None
                           for M in group]) if on else "-",
                 mean_std([gain(M) for M in group])]
        rows.append(f"| {name} | {cond} | {steps} | {seeds} | " + " | ".join(cells) + " |")
    return rows


def main(paths):
    Ms = []
    for p in paths:
        M = read_json(p)
        if "generator" not in M.get("meta", {}):
            raise DataError(f"{p}: no meta.generator (scored before evaluate.py recorded the "
                            f"generator's settings, or not an evaluate.py metrics.json)")
        Ms.append(M)
    print("\n".join([ABLATION_HEADER] + [ablation_row(M) for M in Ms] + ["", SEEDS_HEADER]
                    + seed_rows(Ms)))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except DataError as err:
        raise SystemExit(f"error: {err}") from None
