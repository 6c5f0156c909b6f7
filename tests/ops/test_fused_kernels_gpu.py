"""The CUDA kernels of csrc/ against float64 references on fresh random inputs (GPU only).

Outputs are allocated by the kernels, so the allocator is first filled with NaNs and freed: an
element a kernel forgets to write shows up as NaN. Tolerances are relative norm errors
(||out - ref|| / ||ref||), by the dtype of the tensor compared.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_lpa.ops import reference
from megatron_lpa.ops._ext import HAVE_LPA_CUDA, kernels_for
from megatron_lpa.ops.wgrad_accumulation import wgrad_gemm_accum_fp32

pytestmark = pytest.mark.gpu

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = list(TOLERANCE)


@pytest.fixture(autouse=True)
def kernels():
    assert HAVE_LPA_CUDA, ("megatron_lpa._C is not built: pip install --no-build-isolation -e . "
                           "(or python setup.py build_ext --inplace)")
    torch.seed()  # fresh random inputs every run
    return kernels_for(torch.empty(0, device="cuda"))


def poison_allocator(num_bytes: int) -> None:
    torch.full((num_bytes // 4 + 1024,), float("nan"), device="cuda")
    torch.cuda.synchronize()


def assert_close(out: torch.Tensor, ref: torch.Tensor, tolerance: float) -> None:
    assert torch.isfinite(out).all(), "unwritten or non-finite elements"
    error = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert error < tolerance, f"relative error {error:.2e} >= {tolerance:.0e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab", [(1024, 32000), (37, 1001)])  # vectorised / scalar path
def test_cross_entropy(kernels, dtype, rows, vocab):
    logits = (torch.randn(rows, vocab, device="cuda") * 4).to(dtype)
    vocab_start = vocab  # the middle slice of three: labels land inside and outside it
    labels = torch.randint(0, 3 * vocab, (rows,), device="cuda")
    labels[:4] = vocab_start + torch.tensor([0, vocab - 1, 5, 17], device="cuda")
    poison_allocator(rows * vocab * 4)
    row_max, sum_exp, label_logit = kernels.cross_entropy_stats(logits, labels, vocab_start)
    x = logits.double()
    torch.testing.assert_close(row_max.double(), x.max(-1).values)
    assert_close(sum_exp, torch.exp(x - x.max(-1, keepdim=True).values).sum(-1), 1e-5)
    _, _, ref_label = reference.cross_entropy_stats(x, labels, vocab_start)
    torch.testing.assert_close(label_logit.double(), ref_label.double())

    lse = (row_max.double() + torch.log(sum_exp.double())).float()
    grad = torch.randn(rows, device="cuda")
    poison_allocator(rows * vocab * 4)
    out = kernels.cross_entropy_backward(logits, labels, lse, grad, vocab_start)
    assert out.dtype == dtype
    expected = reference.cross_entropy_backward(x, labels, lse.double(), grad.double(), vocab_start)
    assert_close(out, expected, TOLERANCE[dtype])


def test_fused_cross_entropy_equals_torch_on_the_full_vocabulary():
    from megatron_lpa.ops.cross_entropy import vocab_parallel_cross_entropy

    logits = torch.randn(64, 8, 32000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 32000, (64, 8), device="cuda")
    loss = vocab_parallel_cross_entropy(logits, labels, tp_group=None)
    loss.sum().backward()
    x = logits.detach().double().requires_grad_()
    expected = F.cross_entropy(x.reshape(-1, 32000), labels.reshape(-1), reduction="none")
    expected.sum().backward()
    assert_close(loss, expected.view(64, 8), 1e-5)
    assert_close(logits.grad, x.grad, TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("heads,dim,rot", [(12, 64, 64), (24, 128, 64), (3, 20, 12)])  # last: scalar
def test_rope_on_a_strided_view_of_fused_qkv(kernels, dtype, interleaved, heads, dim, rot):
    seq, batch = 64, 45  # blocks of several samples, the last one partial
    # Megatron's query: a view of the fused [q, k, v] output, last dimension contiguous.
    qkv = torch.randn(seq, batch, heads, 3 * dim, device="cuda").to(dtype)
    t = qkv[..., :dim]
    angles = torch.arange(seq, device="cuda")[:, None] * torch.rand(rot, device="cuda")
    for backward in (False, True):
        poison_allocator(t.numel() * 4)
        out = kernels.rope(t, angles, interleaved, backward)
        assert out.is_contiguous() and out.dtype == dtype
        expected = reference.rope(t.double(), angles.double(), interleaved, backward)
        assert_close(out, expected, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,f", [(4096, 2048), (333, 37)])  # vectorised / scalar path
def test_swiglu(kernels, dtype, rows, f):
    x = (torch.randn(rows, 2 * f, device="cuda") * 3).to(dtype)
    grad = torch.randn(rows, f, device="cuda").to(dtype)
    poison_allocator(rows * 2 * f * 4)
    out = kernels.swiglu_forward(x)
    assert_close(out, reference.swiglu_forward(x.double()), TOLERANCE[dtype])
    poison_allocator(rows * 2 * f * 4)
    dx = kernels.swiglu_backward(grad, x)
    assert_close(dx, reference.swiglu_backward(grad.double(), x.double()), TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wgrad_accumulation_into_fp32_main_grad(dtype):
    x = torch.randn(4096, 768, device="cuda").to(dtype)  # [tokens, in]
    dy = torch.randn(4096, 2304, device="cuda").to(dtype)  # [tokens, out]
    main_grad = torch.randn(2304, 768, device="cuda")
    expected = main_grad.double() + dy.double().t() @ x.double()
    address = main_grad.data_ptr()
    wgrad_gemm_accum_fp32(x, dy, main_grad)
    assert main_grad.data_ptr() == address and main_grad.dtype == torch.float32
    assert_close(main_grad, expected, 1e-5)
