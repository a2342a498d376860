"""Cityscapes label ids -> the 19 train ids (ignore 255), from cityscapesscripts' label table."""
from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = 255
NUM_CLASSES = 19


def _table():
    try:
        from cityscapesscripts.helpers.labels import labels
    except ImportError as e:  # pragma: no cover - the examples extra installs it
        raise ImportError("examples/semiseg needs cityscapesscripts for the label table: "
                          "pip install cityscapesscripts (or pip install tpswarp[examples])") from e
    return labels


def id_to_train_id_lut() -> np.ndarray:
    """A 256-entry uint8 lookup table: label id -> train id; ids that are not evaluated
    (train id 255 or -1 in the table) and ids absent from the table map to 255."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for lab in _table():
        if 0 <= lab.id < 256 and 0 <= lab.trainId < NUM_CLASSES:
            lut[lab.id] = lab.trainId
    return lut


def class_names() -> list:
    names = [""] * NUM_CLASSES
    for lab in _table():
        if 0 <= lab.trainId < NUM_CLASSES and not names[lab.trainId]:
            names[lab.trainId] = lab.name
    return names


def palette() -> torch.Tensor:
    """``(256, 3)`` uint8 colours by train id (ignore = black)."""
    pal = torch.zeros(256, 3, dtype=torch.uint8)
    for lab in _table():
        if 0 <= lab.trainId < NUM_CLASSES:
            pal[lab.trainId] = torch.tensor(lab.color, dtype=torch.uint8)
    return pal


def label_ids() -> dict:
    """Cityscapes label name -> label id (e.g. ``"road" -> 7``)."""
    return {lab.name: lab.id for lab in _table()}


def colourize(train_ids: torch.Tensor) -> torch.Tensor:
    """``(H, W)`` train ids -> ``(H, W, 3)`` float RGB in ``[0, 1]``."""
    return palette()[train_ids.long().clamp(0, 255)].float() / 255
