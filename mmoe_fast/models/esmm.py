"""ESMM (Ma et al., SIGIR 2018): pCTR and pCTCVR = pCTR * pCVR, both over the whole sample space."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .common import MultiTaskModel, Towers, layers, mlp, positive, sizes


class ESMM(MultiTaskModel):
    """Entire Space Multi-task Model (Ma et al., SIGIR 2018) for click (CTR) and conversion (CVR).

    A shared bottom (ESMM's shared embedding) feeds a CTR tower and a CVR tower. ``forward`` returns the
    logits of ``[pCTR, pCTCVR]``, ``pCTCVR = pCTR * pCVR``, so both tasks train with BCE on labels
    ``[click, click and conversion]`` over all impressions; ``predict_proba`` gives the probabilities,
    ``predict_cvr`` the pCVR that ESMM exists to serve.
    """

    def __init__(
        self, in_features: int, num_tasks: int = 2, *, bottom_hidden: int | Sequence[int] = 113,
        tower_hidden: int | Sequence[int] = (8,), task_types: Sequence[str] | None = None,
    ) -> None:
        if num_tasks != 2:
            raise ValueError(f"num_tasks must be 2 for ESMM (pCTR and pCTCVR), got {num_tasks!r}")
        super().__init__(num_tasks, task_types)
        if self.task_types != ("binary", "binary"):
            raise ValueError(f"task_types must be ('binary', 'binary') for ESMM, got {self.task_types!r}")
        widths = (positive(in_features, "in_features"), *layers(bottom_hidden, "bottom_hidden"))
        self.bottom = mlp(widths, None)
        self.towers = Towers(2, widths[-1], sizes(tower_hidden, "tower_hidden"))

    def _ctr_cvr_logits(self, x: Tensor) -> Tensor:
        return self.towers(self.bottom(x))

    @staticmethod
    def ctcvr_logit(ctr_logit: Tensor, cvr_logit: Tensor) -> Tensor:
        """``logit(sigmoid(a) * sigmoid(b))``, exact and finite for any finite logits ``a``, ``b``."""
        a, b = ctr_logit, cvr_logit
        # sigmoid(a) sigmoid(b) / (1 - sigmoid(a) sigmoid(b)) = 1 / (e^-a + e^-b + e^-(a+b)); the result is
        # never above a, since a logsumexp is at least its largest term.
        return -torch.logsumexp(torch.stack((-a, -b, -(a + b)), dim=-1), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 2]``: logit(pCTR) and logit(pCTR * pCVR)."""
        ctr, cvr = self._ctr_cvr_logits(x).unbind(1)
        return torch.stack((ctr, self.ctcvr_logit(ctr, cvr)), dim=1)

    def predict_proba(self, x: Tensor) -> Tensor:
        """``[B, 2]``: pCTR and pCTCVR, with pCTCVR <= pCTR."""
        return torch.sigmoid(self(x))

    def predict_cvr(self, x: Tensor) -> Tensor:
        """``[B]``: pCVR, the conversion probability given a click."""
        return torch.sigmoid(self._ctr_cvr_logits(x)[:, 1])
