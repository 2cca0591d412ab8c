"""Adapters to the toolkits users already run: Intel Neural Compressor and ONNX.

- ``neural_compressor``: registers ``TuckerConfig`` (one model) and ``JTuckerConfig`` (several
  task models, joined in a ``MultiTaskModel``) as Intel Neural Compressor 3.x algorithms, and
  quantizes the task models of a bundle through INC (``quantize_tasks``). Importing it imports
  INC (several seconds); the rest of the plugin imports it only when needed.
- ``onnx``: one ONNX file per task model, checked against PyTorch with onnxruntime.

Names that tools can discover without importing anything: the entry-point group
``jtucker_plugin.neural_compressor`` lists the registered INC algorithms and their configs.
"""
