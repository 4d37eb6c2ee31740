"""torchvision's ResNet-18 (no pretrained weights) checkpointed per residual stage.

The stem (conv1, bn1, ReLU, max-pool) runs plainly; ``layer1`` .. ``layer4``
each go through :func:`harness.checkpoint`, so under a ``layer_ckpt`` variant
only the four stage inputs are kept for the outer backward.  BatchNorm running
statistics are handled by the checkpoint's buffer rule (first call updates,
recomputation runs on clones).
"""
from __future__ import annotations

from torch import Tensor, nn

from harness.core.ckpt import checkpoint

__all__ = ["ResNet18"]


class ResNet18(nn.Module):
    def __init__(self, n_way: int = 5) -> None:
        super().__init__()
        from torchvision.models import resnet18

        self.net = resnet18(weights=None, num_classes=n_way)

    def forward(self, x: Tensor) -> Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        for stage in (n.layer1, n.layer2, n.layer3, n.layer4):
            x = checkpoint(stage, x)
        return n.fc(n.avgpool(x).flatten(1))
