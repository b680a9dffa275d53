"""Prompt-free k-class segmentation head (as in SAMed) and MedSAM-style box prompting.

The mask decoder gets k+1 output tokens (background + k classes); the prompt encoder contributes
its default no-prompt embedding; the k+1 mask logits go through softmax/argmax into a label map.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .laterality import SideSplit
from .models import Architecture, BaseSam, SamParts, _mask_decoder

# A colour per class, as Slicer's generic anatomy colours cycle (r, g, b in 0..1).
DEFAULT_COLORS = [
    (0.945, 0.839, 0.569),
    (0.502, 0.682, 0.502),
    (0.847, 0.396, 0.310),
    (0.435, 0.722, 0.824),
    (0.867, 0.510, 0.396),
    (0.565, 0.933, 0.565),
    (0.753, 0.408, 0.690),
    (0.863, 0.961, 0.078),
]


def default_colors(count: int) -> list[tuple[float, float, float]]:
    return [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(count)]


def class_decoder_from_pretrained(pretrained: nn.Module, num_classes: int, seed: int = 0) -> nn.Module:
    """A mask decoder with ``num_classes + 1`` tokens that starts from SAM's pretrained decoder.

    Slot 0 (background) copies the single-mask token with its hypernetwork's output negated, so the
    untrained background logit is the opposite of SAM's own mask. Class c copies pretrained token
    (c - 1) mod 4 and its hypernetwork: SAM's four tokens differ, so the classes are not symmetric
    (identical copies make argmax ties that the first class always wins). Classes beyond four get
    small noise on top of their copy for the same reason.
    """
    if num_classes < 1:
        raise ValueError("A segmentation head needs at least one class.")
    sources = [0] + [(c - 1) % pretrained.num_mask_tokens for c in range(1, num_classes + 1)]
    decoder = select_class_slots(pretrained, sources)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for slot in range(pretrained.num_mask_tokens + 1, num_classes + 1):
            token = decoder.mask_tokens.weight[slot]
            token += 0.02 * token.std() * torch.randn(token.shape, generator=generator)
        background_out = decoder.output_hypernetworks_mlps[0].layers[-1]
        background_out.weight.neg_()
        background_out.bias.neg_()
    return decoder


def select_class_slots(decoder: nn.Module, slots: Sequence[int]) -> nn.Module:
    """A new mask decoder whose tokens (with their hypernetworks and IoU outputs) are copies of ``decoder``'s
    ``slots``, in that order (slot 0: background); every other weight is shared with it by copy."""
    new = _mask_decoder(num_multimask_outputs=len(slots) - 1).to(decoder.mask_tokens.weight.device)
    shared = {k: v for k, v in decoder.state_dict().items()
              if not k.startswith(("mask_tokens", "output_hypernetworks_mlps", "iou_prediction_head.layers.2"))}
    new.load_state_dict(shared, strict=False)
    with torch.no_grad():
        new.mask_tokens.weight.copy_(decoder.mask_tokens.weight[list(slots)])
        last, new_last = decoder.iou_prediction_head.layers[-1], new.iou_prediction_head.layers[-1]
        new_last.weight.copy_(last.weight[list(slots)])
        new_last.bias.copy_(last.bias[list(slots)])
        for slot, source in enumerate(slots):
            new.output_hypernetworks_mlps[slot].load_state_dict(decoder.output_hypernetworks_mlps[source].state_dict())
    return new


class ClassSegmenter(SamParts):
    """SAM adapted to k classes without prompts: images in [0, 1] -> k+1 logits per pixel."""

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        architecture: Architecture,
        class_names: Sequence[str],
        class_colors: Optional[Sequence[Sequence[float]]] = None,
        pixel_mean: Optional[torch.Tensor] = None,
        pixel_std: Optional[torch.Tensor] = None,
        sides: Optional[SideSplit] = None,
    ) -> None:
        super().__init__(
            architecture,
            pixel_mean if pixel_mean is not None else (0.0, 0.0, 0.0),
            pixel_std if pixel_std is not None else (1.0, 1.0, 1.0),
        )
        if sides is not None and sides.num_classes != len(class_names):
            raise ValueError(f"The left/right split is for {sides.num_classes} classes, not {len(class_names)}.")
        slots = len(sides.names) if sides is not None else len(class_names)
        if mask_decoder.num_mask_tokens != slots + 1:
            raise ValueError(
                f"The decoder has {mask_decoder.num_mask_tokens - 1} class slots but "
                f"{slots} {'structures' if sides is not None else 'class names'} were given."
            )
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.class_names = list(class_names)
        self.class_colors = [tuple(float(x) for x in c) for c in (class_colors or default_colors(len(class_names)))]
        if len(self.class_colors) != len(self.class_names):
            raise ValueError("Give one colour per class.")
        # MedSAGaLib.roi.RegionOfInterest set by fine-tuning on small structures: slices are cropped to it
        self.roi = None
        # MedSAGaLib.laterality.SideSplit: the head segments one structure per left/right pair, split at a midline
        self.sides = sides

    @classmethod
    def from_base(
        cls,
        base: BaseSam,
        class_names: Sequence[str],
        class_colors: Optional[Sequence[Sequence[float]]] = None,
        seed: int = 0,
        sides: Optional[SideSplit] = None,
    ) -> "ClassSegmenter":
        slots = len(sides.names) if sides is not None else len(class_names)
        decoder = class_decoder_from_pretrained(base.mask_decoder, slots, seed=seed)
        return cls(
            base.image_encoder,
            base.prompt_encoder,
            decoder,
            copy.deepcopy(base.architecture),
            class_names,
            class_colors,
            base.pixel_mean,
            base.pixel_std,
            sides,
        )

    @property
    def num_classes(self) -> int:
        """The user's classes (k): the label values a segmentation holds."""
        return len(self.class_names)

    @property
    def head_names(self) -> list[str]:
        """The classes the decoder's tokens segment: the user's, or one structure per left/right pair."""
        return list(self.sides.names) if self.sides is not None else list(self.class_names)

    def merge_sides(self, sides: SideSplit) -> None:
        """Learn each left/right pair as one structure: keep the token of each pair's first class (and
        background), drop its partner's. Only before training; the segmenter's class names stay the user's."""
        if self.sides is not None:
            raise ValueError("This segmenter already learns its left/right pairs as one structure.")
        if sides.num_classes != self.num_classes:
            raise ValueError(f"The left/right split is for {sides.num_classes} classes, not {self.num_classes}.")
        self.mask_decoder = select_class_slots(self.mask_decoder, list(sides.first))
        self.sides = sides

    def encode(self, images01: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(self.normalize(images01))

    def decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Image embeddings -> k+1 logits at the model's input size."""
        batch = embeddings.shape[0]
        sparse, dense = self.prompt_encoder(points=None, boxes=None, masks=None)
        low_res, _ = self.mask_decoder.predict_masks(
            image_embeddings=embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse.expand(batch, -1, -1),
            dense_prompt_embeddings=dense.expand(batch, -1, -1, -1),
        )
        return F.interpolate(low_res, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images01))


def decode_boxes(base: BaseSam, embeddings: torch.Tensor, boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """Box prompts decoded from image embeddings: boxes [N, 4] (pixels of the model input) -> logits [N, 1, S, S].

    ``embeddings`` is [1, C, h, w] (every box prompts the same image: embed once, decode all, as
    SAM's predictor does) or [N, C, h, w] (one box per image).
    """
    boxes = boxes_xyxy.to(embeddings.device, torch.float32).reshape(-1, 1, 4)
    sparse, dense = base.prompt_encoder(points=None, boxes=boxes, masks=None)
    low_res, _ = base.mask_decoder(
        image_embeddings=embeddings.expand(boxes.shape[0], -1, -1, -1),
        image_pe=base.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    size = base.image_size
    return F.interpolate(low_res, size=(size, size), mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_boxes(base: BaseSam, images01: torch.Tensor, boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """MedSAM-style box prompting: one box per image (pixels of the model input) -> mask logits [B,1,S,S]."""
    return decode_boxes(base, base.image_encoder(base.normalize(images01)), boxes_xyxy)
