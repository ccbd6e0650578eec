"""The feature networks: context CNN, glimpse CNN, transpose CNN (Appendix D).

Letters: B batch, C channels, H/W image side, S glimpse side, S_d sketch side.
A block is what the authors' code used for the dataset (`Config.batch_norm`, `conv_init`):
MNIST: Conv k x k without bias, BatchNorm, ReLU, Xavier init; CelebA: Conv with bias, ReLU, PyTorch's init.
We avoid pooling so the features keep as much spatial information as possible (Section 3.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import Config, conv_sides, padding_per_layer


def _init(conv: nn.Module, conv_init: str) -> nn.Module:
    if conv_init == "xavier":
        nn.init.xavier_uniform_(conv.weight)
    return conv  # "default": PyTorch's own initialisation, as built


def conv_block(c_in: int, c_out: int, kernel: int, stride: int, padding: int, batch_norm: bool,
               conv_init: str) -> nn.Sequential:
    conv = _init(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=not batch_norm), conv_init)
    norm = [nn.BatchNorm2d(c_out)] if batch_norm else []  # a bias before BatchNorm would be cancelled by it
    return nn.Sequential(conv, *norm, nn.ReLU(inplace=True))


class ConvNet(nn.Module):
    """A stack of conv blocks whose output is flattened; `out_features` and `out_side` are known up front."""

    def __init__(self, c_in: int, side: int, channels: tuple[int, ...], strides: tuple[int, ...], kernel: int,
                 padding: tuple[int, ...] = (), batch_norm: bool = True, conv_init: str = "xavier"):
        super().__init__()
        layers, c = [], c_in
        for c_out, stride, pad in zip(channels, strides, padding_per_layer(padding, len(channels))):
            layers.append(conv_block(c, c_out, kernel, stride, pad, batch_norm, conv_init))
            c = c_out
        self.layers = nn.Sequential(*layers)
        self.out_side = conv_sides(side, kernel, strides, padding)[-1]
        self.out_channels = channels[-1]
        self.out_features = channels[-1] * self.out_side**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).flatten(1)  # (B, C_last * side_last^2)


def context_net(cfg: Config) -> ConvNet:
    return ConvNet(cfg.channels, cfg.image_size, cfg.context_channels, cfg.context_strides, cfg.context_kernel,
                   cfg.context_padding, cfg.batch_norm, cfg.conv_init)


def glimpse_conv_net(cfg: Config) -> ConvNet:
    return ConvNet(cfg.channels, cfg.glimpse_size, cfg.glimpse_channels, cfg.glimpse_strides, cfg.glimpse_kernel,
                   cfg.glimpse_padding, cfg.batch_norm, cfg.conv_init)


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


@dataclass(frozen=True)
class Deconv:
    """One transpose convolution of the decoder, in the order it runs."""

    c_in: int
    c_out: int
    stride: int
    padding: int
    output_padding: int


def decoder_layers(cfg: Config, c_out: int) -> tuple[tuple[int, int, int], list[Deconv]]:
    """The transpose CNN as the glimpse CNN in reverse: its start shape (C, side, side) and its layers.

    Layer k undoes glimpse layer L-1-k: channels back, same stride and padding, and the output padding
    that restores the side the strided convolution rounded away (cfg.decoder_output_padding), so the
    sketch is S_g x S_g. decoder_order="forward" runs those (stride, padding, output padding) triples
    in the glimpse CNN's forward order instead, while the channels still run back (the authors' MNIST
    drawing scripts: for draw-8 the stride-1 layer first, a 10 x 10 sketch).
    """
    L = len(cfg.glimpse_channels)
    sides = conv_sides(cfg.glimpse_size, cfg.glimpse_kernel, cfg.glimpse_strides, cfg.glimpse_padding)
    padding = padding_per_layer(cfg.glimpse_padding, L)
    outs = [c_out, *cfg.glimpse_channels[:-1]]  # glimpse layer i maps outs[i] channels to glimpse_channels[i]
    geometry = []
    for i in reversed(range(L)):  # the mirror: the last glimpse layer is undone first
        restored = (sides[i + 1] - 1) * cfg.glimpse_strides[i] - 2 * padding[i] + cfg.glimpse_kernel
        geometry.append((cfg.glimpse_strides[i], padding[i], sides[i] - restored if cfg.decoder_output_padding else 0))
    if cfg.decoder_order == "forward":
        geometry.reverse()
    layers = [Deconv(cfg.glimpse_channels[i], outs[i], *g) for i, g in zip(reversed(range(L)), geometry)]
    return (cfg.glimpse_channels[-1], sides[-1], sides[-1]), layers


def sketch_side(cfg: Config) -> int:
    """S_d: the side of the sketch the transpose CNN draws (S_g, unless the layout says otherwise)."""
    (_, side, _), layers = decoder_layers(cfg, 1)
    for layer in layers:
        side = (side - 1) * layer.stride - 2 * layer.padding + cfg.glimpse_kernel + layer.output_padding
    return side


class TransposeCNN(nn.Module):
    """Latent features -> an S_d x S_d sketch with `c_out` channels (logits), the glimpse CNN in reverse (Fig. 4).

    Blocks mirror the glimpse CNN's: transpose conv (+ BatchNorm) + ReLU; the last layer has no ReLU, and
    with batch_norm no bias but a BatchNorm of its own (the authors' MNIST decoders).
    """

    def __init__(self, cfg: Config, c_out: int):
        super().__init__()
        self.start_shape, layers = decoder_layers(cfg, c_out)
        blocks = []
        for k, layer in enumerate(layers):
            deconv = _init(nn.ConvTranspose2d(layer.c_in, layer.c_out, cfg.glimpse_kernel, stride=layer.stride,
                                              padding=layer.padding, output_padding=layer.output_padding,
                                              bias=not cfg.batch_norm), cfg.conv_init)
            norm = [nn.BatchNorm2d(layer.c_out)] if cfg.batch_norm else []
            last = k == len(layers) - 1
            blocks.append(nn.Sequential(deconv, *norm, *([] if last else [nn.ReLU(inplace=True)])))
        self.layers = nn.Sequential(*blocks)
        self.out_side = sketch_side(cfg)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features.view(-1, *self.start_shape))  # (B, c_out, S_d, S_d), logits
