"""The feature networks: context CNN, glimpse CNN, transpose CNN (Appendix D).

Letters: B batch, C channels, H/W image side, S glimpse side.
CNN blocks follow the authors' code: Conv k x k, no padding, no bias, BatchNorm, ReLU, Xavier init.
We avoid pooling so the features keep as much spatial information as possible (Section 3.2).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import conv_stack_side


def conv_block(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=0, bias=False)
    nn.init.xavier_uniform_(conv.weight)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ConvNet(nn.Module):
    """A stack of conv blocks whose output is flattened; `out_features` and `out_side` are known up front."""

    def __init__(self, c_in: int, side: int, channels: tuple[int, ...], strides: tuple[int, ...], kernel: int):
        super().__init__()
        layers, c = [], c_in
        for c_out, stride in zip(channels, strides):
            layers.append(conv_block(c, c_out, kernel, stride))
            c = c_out
        self.layers = nn.Sequential(*layers)
        self.out_side = conv_stack_side(side, kernel, strides)
        self.out_channels = channels[-1]
        self.out_features = channels[-1] * self.out_side**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).flatten(1)  # (B, C_last * side_last^2)


class MobileNetGlimpse(nn.Module):
    """torchvision's MobileNetV2 as the glimpse CNN (CIFAR-10 classification); random init, no download."""

    def __init__(self, c_in: int):
        super().__init__()
        from torchvision.models import mobilenet_v2

        net = mobilenet_v2(weights=None)
        if c_in != 3:
            first = net.features[0][0]
            net.features[0][0] = nn.Conv2d(c_in, first.out_channels, 3, first.stride, 1, bias=False)
        self.features = net.features
        self.out_features = net.last_channel  # 1280

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))  # (B, 1280): global average pool


class TransposeCNN(nn.Module):
    """The glimpse CNN in reverse: latent -> S x S sketch with `c_out` channels (Section 3.3, Fig. 4)."""

    def __init__(self, c_out: int, side: int, channels: tuple[int, ...], strides: tuple[int, ...], kernel: int):
        super().__init__()
        sides = [side]  # input side of each forward conv layer, then the output side
        for stride in strides:
            sides.append((sides[-1] - kernel) // stride + 1)
        self.start_shape = (channels[-1], sides[-1], sides[-1])
        outs = [c_out, *channels[:-1]]  # layer i maps channels[i] back to outs[i]
        layers = []
        for i in reversed(range(len(channels))):
            # output_padding recovers the side an unpadded strided conv rounded away
            pad = sides[i] - ((sides[i + 1] - 1) * strides[i] + kernel)
            deconv = nn.ConvTranspose2d(channels[i], outs[i], kernel, stride=strides[i], output_padding=pad,
                                        bias=(i == 0))
            layers.append(deconv if i == 0 else nn.Sequential(deconv, nn.BatchNorm2d(outs[i]), nn.ReLU(inplace=True)))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features.view(-1, *self.start_shape))  # (B, c_out, S, S), logits
