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


def get_method(name: str) -> Method:
    """The registered method ``name``; a ValueError listing the known ones otherwise."""
    try:
        return METHOD_REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown method {name!r}; choose one of {', '.join(METHODS)}.") from None
