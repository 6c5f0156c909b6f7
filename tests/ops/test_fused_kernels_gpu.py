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
    assert HAVE_LPA_CUDA, (
        "megatron_lpa._C is not built: pip install --no-build-isolation -e . "
        "(or python setup.py build_ext --inplace)"
    )
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
@pytest.mark.parametrize(
    "heads,dim,rot", [(12, 64, 64), (24, 128, 64), (3, 20, 12)]
)  # last: scalar
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


# One 16-byte vector per thread (768; 6144 in 16-bit types) or four (6144 in fp32, 12288 in 16-bit
# types; 12288 fp32 values are 3072 vectors, wider than the kernels take).
@pytest.mark.parametrize(
    "dtype,rows,n",
    [
        (dtype, rows, n)
        for dtype in DTYPES
        for rows, n in ((4096, 768), (40, 6144), (9, 12288))
        if (dtype, n) != (torch.float32, 12288)
    ],
)
def test_rms_norm(kernels, dtype, rows, n):
    x = (torch.randn(rows, n, device="cuda") * 3).to(dtype)
    weight = (1 + torch.randn(n, device="cuda") / 4).to(dtype)
    grad = torch.randn(rows, n, device="cuda").to(dtype)
    poison_allocator(rows * n * 8)
    y, rstd = kernels.rms_norm_forward(x, weight, 1e-5)
    ref_y, ref_rstd = reference.rms_norm_forward(x.double(), weight.double(), 1e-5)
    assert y.dtype == dtype and rstd.dtype == torch.float32
    assert_close(y, ref_y, TOLERANCE[dtype])
    assert_close(rstd, ref_rstd, 1e-5)
    poison_allocator(rows * n * 8)
    dx, dw = kernels.rms_norm_backward(grad, x, weight, rstd)
    ref_dx, ref_dw = reference.rms_norm_backward(
        grad.double(), x.double(), weight.double(), ref_rstd
    )
    assert_close(dx, ref_dx, TOLERANCE[dtype])
    assert_close(dw, ref_dw, TOLERANCE[dtype])


@pytest.mark.parametrize("case", ["odd width", "too wide", "unaligned view"])
def test_rms_norm_op_runs_rows_the_kernels_cannot_hold_in_pytorch(case):
    """The op checks what the kernels take; other rows go to the PyTorch version, not a crash."""
    from megatron_lpa.ops.rms_norm import rms_norm

    n = {"odd width": 1001, "too wide": 20000, "unaligned view": 768}[case]
    storage = torch.randn(4 * n + 1, device="cuda", dtype=torch.bfloat16)
    x = (storage[1:] if case == "unaligned view" else storage[: 4 * n]).view(4, n)
    x.requires_grad_()
    weight = (1 + torch.randn(n, device="cuda") / 4).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(4, n, device="cuda", dtype=torch.bfloat16)
    y = rms_norm(x, weight, 1e-5)
    dx, dw = torch.autograd.grad(y, (x, weight), grad)
    ref_y, ref_rstd = reference.rms_norm_forward(x.double(), weight.double(), 1e-5)
    ref_dx, ref_dw = reference.rms_norm_backward(
        grad.double(), x.double(), weight.double(), ref_rstd
    )
    for out, ref in ((y, ref_y), (dx, ref_dx), (dw, ref_dw)):
        assert_close(out, ref, TOLERANCE[torch.bfloat16])


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
