"""The demo networks: a small conv net with BatchNorm (default) and an MLP."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class ConvNet(nn.Module):
    """Stages of conv3x3 + BatchNorm + ReLU (stride 2 from the second stage on), global
    average pooling, then a linear classifier; works for any image size."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, channels: Sequence[int] = (32, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for index, width in enumerate(channels):
            layers += [
                nn.Conv2d(previous, width, 3, stride=1 if index == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(previous, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


class MLP(nn.Module):
    """Flatten, then Linear + BatchNorm + ReLU per hidden width, then a linear classifier."""

    def __init__(self, in_channels: int = 1, image_size: int = 8, num_classes: int = 10,
                 hidden: Sequence[int] = (128, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        previous = in_channels * image_size * image_size
        for width in hidden:
            layers += [nn.Linear(previous, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
            previous = width
        layers.append(nn.Linear(previous, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
