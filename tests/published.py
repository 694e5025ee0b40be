"""Published ODE-nets, copied as their authors wrote them; only the ODE solver is swapped.

* torchdiffeq ``examples/odenet_mnist.py`` (Ricky T. Q. Chen, MIT licence), at commit
  657943a: ``norm``, ``conv3x3``, ``conv1x1``, ``ResBlock``, ``ConcatConv2d``,
  ``ODEfunc``, ``Flatten`` and the model ``nn.Sequential`` of its ``__main__``. Its
  ``ODEBlock`` (``odeint(self.odefunc, x, [0, 1], rtol, atol)[1]``) becomes
  ``anode_plan.ODEBlock(ODEfunc(64), nt, method)``.
* ANODE ``models/resnet.py`` and ``models/sqnxt.py`` (Amir Gholami, MIT licence): the
  ODE-ResNet-18 and SqueezeNext-23 of the paper (arXiv 1902.10298). They take the ODE
  block class as ``ODEBlock_``; its ``train.py`` passes a module calling
  ``odesolver(odefunc, x, {"Nt": Nt, "method": method})``, here a factory of
  ``anode_plan.ODEBlock``.

Nothing else is changed: in-place ReLUs, ``out += shortcut``, ``self.nfe`` counters,
``x.view(x.size(0), -1)`` and the ``Flatten`` that reads ``.item()`` of a shape product
are as published (the constructors' ``print`` calls too).
"""
# ruff: noqa  (the published code's style is kept)

import torch
import torch.nn as nn
import torch.nn.functional as F

import anode_plan


# --- torchdiffeq examples/odenet_mnist.py ----------------------------------------------------------------------------

def conv3x3(in_planes, out_planes, stride=1):
    """3x3 convolution with padding"""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    """1x1 convolution"""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def norm(dim):
    return nn.GroupNorm(min(32, dim), dim)


class ResBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super(ResBlock, self).__init__()
        self.norm1 = norm(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.norm2 = norm(planes)
        self.conv2 = conv3x3(planes, planes)

    def forward(self, x):
        shortcut = x

        out = self.relu(self.norm1(x))

        if self.downsample is not None:
            shortcut = self.downsample(out)

        out = self.conv1(out)
        out = self.norm2(out)
        out = self.relu(out)
        out = self.conv2(out)

        return out + shortcut


class ConcatConv2d(nn.Module):

    def __init__(self, dim_in, dim_out, ksize=3, stride=1, padding=0, dilation=1, groups=1, bias=True, transpose=False):
        super(ConcatConv2d, self).__init__()
        module = nn.ConvTranspose2d if transpose else nn.Conv2d
        self._layer = module(
            dim_in + 1, dim_out, kernel_size=ksize, stride=stride, padding=padding, dilation=dilation, groups=groups,
            bias=bias
        )

    def forward(self, t, x):
        tt = torch.ones_like(x[:, :1, :, :]) * t
        ttx = torch.cat([tt, x], 1)
        return self._layer(ttx)


class ODEfunc(nn.Module):

    def __init__(self, dim):
        super(ODEfunc, self).__init__()
        self.norm1 = norm(dim)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = ConcatConv2d(dim, dim, 3, 1, 1)
        self.norm2 = norm(dim)
        self.conv2 = ConcatConv2d(dim, dim, 3, 1, 1)
        self.norm3 = norm(dim)
        self.nfe = 0

    def forward(self, t, x):
        self.nfe += 1
        out = self.norm1(x)
        out = self.relu(out)
        out = self.conv1(t, out)
        out = self.norm2(out)
        out = self.relu(out)
        out = self.conv2(t, out)
        out = self.norm3(out)
        return out


class Flatten(nn.Module):

    def __init__(self):
        super(Flatten, self).__init__()

    def forward(self, x):
        shape = torch.prod(torch.tensor(x.shape[1:])).item()
        return x.view(-1, shape)


def odenet_mnist(nt=6, method="rk4", downsampling_method="conv"):
    """The model of odenet_mnist.py's ``__main__`` (``--network odenet``), its ODEBlock ported."""
    if downsampling_method == 'conv':
        downsampling_layers = [
            nn.Conv2d(1, 64, 3, 1),
            norm(64),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 4, 2, 1),
            norm(64),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 4, 2, 1),
        ]
    elif downsampling_method == 'res':
        downsampling_layers = [
            nn.Conv2d(1, 64, 3, 1),
            ResBlock(64, 64, stride=2, downsample=conv1x1(64, 64, 2)),
            ResBlock(64, 64, stride=2, downsample=conv1x1(64, 64, 2)),
        ]

    feature_layers = [anode_plan.ODEBlock(ODEfunc(64), nt=nt, method=method)]
    fc_layers = [norm(64), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1)), Flatten(), nn.Linear(64, 10)]

    return nn.Sequential(*downsampling_layers, *feature_layers, *fc_layers)


# --- ANODE models/resnet.py --------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super(BasicBlock, self).__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion*planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion*planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion*planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out

class BasicBlock2(nn.Module):
    expansion = 1

    def __init__(self, dim):
        super(BasicBlock2, self).__init__()
        in_planes = dim
        planes = dim
        stride = 1
        self.nfe = 0
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

        self.shortcut = nn.Sequential()

    def forward(self,t, x):
        self.nfe += 1
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        #out += self.shortcut(x)
        out = F.relu(out)
        return out

class ResNet(nn.Module):
    def __init__(self, block, num_blocks, num_classes = 10, ODEBlock_ = None):
        super(ResNet, self).__init__()
        self.in_planes = 64
        self.ODEBlock = ODEBlock_

        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1_1 = self._make_layer(64, 1, stride=1)
        self.layer1_2 = self._make_layer2(64, num_blocks[0]-1, stride=1)

        self.layer2_1 = self._make_layer(128, 1, stride=2)
        self.layer2_2 = self._make_layer2(128, num_blocks[1]-1, stride=1)

        self.layer3_1 = self._make_layer(256, 1, stride=2)
        self.layer3_2 = self._make_layer2(256, num_blocks[2]-1, stride=1)

        self.layer4_1 = self._make_layer(512, 1, stride=2)
        self.layer4_2 = self._make_layer2(512, num_blocks[3]-1, stride=1)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, planes, num_blocks, stride):
        strides = [stride] + [1] * (num_blocks-1)
        layers = []
        for stride in strides:
            layers.append(BasicBlock(self.in_planes, planes, stride))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    def _make_layer2(self, planes, num_blocks, stride):
        strides = [stride] + [1]*(num_blocks-1)
        layers = []
        for stride in strides:
            layers.append(self.ODEBlock(BasicBlock2(self.in_planes)))
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1_1(out)
        out = self.layer1_2(out)
        out = self.layer2_1(out)
        out = self.layer2_2(out)
        out = self.layer3_1(out)
        out = self.layer3_2(out)
        out = self.layer4_1(out)
        out = self.layer4_2(out)
        out = F.avg_pool2d(out, 4)
        out = out.view(out.size(0), -1)
        out = self.linear(out)
        return out

def ResNet18(ODEBlock):
      return ResNet(BasicBlock, [2,2,2,2], ODEBlock_ = ODEBlock)


# --- ANODE models/sqnxt.py ---------------------------------------------------------------------------------------------

class SqnxtBlock(nn.Module):  # published as BasicBlock; renamed here beside resnet.py's BasicBlock
    def __init__(self, in_channels, out_channels, stride):
        super(SqnxtBlock, self).__init__()
        reduction = 0.5
        if 2 == stride:
            reduction = 1
        elif in_channels > out_channels:
            reduction = 0.25

        self.conv1 = nn.Conv2d(in_channels, int(in_channels * reduction), 1, stride, bias = True)
        self.bn1   = nn.BatchNorm2d(int(in_channels * reduction))
        self.conv2 = nn.Conv2d(int(in_channels * reduction), int(in_channels * reduction * 0.5), 1, 1, bias = True)
        self.bn2   = nn.BatchNorm2d(int(in_channels * reduction * 0.5))
        self.conv3 = nn.Conv2d(int(in_channels * reduction * 0.5), int(in_channels * reduction), (1, 3), 1, (0, 1), bias = True)
        self.bn3   = nn.BatchNorm2d(int(in_channels * reduction))
        self.conv4 = nn.Conv2d(int(in_channels * reduction), int(in_channels * reduction), (3, 1), 1, (1, 0), bias = True)
        self.bn4   = nn.BatchNorm2d(int(in_channels * reduction))
        self.conv5 = nn.Conv2d(int(in_channels * reduction), out_channels, 1, 1, bias = True)
        self.bn5   = nn.BatchNorm2d(out_channels)

        self.shortcut = nn.Sequential()
        if 2 == stride or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                            nn.Conv2d(in_channels, out_channels, 1, stride, bias = True),
                            nn.BatchNorm2d(out_channels)
            )

    def forward(self, input):
        output = F.relu(self.bn1(self.conv1(input)))
        output = F.relu(self.bn2(self.conv2(output)))
        output = F.relu(self.bn3(self.conv3(output)))
        output = F.relu(self.bn4(self.conv4(output)))
        output = F.relu(self.bn5(self.conv5(output)))
        output += F.relu(self.shortcut(input))
        output = F.relu(output)
        return output

class SqnxtBlock2(nn.Module):  # published as BasicBlock2
    def __init__(self, dim):
        super(SqnxtBlock2, self).__init__()
        in_channels = dim
        out_channels = dim
        reduction = 0.5
        stride = 1
        self.nfe = 0

        self.conv1 = nn.Conv2d(in_channels, int(in_channels * reduction), 1, stride, bias = True)
        self.bn1   = nn.BatchNorm2d(int(in_channels * reduction))
        self.conv2 = nn.Conv2d(int(in_channels * reduction), int(in_channels * reduction * 0.5), 1, 1, bias = True)
        self.bn2   = nn.BatchNorm2d(int(in_channels * reduction * 0.5))
        self.conv3 = nn.Conv2d(int(in_channels * reduction * 0.5), int(in_channels * reduction), (1, 3), 1, (0, 1), bias = True)
        self.bn3   = nn.BatchNorm2d(int(in_channels * reduction))
        self.conv4 = nn.Conv2d(int(in_channels * reduction), int(in_channels * reduction), (3, 1), 1, (1, 0), bias = True)
        self.bn4   = nn.BatchNorm2d(int(in_channels * reduction))
        self.conv5 = nn.Conv2d(int(in_channels * reduction), out_channels, 1, 1, bias = True)
        self.bn5   = nn.BatchNorm2d(out_channels)

    def forward(self, t, x):
        self.nfe += 1
        output = F.relu(self.bn1(self.conv1(x)))
        output = F.relu(self.bn2(self.conv2(output)))
        output = F.relu(self.bn3(self.conv3(output)))
        output = F.relu(self.bn4(self.conv4(output)))
        output = F.relu(self.bn5(self.conv5(output)))
        return output

class SqueezeNext(nn.Module):
    def __init__(self, width_x, blocks, num_classes, ODEBlock_):
        super(SqueezeNext, self).__init__()
        self.in_channels = 64
        self.ODEBlock = ODEBlock_

        self.conv1  = nn.Conv2d(3, int(width_x * self.in_channels), 3, 1, 1, bias=True)     # For Cifar10
        self.bn1    = nn.BatchNorm2d(int(width_x * self.in_channels))
        self.stage1_1 = self._make_layer1(1, width_x, 32, 1)
        self.stage1_2 = self._make_layer2(blocks[0] - 1, width_x, 32, 1)

        self.stage2_1 = self._make_layer1(1, width_x, 64, 2)
        self.stage2_2 = self._make_layer2(blocks[1] - 1, width_x, 64, 1)

        self.stage3_1 = self._make_layer1(1, width_x, 128, 2)
        self.stage3_2 = self._make_layer2(blocks[2] - 1, width_x, 128, 1)

        self.stage4_1 = self._make_layer1(1, width_x, 256, 2)
        self.stage4_2 = self._make_layer2(blocks[3] - 1, width_x, 256, 1)
        self.conv2  = nn.Conv2d(int(width_x * self.in_channels), int(width_x * 128), 1, 1, bias = True)
        self.bn2    = nn.BatchNorm2d(int(width_x * 128))
        self.linear = nn.Linear(int(width_x * 128), num_classes)

    # with residual connection mismatch
    def _make_layer1(self, num_block, width_x, out_channels, stride):
        print("in_channels = ", self.in_channels)
        strides = [stride] + [1] * (num_block - 1)
        layers  = []
        for _stride in strides:
            layers.append(SqnxtBlock(int(width_x * self.in_channels), int(width_x * out_channels), _stride))
            self.in_channels = out_channels
        return nn.Sequential(*layers)

    def _make_layer2(self, num_block, width_x, out_channels, stride):
        print("in_channels = ", self.in_channels)
        strides = [stride] + [1] * (num_block - 1)
        layers  = []
        for _stride in strides:
            layers.append(self.ODEBlock(SqnxtBlock2(int(width_x * self.in_channels))))
            self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, input):
        output = F.relu(self.bn1(self.conv1(input)))
        output = self.stage1_1(output)
        output = self.stage1_2(output)
        output = self.stage2_1(output)
        output = self.stage2_2(output)
        output = self.stage3_1(output)
        output = self.stage3_2(output)
        output = self.stage4_1(output)
        output = self.stage4_2(output)
        output = F.relu(self.bn2(self.conv2(output)))
        output = F.avg_pool2d(output, 4)
        output = output.view(output.size(0), -1)
        output = self.linear(output)
        return output

def SqNxt_23_1x(num_classes, ODEBlock):
    return SqueezeNext(1.0, [2, 2, 2, 2], num_classes, ODEBlock)


def anode_block(nt=2, method="rk2"):
    """What ANODE's train.py passes as ``ODEBlock``: a module class called with the ODE function."""
    return lambda odefunc: anode_plan.ODEBlock(odefunc, nt=nt, method=method)
