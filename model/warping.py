"""W: warping module. Dense motion from 21 keypoint pairs, 3-D warp of F's volume, occlusion map."""
import torch
from torch import nn
import torch.nn.functional as F

from .blocks import DownBlock3d, SameBlock2d, UpBlock3d


def make_coordinate_grid(d: int, h: int, w: int, ref: torch.Tensor) -> torch.Tensor:
    """(d,h,w,3) grid of (x,y,z) in [-1,1] with corner-aligned spacing 2i/(n-1)-1 (sampled later with
    align_corners=False: the official mismatch, kept for parity)."""
    def axis(n: int) -> torch.Tensor:
        return 2 * (torch.arange(n, dtype=ref.dtype, device=ref.device) / (n - 1)) - 1
    z, y, x = torch.meshgrid(axis(d), axis(h), axis(w), indexing="ij")
    return torch.stack([x, y, z], dim=-1)


def kp2gaussian(kp: torch.Tensor, grid: torch.Tensor, kp_variance: float = 0.01) -> torch.Tensor:
    """(B,K,3) keypoints on a (d,h,w,3) grid -> (B,K,d,h,w) Gaussian heat maps."""
    diff = grid[None, None] - kp[:, :, None, None, None, :]
    return torch.exp(-0.5 * (diff ** 2).sum(-1) / kp_variance)


class Encoder(nn.Module):
    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int):
        super().__init__()
        chans = [in_features] + [min(max_features, block_expansion * 2 ** (i + 1)) for i in range(num_blocks)]
        self.down_blocks = nn.ModuleList(DownBlock3d(a, b) for a, b in zip(chans[:-1], chans[1:]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = [x]
        for block in self.down_blocks:
            outs.append(block(outs[-1]))
        return outs


class Decoder(nn.Module):
    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int):
        super().__init__()
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(num_blocks)):
            in_filters = (1 if i == num_blocks - 1 else 2) * min(max_features, block_expansion * 2 ** (i + 1))
            self.up_blocks.append(UpBlock3d(in_filters, min(max_features, block_expansion * 2 ** i)))
        self.out_filters = block_expansion + in_features
        self.conv = nn.Conv3d(self.out_filters, self.out_filters, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(self.out_filters, affine=True)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        out = skips[-1]
        for block, skip in zip(self.up_blocks, reversed(skips[:-1])):
            out = torch.cat([block(out), skip], dim=1)
        return F.relu(self.norm(self.conv(out)))


class Hourglass(nn.Module):
    """3-D U-Net; depth is never down-sampled."""

    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int):
        super().__init__()
        self.encoder = Encoder(block_expansion, in_features, num_blocks, max_features)
        self.decoder = Decoder(block_expansion, in_features, num_blocks, max_features)
        self.out_filters = self.decoder.out_filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class DenseMotionNetwork(nn.Module):
    def __init__(self, num_kp: int = 21, feature_channel: int = 32, block_expansion: int = 32,
                 max_features: int = 1024, num_blocks: int = 5, reshape_depth: int = 16, compress: int = 4,
                 estimate_occlusion_map: bool = True):
        super().__init__()
        self.num_kp = num_kp
        self.hourglass = Hourglass(block_expansion, (num_kp + 1) * (compress + 1), num_blocks, max_features)
        self.mask = nn.Conv3d(self.hourglass.out_filters, num_kp + 1, kernel_size=7, padding=3)
        self.compress = nn.Conv3d(feature_channel, compress, kernel_size=1)
        self.norm = nn.BatchNorm3d(compress, affine=True)
        self.occlusion = (nn.Conv2d(self.hourglass.out_filters * reshape_depth, 1, kernel_size=7, padding=3)
                          if estimate_occlusion_map else None)

    def forward(self, feature: torch.Tensor, kp_driving: torch.Tensor,
                kp_source: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, d, h, w = feature.shape
        k = self.num_kp + 1
        feature = F.relu(self.norm(self.compress(feature)))
        grid = make_coordinate_grid(d, h, w, kp_source)
        # Sparse motions: identity for the background, then a translation-only backward flow per keypoint.
        shifted = grid[None, None] - kp_driving[:, :, None, None, None, :] + kp_source[:, :, None, None, None, :]
        sparse = torch.cat([grid[None, None].expand(b, 1, d, h, w, 3), shifted], dim=1)  # (B,K,d,h,w,3)
        rep = feature[:, None].expand(b, k, *feature.shape[1:]).reshape(b * k, -1, d, h, w)
        deformed = F.grid_sample(rep, sparse.reshape(b * k, d, h, w, 3), align_corners=False)
        deformed = deformed.view(b, k, -1, d, h, w)
        heat = kp2gaussian(kp_driving, grid) - kp2gaussian(kp_source, grid)
        heat = torch.cat([heat.new_zeros(b, 1, d, h, w), heat], dim=1)[:, :, None]
        # group-major [heatmap, compressed features] per keypoint: channel 5k + c
        prediction = self.hourglass(torch.cat([heat, deformed], dim=2).view(b, -1, d, h, w))
        mask = F.softmax(self.mask(prediction), dim=1)
        deformation = (sparse.permute(0, 1, 5, 2, 3, 4) * mask[:, :, None]).sum(dim=1).permute(0, 2, 3, 4, 1)
        out = {"deformation": deformation, "mask": mask}
        if self.occlusion is not None:
            out["occlusion_map"] = torch.sigmoid(self.occlusion(prediction.reshape(b, -1, h, w)))
        return out


class WarpingNetwork(nn.Module):
    """out = occlusion * fourth(third(flatten(grid_sample(f_s, deformation))))."""

    def __init__(self, num_kp: int = 21, block_expansion: int = 64, max_features: int = 512,
                 num_down_blocks: int = 2, reshape_channel: int = 32, estimate_occlusion_map: bool = True,
                 dense_motion_params: dict | None = None):
        super().__init__()
        params = dict(block_expansion=32, max_features=1024, num_blocks=5, reshape_depth=16, compress=4)
        params.update(dense_motion_params or {})
        self.dense_motion_network = DenseMotionNetwork(num_kp=num_kp, feature_channel=reshape_channel,
                                                       estimate_occlusion_map=estimate_occlusion_map, **params)
        out_ch = block_expansion * 2 ** num_down_blocks
        self.third = SameBlock2d(max_features, out_ch, lrelu=True)
        self.fourth = nn.Conv2d(out_ch, out_ch, kernel_size=1)

    def forward(self, feature_3d: torch.Tensor, kp_driving: torch.Tensor,
                kp_source: torch.Tensor) -> dict[str, torch.Tensor]:
        dense = self.dense_motion_network(feature_3d, kp_driving, kp_source)
        out = F.grid_sample(feature_3d, dense["deformation"], align_corners=False)
        b, c, d, h, w = out.shape
        out = self.fourth(self.third(out.view(b, c * d, h, w)))
        occlusion = dense.get("occlusion_map")
        if occlusion is not None:
            out = out * occlusion
        return {"occlusion_map": occlusion, "deformation": dense["deformation"], "out": out}
