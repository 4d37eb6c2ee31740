"""The engine: configuration, the functional MAML learner, checkpointing, gradient comparison."""
from harness.core.ckpt import checkpoint
from harness.core.config import ConfigError, MetaConfig, Task
from harness.core.engine import MetaLearner
from harness.core.grads import agreement

__all__ = ["ConfigError", "MetaConfig", "MetaLearner", "Task", "agreement", "checkpoint"]
