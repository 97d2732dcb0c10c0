"""lightning-mp: pipeline and tensor model parallelism for any LightningModule.

``import lightning_mp`` registers the strategy name ``"model_parallel"``::

    import lightning as L
    import lightning_mp

    trainer = L.Trainer(strategy="model_parallel", devices=2)
    trainer = L.Trainer(strategy=lightning_mp.ModelParallel(pipeline_parallel_size=2, schedule="1f1b"), devices=2)
    trainer = L.Trainer(strategy=lightning_mp.ModelParallel(tensor_parallel_size=2), devices=4)
"""

from lightning_mp.dry_run import dry_run
from lightning_mp.integrations.config import ModelParallelConfig, build_strategy, register_configs
from lightning_mp.integrations.registry import register
from lightning_mp.observe.callbacks import PipelineSummary
from lightning_mp.observe.timeline import PipelineTimeline
from lightning_mp.plan.build import build_plan
from lightning_mp.runtime.errors import ConfigError, LayoutError, ModelSplitError, PipelineError
from lightning_mp.runtime.layout import ParallelLayout
from lightning_mp.strategy import ModelParallel
from lightning_mp.tensor.plan import TensorParallelPlan, plan_tensor_parallel

__all__ = [
    "ConfigError",
    "LayoutError",
    "ModelParallel",
    "ModelParallelConfig",
    "ModelSplitError",
    "ParallelLayout",
    "PipelineError",
    "PipelineSummary",
    "PipelineTimeline",
    "TensorParallelPlan",
    "build_plan",
    "build_strategy",
    "dry_run",
    "plan_tensor_parallel",
]
__version__ = "0.1.0"

register()
register_configs()
