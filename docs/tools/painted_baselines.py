"""The baselines of a painted-slice run (docs/tools/painted_slices_run.sh), on the same plan and slices.

Usage: python docs/tools/painted_baselines.py OUT/TASK [--unet-budget SECONDS] [--seed N] [--skip unet,oracle-box]

Reads OUT/TASK/plan.json, image.nii.gz and reference.seg.nrrd as the shell tool writes them, and scores
on the plan's unseen annotated slices:
- ``nearest-slice``: each slice copies the nearest painted slice's labels (learns nothing);
- ``unet``: a MONAI 2-D U-Net from scratch on the painted slices only (5 unless SHOTS said otherwise), with the crop the product's
  ``--crop auto`` picks from the same painted labels and the same wall-clock budget as the product's
  default fine-tuning (240 s), steps planned from the first steps' time;
- ``unet+painted``: the same U-Net's probabilities with the help ``medsaga evaluate --painted`` gives MedSAGa
  (blended with the painted slices, pieces not connected to them dropped; MedSAGaLib/painted.py);
- ``oracle-box``: zero-shot LiteMedSAM prompted with each structure's box taken from the reference
  labels of every scored slice (an upper bound on what box prompting gives; the user would draw them).
Prints one ``BASELINE`` line each and writes OUT/TASK/baselines.json (per-class Dice and HD95).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--unet-budget", type=float, default=240.0, help="U-Net wall-clock seconds (the product default's budget)")
    parser.add_argument("--unet-max-steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", default="", help="comma-separated baselines to leave out")
    args = parser.parse_args(argv)

    import torch

    from MedSAGaLib.baselines import copy_nearest_slices
    from MedSAGaLib.bench.quality import score, unet_baseline
    from MedSAGaLib.inference import segment_with_boxes
    from MedSAGaLib.models import build_base_model
    from MedSAGaLib.painted import PaintedSlices
    from MedSAGaLib.volume import normalize_with
    from MedSAGaLib.workflow import load_task, training_preprocessing

    torch.set_num_threads(2)
    folder = args.folder
    plan = json.loads((folder / "plan.json").read_text())
    task = load_task(folder / "image.nii.gz", folder / "reference.seg.nrrd", plan["axis"])
    names, painted, test = list(task.class_names), plan["painted"], plan["test"]
    ref = np.moveaxis(task.labels, task.axis, 0)
    # what `medsaga finetune` feeds the model: the crop's own contrast when it crops (workflow.training_preprocessing)
    array01 = normalize_with(task.array, training_preprocessing(task, painted)[0])
    slices01 = np.moveaxis(array01, task.axis, 0)
    spacing2d, skip = task.spacing2d(), set(filter(None, args.skip.split(",")))
    results = {}

    def report(name: str, pred: np.ndarray, **extra) -> None:
        s = score(pred, ref[test], spacing2d, names)
        results[name] = {**s, **extra}
        print("BASELINE", name, round(s["dice"], 3), {n: round(m["dice"], 3) for n, m in s["per_class"].items()},
              " ".join(f"{k} {v}" for k, v in extra.items()), flush=True)

    report("nearest-slice", copy_nearest_slices({z: ref[z] for z in painted}, test))
    if "unet" not in skip:
        t0 = time.perf_counter()
        span = list(range(min(test + painted), max(test + painted) + 1))  # every slice, for the 3-D pieces
        probs, roi, losses = unet_baseline([slices01[z] for z in painted], [ref[z] for z in painted],
                                           [slices01[z] for z in span], len(names), args.unet_max_steps, args.seed,
                                           time_budget=args.unet_budget, probabilities=True, class_names=names)
        at = {z: i for i, z in enumerate(span)}
        report("unet", np.stack([probs[at[z]].argmax(0) for z in test]).astype(np.uint8), steps=len(losses),
               seconds=round(time.perf_counter() - t0), final_loss=round(losses[-1], 3),
               crop=roi.to_dict() if roi is not None else None)
        # the same help from the painted slices as `medsaga segment/evaluate --painted` gives MedSAGa
        drawn = np.zeros_like(ref)
        drawn[painted] = ref[painted]
        hint = PaintedSlices(drawn, 0, len(names), slice_spacing_mm=task.image.GetSpacing()[::-1][task.axis])
        volume = np.zeros_like(ref)
        for z in span:
            volume[z] = hint.blend(probs[at[z]], z).argmax(0)
        hint.finish(volume, span)
        report("unet+painted", volume[test])
    if "oracle-box" not in skip:
        t0 = time.perf_counter()
        boxes = segment_with_boxes(build_base_model("litemedsam"), array01, task.labels, task.axis, test,
                                   label_values=list(range(1, len(names) + 1)), progress=False)
        report("oracle-box", np.moveaxis(boxes, task.axis, 0)[test], seconds=round(time.perf_counter() - t0))
    (folder / "baselines.json").write_text(json.dumps(
        {"plan": plan, "unet_budget_s": args.unet_budget, "seed": args.seed, "results": results}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
