"""G: SPADE generator. Warped feature (B,256,64,64) -> image (B,3,512,512) in [0,1]."""
import torch
from torch import nn
import torch.nn.functional as F


class SNConv2d(nn.Conv2d):
    """Conv2d under the legacy spectral-norm key layout (`weight_orig`, `weight_u`, `weight_v`), in eval form:
    W = weight_orig / (u . (W_mat v)) from the stored u, v, with no power iteration."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, bias=bias)
        weight = self.weight
        del self.weight
        self.weight_orig = nn.Parameter(weight.detach())
        self.register_buffer("weight_u", torch.zeros(out_channels))
        self.register_buffer("weight_v", torch.zeros(weight[0].numel()))
        self.register_buffer("frozen", None, persistent=False)  # normalized_weight(), once (freeze)

    def normalized_weight(self) -> torch.Tensor:
        sigma = torch.dot(self.weight_u, torch.mv(self.weight_orig.flatten(1), self.weight_v))
        return self.weight_orig / sigma

    def freeze(self) -> None:
        """Compute the normalised weight now and use it from here on (eval weights do not change)."""
        with torch.no_grad():
            self.frozen = self.normalized_weight().detach().clone()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.frozen = None  # new weights: normalise them again
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.normalized_weight() if self.frozen is None else self.frozen, self.bias)


class SPADE(nn.Module):
    """out = InstanceNorm(x) * (1 + gamma(seg)) + beta(seg), seg resized nearest to x."""

    def __init__(self, norm_nc: int, label_nc: int, hidden: int = 128):
        super().__init__()
        self.param_free_norm = nn.InstanceNorm2d(norm_nc, affine=False)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, kernel_size=3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, norm_nc, kernel_size=3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, norm_nc, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        actv = self.mlp_shared(F.interpolate(seg, size=x.shape[2:], mode="nearest"))
        return self.param_free_norm(x) * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SPADEResnetBlock(nn.Module):
    def __init__(self, fin: int, fout: int, label_nc: int, hidden: int = 128):
        super().__init__()
        fmiddle = min(fin, fout)
        self.learned_shortcut = fin != fout
        self.conv_0 = SNConv2d(fin, fmiddle, kernel_size=3, padding=1)
        self.conv_1 = SNConv2d(fmiddle, fout, kernel_size=3, padding=1)
        if self.learned_shortcut:
            self.conv_s = SNConv2d(fin, fout, kernel_size=1, bias=False)
        self.norm_0 = SPADE(fin, label_nc, hidden)
        self.norm_1 = SPADE(fmiddle, label_nc, hidden)
        if self.learned_shortcut:
            self.norm_s = SPADE(fin, label_nc, hidden)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 2e-1))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 2e-1))
        return shortcut + dx


class SPADEDecoder(nn.Module):
    def __init__(self, upscale: int = 2, max_features: int = 512, block_expansion: int = 64,
                 out_channels: int = 64, num_down_blocks: int = 2, spade_hidden: int = 128):
        super().__init__()
        ic = min(max_features, block_expansion * 2 ** num_down_blocks)  # = W's output channels; also the segmap
        self.fc = nn.Conv2d(ic, 2 * ic, kernel_size=3, padding=1)
        for i in range(6):
            self.add_module(f"G_middle_{i}", SPADEResnetBlock(2 * ic, 2 * ic, ic, spade_hidden))
        self.up_0 = SPADEResnetBlock(2 * ic, ic, ic, spade_hidden)
        self.up_1 = SPADEResnetBlock(ic, out_channels, ic, spade_hidden)
        self.up = nn.Upsample(scale_factor=2)
        self.conv_img = (nn.Sequential(nn.Conv2d(out_channels, 3 * 4, kernel_size=3, padding=1), nn.PixelShuffle(2))
                         if upscale > 1 else nn.Conv2d(out_channels, 3, kernel_size=3, padding=1))

    def freeze_spectral_norm(self) -> None:
        """Every SNConv2d's normalised weight computed once, at its current precision (the engine: fp32, before
        casting), instead of on every call."""
        for m in self.modules():
            if isinstance(m, SNConv2d):
                m.freeze()

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        x = self.fc(feature)
        for i in range(6):
            x = getattr(self, f"G_middle_{i}")(x, feature)
        x = self.up_1(self.up(self.up_0(self.up(x), feature)), feature)
        return torch.sigmoid(self.conv_img(F.leaky_relu(x, 2e-1)))
