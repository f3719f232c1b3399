"""Speed options every method shares: channels-last memory and ``torch.compile`` (results unchanged)."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


class SpeedOptions:
    """For a LightningModule with ``backbone``, ``weighting_networks`` and the ``channels_last`` and ``compile`` hyper-parameters."""

    def configure_model(self) -> None:
        """Memory format and compilation, once the module is on its device."""
        if self.hparams.channels_last:
            for net in [self.backbone, *self.weighting_networks]:
                net.to(memory_format=self._memory_format)
        if self.hparams.compile and not getattr(self, "_compiled", False):
            # The adapter's own methods (forward_train) call its children, so compile those.
            for net in [*self.backbone.children(), *self.weighting_networks]:
                net.compile()
            self._compiled = True

    def _in_memory_format(self, *images: Tensor) -> tuple[Tensor, ...]:
        """``images`` in the networks' memory format."""
        if not self.hparams.channels_last:
            return images
        return tuple(t.contiguous(memory_format=self._memory_format) for t in images)

    @property
    def _memory_format(self) -> torch.memory_format:
        if not self.hparams.channels_last:
            return torch.contiguous_format
        return torch.channels_last if self.backbone.spatial_dims == 2 else torch.channels_last_3d
