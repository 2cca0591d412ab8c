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
PRUNE_ITERATIVE_STEPS = 3
"""Pruning steps, the importance re-estimated before each (step k of a MACs target aims at
``macs_target ** (k / steps)``)."""
MAX_PRUNING_RATIO = 0.9
"""No layer loses more than this share of its channels (in one step, with a MACs target)."""
PRUNE_CALIBRATION_BATCHES = 2
"""Batches per task on which data-driven importances (naive Bayes, Taylor) are measured."""
NAIVE_BAYES_PROBES = 48
"""Channels masked one at a time to label the naive-Bayes classifier."""
NAIVE_BAYES_VAR_SMOOTHING = 1e-2
"""Added to every variance of the naive-Bayes classifier, times the largest feature variance."""

# Intel Neural Compressor integration (integrations/neural_compressor.py, stages/quantize.py)
RANK_ENERGY = 0.9
"""Energy kept per mode when a Tucker config names no rank (INC's TuckerConfig/JTuckerConfig)."""
CALIBRATION_BATCHES = 8
"""Batches of each task's own training images on which int8 static quantization calibrates."""

# ONNX export (integrations/onnx.py)
ONNX_OPSET = 17
"""The opset of exported task models (onnxruntime >= 1.17 runs it)."""
ONNX_ATOL = 1e-4
ONNX_RTOL = 1e-4
"""How far onnxruntime's logits may be from PyTorch's: |ort - torch| <= atol + rtol * |torch|."""

# Layers composed of shared parts: Hybrid sharing and shared cores (merge/, decompose/shared_core.py)
MATERIALIZE = True
"""Keep each task's dense weight after its first forward without gradients (the dense layer's
speed, one dense weight of memory per task layer) rather than rebuild it at every forward."""
HYBRID_L1 = 1e-4
"""Strength of Hybrid's L1 penalty on the sparse deltas, ``l1 * sum_t |S_t|_1``."""
