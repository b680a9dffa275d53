"""The PyTorch backend: the model itself (through the fast path on CPUs), on any device torch has."""

from __future__ import annotations

import torch

from ..fastpath import inference_copy
from ..head import decode_boxes


class TorchRunner:
    """Encoder and decoders of a segmenter or base model, run by PyTorch.

    ``fast`` runs :func:`~MedSAGaLib.fastpath.inference_copy` (batch norms folded, channels-last
    convolutions); otherwise the model runs as it is (the reference the other backends are tested against).
    """

    name = "torch"
    precision = "f32"

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu", fast: bool = True) -> None:
        self.device = torch.device(device)
        model = model.to(self.device).eval()
        self.model = inference_copy(model) if fast else model
        self.image_size = model.image_size
        self.roi = getattr(model, "roi", None)  # a crop the model was fine-tuned on (predict_slices applies it)
        self.sides = getattr(model, "sides", None)  # left/right pairs learnt as one structure (split there too)
        self.description = "PyTorch (fast path)" if fast else "PyTorch"

    @torch.inference_mode()
    def encode(self, images01: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] in [0, 1] -> image embeddings."""
        return self.model.image_encoder(self.model.normalize(images01.to(self.device)))

    @torch.inference_mode()
    def decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Image embeddings -> k+1 class logits [B, k+1, S, S] (k-class segmenters)."""
        return self.model.decode(embeddings.to(self.device)).float().cpu()

    @torch.inference_mode()
    def decode_boxes(self, embeddings: torch.Tensor, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        """One image's embedding [1, C, h, w] and its boxes [N, 4] (model pixels) -> logits [N, 1, S, S]."""
        return decode_boxes(self.model, embeddings.to(self.device), boxes_xyxy).float().cpu()

    def __call__(self, images01: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images01))
