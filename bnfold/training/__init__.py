"""Training BN networks and computing their population statistics (the BN paper's Algorithm 2)."""

from bnfold.training.population import population_statistics

__all__ = ["population_statistics"]
