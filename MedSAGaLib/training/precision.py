"""Which number format a fine-tune computes in (``--precision``), and why.

``auto`` (the product default) uses mixed precision wherever the hardware computes it natively: bf16
(or fp16 where bf16 is missing) on a GPU, bf16 on a CPU with bf16 units (AVX-512 BF16 or AMX) when the
encoder trains, fp32 on any other CPU, where bf16 would be emulated and slower than fp32. Measured on a
2-core AMD EPYC with AVX-512 BF16 (docs/results/NOTES.md, "bf16 training"): a GaLore step 0.91-1.0 s in
bf16 against 1.57 s in fp32; MNI152 GM/WM 0.941 at the 240 s budget (fp32 0.935-0.937) and 0.920-0.933
at 120 s (fp32 0.910). Weights and optimizer states stay fp32 in every case; only the forward and backward
passes are autocast.
"""
from __future__ import annotations

from typing import Optional

import torch


def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX tiles), as torch's own CPU checks see it."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(torch.cpu, name)()) for name in checks if hasattr(torch.cpu, name))
    except Exception:  # a torch build without these probes makes no claim
        return False


def choose_autocast(precision: str, device: torch.device, trains_encoder: bool = True) -> tuple[Optional[torch.dtype], str]:
    """The autocast dtype of a fine-tune (None: fp32 throughout) and a sentence saying why.

    ``trains_encoder=False`` (decoder-only): ``auto`` stays fp32 on a CPU. A decoder step is too small for bf16
    units to shorten it (0.35 s against 0.33 s), and bf16 cost mean Dice there (colin27_aal 0.713 against
    0.747-0.749 in fp32).
    """
    if precision == "fp32":
        return None, "precision fp32 (asked for)"
    if precision in ("bf16", "fp16"):
        return (torch.bfloat16 if precision == "bf16" else torch.float16), f"precision {precision} mixed (asked for)"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "precision bf16 mixed (auto): the GPU computes bf16; --precision fp32 to turn it off"
        return torch.float16, "precision fp16 mixed (auto): the GPU has no bf16; --precision fp32 to turn it off"
    if device.type == "cpu" and not trains_encoder:
        return None, "precision fp32 (auto): decoder-only steps on a CPU gain no time from bf16 and lose Dice"
    if device.type == "cpu" and cpu_has_bf16_units():
        return torch.bfloat16, ("precision bf16 mixed (auto): this CPU has bf16 units, which take about 0.6x the "
                                "time of an fp32 step; --precision fp32 to turn it off")
    return None, f"precision fp32 (auto): no bf16 units on this {device.type.upper()}"


def encoder_on_bf16_units(precision: str, device: torch.device) -> bool:
    """Whether an encoder-training run with this ``--precision`` computes on a CPU's bf16 units (the case
    where a GaLore step gets cheap enough to change :func:`~MedSAGaLib.training.methods.choose_method`)."""
    return (device.type == "cpu" and cpu_has_bf16_units()
            and choose_autocast(precision, device, trains_encoder=True)[0] == torch.bfloat16)
