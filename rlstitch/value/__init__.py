"""Value estimators V(z_t, t, prompts) behind one interface: StitchVM, Tweedie, Monte Carlo, baselines."""

from rlstitch.value.base import ValueEstimator
from rlstitch.value.estimators import MonteCarlo, Tweedie

__all__ = ["MonteCarlo", "Tweedie", "ValueEstimator"]
