"""Every default value with a shared name, in one place.

A parameter name that appears in several functions or configs (``rank``, ``n_iter_max``,
``tol``, seeds, ...) takes its default from here, so sibling functions cannot drift apart.
"""

# Joint Tucker-2 / HOOI (decompose/tucker.py)
TUCKER_N_ITER_MAX = 20
"""HOOI sweeps after the HOSVD start; each sweep updates U, then V."""
TUCKER_TOL = 1e-5
"""Stop once a sweep raises the fit (share of the energy kept, 1 - error^2) by less than this."""

# Which layers a decomposition stage touches (decompose/apply.py)
DECOMPOSE_MIN_PARAMS = 1024
"""Layers with fewer weights per task stay dense: their factors would cost more than they save."""
CALIBRATION_SAMPLES = 512
"""Samples per task on which rank searches score a candidate (accuracy proxy)."""

# Channel pruning (prune/)
PRUNING_RATIO = 0.3
"""Share of each layer's (or, with global pruning, of all) channels removed."""
PRUNE_ITERATIVE_STEPS = 10
"""Pruning steps, importance re-estimated before each; with a MACs target, the schedule's steps."""
MAX_PRUNING_RATIO = 0.9
"""No layer loses more than this share of its channels (the end of a MACs target's schedule)."""
PRUNE_CALIBRATION_BATCHES = 2
"""Batches per task on which data-driven importances (naive Bayes, Taylor) are measured."""
NAIVE_BAYES_PROBES = 48
"""Channels masked one at a time to label the naive-Bayes classifier."""
NAIVE_BAYES_VAR_SMOOTHING = 1e-2
"""Added to every variance of the naive-Bayes classifier, times the largest feature variance."""
