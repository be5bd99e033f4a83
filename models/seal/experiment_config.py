"""The SEAL experiment's settings, at the bottom of its import graph: ``ExperimentConfig``
(every option of ``safeserve train seal-experiment``), ``STAGES`` (a run's stages in order;
all but the last are the valid ``stop_after`` values) and ``RUNS`` (the names of the three
fine-tuning runs compared). The experiment's other modules (``experiment_data``,
``experiment_steps``, ``experiment_report``, ``experiment``) import them from here, so nothing
imports back up.
"""

from __future__ import annotations

from dataclasses import dataclass

STAGES = ("data", "align", "selector", "sft", "eval")
RUNS = ("all", "random", "seal")


@dataclass
class ExperimentConfig:
    data_root: str
    out: str = "runs/seal/exp"
    n_benign: int = 120
    n_harmful: int = 30
    n_safe_refusals: int = 36
    n_safe_benign: int = 12
    n_eval_harmful: int = 64
    n_eval_benign: int = 40
    answer_tokens: int = 32
    keep: float = 0.8
    algorithm: int = 2
    selector_epochs: int = 3
    sft_epochs: float = 1.0
    batch_size: int = 8
    select_lr: float = 2e-4
    sft_lr: float = 3e-4
    selector_lr: float = 5e-3
    selector_optim: str = "adam"  # adam (paper) | sgd
    gamma_step: float = 0.025
    max_length: int = 256
    seed: int = 0
    threads: int = 1
    model: str | None = None
    align: bool = True
    n_align_harmful: int = 96
    n_align_benign: int = 96
    align_epochs: float = 2.0
    align_lr: float = 3e-4
    gen_backend: str = "hf"  # hf | vllm
    stop_after: str | None = None  # one of STAGES[:-1]
