"""Small real models the tests attach quantizers to."""

import torch
from torch import nn


class TwoInputNet(nn.Module):
    """A forward with two tensors and a keyword argument, like many real models."""

    def __init__(self):
        super().__init__()
        self.image = nn.Conv2d(1, 4, 3, padding=1)
        self.side = nn.Linear(3, 4)
        self.head = nn.Linear(4 * 8 * 8 + 4, 2)

    def forward(self, image, side, *, temperature=1.0):
        features = torch.cat([self.image(image).flatten(1), self.side(side)], dim=1)
        return self.head(features) / temperature


def conv_net(dims: int = 2) -> nn.Sequential:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    return nn.Sequential(conv(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
