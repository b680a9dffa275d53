"""The registry of training methods: what each one trains and with which optimizer.

As segment_anything's ``sam_model_registry`` names its model builders, ``METHOD_REGISTRY`` names
the methods every front end offers (CLI choices, Slicer panel, benchmarks). Torch-free at import:
the trainer builds parameter groups from these descriptions (``trainer.parameter_groups``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """A training method.

    ``encoder``: how the trained encoder stages are updated: ``"galore"`` (GaLore on their 2-D Linear
    weights, AdamW on the rest), ``"adamw"`` (all AdamW), ``"lora"`` (rank-r LoRA on q and v, SAMed),
    or None (encoder frozen). The mask decoder and the prompt encoder's no-mask embedding always
    train with AdamW. ``layerwise``: one optimizer per parameter, stepped from its gradient hook.
    """

    name: str
    description: str
    encoder: str | None
    layerwise: bool = False

    @property
    def trains_encoder(self) -> bool:
        return self.encoder is not None


METHOD_REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("galore", "GaLore on the encoder's Linear weights, AdamW on the rest", "galore"),
        Method("galore-layerwise", "GaLore with per-parameter (layer-wise) updates: no full gradient buffers",
               "galore", layerwise=True),
        Method("lora", "LoRA on q and v of every trained attention block (SAMed)", "lora"),
        Method("full", "every trained encoder parameter with AdamW", "adamw"),
        Method("decoder", "encoder frozen; mask decoder and prompt defaults only", None),
    )
}
METHODS = tuple(METHOD_REGISTRY)
# Not a method: the product default (CLI, Slicer panel), which picks one per task (:func:`choose_method`).
AUTO = "auto"


def choose_method(device_type: str, cropped: bool, train_stages: int | None = None,
                  bf16_encoder: bool = False) -> tuple[str, str]:
    """What ``method="auto"`` trains, and why, as a sentence.

    Measured (docs/results/NOTES.md, "Realistic tasks"; 240 s budget, 2 CPU threads, 5 painted slices): an fp32
    GaLore step costs about 1.6 s on a CPU and a decoder-only step about 0.35 s, so in the time budget
    decoder-only takes several times the steps. Where the painted structures are small (the run crops to them)
    that wins on an fp32 CPU: colin27_aal 0.731 against 0.341 mean Dice with all five slices training (0.39
    against 0.35-0.46 when one was held out), colin27_aal_lr 0.37 against 0.05 (one held out). Where they fill
    the slice GaLore wins (MNI152 GM/WM: the demo's 0.90 against 0.50), and on a GPU its steps are cheap.
    ``bf16_encoder``: the encoder would train in bf16 on a CPU with bf16 units (:mod:`.precision`), where a
    GaLore step takes about 1 s: there GaLore wins on the small structures too (colin27_aal 0.759 against
    decoder-only's 0.747-0.749, colin27_aal_lr 0.684 against 0.644-0.654). ``train_stages`` given by the user
    decides instead: encoder stages to train mean GaLore, 0 means decoder-only.
    """
    if train_stages is not None:
        if train_stages > 0:
            return "galore", f"method galore (auto): {train_stages} encoder stage(s) to train were asked for"
        return "decoder", "method decoder-only (auto): no encoder stage to train was asked for"
    if device_type == "cpu" and cropped and not bf16_encoder:
        return "decoder", ("method decoder-only (auto): small structures on a CPU without bf16 units, where a GaLore "
                           "step costs about 4x a decoder step and fewer steps fit in the time budget; --method galore "
                           "trains the encoder too")
    if device_type == "cpu" and cropped:
        return "galore", ("method galore (auto): small structures on a CPU with bf16 units, where a bf16 GaLore step "
                          "is cheap enough to beat decoder-only in the time budget")
    where = "on a GPU" if device_type != "cpu" else "the painted structures fill most of the slice"
    return "galore", f"method galore (auto): {where}"


def get_method(name: str) -> Method:
    """The registered method ``name``; a ValueError listing the known ones otherwise."""
    try:
        return METHOD_REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown method {name!r}; choose one of {', '.join(METHODS)}.") from None
