"""F: appearance feature extractor. Portrait (B,3,256,256) -> 3-D feature volume (B,32,16,64,64)."""
import torch
from torch import nn

from .blocks import DownBlock2d, ResBlock3d, SameBlock2d


class AppearanceFeatureExtractor(nn.Module):
    def __init__(self, image_channel: int = 3, block_expansion: int = 64, num_down_blocks: int = 2,
                 max_features: int = 512, reshape_channel: int = 32, reshape_depth: int = 16,
                 num_resblocks: int = 6):
        super().__init__()
        self.reshape_channel, self.reshape_depth = reshape_channel, reshape_depth
        self.first = SameBlock2d(image_channel, block_expansion)
        chans = [min(max_features, block_expansion * 2 ** i) for i in range(num_down_blocks + 1)]
        self.down_blocks = nn.ModuleList(DownBlock2d(a, b) for a, b in zip(chans[:-1], chans[1:]))
        self.second = nn.Conv2d(chans[-1], max_features, kernel_size=1)
        # Added by name: the checkpoint keys are resblocks_3d.3dr{i}.*
        self.resblocks_3d = nn.Sequential()
        for i in range(num_resblocks):
            self.resblocks_3d.add_module(f"3dr{i}", ResBlock3d(reshape_channel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.first(x)
        for block in self.down_blocks:
            out = block(out)
        out = self.second(out)
        b, _, h, w = out.shape
        # channel index c*depth + d, the order W flattens back with.
        return self.resblocks_3d(out.view(b, self.reshape_channel, self.reshape_depth, h, w))
