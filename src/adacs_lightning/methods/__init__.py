"""Training methods: one base module and the methods built on it (docs/method.md, docs/architecture.md).

* :class:`AdaCS`: the learned correspondence score (``scoring=False``: the plain baseline);
  ``AdaCS.paper(net)``: the paper's settings (:data:`PAPER`);
* :class:`ReferenceAdaCS`: AdaCS as the authors' code trains it (``experiment=reference``);
* :class:`VarianceWeighted`: heteroscedastic Gaussian NLL and β-NLL;
* :class:`ClosedFormRobust`: AdaCS's pointwise optimum without a network (a control).
"""

from ..objective import Direction
from .adacs import AdaCS
from .base import RegistrationModule
from .reference import ReferenceAdaCS
from .robust import ClosedFormRobust
from .settings import LAM, LR, PAPER, WARMUP_EPOCHS
from .variance import LogVarianceNetwork, VarianceWeighted

__all__ = [
    "LAM",
    "LR",
    "PAPER",
    "WARMUP_EPOCHS",
    "AdaCS",
    "ClosedFormRobust",
    "Direction",
    "LogVarianceNetwork",
    "ReferenceAdaCS",
    "RegistrationModule",
    "VarianceWeighted",
]
