"""Portrait editing without a webcam: the official "retargeting image" feature.

The still portrait with the expression and pose sliders (and eye/lip retargeting) applied, pasted back into the
full image. It owns one engine session whose driving frame and reference are the portrait's own crop: relative
motion against itself is no motion, so the edits are all that changes. One engine call per change.
"""
from __future__ import annotations

import dataclasses
import threading
import uuid

import numpy as np

from model.engine import Engine
from stream.face import SourceFace
from stream.paste import Pastes
from stream.pipeline import Settings, host
from stream.scheduler import Scheduler, Work


class PortraitEditor:
    """Edits one portrait at a time for one page; call it with the page's settings after every change."""

    def __init__(self, engine: Engine, name: str | None = None):
        self.engine = engine
        self.name = name or f"edit-{uuid.uuid4().hex[:12]}"
        self._source: SourceFace | None = None
        self._pastes = Pastes()
        self._closed = False
        self._lock = threading.Lock()  # a page's events may overlap

    def __call__(self, source: SourceFace, settings: Settings) -> np.ndarray | None:
        """The edited portrait (uint8 RGB, the size of `source.image`); None once closed. Only the sliders,
        stitching and the retargeting targets apply: there is no motion to restrict or scale."""
        still = dataclasses.replace(settings, relative=True, multiplier=1.0, region="all")
        crop = source.crop.image_256
        with self._lock:
            if self._closed:
                return None
            def setup() -> None:  # on the engine thread, right before the batch this frame joins
                if source is not self._source:
                    self.engine.set_source(crop, self.name, ratios=[*source.eye, *source.lip])
                    self.engine.set_reference(crop, self.name)
                    self._source = source
                self.engine.set_controls(self.name, **still.engine_controls(1.0))
            # an item of the live batches; on CUDA brought to the host, where this editor pastes
            face = host(Scheduler.of(self.engine).run(Work(crop, self.name, setup)))
            return self._pastes(source, face)

    def close(self) -> None:
        """Free the engine session; later calls return None."""
        with self._lock:
            self._closed = True
            Scheduler.of(self.engine).call(lambda: self.engine.close(self.name))
            self._source, self._pastes = None, Pastes()
