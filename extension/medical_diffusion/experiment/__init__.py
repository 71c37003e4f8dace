"""The paper's experiments as one cached stage graph (``meddiff experiment``).

``load_config`` (YAML or preset) -> ``build_plan`` (stages with cache keys) -> ``run_experiment``
(local, one worker per GPU, or Ray) -> ``results/`` (results.json, table1.md, table2.md, report.html).
Every stage calls the same library functions as the single ``meddiff`` commands.
"""

from medical_diffusion.experiment.config import ExperimentConfig, load_config
from medical_diffusion.experiment.graph import Plan, Stage, build_plan
from medical_diffusion.experiment.runner import RunSummary, run_experiment

__all__ = ["ExperimentConfig", "Plan", "RunSummary", "Stage", "build_plan", "load_config", "run_experiment"]
