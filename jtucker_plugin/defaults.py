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
