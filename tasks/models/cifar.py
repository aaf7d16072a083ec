"""CIFAR-style ResNet (arXiv 1512.03385, OpenLTH ``cifar_resnet_<depth>``) and VGG-11-bn with a global-pool classifier.

ResNet-<depth>: stem conv3x3 -> BN -> ReLU, three stages of ``(depth - 2) / 6`` basic blocks with widths W, 2W, 4W
(W = 16), global average pool, ``fc`` 4W -> classes. The shortcut is a 1x1 stride-2 conv + BN where the width changes
(option B), the identity otherwise. ResNet-20 for 10 classes on RGB input has 272,474 parameters.

VGG-11-bn: plan [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512]; every conv is 3x3 with bias -> BN -> ReLU, M is a
2x2 max-pool; global average pool (any input size), ``fc`` 512 -> classes. 9,231,114 parameters for 10 classes.

Both models list their repeated blocks in ``block_names()`` (residual blocks, resp. conv stages between poolings),
which ``tasks.adapters.CnnAdapter`` uses.
"""
from __future__ import annotations

from torch import Tensor, nn

from core.errors import ConfigError


class BasicBlock(nn.Module):
    def __init__(self, f_in: int, f_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(f_in, f_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(f_out)
        self.conv2 = nn.Conv2d(f_out, f_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(f_out)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or f_in != f_out:
            self.shortcut = nn.Sequential(nn.Conv2d(f_in, f_out, 1, stride=stride, bias=False), nn.BatchNorm2d(f_out))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, width: int = 16):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ConfigError(f"CIFAR ResNet depth={depth} must be 6n + 2 (20, 32, 44, 56, 110, ...)")
        if width < 1 or num_classes < 1 or in_chans < 1:
            raise ConfigError(f"ResNet width={width}, num_classes={num_classes}, in_chans={in_chans} must be >= 1")
        n = (depth - 2) // 6
        self.depth, self.width = depth, width
        self.conv1 = nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        f_in = width
        for stage, f_out in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(f_in, f_out, stride))
                f_in = f_out
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(f_in, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """kaiming_normal_ (fan_in) on conv and linear weights, biases 0, BN weight ~ U(0, 1) and bias 0 (OpenLTH)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def block_names(self) -> list[str]:
        return [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(len(getattr(self, f"layer{s}")))]

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


VGG_PLANS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
}


class ConvBNReLU(nn.Sequential):
    def __init__(self, f_in: int, f_out: int, batch_norm: bool = True):
        layers = [nn.Conv2d(f_in, f_out, 3, padding=1, bias=True)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(f_out))
        layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class VGG(nn.Module):
    """CIFAR VGG: ``stages[i]`` are the conv units between two poolings (the pooling closes the stage)."""

    def __init__(self, plan: list, num_classes: int = 10, in_chans: int = 3, batch_norm: bool = True):
        super().__init__()
        stages, current, f_in = [], [], in_chans
        for item in plan:
            if item == "M":
                stages.append(nn.Sequential(*current, nn.MaxPool2d(2)))
                current = []
            else:
                current.append(ConvBNReLU(f_in, int(item), batch_norm))
                f_in = int(item)
        if current:
            stages.append(nn.Sequential(*current))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(f_in, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """kaiming_normal_ (fan_in) on conv and linear weights, biases 0, BN weight 1 and bias 0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def block_names(self) -> list[str]:
        return [f"stages.{i}" for i in range(len(self.stages))]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(x)).flatten(1))


def resnet(depth: int = 20, num_classes: int = 10, in_chans: int = 3, width: int = 16) -> ResNet:
    return ResNet(depth, num_classes, in_chans, width)


def vgg(depth: int = 11, num_classes: int = 10, in_chans: int = 3, batch_norm: bool = True) -> VGG:
    if depth not in VGG_PLANS:
        raise ConfigError(f"VGG depth={depth}; valid: {', '.join(map(str, sorted(VGG_PLANS)))}")
    return VGG(VGG_PLANS[depth], num_classes, in_chans, batch_norm)
