"""maml-harness: a correct functional MAML engine and a benchmark/ablation harness around it.

Public surface (the rest is the harness):

* :class:`MetaLearner`, :class:`MetaConfig`, :class:`Task` -- the engine;
* :func:`checkpoint` -- drop-in for ``torch.utils.checkpoint.checkpoint(module, x)`` inside a model's forward;
* :func:`agreement` -- relative error and cosine between two sets of meta-gradients.
"""
from harness.core.ckpt import checkpoint
from harness.core.config import MetaConfig, Task
from harness.core.engine import MetaLearner
from harness.core.grads import agreement

__all__ = ["MetaLearner", "MetaConfig", "Task", "checkpoint", "agreement"]
__version__ = "0.1.0"
