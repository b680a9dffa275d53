"""Box-prompt propagation, numpy only; also the background job that runs it with a SAM model.

``propagate`` works with any ``predict(slice2d, box) -> mask2d``. As a job
(``MedSAGaBridgeLib.runner ... MedSAGaBridgeLib.propagation ARGS``) it loads the base model,
prints ``segment`` progress events (``MedSAGaLib.events``) and writes the masks to an .npz file.
Imports no MRML, so it runs in a plain Python (PythonSlicer) with MedSAGaLib and torch.
"""

import argparse
import signal
import sys

import numpy as np

from MedSAGaLib.slices import bounding_box, get_slice


def propagate(predict, array, axis, start, box, directions=(1, -1), max_slices=None, margin=2, min_pixels=4,
              should_stop=None, on_slice=None):
    """Box-prompt slice by slice from ``start``: each result's box prompts the next slice.

    Stops in each direction at the volume's end, after ``max_slices``, when a result has fewer
    than ``min_pixels`` pixels, or when ``should_stop()`` says so. Returns {slice index: mask}
    (``start`` included)."""
    results = {start: np.asarray(predict(get_slice(array, axis, start), box)) != 0}
    if on_slice:
        on_slice(len(results))
    count = array.shape[axis]
    for step in directions:
        previous, index, done = results[start], start + step, 0
        while 0 <= index < count and (max_slices is None or done < max_slices):
            if should_stop is not None and should_stop():
                return results
            prompt = bounding_box(previous, margin)
            if prompt is None or np.count_nonzero(previous) < min_pixels:
                break
            previous = np.asarray(predict(get_slice(array, axis, index), prompt)) != 0
            if np.count_nonzero(previous) < min_pixels:
                break
            results[index] = previous
            if on_slice:
                on_slice(len(results))
            index += step
            done += 1
    return results


def main(argv=None):
    """Job: read the volume, box-prompt ``--slice`` with ``--box``, propagate, write the masks."""
    parser = argparse.ArgumentParser(prog="MedSAGaBridgeLib.propagation")
    parser.add_argument("image")
    parser.add_argument("--base", default="litemedsam")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--axis", type=int, required=True, help="axis of the (k, j, i) array")
    parser.add_argument("--slice", type=int, required=True)
    parser.add_argument("--box", required=True, help="x0,y0,x1,y1 in slice pixels")
    parser.add_argument("--max-slices", type=int, default=30)
    parser.add_argument("--margin", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("-o", "--output", required=True, help=".npz file: slices, masks")
    args = parser.parse_args(argv)

    from MedSAGaLib.events import event, to_json_line
    from MedSAGaLib.inference import predict_box_slice
    from MedSAGaLib.models import build_base_model
    from MedSAGaLib.volume import array_from_image, normalize_with, preprocessing_settings, read_volume

    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("requested", True))
    array01 = normalize_with(array_from_image(read_volume(args.image)).astype(np.float32),
                             preprocessing_settings(None))
    device = args.device if args.device != "auto" else "cpu"
    base = build_base_model(args.base, checkpoint=args.checkpoint).eval().to(device)
    total = 1 + 2 * args.max_slices

    def predict(slice01, box):
        return predict_box_slice(base, slice01, [float(v) for v in box], device)

    def report(done):
        print(to_json_line(event("segment", done=done, total=total)), flush=True)

    box = [float(v) for v in args.box.split(",")]
    results = propagate(predict, array01, args.axis, args.slice, box, max_slices=args.max_slices,
                        margin=args.margin, should_stop=lambda: stop["requested"], on_slice=report)
    if stop["requested"]:
        print("propagation: cancelled", file=sys.stderr)
        return 130
    slices = sorted(results)
    np.savez_compressed(args.output, slices=np.array(slices, int),
                        masks=np.stack([results[s] for s in slices]).astype(np.uint8))
    return 0


if __name__ == "__main__":
    sys.exit(main())
