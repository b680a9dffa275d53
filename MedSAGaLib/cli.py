"""The ``medsaga`` command line: segment, info, finetune, evaluate, bench."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from .commands import SEGMENT_OPTIONS, add_options
from .models import ModelError
from .modelfile import ModelFileError
from .volume import VolumeError

USER_ERRORS = (VolumeError, ModelFileError, ModelError, ValueError, FileNotFoundError, MemoryError)


def add_segment_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment", help="segment a volume slice by slice",
        description="Segment every slice (or --slices) of a volume with an adapted model, or with box prompts.")
    add_options(parser, SEGMENT_OPTIONS)
    from .cohort import add_cohort_arguments

    add_cohort_arguments(parser)
    parser.set_defaults(func=run_segment)


def run_segment(args) -> int:
    from .cli_train import _set_threads
    from .cohort import is_cohort_request, run_segment_cohort
    from .events import ConsoleProgress
    from .workflow import segment_file

    _set_threads(args.threads)
    if is_cohort_request(args):  # many inputs: a Dask cluster (MedSAGaLib/cohort.py)
        return run_segment_cohort(args)
    if len(args.image) != 1 or not args.output:
        raise ValueError("Give one image and -o OUTPUT.seg.nrrd, or many inputs with --output-dir DIR.")
    args.image = args.image[0]
    progress = ConsoleProgress("auto")
    try:
        seg = segment_file(args.image, args.model, args.output, labelmap=args.labelmap, axis=args.axis,
                           slices=args.slices, window=args.window, classes=args.classes, checkpoint=args.checkpoint,
                           image_size=args.image_size, boxes_from=args.boxes_from, box_margin=args.box_margin,
                           batch_size=args.batch_size, device=args.device, progress=progress)
    finally:
        progress.close()
    for note in seg.notes:
        print(f"Note: {note}", file=sys.stderr)
    print(f"Wrote {seg.output} ({len(seg.class_names)} segments: {', '.join(seg.class_names)})")
    if seg.labelmap:
        print(f"Wrote {seg.labelmap}")
    print("Voxels per segment: " + ", ".join(f"{k} {v}" for k, v in seg.voxel_counts().items()))
    return 0


def add_info_parser(subparsers) -> None:
    parser = subparsers.add_parser("info", help="print a model file's metadata")
    parser.add_argument("model", help="adapted model file")
    parser.add_argument("--json", action="store_true", help="print the metadata as JSON")
    parser.set_defaults(func=run_info)


def run_info(args) -> int:
    from .modelfile import read_metadata

    meta = read_metadata(args.model)
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    print(f"MedSAGa model {args.model}")
    print(f"  format version : {meta.get('format_version')}")
    print(f"  base model     : {meta.get('base_model')} ({meta.get('image_size')} px)")
    print(f"  classes        : {', '.join(meta.get('class_names', []))}")
    print(f"  preprocessing  : {json.dumps(meta.get('preprocessing'))}")
    if meta.get("axis"):
        print(f"  slice axis     : {meta['axis']}")
    training = meta.get("training")
    if training:
        keys = ("method", "steps", "rank", "lr", "train_slices")
        print("  training       : " + ", ".join(f"{k}={training[k]}" for k in keys if k in training))
    else:
        print("  training       : none (untrained head)")
    dice = meta.get("validation_dice")
    if dice:
        print("  validation Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items() if isinstance(v, (int, float))))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medsaga", description="Few-shot, memory-efficient medical image segmentation with SAM and GaLore.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_segment_parser(subparsers)
    add_info_parser(subparsers)
    from .bench.cli import add_bench_parser
    from .cli_train import add_evaluate_parser, add_finetune_parser

    add_finetune_parser(subparsers)
    add_evaluate_parser(subparsers)
    add_bench_parser(subparsers)
    return parser


def _tolerate_ascii_terminals() -> None:
    # Under a C/POSIX locale stdout may be ASCII: never die on a non-ASCII character (names, bars).
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and (stream.encoding or "").lower().replace("-", "") != "utf8":
            stream.reconfigure(errors="backslashreplace")


def main(argv: Optional[Sequence[str]] = None) -> int:
    _tolerate_ascii_terminals()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("medsaga: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        print(f"medsaga {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
