"""The compiled CPU decode kernel computes what F.linear computes, and is swapped in from outside the model."""

import pytest
import torch

from camelid.model import kernels


@pytest.fixture
def gemv():
    try:
        return kernels.CompiledGemv()
    except Exception as exc:
        pytest.skip(f"torch.compile is not available here ({exc})")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("shape", [(96, 64), (40, 4160)])  # the second takes the split-reduction path
def test_gemv_matches_f_linear(gemv, dtype, tol, shape):
    torch.manual_seed(0)
    layer = torch.nn.Linear(shape[1], shape[0], bias=True).to(dtype)
    x = torch.randn(1, 1, shape[1], dtype=dtype)
    fast = kernels.GemvLinear(layer, gemv)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
        got = fast(x)
    assert gemv.fn is not None  # the compiled kernel ran, not the fallback
    assert got.shape == (1, 1, shape[0]) and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=tol * expected.abs().max().item(), rtol=0)


def test_a_failing_compiler_falls_back_to_f_linear(gemv):
    def broken(*_):
        raise RuntimeError("no C++ compiler\nmore")

    gemv.fn = broken
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(kernels.GemvLinear(layer, gemv)(x), layer(x))
    assert gemv.fn is None


def test_model_decode_with_kernel_matches_eager(gemv):
    from camelid.formats.load import load_model
    from camelid.generate.generate import generate
    from camelid.generate.sampling import SamplingParams

    from conftest import REPO

    plain = load_model(REPO / "models" / "stories260K")
    fast = load_model(REPO / "models" / "stories260K")
    names = {k for k, _ in fast.model.named_parameters()}
    assert kernels.use_gemv_kernel(fast.model) > 0
    assert {k for k, _ in fast.model.named_parameters()} == names  # checkpoints see the same model
    assert not any(isinstance(m, kernels.GemvLinear) for m in plain.model.modules())  # nothing process-wide
    prompt, params = ["Once upon a time"], SamplingParams.greedy()
    assert generate(fast, prompt, 40, params)[0].text == generate(plain, prompt, 40, params)[0].text
