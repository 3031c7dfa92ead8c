"""Superposition toy data with known ground-truth features (Sharkey, Braun & Millidge 2022) and the
numbers that say how well a coder recovered them.

    data = ToyData(ToyConfig(d=64, n_features=128, mean_active=4))
    x, coefficients = data.sample(4096)
    ...train a coder on x (monosemantic.train)...
    toy_recovery(decoder_rows, data.features, density)
"""

from monosemantic.toy.data import ToyConfig, ToyData, ToySample, firing_probabilities
from monosemantic.toy.recovery import MMCS, ToyRecovery, fraction_recovered, mmcs, toy_recovery

__all__ = ["ToyConfig", "ToyData", "ToySample", "firing_probabilities", "MMCS", "ToyRecovery",
           "fraction_recovered", "mmcs", "toy_recovery"]
