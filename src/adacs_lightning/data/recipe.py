"""What a data set does to an image's grid before the network sees it, for registering new files the same way.

Training reads each file through its data module's MONAI chain; the geometric steps of that chain
(axis order, reorientation, resampling, resizing) decide what a voxel of the network's input means.
:class:`GridRecipe` names those steps so that ``adacs-register`` can put a new pair on the grid the
network was trained on. Steps that only choose a field of view (a crop around the heart, padding to a
size) are left out: the networks are convolutional and register the whole image.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GridRecipe:
    """The geometric preprocessing of a data set, in the order it is applied.

    Attributes:
        transpose: a permutation of the spatial axes applied first (e.g. ``(1, 0)``), or None.
        orientation: axis codes (``"RAS"``) a 3D image is reoriented to, or None (stored order).
        spacing: the spacing resampled to, mm per axis (``0``: that axis keeps its spacing), or None.
        size: the shape an image is resized to (voxels per axis; its spacing follows), or None.
    """

    transpose: tuple[int, ...] | None = None
    orientation: str | None = None
    spacing: tuple[float, ...] | None = None
    size: tuple[int, ...] | None = None

    @property
    def is_identity(self) -> bool:
        return self == GridRecipe()

    def describe(self) -> str:
        """One phrase per step, for messages and ``registration.json``."""
        parts = []
        if self.transpose:
            parts.append(f"axes transposed {self.transpose}")
        if self.orientation:
            parts.append(f"reoriented to {self.orientation}")
        if self.spacing:
            mm = " × ".join("kept" if s <= 0 else f"{s:g}" for s in self.spacing)
            parts.append(f"resampled to {mm} mm")
        if self.size:
            parts.append(f"resized to {' × '.join(str(n) for n in self.size)}")
        return ", ".join(parts) or "none"
