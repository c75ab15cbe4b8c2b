"""Res16UNet34C on MinkowskiEngine, laid out exactly like OneFormer3D/ESAM's backbone.

Module and parameter names follow ``oneformer3d/mink_unet.py`` (``conv0p1s1``, ``bn0``,
``block1.0.conv1``, ``convtr4p16s2``...), so a ``backbone.*`` state dict from those
projects loads after stripping the prefix. For D = 3 every convolution there is a plain
hypercube, which is what MinkowskiEngine builds by default. The network returns block8's
96-d output; the ``final`` 1×1 convolution of the original is not part of this encoder.
"""

from __future__ import annotations

from torch import nn

from .config import UNetConfig
from .minkowski import ME

DIMENSION = 3


def _conv(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1) -> nn.Module:
    return ME.MinkowskiConvolution(
        in_ch, out_ch, kernel_size=kernel_size, stride=stride, bias=False, dimension=DIMENSION
    )


def _conv_tr(in_ch: int, out_ch: int) -> nn.Module:
    return ME.MinkowskiConvolutionTranspose(
        in_ch, out_ch, kernel_size=2, stride=2, bias=False, dimension=DIMENSION
    )


def _norm(channels: int, momentum: float) -> nn.Module:
    return ME.MinkowskiBatchNorm(channels, momentum=momentum)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, downsample: nn.Module | None = None):
        super().__init__()
        # The original builds the blocks' own norms with the default momentum 0.1.
        self.conv1 = _conv(inplanes, planes, 3)
        self.norm1 = _norm(planes, 0.1)
        self.conv2 = _conv(planes, planes, 3)
        self.norm2 = _norm(planes, 0.1)
        self.relu = ME.MinkowskiReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + residual)


class Res16UNet34C(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        planes, layers, momentum = config.planes, config.layers, config.bn_momentum
        self.out_channels = planes[7]
        self.inplanes = config.init_dim
        self.conv0p1s1 = _conv(config.in_channels, self.inplanes, config.conv1_kernel_size)
        self.bn0 = _norm(self.inplanes, momentum)
        for level, name in enumerate(("conv1p1s2", "conv2p2s2", "conv3p4s2", "conv4p8s2")):
            setattr(self, name, _conv(self.inplanes, self.inplanes, 2, stride=2))
            setattr(self, f"bn{level + 1}", _norm(self.inplanes, momentum))
            setattr(self, f"block{level + 1}", self._make_layer(planes[level], layers[level], momentum))
        skips = (planes[2], planes[1], planes[0], config.init_dim)
        for level, name in enumerate(("convtr4p16s2", "convtr5p8s2", "convtr6p4s2", "convtr7p2s2")):
            setattr(self, name, _conv_tr(self.inplanes, planes[4 + level]))
            setattr(self, f"bntr{4 + level}", _norm(planes[4 + level], momentum))
            self.inplanes = planes[4 + level] + skips[level] * BasicBlock.expansion
            setattr(
                self,
                f"block{5 + level}",
                self._make_layer(planes[4 + level], layers[4 + level], momentum),
            )
        self.relu = ME.MinkowskiReLU(inplace=True)

    def _make_layer(self, planes: int, blocks: int, momentum: float) -> nn.Sequential:
        downsample = None
        if self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                _conv(self.inplanes, planes * BasicBlock.expansion, 1),
                _norm(planes * BasicBlock.expansion, momentum),
            )
        layers = [BasicBlock(self.inplanes, planes, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        out_p1 = self.relu(self.bn0(self.conv0p1s1(x)))
        out = out_p1
        skips = []
        for level in range(1, 5):
            out = getattr(self, f"conv{level}p{2 ** (level - 1)}s2")(out)
            out = self.relu(getattr(self, f"bn{level}")(out))
            out = getattr(self, f"block{level}")(out)
            skips.append(out)
        skips = [skips[2], skips[1], skips[0], out_p1]
        for level, name in enumerate(("convtr4p16s2", "convtr5p8s2", "convtr6p4s2", "convtr7p2s2")):
            out = self.relu(getattr(self, f"bntr{4 + level}")(getattr(self, name)(out)))
            out = ME.cat(out, skips[level])
            out = getattr(self, f"block{5 + level}")(out)
        return out
