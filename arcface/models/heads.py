"""The classifier used only for training: cosine between embeddings and one learned centre per class."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NormalizedLinear(nn.Module):
    """cos θ between L2-normalized embeddings and L2-normalized class weights (the class centres)."""

    def __init__(self, embedding_size: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, C) cosines in [-1, 1], computed in float32 (margins need the precision)."""
        features = F.normalize(embeddings.float(), dim=1)
        centres = F.normalize(self.weight.float(), dim=1)
        return features @ centres.T
