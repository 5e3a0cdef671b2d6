"""S: the stitching, lip and eye retargeting MLPs (one class, three instances)."""
import torch
from torch import nn


class StitchingRetargetingNetwork(nn.Module):
    """Linear layers at the even indices of `mlp`, ReLU between them, none after the last."""

    def __init__(self, input_size: int, hidden_sizes: list[int], output_size: int):
        super().__init__()
        sizes = [input_size, *hidden_sizes]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(sizes[-1], output_size))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


# models.yaml: checkpoint sub-dict name -> (our name, constructor arguments)
STITCHING_CONFIGS = {
    "retarget_shoulder": ("stitching", dict(input_size=126, hidden_sizes=[128, 128, 64], output_size=65)),
    "retarget_mouth": ("lip", dict(input_size=65, hidden_sizes=[128, 128, 64], output_size=63)),
    "retarget_eye": ("eye", dict(input_size=66, hidden_sizes=[256, 256, 128, 128, 64], output_size=63)),
}
