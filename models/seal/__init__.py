"""SEAL: safety-enhanced data selection for fine-tuning (Shen, Chen, Das, Chen, ICLR 2025).

Commands (registered on the ``train`` group by ``cli.register``):

* ``safeserve train seal-select``: learn one selector logit per fine-tuning row by penalty-based
  bilevel optimisation against a safe data set (``select_train.py``; gradient derivation in
  ``selector.py``). Writes ``selector.json`` (ids, omega, weight, rank, data sha256, config,
  per-epoch history), ``selector.safetensors`` (omega and optimiser moments),
  ``selector_hist.png`` and ``train_state.pt`` (for ``--resume``).
* ``safeserve train seal-finetune``: SFT with TRL on the top ``--keep`` fraction (or a random
  fraction) and save a servable checkpoint, with the safety head copied and re-checked
  (``finetune.py``, ``probe.py``).
* ``safeserve train seal-experiment``: the small CPU reproduction (``experiment.py``; its
  settings, data, step bookkeeping and report in ``experiment_config.py``,
  ``experiment_data.py``, ``experiment_steps.py`` and ``experiment_report.py``).

Data formats: ``data.py``. Data-parallel selector training (every rank walks the same seeded
batch order and takes its slice; the selector update is formed from the gathered per-row
values of the whole global batch, so omega stays identical on every rank)::

    # several GPUs
    accelerate launch --config_file deploy/accelerate/multi_gpu.yaml --num_processes 8 \\
        -m safeserve.server.cli train seal-select --ft-data ft.jsonl --safe-data safe.jsonl \\
        --model /models/base --out runs/seal/sel --dtype bfloat16 --micro-batch-size 8
    # two CPU processes (gloo), as the test does (SAFESERVE_SKIP_DDP=1 skips it)
    ACCELERATE_USE_CPU=1 accelerate launch --config_file deploy/accelerate/multi_gpu.yaml \\
        --num_processes 2 -m safeserve.server.cli train seal-select ...

``--batch-size`` is the global batch; ``--micro-batch-size`` bounds the rows per forward pass on
each rank (gradient accumulation inside one step).
"""
