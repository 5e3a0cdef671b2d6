"""The five LivePortrait networks in one container, built from models.yaml hyperparameters ("full") or from a
tiny configuration of the same classes for fast plumbing tests ("tiny")."""
import torch
from torch import nn

from .appearance import AppearanceFeatureExtractor
from .motion import MotionExtractor
from .recipe import fill_module
from .spade import SPADEDecoder
from .stitching import STITCHING_CONFIGS, StitchingRetargetingNetwork
from .warping import WarpingNetwork

# src/config/models.yaml of the official release.
FULL = {
    "appearance_feature_extractor": dict(image_channel=3, block_expansion=64, num_down_blocks=2, max_features=512,
                                         reshape_channel=32, reshape_depth=16, num_resblocks=6),
    "motion_extractor": dict(num_kp=21, num_bins=66, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    "warping_module": dict(num_kp=21, block_expansion=64, max_features=512, num_down_blocks=2, reshape_channel=32,
                           estimate_occlusion_map=True,
                           dense_motion_params=dict(block_expansion=32, max_features=1024, num_blocks=5,
                                                    reshape_depth=16, compress=4)),
    "spade_generator": dict(upscale=2, block_expansion=64, max_features=512, num_down_blocks=2),
}
# Same classes, a few percent of the work: a 16x4x32x32 feature volume and a 256x256 output.
TINY = {
    "appearance_feature_extractor": dict(image_channel=3, block_expansion=8, num_down_blocks=3, max_features=64,
                                         reshape_channel=16, reshape_depth=4, num_resblocks=2),
    "motion_extractor": dict(num_kp=21, num_bins=66, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)),
    "warping_module": dict(num_kp=21, block_expansion=16, max_features=64, num_down_blocks=1, reshape_channel=16,
                           estimate_occlusion_map=True,
                           dense_motion_params=dict(block_expansion=8, max_features=32, num_blocks=3,
                                                    reshape_depth=4, compress=1)),
    "spade_generator": dict(upscale=2, block_expansion=16, max_features=32, num_down_blocks=1, out_channels=16,
                            spade_hidden=16),
}
CONFIGS = {"full": FULL, "tiny": TINY}
NETWORK_NAMES = tuple(FULL)  # the four single-network checkpoint files, in checkpoint order


class LivePortraitNetworks(nn.Module):
    """F, M, W, G and the three S MLPs, attribute names equal to the checkpoint file names."""

    def __init__(self, config: str = "full"):
        super().__init__()
        cfg = CONFIGS[config]
        self.config = config
        self.appearance_feature_extractor = AppearanceFeatureExtractor(**cfg["appearance_feature_extractor"])
        self.motion_extractor = MotionExtractor(**cfg["motion_extractor"])
        self.warping_module = WarpingNetwork(**cfg["warping_module"])
        self.spade_generator = SPADEDecoder(**cfg["spade_generator"])
        # keyed by checkpoint sub-dict: retarget_shoulder (stitching), retarget_mouth (lip), retarget_eye (eye)
        self.stitching_retargeting_module = nn.ModuleDict(
            {sub: StitchingRetargetingNetwork(**kw) for sub, (_, kw) in STITCHING_CONFIGS.items()})
        self.eval()

    @property
    def stitching(self) -> StitchingRetargetingNetwork:
        return self.stitching_retargeting_module["retarget_shoulder"]

    @property
    def lip(self) -> StitchingRetargetingNetwork:
        return self.stitching_retargeting_module["retarget_mouth"]

    @property
    def eye(self) -> StitchingRetargetingNetwork:
        return self.stitching_retargeting_module["retarget_eye"]

    def fill_recipe(self, seed: int = 1) -> "LivePortraitNetworks":
        """Deterministic untrained weights (the conformance kit's recipe): same FLOPs, meaningless faces."""
        for name in NETWORK_NAMES:
            fill_module(getattr(self, name), seed)
        for sub, net in self.stitching_retargeting_module.items():
            fill_module(net, seed, prefix=sub + ".")
        return self
