"""The model's head in one kernel (kernels/head_gemv.cu) against RMSNorm + fp16 nn.Linear + cast; GPU only."""

import pytest
import torch

from tests.gptq_testing import relative_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels need a GPU (run on the device)")


@pytest.mark.parametrize("n, k", [(1000, 4096), (32000, 5120), (77, 264)])
def test_matches_norm_then_fp16_linear(n, k):
    from backends.model import RMSNorm
    from kernels import head_gemv

    g = torch.Generator(device="cuda").manual_seed(n)
    weight = (torch.randn(n, k, device="cuda", generator=g) * 0.05).to(torch.float16)
    norm = RMSNorm(k, 1e-5)
    norm.weight = torch.nn.Parameter((torch.rand(k, device="cuda", generator=g) + 0.5).to(torch.float16),
                                     requires_grad=False)
    x = (torch.randn(1, 1, k, device="cuda", generator=g) * 30).to(torch.float16)
    expected = torch.nn.functional.linear(norm(x), weight).float().view(-1)
    out = head_gemv.head_gemv(x, weight, norm.weight, norm.eps)
    assert out.dtype == torch.float32 and out.shape == (n,)
    assert relative_error(out, expected) < 2e-3
    assert torch.equal(out, out.half().float()), "values rounded to fp16, as the fp16 GEMV's output"


def test_the_model_uses_it_for_one_token(tmp_path):
    from backends.loader import LoadOptions, build_model
    from tests.gptq_testing import tiny_config, write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "m", tiny_config(hidden_size=256, head_dim=64), 4, 32, False)
    model, *_ = build_model(path, LoadOptions(backend="exllama", device="cuda", dtype="float16"))
    x = torch.randn(1, 1, 256, device="cuda").to(torch.float16)
    expected = model.lm_head(model.norm(x)).float()
    out = model.head(x)
    assert out.shape == expected.shape
    assert relative_error(out, expected) < 2e-3
    rows = torch.randn(1, 3, 256, device="cuda").to(torch.float16)  # a prompt: the plain modules
    torch.testing.assert_close(model.head(rows), model.lm_head(model.norm(rows)).float(), rtol=0, atol=0)
