"""Flags that must not change what is trained, and the schedule flags, through ``pretrain_gpt.py``.

* Activation recomputation (full, uniform, one layer per chunk; selective) gives the same per-step
  losses and gradient norms as none, with dropout on: megatron's recompute restores the RNG states
  of the forward, so the recomputed forward draws the same dropout masks.
* ``--overlap-grad-reduce``, and the distributed optimizer with ``--overlap-param-gather``, at DP=2
  give the same losses and gradient norms as the plain data-parallel run.
* ``--train-samples N`` trains ceil(N / global batch) steps, exactly like that ``--train-iters``.
* ``--lr-decay-style wsd``: every step's learning rate is ``wsd_lr`` below (warm-up, stable at the
  peak, decay to the minimum over the last ``--lr-wsd-decay-iters`` steps), for each decay shape.

Tiny LPA model on mock data, 10 steps; runs with the same flags are made once per session.
"""

import functools
import math

import pytest

from tests.launch import pretrain_records

STEPS, GLOBAL_BATCH = 10, 4
PEAK_LR, MIN_LR, WARMUP, WSD_DECAY = 1e-2, 1e-3, 2, 4
# LLaMA-style LPA block with megatron's dropout on attention probabilities and sublayer outputs.
BASE = (
    "--mock-data --vocab-size 256 --make-vocab-size-divisible-by 1 --seq-length 32 "
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2 "
    "--ffn-hidden-size 128 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--disable-bias-linear --untie-embeddings-and-output-weights --lpa-attn-rank 8 "
    "--hidden-dropout 0.1 --attention-dropout 0.1 --micro-batch-size 2 "
    f"--lr {PEAK_LR} --min-lr {MIN_LR} --lr-warmup-iters {WARMUP} --lr-decay-style wsd "
    f"--lr-wsd-decay-iters {WSD_DECAY} --log-interval 1 --eval-iters 0 --num-workers 0 --seed 7"
).split()


def single(style: str = "exponential", length: str = f"--train-iters {STEPS}") -> list:
    """One process, 2 micro-batches a step; ``style`` is the WSD decay shape (megatron's default:
    exponential), ``length`` how the run's length is given."""
    return [
        *BASE,
        "--global-batch-size",
        str(GLOBAL_BATCH),
        "--lr-wsd-decay-style",
        style,
        *length.split(),
    ]


SINGLE = single()
# DP=2 with 2 micro-batches per rank, so megatron's no_sync (accumulation without reducing) runs.
DP2 = [*BASE, "--global-batch-size", str(2 * GLOBAL_BATCH), "--train-iters", str(STEPS)]


@functools.lru_cache(maxsize=None)
def _curves(nproc: int, flags: tuple) -> dict:
    records = [r for r in pretrain_records(nproc, *flags) if r["split"] == "train"]
    return {
        "iteration": [r["iteration"] for r in records],
        "loss": [r["lm loss"] for r in records],
        "grad_norm": [r["grad-norm"] for r in records],
        "lr": [r["learning-rate"] for r in records],
    }


def curves(nproc: int, *flags: str) -> dict:
    """Per-step iteration, loss, gradient norm and learning rate of one run (made once)."""
    return _curves(nproc, tuple(flags))


def assert_same_curves(actual: dict, expected: dict, what: str, rtol: float) -> None:
    assert actual["iteration"] == expected["iteration"], (
        f"{what}: logged steps {actual['iteration']}, expected {expected['iteration']}"
    )
    for series in ("loss", "grad_norm", "lr"):
        for step, (a, e) in zip(actual["iteration"], zip(actual[series], expected[series])):
            assert math.isclose(a, e, rel_tol=rtol, abs_tol=0.0), (
                f"{what}: {series} at step {step} is {a!r}, without it {e!r} (rtol {rtol})\n"
                f"with    {actual[series]}\nwithout {expected[series]}"
            )


# ----- recomputation -----------------------------------------------------------------------------
RECOMPUTE = {
    "full_uniform": "--recompute-granularity full --recompute-method uniform "
    "--recompute-num-layers 1",
    "selective": "--recompute-granularity selective",
}


@pytest.mark.parametrize("mode", RECOMPUTE)
def test_recompute_trains_the_same_steps(mode):
    """Same losses, gradient norms and learning rates at every step as without recomputation,
    dropout on (a recompute that drew fresh dropout masks would differ at the first step)."""
    # The recomputed forward repeats the same fp32 kernels on the same inputs: bit-identical on
    # one machine; the tolerance only leaves room for a kernel choice that depends on memory.
    assert_same_curves(
        curves(1, *SINGLE, *RECOMPUTE[mode].split()),
        curves(1, *SINGLE),
        f"--recompute {mode}",
        rtol=1e-6,
    )


# ----- overlapped communication ------------------------------------------------------------------
OVERLAP = {
    "overlap_grad_reduce": "--overlap-grad-reduce",
    "distributed_optimizer_overlap": "--use-distributed-optimizer --overlap-grad-reduce "
    "--overlap-param-gather",
}


@pytest.mark.parametrize("mode", OVERLAP)
def test_overlapped_communication_trains_the_same_steps(mode):
    """At DP=2, the same losses, gradient norms and learning rates as the plain DP run."""
    # The distributed optimizer computes the gradient norm from its shards (another summation
    # order) and reduce-scatters instead of all-reducing: a few fp32 ulps.
    assert_same_curves(curves(2, *DP2, *OVERLAP[mode].split()), curves(2, *DP2), mode, rtol=1e-5)


# ----- --train-samples ---------------------------------------------------------------------------
def test_train_samples_trains_ceil_samples_over_batch_steps():
    """37 samples at 4 per step are 10 steps (the last one partly past 37), trained, logged and
    scheduled exactly as ``--train-iters 10``."""
    samples = GLOBAL_BATCH * (STEPS - 1) + 1
    assert math.ceil(samples / GLOBAL_BATCH) == STEPS
    by_samples = curves(1, *single(length=f"--train-samples {samples}"))
    assert_same_curves(by_samples, curves(1, *SINGLE), f"--train-samples {samples}", rtol=0.0)


# ----- WSD schedule ------------------------------------------------------------------------------
def wsd_lr(
    step: int,
    style: str,
    steps: int = STEPS,
    peak: float = PEAK_LR,
    floor: float = MIN_LR,
    warmup: int = WARMUP,
    decay: int = WSD_DECAY,
) -> float:
    """The learning rate after ``step`` optimizer steps: linear warm-up from 0 over ``warmup``
    steps, ``peak`` until ``decay`` steps before the end, then down to ``floor`` at the last step
    along ``style``, as a fraction p of the decay done: linear 1-p, cosine (1+cos(pi p))/2,
    exponential 2*0.5^p - 1 (1 at p=0, 0 at p=1)."""
    if step <= warmup:
        return peak * step / warmup
    decay_start = steps - decay
    if step <= decay_start:
        return peak
    p = (step - decay_start) / decay
    shape = {
        "linear": 1 - p,
        "cosine": (1 + math.cos(math.pi * p)) / 2,
        "exponential": 2 * 0.5**p - 1,
    }[style]
    return floor + (peak - floor) * shape


def test_wsd_formula_is_warmup_stable_decay():
    """The statement itself: the points that define WSD, whatever the decay shape."""
    for style in ("linear", "cosine", "exponential"):
        assert [wsd_lr(s, style) for s in (0, 1, 2, 5, 6)] == [
            0,
            PEAK_LR / 2,
            PEAK_LR,
            PEAK_LR,
            PEAK_LR,
        ]
        assert wsd_lr(STEPS, style) == pytest.approx(MIN_LR, rel=1e-12)
        assert PEAK_LR > wsd_lr(STEPS - 2, style) > MIN_LR


@pytest.mark.parametrize("style", ["linear", "cosine", "exponential"])
def test_wsd_schedule_logs_the_formulas_learning_rates(style):
    """Each logged learning rate (the log line follows the step's schedule update, so step t logs
    the rate after t steps) is ``wsd_lr(t)``; the decay shapes differ, so the flag is honoured."""
    run = curves(1, *single(style))  # the exponential one is the other tests' baseline run
    expected = [wsd_lr(step, style) for step in range(1, STEPS + 1)]
    assert run["iteration"] == list(range(1, STEPS + 1)), run["iteration"]
    for step, (lr, want) in enumerate(zip(run["lr"], expected), start=1):
        assert math.isclose(lr, want, rel_tol=1e-9, abs_tol=1e-15), (
            f"--lr-wsd-decay-style {style}: lr after step {step} is {lr!r}, the formula gives "
            f"{want!r}\nlogged  {run['lr']}\nformula {expected}"
        )
