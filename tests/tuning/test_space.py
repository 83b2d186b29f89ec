"""The search-space contract: what a space says of its problem's size is what its inputs and result
take, found without allocating anything, so the autotuner can refuse a problem too big for the device."""
import math
import time

import jax
import numpy as np
import pytest

from autotune import registry
from kernels.cpu import build
from tests.cli_fuzz import SHAPES


def _nbytes(tree) -> int:
    return sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("kernel, shape", sorted(SHAPES.items()) + [("int8", "16x16x32"), ("cpu_rmsnorm", "4x64")])
def test_problem_bytes_are_those_of_the_inputs_and_the_result(kernel, shape):
    if kernel.startswith("cpu") and build.availability() is not None:
        pytest.skip(f"the compiled CPU kernels do not build here: {build.availability()}")
    space = registry.kernel_module(kernel).search_space(registry.kernel_module(kernel).parse_shape(shape))
    inputs = space.make_inputs(0)
    result = space.fn(space.to_config(space.default))(*inputs)
    assert space.problem_bytes() == _nbytes(inputs) + _nbytes(result)


def test_problem_bytes_of_a_problem_no_device_holds_allocate_nothing():
    space = registry.kernel_module("matmul").search_space(registry.kernel_module("matmul").parse_shape(
        "1000000000x1000000000x1000000000"))
    start = time.perf_counter()
    assert space.problem_bytes() == 3 * 10**18 * 4
    assert time.perf_counter() - start < 30  # abstract evaluation: 12 EB were never allocated


def test_sizes_past_an_array_index_are_a_clear_error():
    space = registry.kernel_module("matmul").search_space(registry.kernel_module("matmul").parse_shape(
        "99999999999999999999x1x1"))
    with pytest.raises(ValueError, match="too large to index an array; choose a smaller --shape"):
        space.problem_bytes()


def test_spaces_that_measure_or_pack_weights_on_the_host_have_no_byte_count():
    q4 = registry.kernel_module("cpu_q4_gemv")
    assert q4.search_space(q4.parse_shape("1x64x64")).problem_bytes() is None  # numpy packing: no abstract form
    toy = registry.kernel_module("matmul").search_space({"m": 16, "n": 16, "k": 16, "dtype": "float32"})
    assert math.prod((16, 16)) * 4 * 3 == toy.problem_bytes()
