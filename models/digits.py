"""End-to-end example on real data shipped with scikit-learn: the 8x8 handwritten digits.

Train ``builders.digits_cnn`` in float on the CPU (a few seconds), quantize it post-training
(``models.ptq``), run the int8 graph through the Pallas kernels and compare accuracies.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from models import builders, execute, ptq
from models.ir import Graph


def load_digits(seed: int = 0, test_fraction: float = 0.2):
    """(x_train, y_train, x_test, y_test): images (N, 8, 8, 1) float32 in [0, 1], labels int."""
    from sklearn.datasets import load_digits as sk_load

    data = sk_load()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _logits_name(graph: Graph) -> str:
    softmax = [op for op in graph.ops if op.kind == "SOFTMAX"]
    return softmax[-1].inputs[0]


def train(graph: Graph, x: np.ndarray, y: np.ndarray, *, steps: int = 600, batch_size: int = 64,
          learning_rate: float = 1e-2, seed: int = 0) -> dict:
    """Mini-batch Adam on softmax cross-entropy; returns trained float params (by tensor name)."""
    params = execute.float_params(graph)
    logits_name = _logits_name(graph)
    rng = np.random.default_rng(seed)

    def loss_fn(p, xb, yb):
        _, env = execute.float_forward(graph, p, xb, intermediates=True)
        logits = env[logits_name]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=1))

    b1, b2, eps = 0.9, 0.999, 1e-8

    @jax.jit
    def step(p, m, v, t, xb, yb):
        loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
        m = jax.tree.map(lambda m_, g_: b1 * m_ + (1 - b1) * g_, m, g)
        v = jax.tree.map(lambda v_, g_: b2 * v_ + (1 - b2) * g_ * g_, v, g)
        lr = learning_rate * jnp.sqrt(1 - b2**t) / (1 - b1**t)
        p = jax.tree.map(lambda p_, m_, v_: p_ - lr * m_ / (jnp.sqrt(v_) + eps), p, m, v)
        return p, m, v, loss

    zeros = jax.tree.map(jnp.zeros_like, params)
    m, v = zeros, zeros
    for t in range(1, steps + 1):
        batch = rng.integers(0, len(y), batch_size)
        params, m, v, _ = step(params, m, v, jnp.float32(t), x[batch], y[batch])
    return params


def with_params(graph: Graph, params: dict) -> Graph:
    """A copy of a float graph whose constants are ``params``."""
    import copy

    g = copy.deepcopy(graph)
    for name, value in params.items():
        g.tensors[name].data = np.asarray(value, np.float32)
    return g


@dataclasses.dataclass
class DigitsResult:
    float_accuracy: float
    int8_accuracy: float
    agreement: float  # fraction of test images where float and int8 predict the same class
    float_graph: Graph
    int8_graph: Graph


def run(steps: int = 600, calibration_size: int = 200, seed: int = 0, pallas: bool = True) -> DigitsResult:
    """Train, quantize with ``calibration_size`` training images, evaluate both on the test split."""
    x_train, y_train, x_test, y_test = load_digits(seed)
    graph = builders.digits_cnn(seed)
    trained = with_params(graph, train(graph, x_train, y_train, steps=steps, seed=seed))
    int8_graph = ptq.quantize(trained, [x_train[:calibration_size]])
    float_pred = np.asarray(execute.compile_float_graph(trained)(x_test)[0]).argmax(-1)
    int8_pred = np.asarray(execute.compile_graph(int8_graph, pallas=pallas)(jnp.asarray(x_test))[0]).argmax(-1)
    return DigitsResult(float((float_pred == y_test).mean()), float((int8_pred == y_test).mean()),
                        float((float_pred == int8_pred).mean()), trained, int8_graph)
