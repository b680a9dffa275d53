"""Slice <-> model input: resize the longest side to the input size, pad bottom/right (as MedSAM).

The inverse crops the padding and resizes logits back, so predictions land on the exact input grid.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


class SliceTransform:
    """Maps 2-D slices in [0, 1] to 3-channel model inputs of ``image_size`` and back."""

    def __init__(self, image_size: int) -> None:
        self.image_size = int(image_size)

    def resized_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        height, width = int(shape[0]), int(shape[1])
        scale = self.image_size / max(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))

    def _pad(self, tensor: torch.Tensor) -> torch.Tensor:
        height, width = tensor.shape[-2:]
        return F.pad(tensor, (0, self.image_size - width, 0, self.image_size - height))

    def to_model(self, slice01: np.ndarray | torch.Tensor) -> torch.Tensor:
        """2-D slice [H, W] in [0, 1] -> image [3, S, S]."""
        image = torch.as_tensor(np.asarray(slice01, dtype=np.float32))[None, None]
        image = F.interpolate(image, size=self.resized_shape(image.shape[-2:]), mode="bilinear",
                              align_corners=False, antialias=True)
        return self._pad(image)[0].expand(3, -1, -1).contiguous()

    def to_model_labels(self, labels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """2-D label map [H, W] -> [S, S] long (nearest neighbour; padding is background)."""
        tensor = torch.as_tensor(np.asarray(labels, dtype=np.int64))[None, None].float()
        tensor = F.interpolate(tensor, size=self.resized_shape(tensor.shape[-2:]), mode="nearest-exact")
        return self._pad(tensor)[0, 0].long()

    def from_model(self, logits: torch.Tensor, original_shape: Sequence[int]) -> torch.Tensor:
        """Logits [..., C, S, S] -> [..., C, H, W] on the slice's own grid."""
        height, width = self.resized_shape(original_shape)
        cropped = logits[..., :height, :width]
        lead = cropped.shape[:-2]
        flat = cropped.reshape(-1, 1, height, width) if cropped.dim() == 3 else cropped
        out = F.interpolate(flat.float(), size=(int(original_shape[0]), int(original_shape[1])),
                            mode="bilinear", align_corners=False)
        return out.reshape(*lead, int(original_shape[0]), int(original_shape[1]))

    def box_to_model(self, box_xyxy: Sequence[float], original_shape: Sequence[int]) -> list[float]:
        """A box in slice pixels (x0, y0, x1, y1) -> the same box in model-input pixels."""
        scale = self.image_size / max(int(original_shape[0]), int(original_shape[1]))
        return [float(v) * scale for v in box_xyxy]
