"""Per-worker memory preflight for a training run: estimate, compare with the device, refuse what cannot fit.

A *worker* is one training process (one rank); ``device_bytes`` is the memory it can use: one GPU's, or its
share of a node's memory on CPU. The estimate covers the tensors of one steady-state training step (forward,
token loss, backward, optimizer step) for a Llama-style decoder (Llama, Qwen, Mistral; Gemma-3 is close) with
SDPA attention. It counts tensor bytes only: the CUDA context, the NCCL buffers, the caching allocator's
fragmentation, loading the model and scoring it after training are what the ``headroom`` of
:func:`rpsft.core.memory.preflight.check_fits` keeps free.

* :mod:`~rpsft.core.memory.dims`: the sizes of a model (:func:`model_dims`, :func:`model_dims_for`, with an
  exact parameter count taken from the model built on the meta device: no weights are read or allocated), the
  matrices a ``layers`` selection protects and the bytes of their bases (:func:`protected_shapes`,
  :func:`bases_bytes`).
* :mod:`~rpsft.core.memory.estimate`: :func:`estimate_worker_memory`, the per-worker breakdown for a strategy
  (``fsdp2``, ``ddp``, ``single``), a parameter dtype, mixed precision, batch and activation checkpointing.
* :mod:`~rpsft.core.memory.fixes`: :func:`suggest_fixes`, the config changes that make an estimate fit.
* :mod:`~rpsft.core.memory.preflight`: :func:`estimate_train_memory` reads the inputs from a
  :class:`~rpsft.core.config.TrainConfig`; :func:`check_fits` raises :class:`MemoryPreflightError` with the
  per-part table and the fixes; :func:`preflight_train_memory` runs the whole check for one ``TrainConfig``
  on this machine (a :class:`MemoryPreflightWarning` when it cannot size the model).
* :mod:`~rpsft.core.memory.report`: :class:`MemoryEstimate`, the parts and phase peaks of one estimate with
  its table in GiB, and the text of the refusal.
* :mod:`~rpsft.core.memory.measure`: :func:`measure_peak_bytes`, the peak tensor bytes of a callable measured
  by torch's ``MemTracker``; the tests compare it with the estimate.
"""
