"""Model definitions the harness builds itself (the CIFAR-style CNNs of the pruning / RPS literature)."""
from tasks.models.cifar import VGG, ResNet, resnet, vgg

__all__ = ["ResNet", "VGG", "resnet", "vgg"]
