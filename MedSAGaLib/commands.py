"""Command-line options of ``medsaga finetune``, ``evaluate`` and ``segment``, defined once.

The CLI builds its argparse parsers from these definitions, and front ends that start jobs (the
Slicer panel) build their command lines with :func:`finetune_argv` / :func:`segment_argv` from the
same definitions, so a flag cannot be spelt two ways. Torch-free: importable before PyTorch is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from .training.config import PRECISIONS, SIDES, SWITCHES, FinetuneConfig

PROGRESS_MODES = ("auto", "tqdm", "json", "none")
# the names of ``models.BASE_MODEL_REGISTRY`` (a test keeps them equal), here without importing torch
BASE_MODEL_NAMES = ("litemedsam", "vit_b", "vit_l", "vit_h")
Choices = Union[Sequence[str], Callable[[], Sequence[str]], None]


@dataclass(frozen=True)
class Option:
    """One command-line option; ``dest`` is also its keyword in :func:`finetune_argv` / :func:`segment_argv`."""

    flags: tuple[str, ...]
    dest: str
    help: str = ""
    type: Optional[Callable[[str], Any]] = None
    default: Any = None
    choices: Choices = None  # a callable is resolved only when a parser is built (it may import torch)
    nargs: Optional[str] = None
    flag: bool = False  # store_true
    required: bool = False
    metavar: Optional[str] = None
    group: Optional[str] = None  # options sharing a group are mutually exclusive
    positional: bool = False

    def add_to(self, parser) -> None:
        kwargs: dict = {"help": self.help}
        if self.flag:
            kwargs["action"] = "store_true"
        else:
            kwargs["default"] = self.default
            for key in ("type", "nargs", "metavar"):
                if getattr(self, key) is not None:
                    kwargs[key] = getattr(self, key)
            if self.choices is not None:
                kwargs["choices"] = tuple(self.choices() if callable(self.choices) else self.choices)
        if self.positional:
            parser.add_argument(self.dest, **kwargs)
        else:
            if self.required:
                kwargs["required"] = True
            parser.add_argument(*self.flags, dest=self.dest, **kwargs)

    def to_argv(self, value: Any) -> list[str]:
        """The command-line words for ``value`` (none for None, False or an empty text)."""
        if value is None or value is False or (isinstance(value, str) and value == ""):
            return []
        if self.flag:
            return [self.flags[0]]
        if self.nargs in ("+", "*"):
            words = [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        else:
            words = [format_value(self.dest, value)]
        return words if self.positional else [self.flags[0], *words]


def format_value(dest: str, value: Any) -> str:
    if dest == "slices" and isinstance(value, (list, tuple)):
        return ",".join(str(int(s)) for s in value)
    if dest == "axis" and isinstance(value, int) and not isinstance(value, bool):
        # an int is an axis of the (z, y, x) = (k, j, i) array, as the library's functions take it
        if value not in (0, 1, 2):
            raise ValueError(f"Array axis {value} is out of range 0-2.")
        return "kji"[value]
    return str(value)


def _methods() -> Sequence[str]:
    from .training.config import AUTO, METHODS

    return (AUTO,) + METHODS


_DEFAULTS = FinetuneConfig()

# --- shared by finetune, evaluate and segment -------------------------------------------------
AXIS = Option(("--axis",), "axis", "slice axis: axial (default, or the model's), coronal, sagittal "
              "(from the image's directions), or voxel axis i/j/k")
SLICES = Option(("--slices",), "slices", "slices along the axis, voxel indices from 0: A:B (B excluded), "
                "A:B:STEP or a list 12,40,77")
DEVICE = Option(("--device",), "device", "auto (default), cpu, cuda or mps", default="auto")
WINDOW = Option(("--window",), "window", "intensity window CENTRE,WIDTH or a CT preset (ct-soft, ct-abdomen, "
                "ct-lung, ct-bone, ct-brain), or 'percentile' for the volume's 0.5-99.5th percentiles; default: "
                "the model's own setting; finetune: volume percentiles, narrowed to the crop's own 1-99th when it "
                "crops to small structures (MR)")
BACKEND = Option(("--backend",), "backend", "inference runtime: auto (default: OpenVINO on a CPU when installed and "
                 "the export pays off, else PyTorch), torch, openvino", choices=("auto", "torch", "openvino"),
                 default="auto")
TTA = Option(("--tta",), "tta", "test-time mirroring: average each slice with its left-right mirror image, "
              "left/right classes swapped (default auto: when the model was trained with mirroring, see "
              "finetune --mirror; costs a second "
              "encoder pass per slice)", choices=SWITCHES, default="auto")
INFERENCE_PRECISION = Option(
    ("--inference-precision",), "inference_precision", "auto (default): bf16 where OpenVINO runs an adapted model on a "
    "CPU with bf16 units (AVX-512 BF16 or AMX), f32 elsewhere (a cohort with --output-dir keeps f32); f32: the "
    "reference; int8: an OpenVINO encoder quantised on 16 slices of this volume (needs nncf); bf16: OpenVINO at bf16. "
    "The lower precisions are faster on a CPU, with about 99.8%% of pixels as f32 (README)",
    choices=("auto", "f32", "int8", "bf16"), default="auto")  # = backends.INFERENCE_PRECISIONS (a test keeps them equal)
PAINTED = Option(("--painted",), "painted", "the labels painted on this same volume (the .seg.nrrd or label volume "
                 "the model was fine-tuned from): they are kept, the slices near them lean on them, and pieces of "
                 "a class not connected to its painted parts are dropped (README); not for other scans",
                 metavar="LABELS")
SEGMENT_PAINTED = Option(("--painted",), "painted", "the labels painted on this same volume (the .seg.nrrd or label "
                         "volume the model was fine-tuned from): they are kept, the slices near them lean on them, and "
                         "pieces of a class not connected to its painted parts are dropped (README); not for other "
                         "scans. Default: on the very scan the model was fine-tuned on (same voxels), the labels file "
                         "it was fine-tuned from, if its training slices are unchanged; 'none': the model alone",
                         metavar="LABELS")
THREADS = Option(("--threads",), "threads", "CPU threads for PyTorch (default: PyTorch's choice)", type=int)
IMAGE = Option(("--image",), "image", "NIfTI, NRRD, MetaImage file or a DICOM series folder", required=True)
LABELS = Option(("--labels",), "labels", "label volume on the image's grid, or a .seg.nrrd", required=True)
CHECKPOINT = Option(("--checkpoint",), "checkpoint", "SAM checkpoint file for vit_b/vit_l/vit_h")
IMAGE_SIZE = Option(("--image-size",), "image_size", "model input size for vit_* (e.g. 512 as SAMed)", type=int)
TASK_OPTIONS = (IMAGE, LABELS, AXIS, SLICES, DEVICE, WINDOW, THREADS)

FINETUNE_OPTIONS = TASK_OPTIONS + (
    Option(("--shots",), "shots", "use N annotated slices, evenly spread", type=int),
    Option(("--classes",), "classes", "class names: rename the label values 1..k in order, or pick segments "
           "of a .seg.nrrd by name", nargs="+"),
    Option(("--method",), "method", "training method (default auto: galore, except decoder-only on a CPU without bf16 "
           "units when the painted structures are small enough to crop to; measured in docs/results/NOTES.md)", choices=_methods,
           default=_DEFAULTS.method),
    Option(("--base",), "base", "base model (default litemedsam)", choices=BASE_MODEL_NAMES),
    CHECKPOINT,
    IMAGE_SIZE,
    Option(("--steps",), "steps", "optimizer steps (default: chosen by the data: with 10 or more annotated slices, "
           "train until the held-out ones stop improving, else the steps that fit; within --time-budget)", type=int, group="length"),
    Option(("--time-budget",), "time_budget", f"seconds for the whole fine-tuning when the steps are chosen by the "
           f"data (default {_DEFAULTS.time_budget:g})", type=float, default=_DEFAULTS.time_budget),
    Option(("--max-steps",), "max_steps", "most optimizer steps when the steps are chosen by the data "
           f"(default {_DEFAULTS.max_steps})", type=int, default=_DEFAULTS.max_steps),
    Option(("--crop",), "crop", "train and segment on the box around the painted structures, at a higher "
           f"resolution (default {_DEFAULTS.crop}: when they fill less than half of the slice)",
           choices=SWITCHES, default=_DEFAULTS.crop),
    Option(("--crop-margin",), "crop_margin", "margin of that box on every side, as a fraction of its height and "
           f"width (default {_DEFAULTS.crop_margin:g})", type=float, default=_DEFAULTS.crop_margin),
    Option(("--mirror",), "mirror", "left-right mirroring in the augmentation (default auto: only when every "
           "painted class lies on both sides of the middle or has its left/right partner by name on the other "
           "side, which a mirrored copy swaps it with, so no 'left' structure is shown as 'left' on the right)",
           choices=SWITCHES, default=_DEFAULTS.mirror),
    Option(("--sides",), "sides", "classes named as left/right pairs (caudate_left / caudate_right): default auto "
           "learns each pair as one structure and splits it at the midline between the painted pairs, when every "
           "pair is painted on either side of one column (the split keeps to the grid of the scan it was trained "
           "on, as the crop does); off learns the sides as classes of their own",
           choices=SIDES, default=_DEFAULTS.sides),
    Option(("--class-weighting",), "class_weighting", f"class weights of the loss (default {_DEFAULTS.class_weighting})",
           choices=("none", "balanced"), default=_DEFAULTS.class_weighting),
    Option(("--feature-cache",), "feature_cache", "folder that keeps the frozen encoder features of the training "
           "slices between runs, so --resume and a retrain with one slice more skip most of the preparation "
           "(default: $MEDSAGA_FEATURE_CACHE, else ~/.cache/medsaga/features, at most 2 GB; none: off)",
           metavar="DIR|none"),
    Option(("--epochs",), "epochs", "passes over the training slices instead of --steps", type=float,
           group="length"),
    Option(("--batch-size",), "batch_size", f"slices per step (default {_DEFAULTS.batch_size})", type=int,
           default=_DEFAULTS.batch_size),
    Option(("--lr",), "lr", f"learning rate (default {_DEFAULTS.lr})", type=float, default=_DEFAULTS.lr),
    Option(("--encoder-lr",), "encoder_lr", "encoder learning rate (default: --lr)", type=float),
    Option(("--warmup",), "warmup", f"linear warm-up steps before poly decay (default {_DEFAULTS.warmup})",
           type=int, default=_DEFAULTS.warmup),
    Option(("--rank",), "rank", f"GaLore rank (default {_DEFAULTS.rank})", type=int, default=_DEFAULTS.rank),
    Option(("--update-proj-gap",), "update_proj_gap", "steps between GaLore projector updates", type=int,
           default=_DEFAULTS.update_proj_gap),
    Option(("--scale",), "scale", f"GaLore scale: multiplies the projected encoder update "
           f"(default {_DEFAULTS.scale:g})", type=float, default=_DEFAULTS.scale),
    Option(("--proj-type",), "proj_type", "GaLore projection type (std, left, right, ...)",
           default=_DEFAULTS.proj_type),
    Option(("--lora-rank",), "lora_rank", "LoRA rank (method lora)", type=int, default=_DEFAULTS.lora_rank),
    Option(("--train-stages",), "train_stages", "trailing encoder stages to train, 1-4 (default: 1 on a CPU; "
           "on a GPU 3 for litemedsam, 4 for vit_*); the stages in front are frozen and computed once per slice",
           type=int),
    Option(("--checkpointing",), "checkpointing", "activation checkpointing (less memory, more time)", flag=True),
    Option(("--precision",), "precision", "auto: bf16 (fp16) mixed precision on a GPU and on a CPU with bf16 units "
           "(AVX-512 BF16 or AMX), fp32 on other CPUs; fp32 to turn mixed precision off",
           choices=PRECISIONS, default="auto"),
    Option(("--no-augment",), "no_augment", "no data augmentation", flag=True),
    Option(("--val-fraction",), "val_fraction", "hold out this fraction of the annotated slices (from 10 of them "
           "on) to validate, stop early and keep the best step; default 0: every painted slice trains and the time "
           "budget sets the steps (holding 2 of 10 out cost 0.17 mean Dice, docs/results/NOTES.md)",
           type=float, default=0.0),
    Option(("--max-val-slices",), "max_val_slices", f"validation slices used during training "
           f"(default {_DEFAULTS.max_val_slices}, evenly spread)", type=int, default=_DEFAULTS.max_val_slices),
    Option(("--seed",), "seed", "random seed (default 0)", type=int, default=0),
    Option(("--resume",), "resume", "continue training an adapted model file", metavar="MODEL"),
    Option(("--progress",), "progress", "progress: tqdm bar (auto on a terminal), json lines on stdout "
           "(see MedSAGaLib.events), or none", choices=PROGRESS_MODES, default="auto"),
    Option(("-o", "--output"), "output", "adapted model file to write (atomically)", required=True),
)

EVALUATE_OPTIONS = TASK_OPTIONS + (
    Option(("--model",), "model", "adapted model file", required=True),
    Option(("--batch-size",), "batch_size", "slices per forward pass (default: 1 on a CPU, 8 on a GPU)", type=int),
    Option(("--json",), "json", "print the results as JSON", flag=True),
    BACKEND,
    TTA,
    INFERENCE_PRECISION,
    PAINTED,
)

SEGMENT_OPTIONS = (
    Option(("image",), "image", "NIfTI, NRRD, MetaImage file or a DICOM series folder; several, folders or globs "
           "with --output-dir", positional=True, nargs="*"),
    Option(("--model",), "model", f"adapted model file, or a base model ({', '.join(BASE_MODEL_NAMES)}) for box "
           "prompts or an untrained head", default="litemedsam"),
    CHECKPOINT,
    IMAGE_SIZE,
    Option(("--classes",), "classes", "class names (untrained head on a base model)", nargs="+"),
    Option(("--boxes-from",), "boxes_from", "label volume or .seg.nrrd: prompt each slice with each label's "
           "bounding box (zero-shot)", metavar="LABELS"),
    Option(("--box-margin",), "box_margin", "pixels added around each box (default 0)", type=int, default=0),
    Option(("-o", "--output"), "output", "output segmentation (.seg.nrrd) of one input (many: --output-dir)"),
    Option(("--labelmap",), "labelmap", "also write a plain label volume (e.g. OUT.nii.gz)"),
    Option(("--batch-size",), "batch_size", "slices per forward pass (default: 1 on a CPU, where it is fastest; "
           "8 on a GPU)", type=int),
    AXIS, SLICES, DEVICE, WINDOW, THREADS, BACKEND, TTA, INFERENCE_PRECISION, SEGMENT_PAINTED,
)


def add_command(subparsers, name: str, options: Sequence[Option], func, help: str, description: str):
    """A sub-command parser with ``options`` that runs ``func(args)``."""
    parser = subparsers.add_parser(name, help=help, description=description)
    add_options(parser, options)
    parser.set_defaults(func=func)
    return parser


def add_options(parser, options: Sequence[Option]) -> None:
    """Add ``options`` to an argparse parser (mutually exclusive groups as declared)."""
    groups: dict = {}
    for option in options:
        target = parser
        if option.group is not None:
            if option.group not in groups:
                groups[option.group] = parser.add_mutually_exclusive_group()
            target = groups[option.group]
        option.add_to(target)


def build_argv(command: str, options: Sequence[Option], values: dict) -> list[str]:
    """``[command, words...]`` for ``values`` keyed by option ``dest``; an unknown key is a TypeError."""
    by_dest = {o.dest: o for o in options}
    unknown = [k for k in values if k not in by_dest]
    if unknown:
        raise TypeError(f"medsaga {command} has no option {', '.join(unknown)}.")
    argv = [command]
    for option in options:  # definition order: positionals first where declared so
        if option.dest in values:
            argv += option.to_argv(values[option.dest])
    return argv


def finetune_argv(image: str, labels: str, output: str, **options: Any) -> list[str]:
    """``["finetune", "--image", image, ...]``: the arguments of a ``medsaga finetune`` run.

    ``options`` are the options' ``dest`` names (``steps=3``, ``slices=[4, 9]``, ``axis=0`` for an
    array axis or ``axis="axial"``, ``checkpointing=True``); None leaves an option at its default.
    """
    return build_argv("finetune", FINETUNE_OPTIONS, dict(image=str(image), labels=str(labels), output=str(output),
                                                         **options))


def segment_argv(image: str, model: str, output: str, **options: Any) -> list[str]:
    """``["segment", image, "--model", model, ...]``: the arguments of a ``medsaga segment`` run."""
    return build_argv("segment", SEGMENT_OPTIONS, dict(image=str(image), model=str(model), output=str(output),
                                                        **options))


def evaluate_argv(image: str, labels: str, model: str, **options: Any) -> list[str]:
    """``["evaluate", "--image", image, ...]``: the arguments of a ``medsaga evaluate`` run."""
    return build_argv("evaluate", EVALUATE_OPTIONS, dict(image=str(image), labels=str(labels), model=str(model),
                                                         **options))
