"""The kernel tests again, on a portable build of ``cpu_kernels.cpp`` (no ``-march=native``).

The kernels are compiled for the machine they run on, so on a CPU with AVX-512 and FMA the tests above
only see that build: the depthwise conv's row path and fused multiply-adds. Users whose compiler takes
no ``-march=native`` (``fast_ops._FLAG_SETS`` falls back to plain flags), or whose CPU lacks those
instructions, run the flat-loop conv and separate multiplies and adds instead. This module compiles that
build into a temporary cache (a few seconds), checks it is what it should be, and runs the numeric tests
of ``test_cpu_kernels.py`` and the whole-network comparison of ``test_perf_equivalence.py`` on it. The
loader tests (cache, fallbacks, off switch, concurrent compiles) are about the build machinery, not the
build, and run once, there, as does the check of the native build's features.
"""
import platform

import pytest
import test_cpu_kernels as _kernels
import test_perf_equivalence as _equivalence

from ela_hf.layers import fast_ops

PORTABLE_FLAGS = (["-fopenmp"], [])

_NATIVE_ONLY = {
    "test_kernel_features_say_what_the_native_build_uses",
    "test_kernels_are_compiled_once_into_the_cache",
    "test_without_a_compiler_the_pure_pytorch_paths_run",
    "test_a_compile_error_is_reported_and_falls_back",
    "test_kernel_cache_dir_follows_the_environment",
    "test_kernels_can_be_switched_off",
    "test_two_processes_compiling_at_once_both_load_the_kernels",
}
_REUSED = sorted(n for n in vars(_kernels) if n.startswith("test_") and n not in _NATIVE_ONLY)
assert _NATIVE_ONLY <= set(vars(_kernels)), "a test named here was renamed: update _NATIVE_ONLY"
globals().update({name: getattr(_kernels, name) for name in _REUSED})
test_cpu_kernels_match_reference_in_whole_network = _equivalence.test_cpu_kernels_match_reference_in_whole_network
test_float32_matches_reference = _equivalence.test_float32_matches_reference
kernels_at_every_size = _kernels.kernels_at_every_size  # the module's autouse fixture, here too


@pytest.fixture(scope="module")
def portable_kernels(tmp_path_factory):
    if fast_ops.cpu_kernels() is None:
        pytest.skip("no C++ compiler: the C++ kernels are unavailable here")
    path = fast_ops._compile_kernels(flag_sets=PORTABLE_FLAGS, cache=tmp_path_factory.mktemp("portable_kernels"))
    return fast_ops._load_kernels(path)


@pytest.fixture(autouse=True)
def on_the_portable_build(portable_kernels, monkeypatch):
    """Every test here runs with the portable build loaded in place of the native one."""
    monkeypatch.setitem(fast_ops._kernel_state, "lib", portable_kernels)


def test_the_portable_build_has_neither_the_row_path_nor_fma(portable_kernels):
    """Otherwise this module would test the native build a second time."""
    assert fast_ops.cpu_kernels() is portable_kernels
    features = fast_ops.kernel_features()
    assert features["row_path"] is False
    assert fast_ops.describe_kernels().startswith("on (") and "AVX-512" not in fast_ops.describe_kernels()
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert features["fma"] is False  # x86-64's baseline has no FMA; aarch64's has


def test_reuses_the_numeric_kernel_tests():
    assert len(_REUSED) >= 20 and "test_depthwise_conv3x3_matches_conv2d" in _REUSED
