"""The page's control panel, grouped the way a newcomer looks for things: motion, expression, pose, retargeting,
output. Every control applies live (from the next frame) and to the Portrait editing tab."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from model.editing import REGIONS, SLIDERS

REGION_LABELS = ("All", "Expression only", "Pose only", "Lips only", "Eyes only")
POSE = ("pitch", "yaw", "roll", "mov_x", "mov_y", "mov_z")  # head angles and movement, as the official app groups them
FACE = tuple(k for k in SLIDERS if k not in POSE)  # the expression sliders


@dataclass
class Panel:
    controls: list[gr.components.Component]  # LiveApp.set_controls' inputs, in its order
    region: gr.Radio
    sliders: list[gr.Slider]  # one per model.editing.SLIDERS key, in its order
    reset_reference: gr.Button
    reset_edits: gr.Button


def _slider(name: str) -> gr.Slider:
    lo, hi, default, step, label = SLIDERS[name]
    return gr.Slider(lo, hi, default, step=step, label=label, elem_id=f"lp-{name.replace('_', '-')}")


def panel() -> Panel:
    """Build the grouped controls inside the current Blocks context."""
    with gr.Accordion("Motion", open=True):
        relative = gr.Checkbox(True, label="Relative motion (against the reference frame)")
        stitching = gr.Checkbox(True, label="Stitching (keeps shoulders still)")
        region = gr.Radio(list(zip(REGION_LABELS, REGIONS)), value="all", label="Animation region",
                          info="What your face drives; the rest stays as in the portrait.", elem_id="lp-region")
        multiplier = gr.Slider(0, 2, 1, step=0.05, label="Motion multiplier (scales the edits too)")
        smoothing = gr.Slider(0, 1, 0.5, step=0.05, label="Smoothing of the face box")
        reset_reference = gr.Button("Reset reference (next frame = neutral pose)", size="sm")
    sliders = {}
    with gr.Accordion("Expression", open=True):
        for name in FACE:
            sliders[name] = _slider(name)
    with gr.Accordion("Pose", open=False):
        for name in POSE:
            sliders[name] = _slider(name)
    reset_edits = gr.Button("Reset expression and pose", size="sm", elem_id="lp-reset-edits")
    with gr.Accordion("Retargeting", open=False):
        with gr.Row():
            eye_on = gr.Checkbox(False, label="Retarget eyes")
            eye = gr.Slider(0, 0.8, 0.35, step=0.01, label="Eye open ratio")
        with gr.Row():
            lip_on = gr.Checkbox(False, label="Retarget lips")
            lip = gr.Slider(0, 0.8, 0.1, step=0.01, label="Lip open ratio")
    with gr.Accordion("Output", open=False):
        paste = gr.Checkbox(True, label="Paste back into the full portrait")
        overlay = gr.Checkbox(False, label="Draw FPS / latency on the video")
    return Panel([relative, stitching, paste, multiplier, eye_on, eye, lip_on, lip, smoothing, overlay], region,
                 [sliders[k] for k in SLIDERS], reset_reference, reset_edits)
