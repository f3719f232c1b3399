"""Training methods: one base module and the methods built on it (docs/method.md).

* :class:`AdaCS`: the learned correspondence score (``scoring=False``: the plain baseline);
* :class:`VarianceWeighted`: heteroscedastic Gaussian NLL and β-NLL;
* :class:`ClosedFormRobust`: AdaCS's pointwise optimum without a network (a control).
"""

from .adacs import AdaCS
from .base import Direction, RegistrationModule
from .robust import ClosedFormRobust
from .variance import LogVarianceNetwork, VarianceWeighted

__all__ = ["AdaCS", "ClosedFormRobust", "Direction", "LogVarianceNetwork", "RegistrationModule", "VarianceWeighted"]
