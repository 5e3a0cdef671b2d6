"""The networks and keypoint math against the official outputs (golden file, recipe weights, full size, fp32).
Budgets are the kit's: max|d| <= max_rel*max|g| + 1e-6 and rms(d) <= rms_rel*rms(g) + 1e-6."""
import numpy as np
import pytest
import torch

from model import kinematics as kin
from model.conformance import ANGLE_ABS, CHAINED, IMAGE_SHARE, STAGEWISE, measure, measure_image
from model.images import to_image, to_tensor

TAGS = {"src": "input.source_rgb_u8", "drv0": "input.driving0_rgb_u8", "drv": "input.driving_rgb_u8"}
MEASURED: dict[str, float] = {}  # "stagewise|chained name" -> max|d|, printed at the end of the run (conftest)


def check(golden: dict, name: str, ours: torch.Tensor, budgets: dict, extra_abs: float = 0.0) -> float:
    r = measure(golden[name], ours.detach().double().numpy(), budgets[name.split(".")[0]], extra_abs)
    MEASURED[f"{'chained' if budgets is CHAINED else 'stagewise'} {name}"] = r["max_abs"]
    assert r["max_abs"] <= r["max_limit"], f"{name}: max|d| {r['max_abs']:.3g}"
    assert r["rms"] <= r["rms_limit"], f"{name}: rms(d) {r['rms']:.3g}"
    return r["max_abs"]


def T(golden: dict, name: str) -> torch.Tensor:
    return torch.from_numpy(golden[name])


def kp_info(golden: dict, tag: str) -> kin.KpInfo:
    return {k: T(golden, f"M.{tag}.{k}") for k in ("pitch", "yaw", "roll", "t", "exp", "scale", "kp")}


def check_m(golden, tag, raw, budgets):
    info = kin.refine_kp_info(raw)
    for k, v in raw.items():
        check(golden, f"M.{tag}.raw.{k}", v, budgets)
    for k, v in info.items():
        check(golden, f"M.{tag}.{k}", v, budgets, ANGLE_ABS if k in ("pitch", "yaw", "roll") else 0.0)
    return info


def stitch(nets, x_s, x_d):
    return kin.apply_stitching(x_d, nets.stitching(kin.stitching_input(x_s, x_d)))


# ---- stagewise: each stage fed the golden values of its inputs ----

@torch.inference_mode()
def test_appearance_and_motion(golden, full_nets):
    check(golden, "F.feature_3d", full_nets.appearance_feature_extractor(to_tensor(golden[TAGS["src"]])), STAGEWISE)
    for tag, image in TAGS.items():
        check_m(golden, tag, full_nets.motion_extractor(to_tensor(golden[image])), STAGEWISE)


@torch.inference_mode()
def test_keypoint_math(golden):
    for tag in TAGS:
        info = kp_info(golden, tag)
        check(golden, f"R.{tag}", kin.rotation_matrix(info["pitch"], info["yaw"], info["roll"]), STAGEWISE)
        check(golden, f"K.{tag}", kin.transform_keypoint(info), STAGEWISE)
    x_new = kin.relative_motion(kp_info(golden, "src"), kp_info(golden, "drv"), kp_info(golden, "drv0"))
    check(golden, "REL.x_d_new", x_new, STAGEWISE)


@torch.inference_mode()
def test_stitching_and_retargeting(golden, full_nets):
    x_s, x_d = T(golden, "K.src"), T(golden, "K.drv")
    check(golden, "S.stitch_delta", full_nets.stitching(kin.stitching_input(x_s, x_d)), STAGEWISE)
    check(golden, "S.stitching", stitch(full_nets, x_s, x_d), STAGEWISE)
    lip = full_nets.lip(kin.retarget_input(x_s, T(golden, "input.lip_ratio")))
    check(golden, "S.lip_delta", lip.reshape(1, 21, 3), STAGEWISE)
    eye = full_nets.eye(kin.retarget_input(x_s, T(golden, "input.eye_ratio")))
    check(golden, "S.eye_delta", eye.reshape(1, 21, 3), STAGEWISE)
    x_st = stitch(full_nets, x_s, T(golden, "REL.x_d_new"))
    check(golden, "REL.x_d_stitched", x_st, STAGEWISE)
    check(golden, "REL.x_d_final", kin.apply_multiplier(x_s, T(golden, "REL.x_d_stitched")), STAGEWISE)


@torch.inference_mode()
@pytest.mark.parametrize("prefix,drv,src", [("W", "K.drv", "K.src"),
                                            ("Wsyn", "input.kp_driving_synth", "input.kp_source_synth")])
def test_warping(golden, full_nets, prefix, drv, src):
    out = full_nets.warping_module(T(golden, "F.feature_3d"), T(golden, drv), T(golden, src))
    for k in ("out", "occlusion_map", "deformation"):
        check(golden, f"{prefix}.{k}", out[k], STAGEWISE)


@torch.inference_mode()
def test_generator_and_output_image(golden, full_nets):
    check(golden, "G.out", full_nets.spade_generator(T(golden, "W.out")), STAGEWISE)
    assert np.array_equal(to_image(T(golden, "E2E.out"))[0], golden["E2E.image_u8"])


@torch.inference_mode()
def test_warp_decode(golden, full_nets):
    w = full_nets.warping_module(T(golden, "F.feature_3d"), T(golden, "REL.x_d_final"), T(golden, "K.src"))
    for k in ("occlusion_map", "deformation"):
        check(golden, f"E2E.{k}", w[k], STAGEWISE)
    check(golden, "E2E.out", full_nets.spade_generator(w["out"]), STAGEWISE)


# ---- chained: everything from the three input images ----

@torch.inference_mode()
def test_chained_end_to_end(golden, full_nets):
    nets = full_nets
    f_s = nets.appearance_feature_extractor(to_tensor(golden[TAGS["src"]]))
    check(golden, "F.feature_3d", f_s, CHAINED)
    info = {tag: check_m(golden, tag, nets.motion_extractor(to_tensor(golden[im])), CHAINED)
            for tag, im in TAGS.items()}
    x = {tag: kin.transform_keypoint(i) for tag, i in info.items()}
    for tag in TAGS:
        check(golden, f"K.{tag}", x[tag], CHAINED)
    x_new = kin.relative_motion(info["src"], info["drv"], info["drv0"])
    check(golden, "REL.x_d_new", x_new, CHAINED)
    x_final = kin.apply_multiplier(x["src"], stitch(nets, x["src"], x_new))
    check(golden, "REL.x_d_final", x_final, CHAINED)
    w = nets.warping_module(f_s, x_final, x["src"])
    out = nets.spade_generator(w["out"])
    for k in ("occlusion_map", "deformation"):
        check(golden, f"E2E.{k}", w[k], CHAINED)
    check(golden, "E2E.out", out, CHAINED)
    assert measure_image(golden["E2E.image_u8"], to_image(out)[0], IMAGE_SHARE["chained"])["ok"]
