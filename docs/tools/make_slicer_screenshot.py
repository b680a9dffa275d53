"""Render the catalog screenshot ``mni152-gm-wm.png`` from a real MedSAGa result (not a Slicer
screenshot).

Steps (all with the ``medsaga`` CLI of this repository, on the CPU):
1. the MNI152 2009 T1 template and its grey/white-matter labels (``MedSAGaLib.samples.mni152``);
2. ``medsaga finetune --image T1 --labels LABELS --axis axial --shots 5 --steps 40`` (GaLore, the
   default method, LiteMedSAM base);
3. ``medsaga segment T1 --model MODEL --axis axial --slices S --labelmap OUT`` on one axial slice
   that was not trained on;
4. the T1 slice with the predicted classes as an overlay, beside the reference labels, with each
   class's Dice on that slice.

Usage: ``python docs/tools/make_slicer_screenshot.py WORKDIR [--slice 90]``.
"""

import argparse
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def run(args):
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "MedSAGaLib.cli", *args], check=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--slice", type=int, default=90)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--output", default=os.path.join(HERE, "..", "..", "MedSAGaSlicer", "Screenshots", "mni152-gm-wm.png"))
    args = parser.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk
    from MedSAGaLib.samples.mni152 import write_mni152_task
    from MedSAGaLib.volume import read_volume, slice_axis

    os.makedirs(args.workdir, exist_ok=True)
    image, labels = write_mni152_task(args.workdir)
    model = os.path.join(args.workdir, "model.medsaga")
    if not os.path.exists(model):
        run(["finetune", "--image", str(image), "--labels", str(labels), "--axis", "axial", "--shots", "5",
             "--steps", str(args.steps), "--threads", "1", "--progress", "none", "-o", model])
    result = os.path.join(args.workdir, f"slice{args.slice}.nii.gz")
    run(["segment", str(image), "--model", model, "--axis", "axial", "--slices", str(args.slice),
         "-o", os.path.join(args.workdir, f"slice{args.slice}.seg.nrrd"), "--labelmap", result])

    t1 = read_volume(str(image))
    axis = slice_axis(t1, "axial")
    take = lambda path: np.take(sitk.GetArrayFromImage(read_volume(str(path))), args.slice, axis=axis)  # noqa: E731
    t1_slice, truth, predicted = take(image), take(labels), take(result)
    dice = {}
    for value, name in ((1, "grey matter"), (2, "white matter")):
        a, b = predicted == value, truth == value
        dice[name] = 2 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)

    colors = np.array([[0, 0, 0, 0], [0.95, 0.75, 0.1, 0.55], [0.2, 0.6, 1.0, 0.55]])
    figure, axes = plt.subplots(1, 2, figsize=(7.2, 4.2), dpi=100)
    for ax, lab, title in ((axes[0], predicted, "MedSAGa (GaLore, 5 shots)"), (axes[1], truth, "reference")):
        ax.imshow(np.flipud(t1_slice), cmap="gray")
        ax.imshow(np.flipud(colors[lab.astype(int)]))
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    figure.suptitle(f"MNI152 T1, axial slice {args.slice} (not trained on): Dice grey matter "
                    f"{dice['grey matter']:.2f}, white matter {dice['white matter']:.2f}", fontsize=9)
    figure.text(0.5, 0.02, f"medsaga finetune --shots 5 --steps {args.steps} (LiteMedSAM, CPU); "
                "matplotlib rendering, not a Slicer screenshot", ha="center", fontsize=7)
    figure.tight_layout(rect=(0, 0.04, 1, 0.95))
    figure.savefig(args.output)
    print(args.output, os.path.getsize(args.output), "bytes;", dice)
    return 0


if __name__ == "__main__":
    sys.exit(main())
