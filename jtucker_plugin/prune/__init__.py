"""Structured channel pruning: the naive-Bayes importance for torch-pruning, and bundle pruning."""

from jtucker_plugin.prune.gaussian_nb import fit_gaussian_nb, nb_log_odds
from jtucker_plugin.prune.naive_bayes import FEATURES, NaiveBayesImportance
from jtucker_plugin.prune.prune import (
    IMPORTANCES,
    BundleNet,
    GuardedImportance,
    make_importance,
    prune_bundle,
)

__all__ = [
    "FEATURES",
    "IMPORTANCES",
    "BundleNet",
    "GuardedImportance",
    "NaiveBayesImportance",
    "fit_gaussian_nb",
    "make_importance",
    "nb_log_odds",
    "prune_bundle",
]
