"""The compiled CPU decode kernel computes what F.linear computes."""

import pytest
import torch

from camelid.model import kernels


@pytest.fixture
def fast_decode():
    if not kernels.enable_fast_decode(True):
        pytest.skip("torch.compile is not available here")
    yield
    kernels.enable_fast_decode(False)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("shape", [(96, 64), (40, 4160)])  # the second takes the split-reduction path
def test_gemv_matches_f_linear(fast_decode, dtype, tol, shape):
    torch.manual_seed(0)
    layer = torch.nn.Linear(shape[1], shape[0], bias=True).to(dtype)
    x = torch.randn(1, 1, shape[1], dtype=dtype)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
        got = kernels.linear(x, layer)
    assert got.shape == (1, 1, shape[0]) and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=tol * expected.abs().max().item(), rtol=0)


def test_model_decode_with_kernel_matches_eager(fast_decode):
    from camelid.formats.load import load_model
    from camelid.generate.generate import generate
    from camelid.generate.sampling import SamplingParams

    from conftest import REPO

    lm = load_model(REPO / "models" / "stories260K")
    fast = generate(lm, ["Once upon a time"], 40, SamplingParams.greedy())[0].text
    kernels.enable_fast_decode(False)
    assert fast == generate(lm, ["Once upon a time"], 40, SamplingParams.greedy())[0].text
