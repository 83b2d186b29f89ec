"""Float CNNs for MCU-class experiments, built directly as float IR graphs (no download needed).

``GraphBuilder`` writes ops of the graph IR with float32 tensors and randomly initialised
weights; ``models.execute.float_forward`` runs (and differentiates) them, ``models.ptq``
quantizes them to int8. Builders: MobileNetV2 and MobileNetV3-Small (width multiplier,
resolution), an MCUNet-style net (mixed kernel sizes and expansion ratios), ResNet-8 and DS-CNN
(the MLPerf Tiny IC and KWS reference topologies), the FC autoencoder (MLPerf Tiny AD) and the
small CNN of the digits example.
"""
from __future__ import annotations

import numpy as np

from models.ir import Graph, Op, Tensor


class GraphBuilder:
    """Append float ops to a graph; every method returns the name of the op's output tensor."""

    def __init__(self, name: str, input_shape: tuple[int, ...], seed: int = 0):
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.tensors: dict[str, Tensor] = {}
        self.ops: list[Op] = []
        self.input = self._tensor("input", (1, *input_shape))

    def _tensor(self, base: str, shape, data=None) -> str:
        name = f"{base}_{len(self.tensors)}"
        self.tensors[name] = Tensor(name, tuple(shape), "float32", None, data)
        return name

    def shape(self, x: str) -> tuple[int, ...]:
        return self.tensors[x].shape

    def _op(self, kind: str, inputs: list, out_shape, options: dict) -> str:
        out = self._tensor(kind.lower(), out_shape)
        self.ops.append(Op(kind, inputs, [out], options))
        return out

    @staticmethod
    def _out_size(size: int, kernel: int, stride: int, padding: str) -> int:
        return -(-size // stride) if padding == "SAME" else (size - kernel) // stride + 1

    def conv(self, x: str, out_channels: int, kernel: int | tuple[int, int] = 3, stride: int = 1,
             padding: str = "SAME", activation: str = "RELU6") -> str:
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        _, h, w, c = self.shape(x)
        fan_in = kh * kw * c
        wt = self._tensor("conv_w", (out_channels, kh, kw, c),
                          (self.rng.normal(size=(out_channels, kh, kw, c)) * np.sqrt(2.0 / fan_in)).astype(np.float32))
        b = self._tensor("conv_b", (out_channels,), np.zeros(out_channels, np.float32))
        out = (1, self._out_size(h, kh, stride, padding), self._out_size(w, kw, stride, padding), out_channels)
        return self._op("CONV_2D", [x, wt, b], out, {"stride_h": stride, "stride_w": stride, "padding": padding,
                                                     "dilation_h": 1, "dilation_w": 1, "activation": activation})

    def depthwise(self, x: str, kernel: int | tuple[int, int] = 3, stride: int = 1, padding: str = "SAME",
                  activation: str = "RELU6") -> str:
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        _, h, w, c = self.shape(x)
        wt = self._tensor("dw_w", (1, kh, kw, c),
                          (self.rng.normal(size=(1, kh, kw, c)) * np.sqrt(2.0 / (kh * kw))).astype(np.float32))
        b = self._tensor("dw_b", (c,), np.zeros(c, np.float32))
        out = (1, self._out_size(h, kh, stride, padding), self._out_size(w, kw, stride, padding), c)
        return self._op("DEPTHWISE_CONV_2D", [x, wt, b], out, {
            "stride_h": stride, "stride_w": stride, "padding": padding, "dilation_h": 1, "dilation_w": 1,
            "depth_multiplier": 1, "activation": activation})

    def dense(self, x: str, out_features: int, activation: str = "NONE") -> str:
        in_features = int(np.prod(self.shape(x)[1:]))
        wt = self._tensor("fc_w", (out_features, in_features),
                          (self.rng.normal(size=(out_features, in_features)) * np.sqrt(1.0 / in_features)).astype(np.float32))
        b = self._tensor("fc_b", (out_features,), np.zeros(out_features, np.float32))
        return self._op("FULLY_CONNECTED", [x, wt, b], (1, out_features),
                        {"activation": activation, "keep_num_dims": False})

    def constant(self, value) -> str:
        """A float constant operand (a scale, a shift), e.g. ``constant([3.0])``."""
        value = np.asarray(value, np.float32)
        return self._tensor("const", value.shape, value)

    def add(self, a: str, b: str, activation: str = "NONE") -> str:
        shape = tuple(np.broadcast_shapes(self.shape(a), self.shape(b)))
        return self._op("ADD", [a, b], shape, {"activation": activation})

    def mul(self, a: str, b: str, activation: str = "NONE") -> str:
        shape = tuple(np.broadcast_shapes(self.shape(a), self.shape(b)))
        return self._op("MUL", [a, b], shape, {"activation": activation})

    def hard_swish(self, x: str) -> str:
        return self._op("HARD_SWISH", [x], self.shape(x), {})

    def hard_sigmoid(self, x: str) -> str:
        """ReLU6(x + 3) / 6 as converters emit it: ADD of a constant with a fused RELU6, MUL by 1/6."""
        return self.mul(self.add(x, self.constant([3.0]), activation="RELU6"), self.constant([1.0 / 6.0]))

    def global_mean(self, x: str) -> str:
        _, _, _, c = self.shape(x)
        return self._op("MEAN", [x], (1, 1, 1, c), {"axes": (1, 2), "keep_dims": True})

    def squeeze_excite(self, x: str, squeeze_channels: int) -> str:
        """Hu et al. 2018 as MobileNetV3 uses it: global mean, 1x1 ReLU, 1x1, hard sigmoid, scale."""
        s = self.conv(self.global_mean(x), squeeze_channels, 1, activation="RELU")
        s = self.hard_sigmoid(self.conv(s, self.shape(x)[-1], 1, activation="NONE"))
        return self.mul(x, s)

    def average_pool(self, x: str, kernel: tuple[int, int] | None = None, stride: int | None = None) -> str:
        """Average pool; by default over the whole feature map (global average pooling)."""
        _, h, w, c = self.shape(x)
        kh, kw = kernel or (h, w)
        sh = stride or kh
        sw = stride or kw
        out = (1, (h - kh) // sh + 1, (w - kw) // sw + 1, c)
        return self._op("AVERAGE_POOL_2D", [x], out, {"filter_h": kh, "filter_w": kw, "stride_h": sh, "stride_w": sw,
                                                      "padding": "VALID", "activation": "NONE"})

    def flatten(self, x: str) -> str:
        shape = (1, int(np.prod(self.shape(x)[1:])))
        return self._op("RESHAPE", [x], shape, {"new_shape": shape})

    def softmax(self, x: str) -> str:
        return self._op("SOFTMAX", [x], self.shape(x), {"beta": 1.0})

    def build(self, *outputs: str) -> Graph:
        return Graph(dict(self.tensors), list(self.ops), [self.input], list(outputs), name=self.name).validate()


def _make_divisible(v: float, divisor: int = 8) -> int:
    """MobileNet's channel rounding: nearest multiple of ``divisor``, never below 90% of ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def inverted_residual(gb: GraphBuilder, x: str, out_channels: int, stride: int, expand: int, kernel: int = 3) -> str:
    """MobileNetV2 block: 1x1 expand (ReLU6), kxk depthwise (ReLU6), 1x1 project (linear), residual."""
    c = gb.shape(x)[-1]
    y = gb.conv(x, c * expand, 1) if expand != 1 else x
    y = gb.depthwise(y, kernel, stride)
    y = gb.conv(y, out_channels, 1, activation="NONE")
    return gb.add(x, y) if stride == 1 and c == out_channels else y


def mobilenet_v2(width_multiplier: float = 1.0, resolution: int = 224, num_classes: int = 1000,
                 in_channels: int = 3, seed: int = 0) -> Graph:
    """MobileNetV2 (Sandler et al. 2018, Table 2) at a width multiplier and input resolution."""
    gb = GraphBuilder(f"mobilenet_v2_{width_multiplier}_{resolution}", (resolution, resolution, in_channels), seed)
    x = gb.conv(gb.input, _make_divisible(32 * width_multiplier), 3, stride=2)
    # (expansion t, channels c, repeats n, stride s)
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1)):
        for i in range(n):
            x = inverted_residual(gb, x, _make_divisible(c * width_multiplier), s if i == 0 else 1, t)
    x = gb.conv(x, _make_divisible(1280 * max(1.0, width_multiplier)), 1)
    x = gb.flatten(gb.average_pool(x))
    return gb.build(gb.softmax(gb.dense(x, num_classes)))


def _mbv3_block(gb: GraphBuilder, x: str, kernel: int, expand: int, out_channels: int, se: bool, act: str,
                stride: int) -> str:
    """MobileNetV3 bneck: 1x1 expand, kxk depthwise, optional squeeze-and-excite, 1x1 project, residual."""
    c = gb.shape(x)[-1]

    def activation(y: str) -> str:
        return gb.hard_swish(y) if act == "HS" else y

    fused = "RELU" if act == "RE" else "NONE"
    y = activation(gb.conv(x, expand, 1, activation=fused)) if expand != c else x
    y = activation(gb.depthwise(y, kernel, stride, activation=fused))
    if se:
        y = gb.squeeze_excite(y, _make_divisible(expand / 4))
    y = gb.conv(y, out_channels, 1, activation="NONE")
    return gb.add(x, y) if stride == 1 and c == out_channels else y


def mobilenet_v3_small(width_multiplier: float = 1.0, resolution: int = 224, num_classes: int = 1000,
                       in_channels: int = 3, seed: int = 0) -> Graph:
    """MobileNetV3-Small (Howard et al. 2019, Table 2): hard-swish, squeeze-and-excite with a hard
    sigmoid, 3x3/5x5 depthwise bottlenecks, a 1x1 head on the pooled features."""
    gb = GraphBuilder(f"mobilenet_v3_small_{width_multiplier}_{resolution}", (resolution, resolution, in_channels),
                      seed)
    x = gb.hard_swish(gb.conv(gb.input, _make_divisible(16 * width_multiplier), 3, stride=2, activation="NONE"))
    # (kernel, expansion size, out channels, squeeze-and-excite, activation, stride)
    for k, exp, out, se, act, s in ((3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
                                    (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
                                    (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
                                    (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1)):
        x = _mbv3_block(gb, x, k, _make_divisible(exp * width_multiplier), _make_divisible(out * width_multiplier), se,
                        act, s)
    x = gb.hard_swish(gb.conv(x, _make_divisible(576 * width_multiplier), 1, activation="NONE"))
    x = gb.global_mean(x)
    x = gb.hard_swish(gb.conv(x, 1024, 1, activation="NONE"))
    x = gb.flatten(gb.conv(x, num_classes, 1, activation="NONE"))
    return gb.build(gb.softmax(x))


def mcunet(resolution: int = 80, num_classes: int = 2, in_channels: int = 3, seed: int = 0) -> Graph:
    """An MCUNet-style net (Lin et al. 2020): inverted residual blocks whose kernel sizes (3/5/7)
    and expansion ratios (3/4/6) vary per block, as TinyNAS picks them, sized for ~100 kB SRAM."""
    gb = GraphBuilder(f"mcunet_{resolution}", (resolution, resolution, in_channels), seed)
    x = gb.conv(gb.input, 16, 3, stride=2)
    x = inverted_residual(gb, x, 8, 1, 1, 3)
    # (channels, stride, expansion, kernel) per block
    for c, s, t, k in ((16, 2, 4, 7), (16, 1, 3, 3), (24, 2, 6, 5), (24, 1, 4, 3), (40, 2, 4, 7), (40, 1, 3, 5),
                       (48, 1, 4, 3), (96, 2, 6, 5), (96, 1, 3, 3), (160, 1, 6, 3)):
        x = inverted_residual(gb, x, c, s, t, k)
    x = gb.flatten(gb.average_pool(x))
    return gb.build(gb.softmax(gb.dense(x, num_classes)))


def resnet8(resolution: int = 32, num_classes: int = 10, in_channels: int = 3, width: int = 16, seed: int = 0) -> Graph:
    """ResNet-8 of the MLPerf Tiny image-classification benchmark (three residual stages)."""
    gb = GraphBuilder(f"resnet8_{width}", (resolution, resolution, in_channels), seed)
    x = gb.conv(gb.input, width, 3, activation="RELU")
    for stage, channels in enumerate((width, 2 * width, 4 * width)):
        stride = 1 if stage == 0 else 2
        y = gb.conv(x, channels, 3, stride=stride, activation="RELU")
        y = gb.conv(y, channels, 3, activation="NONE")
        shortcut = x if stride == 1 and gb.shape(x)[-1] == channels else gb.conv(x, channels, 1, stride=stride,
                                                                                   activation="NONE")
        x = gb.add(shortcut, y, activation="RELU")
    x = gb.flatten(gb.average_pool(x))
    return gb.build(gb.softmax(gb.dense(x, num_classes)))


def ds_cnn(input_shape: tuple[int, int, int] = (49, 10, 1), num_classes: int = 12, filters: int = 64,
           seed: int = 0) -> Graph:
    """DS-CNN of the MLPerf Tiny keyword-spotting benchmark: a 10x4 stride-2 conv, then four
    depthwise-separable blocks, global average pooling and a classifier."""
    gb = GraphBuilder(f"ds_cnn_{filters}", input_shape, seed)
    x = gb.conv(gb.input, filters, (10, 4), stride=2, activation="RELU")
    for _ in range(4):
        x = gb.depthwise(x, 3, activation="RELU")
        x = gb.conv(x, filters, 1, activation="RELU")
    x = gb.flatten(gb.average_pool(x))
    return gb.build(gb.softmax(gb.dense(x, num_classes)))


def digits_cnn(seed: int = 0) -> Graph:
    """A tiny CNN for scikit-learn's 8x8 digits: conv, depthwise-separable block, classifier."""
    gb = GraphBuilder("digits_cnn", (8, 8, 1), seed)
    x = gb.conv(gb.input, 16, 3, activation="RELU")
    x = gb.depthwise(x, 3, stride=2, activation="RELU6")
    x = gb.conv(x, 32, 1, activation="RELU6")
    x = gb.flatten(gb.average_pool(x))
    return gb.build(gb.softmax(gb.dense(x, 10)))


def fc_autoencoder(features: int = 640, hidden: int = 128, bottleneck: int = 8, seed: int = 0) -> Graph:
    """The FC autoencoder of the MLPerf Tiny anomaly-detection benchmark: ten dense layers
    640-128-128-128-128-8-128-128-128-128-640, ReLU on all but the last."""
    gb = GraphBuilder(f"fc_autoencoder_{features}", (features,), seed)
    x = gb.input
    for width in (hidden,) * 4 + (bottleneck,) + (hidden,) * 4:
        x = gb.dense(x, width, activation="RELU")
    return gb.build(gb.dense(x, features))
