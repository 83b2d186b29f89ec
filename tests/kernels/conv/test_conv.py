"""conv2d's algorithms against lax.conv_general_dilated (interpreted Pallas on CPU, compiled on GPU).

Tolerances: inputs ~ N(0, 1), weights ~ N(0, 1/fan_in), so outputs are O(1). f32 kernels use
full-precision f32 products: |err| <= 1e-4 + 1e-4 |ref|. Winograd reassociates the sum through its
transforms: 1e-3 in f32 (F(4x4,3x3) amplifies rounding ~10x). bf16: 3e-2 (8-bit mantissa).
"""
import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import kernels.conv as kc
from kernels.conv import winograd
from tuning import tuned

FEW = settings(max_examples=8, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def operands(x_shape_nhwc, w_shape, layout, dtype=jnp.float32, seed=0):
    kx, kw, kb = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, x_shape_nhwc, jnp.float32)
    w = jax.random.normal(kw, w_shape, jnp.float32) / np.sqrt(np.prod(w_shape[:3]))
    b = jax.random.normal(kb, (w_shape[3],), jnp.float32)
    if layout == "NCHW":
        x = jnp.transpose(x, (0, 3, 1, 2))
    return x.astype(dtype), w.astype(dtype), b


@st.composite
def conv_problems(draw, *, kernels=(1, 3, 5), strides=(1, 2), dilations=(1, 2), depthwise=False, groups=(1,)):
    n = draw(st.integers(1, 2))
    h, w = draw(st.integers(3, 9)), draw(st.integers(3, 9))
    c = draw(st.sampled_from((1, 3, 5, 8, 17)))
    kh = draw(st.sampled_from(kernels))
    kw = draw(st.sampled_from(kernels))
    stride = draw(st.sampled_from(strides))
    dilation = draw(st.sampled_from(dilations))
    padding = draw(st.sampled_from(("SAME", "VALID", ((1, 0), (2, 1)))))
    if depthwise:
        g = c
        k = c * draw(st.sampled_from((1, 1, 2)))
    else:
        g = draw(st.sampled_from(groups))
        assume(c % g == 0)
        k = g * draw(st.sampled_from((1, 4, 7)))
    layout = draw(st.sampled_from(kc.geometry.LAYOUTS))
    eff_h, eff_w = (kh - 1) * dilation + 1, (kw - 1) * dilation + 1
    if padding == "VALID":
        assume(h >= eff_h and w >= eff_w)
    elif padding != "SAME":
        assume(h + 1 >= eff_h and w + 3 >= eff_w)
    return {"x": (n, h, w, c), "w": (kh, kw, c // g, k), "kwargs": {"stride": stride, "padding": padding,
                "dilation": dilation, "groups": g}, "layout": layout}


def check(problem, algorithm, *, activation="relu", atol=1e-4, rtol=1e-4, config=None):
    x, w, b = operands(problem["x"], problem["w"], problem["layout"])
    kwargs = dict(problem["kwargs"], layout=problem["layout"], bias=b, activation=activation)
    got = kc.conv2d(x, w, algorithm=None if config else algorithm, config=config, **kwargs)
    want = kc.reference(x, w, **kwargs)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=atol, rtol=rtol)


@settings(FEW, max_examples=5)
@given(conv_problems(groups=(1, 2)))
def test_im2col_matches_lax(problem):
    check(problem, "im2col")


@settings(FEW, max_examples=6)
@given(conv_problems(groups=(1, 2)), st.sampled_from(kc.geometry.LAYOUTS), st.sampled_from((1, 2, 3)))
def test_implicit_gemm_matches_lax_in_any_compute_layout(problem, compute_layout, block_h):
    # block_h=3 does not divide most output heights: the ragged last row block is exercised.
    cfg = kc.Config(algorithm="implicit_gemm", layout=compute_layout, block_h=block_h, block_m=16, block_n=16,
                    block_k=16)
    check(problem, "implicit_gemm", config=cfg)


@settings(FEW, max_examples=6)
@given(conv_problems(kernels=(3, 5, 7), depthwise=True), st.sampled_from((8, 16)))
def test_direct_depthwise_matches_lax(problem, block_m):
    cfg = kc.Config(algorithm="depthwise", layout=problem["layout"], block_h=2, block_m=block_m, block_c=8)
    check(problem, "depthwise", activation="relu6", config=cfg)


@settings(FEW, max_examples=5)
@given(conv_problems(kernels=(1,), dilations=(1,)))
def test_pointwise_matches_lax(problem):
    check(problem, "pointwise")


@settings(FEW, max_examples=3)
@given(conv_problems(kernels=(3,), strides=(1,), dilations=(1,)), st.sampled_from(winograd.TILE_SIZES))
def test_winograd_matches_lax(problem, m):
    cfg = kc.Config(algorithm="winograd", layout="NHWC", winograd_m=m, block_m=16, block_n=16, block_k=16)
    check(problem, "winograd", config=cfg, atol=1e-3, rtol=1e-3)


def test_bfloat16_conv_matches_lax_within_bf16_rounding():
    x, w, b = operands((1, 8, 8, 16), (3, 3, 16, 16), "NHWC", jnp.bfloat16)
    want = kc.reference(x.astype(jnp.float32), w.astype(jnp.float32), bias=b)
    for algorithm in ("im2col", "implicit_gemm", "winograd"):
        got = kc.conv2d(x, w, bias=b, algorithm=algorithm)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2, rtol=3e-2, err_msg=algorithm)


def test_winograd_refuses_unsupported_convs_naming_the_supported_ones():
    x, w, _ = operands((1, 8, 8, 4), (5, 5, 4, 4), "NHWC")
    with pytest.raises(ValueError, match=r"only 3x3 kernels with stride 1.*F\(2x2,3x3\), F\(4x4,3x3\)"):
        kc.conv2d(x, w, algorithm="winograd")
    x, w, _ = operands((1, 8, 8, 4), (3, 3, 4, 4), "NHWC")
    with pytest.raises(ValueError, match="stride 1"):
        kc.conv2d(x, w, stride=2, algorithm="winograd")
    with pytest.raises(ValueError, match="m=2.*m=4"):
        winograd.transform_filter(w, 3)


def test_winograd_error_grows_with_tile_size_and_lower_precision():
    rows = {(r["algorithm"], r["dtype"]): r for r in winograd.error_table(h=8, w=8, c=16, k=16)}
    f2, f4 = "F(2x2,3x3)", "F(4x4,3x3)"
    assert rows[(f2, "float32")]["max_rel_error"] < 1e-5
    assert rows[(f4, "float32")]["max_rel_error"] < 1e-4
    assert rows[(f4, "bfloat16")]["max_abs_error"] > rows[(f2, "bfloat16")]["max_abs_error"]
    assert rows[(f2, "bfloat16")]["max_rel_error"] > rows[(f2, "float32")]["max_rel_error"]


def test_inplace_depthwise_reuses_the_input_buffer_and_is_correct():
    x, w, b = operands((2, 7, 10, 20), (3, 3, 1, 20), "NHWC")
    want = kc.reference(x, w, groups=20, bias=b, activation="relu6")
    buf = kc.halo_buffer(x, 3)
    address = buf.unsafe_buffer_pointer()
    out = kc.depthwise_conv_inplace(buf, w, b, height=7, width=10, activation="relu6")
    assert buf.is_deleted()  # donated ...
    assert out.unsafe_buffer_pointer() == address  # ... and the output lives in the same memory
    np.testing.assert_allclose(kc.from_halo_buffer(out, 7, 10, 20, 3), want, atol=1e-4, rtol=1e-4)
    # The halo is still zero, so the buffer feeds the next in-place layer directly.
    w2 = w[::-1]
    want2 = kc.reference(want, w2, groups=20, bias=b)
    out2 = kc.depthwise_conv_inplace(out, w2, b, height=7, width=10)
    np.testing.assert_allclose(kc.from_halo_buffer(out2, 7, 10, 20, 3), want2, atol=1e-4, rtol=1e-4)


def test_inplace_depthwise_5x5_matches_lax():
    x, w, b = operands((1, 6, 5, 8), (5, 5, 1, 8), "NHWC")
    out = kc.depthwise_conv_inplace(kc.halo_buffer(x, 5), w, b, height=6, width=5)
    np.testing.assert_allclose(kc.from_halo_buffer(out, 6, 5, 8, 5), kc.reference(x, w, groups=8, bias=b),
                               atol=1e-4, rtol=1e-4)


def test_inplace_depthwise_rejects_a_plain_activation():
    x, w, b = operands((1, 6, 5, 8), (3, 3, 1, 8), "NHWC")
    with pytest.raises(ValueError, match="halo_buffer"):
        kc.depthwise_conv_inplace(x, w, b, height=6, width=5)


def block_weights(cin, t, cout, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    ce = cin * t
    we = None if t == 1 else jax.random.normal(ks[0], (cin, ce)) / np.sqrt(cin)
    be = None if t == 1 else jax.random.normal(ks[1], (ce,))
    wd = jax.random.normal(ks[2], (3, 3, 1, ce)) / 3
    bd = jax.random.normal(ks[3], (ce,))
    wp = jax.random.normal(ks[4], (ce, cout)) / np.sqrt(ce)
    bp = jax.random.normal(ks[5], (cout,))
    return we, be, wd, bd, wp, bp


@pytest.mark.parametrize("n,h,w,cin,t,cout,stride,block_h", [
    (1, 9, 10, 16, 6, 16, 1, 2),   # residual, ragged spatial tiles
    (2, 7, 9, 24, 6, 32, 2, 3),    # stride 2, no residual
    (1, 8, 8, 16, 1, 8, 1, 4),     # expand ratio 1 (MobileNetV2's first block)
    (1, 6, 5, 5, 3, 5, 1, 1),      # odd channels, residual
])
def test_fused_inverted_residual_matches_separate_ops(n, h, w, cin, t, cout, stride, block_h):
    x = jax.random.normal(jax.random.key(9), (n, h, w, cin))
    weights = block_weights(cin, t, cout)
    want = kc.inverted_residual_reference(x, *weights, stride=stride)
    cfg = kc.InvertedResidualConfig(block_h=block_h, block_m=16, block_e=16)
    got = kc.inverted_residual(x, *weights, stride=stride, config=cfg)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_conv_bn_relu6_equals_conv_then_batch_norm_then_relu6():
    x, w, b = operands((1, 6, 6, 5), (3, 3, 5, 7), "NHWC")
    ks = jax.random.split(jax.random.key(3), 4)
    gamma, beta = jax.random.uniform(ks[0], (7,), minval=0.5, maxval=2), jax.random.normal(ks[1], (7,))
    mean, var = jax.random.normal(ks[2], (7,)), jax.random.uniform(ks[3], (7,), minval=0.1, maxval=2)
    y = kc.reference(x, w, bias=b)
    want = jnp.clip((y - mean) / jnp.sqrt(var + 1e-5) * gamma + beta, 0, 6)
    for algorithm in ("im2col", "implicit_gemm"):
        got = kc.conv2d_bn_act(x, w, gamma, beta, mean, var, bias=b, activation="relu6", algorithm=algorithm)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=algorithm)


def test_bad_inputs_get_clear_errors():
    x, w, _ = operands((1, 6, 6, 4), (3, 3, 4, 8), "NHWC")
    with pytest.raises(ValueError, match="input channels per group"):
        kc.conv2d(x, w[:, :, :3])
    with pytest.raises(ValueError, match="must divide"):
        kc.conv2d(x, w, groups=3)
    with pytest.raises(ValueError, match="does not fit"):
        kc.conv2d(x[:, :2, :2], w, padding="VALID")
    with pytest.raises(ValueError, match="padding="):
        kc.conv2d(x, w, padding="FULL")
    with pytest.raises(ValueError, match="layout="):
        kc.conv2d(x, w, layout="NWHC")
    with pytest.raises(ValueError, match="power of 2"):
        kc.conv2d(x, w, config=kc.Config(block_n=24))
    with pytest.raises(ValueError, match="groups == input channels"):
        kc.conv2d(x, w, algorithm="depthwise")
    with pytest.raises(ValueError, match="bias must have shape"):
        kc.conv2d(x, w, bias=jnp.zeros(3))
    with pytest.raises(ValueError, match="Winograd computes in NHWC only"):
        kc.conv2d(x, w, config=kc.Config(algorithm="winograd", layout="NCHW"))


def test_tuned_config_is_used_when_no_config_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYPALLAS_CACHE", str(tmp_path / "best.json"))
    x, w, _ = operands((1, 6, 6, 4), (3, 3, 4, 8), "NHWC")
    g = kc.geometry.make_geometry(x.shape, w.shape, stride=1, padding="SAME", dilation=1, groups=1, layout="NHWC")
    problem = kc.problem_key(g, x.dtype)
    assert problem == kc.parse_shape("1x6x6x4:8:3x3")
    tuned_cfg = kc.Config(algorithm="winograd", winograd_m=4, block_m=16, block_n=16, block_k=16)
    tuned.store("conv2d", problem, tuned_cfg.params(), seconds=1.0)
    assert tuned.resolve("conv2d", problem, None, config_type=kc.Config,
                         heuristic=lambda: kc.heuristic_config(g, x.dtype)) == tuned_cfg
    np.testing.assert_allclose(kc.conv2d(x, w), kc.reference(x, w), atol=1e-3, rtol=1e-3)


def test_search_space_default_is_legal_and_knobs_cover_the_algorithms():
    for problem in kc.DEFAULT_PROBLEMS + kc.PRESETS["mobilenetv2"][:4] + kc.PRESETS["resnet18"][:3]:
        space = kc.search_space(problem)
        assert space.kernel == "conv2d"
        assert space.violations(space.default) == [], problem
        knobs = {k.name: k.choices for k in space.knobs}
        assert {"algorithm", "layout"} <= set(knobs)
        assert all(space.violations(dict(space.default, algorithm=a)) == [] for a in knobs["algorithm"])
    space = kc.search_space(kc.parse_shape("1x16x16x16:16:3x3"))
    algorithms = {k.name: k.choices for k in space.knobs}["algorithm"]
    assert set(algorithms) == {"im2col", "implicit_gemm", "winograd"}
    assert space.violations(dict(space.default, algorithm="winograd", layout="NCHW"))
    assert space.violations(dict(space.default, block_m=24))
    # The timed function is the whole op, layout changes included, and returns the conv's output.
    cfg = space.to_config(dict(space.default, algorithm="implicit_gemm", layout="NCHW", block_m=16, block_n=16,
                               block_k=16))
    assert space.run(cfg).shape == (1, 16, 16, 16)


def test_presets_hold_every_distinct_layer_once():
    mbv2, r18 = kc.PRESETS["mobilenetv2"], kc.PRESETS["resnet18"]
    assert len({tuple(sorted(p.items())) for p in mbv2}) == len(mbv2)
    assert {p["groups"] > 1 for p in mbv2} == {True, False}
    assert sum(p["kh"] == 7 for p in r18) == 1 and len(r18) == 11
    for p in mbv2 + r18:
        kc.geometry_of(p)


def test_parse_shape_reads_options_and_rejects_nonsense():
    p = kc.parse_shape("2x28x28x32:64:3x3:s2:d1:g2:VALID:NCHW:bfloat16")
    assert (p["n"], p["stride"], p["groups"], p["padding"], p["layout"], p["dtype"]) == \
        (2, 2, 2, "VALID", "NCHW", "bfloat16")
    with pytest.raises(ValueError, match="e.g."):
        kc.parse_shape("28x28")
    with pytest.raises(ValueError, match="not understood"):
        kc.parse_shape("1x8x8x4:4:3:q7")


def test_config_is_a_frozen_dataclass_of_json_params():
    cfg = kc.Config()
    assert kc.Config(**cfg.params()) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block_m = 32


def test_inverted_residual_search_space_and_errors():
    ir = importlib.import_module("kernels.conv.inverted_residual")  # the package exports the function
    problem = ir.parse_shape("8x8x16:6:24:s2")
    assert problem == ir.DEFAULT_PROBLEMS[1]
    space = ir.search_space(problem)
    assert space.violations(space.default) == []
    assert space.violations(dict(space.default, block_e=24))
    out = space.run(space.to_config(dict(space.default, block_h=2, block_m=16, block_e=16)))
    assert out.shape == (1, 4, 4, 24)
    assert len(ir.PRESETS["mobilenetv2"]) == len(ir.MOBILENETV2_BLOCKS)
    with pytest.raises(ValueError, match="e.g."):
        ir.parse_shape("8x8x16")
    x = jnp.zeros((1, 8, 8, 16))
    we, be, wd, bd, wp, bp = block_weights(16, 6, 16)
    with pytest.raises(ValueError, match="shapes disagree"):
        kc.inverted_residual(x, we[:8], be, wd, bd, wp, bp)
    with pytest.raises(ValueError, match="stride=3"):
        kc.inverted_residual(x, we, be, wd, bd, wp, bp, stride=3)
    with pytest.raises(ValueError, match="power of 2"):
        kc.inverted_residual(x, we, be, wd, bd, wp, bp, config=kc.InvertedResidualConfig(block_m=24))


def test_heuristic_picks_the_algorithm_that_fits_the_layer():
    def pick(problem, backend):
        return kc.heuristic_config(kc.geometry_of(problem), "float32", backend=backend).algorithm

    for backend in ("cpu", "gpu"):
        assert pick(kc.parse_shape("1x16x16x32:32:3x3:g32"), backend) == "depthwise"
        assert pick(kc.parse_shape("1x16x16x32:64:1x1"), backend) == "pointwise"
    assert pick(kc.parse_shape("1x16x16x32:64:3x3"), "cpu") == "im2col"  # few, large interpreter steps
    assert pick(kc.parse_shape("1x16x16x32:64:3x3"), "gpu") == "implicit_gemm"


@pytest.mark.slow
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(conv_problems(kernels=(1, 3, 5), groups=(1, 2, 3)), st.data())
def test_every_applicable_algorithm_matches_lax_many_shapes(problem, data):
    g = kc.geometry.make_geometry(problem["x"], problem["w"], layout="NHWC", **problem["kwargs"])
    algorithm = data.draw(st.sampled_from(kc.applicable_algorithms(g)))
    tol = 1e-3 if algorithm == "winograd" else 1e-4
    check(problem, algorithm, atol=tol, rtol=tol)
