"""The per-step log line and its TensorBoard / Weights & Biases scalars (on one rank)."""

import json
import time
from typing import Optional

import psutil
import torch

from megatron_lpa.config.training_config import TrainingConfig

# bf16 dense GEMM rate measured on an H200 (8192^3 matmul: 775 TFLOP/s; 790 is the figure the
# project's MFU targets are stated against).
DEFAULT_CUDA_PEAK_TFLOPS = 790.0


def memory_gib() -> float:
    """Peak GPU memory allocated on this rank, or this process's resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


class MetricsLogger:
    """Formats log lines and writes scalars; only the rank that holds the loss logs."""

    def __init__(self, cfg: TrainingConfig, flops_per_token: float, world_size: int, enabled: bool):
        self.cfg, self.flops_per_token, self.world_size = cfg, flops_per_token, world_size
        self.enabled = enabled
        peak = cfg.logging.peak_tflops_per_device
        if peak is None and torch.cuda.is_available():
            peak = DEFAULT_CUDA_PEAK_TFLOPS
        self.peak_tflops = peak
        self.tensorboard = self.wandb = self.jsonl = None
        if enabled and cfg.logging.log_jsonl:
            self.jsonl = open(cfg.logging.log_jsonl, "a", buffering=1)
        if enabled and cfg.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=cfg.logging.tensorboard_dir)
        if enabled and cfg.logging.wandb_project:
            try:
                import wandb
            except ImportError:
                raise SystemExit(
                    "--wandb-project needs wandb: pip install -e '.[wandb]'."
                ) from None
            self.wandb = wandb.init(
                project=cfg.logging.wandb_project,
                name=cfg.logging.wandb_exp_name,
                config=cfg.to_dict(),
            )
        self.start = time.time()

    def log_train(
        self,
        iteration: int,
        loss: float,
        lr: float,
        grad_norm: Optional[float],
        step_seconds: float,
        skipped: int,
    ) -> None:
        """One line for the mean over the last ``log_interval`` steps."""
        tokens_per_step = self.cfg.schedule.global_batch_size * self.cfg.model.seq_length
        tokens_per_s = tokens_per_step / step_seconds
        tflops = tokens_per_s * self.flops_per_token / 1e12 / self.world_size
        remaining = (self.cfg.schedule.train_iters - iteration) * step_seconds
        scalars = {
            "lm loss": loss,
            "learning-rate": lr,
            "tokens-per-sec": tokens_per_s,
            "tflops-per-device": tflops,
            "step-time": step_seconds,
            "memory-gib": memory_gib(),
        }
        if grad_norm is not None:
            scalars["grad-norm"] = grad_norm
        parts = [
            f"iteration {iteration:8d}/{self.cfg.schedule.train_iters:8d}",
            f"loss {loss:.4f}",
            f"lr {lr:.3e}",
            f"grad norm {grad_norm:.3f}" if grad_norm is not None else "",
            f"tokens/s {tokens_per_s:,.0f}",
            f"TFLOP/s/device {tflops:.1f}",
        ]
        if self.peak_tflops:
            scalars["mfu"] = tflops / self.peak_tflops
            parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
        parts += [
            f"mem {scalars['memory-gib']:.2f} GiB",
            f"step {1000 * step_seconds:.1f} ms",
            f"ETA {_duration(remaining)}",
        ]
        if skipped:
            parts.append(f"skipped {skipped}")
        self._emit(" | ".join(p for p in parts if p), scalars, iteration, "train")

    def log_eval(self, iteration: int, split: str, totals) -> None:
        """One evaluation's ``LossTotals``: loss, perplexity and (with a tokenizer) bits per
        byte."""
        line = (
            f"{split} at iteration {iteration}: loss {totals.loss:.4f} | "
            f"perplexity {totals.perplexity:.2f}"
        )
        scalars = {"lm loss": totals.loss, "ppl": totals.perplexity}
        if totals.bits_per_byte is not None:
            line += f" | bits per byte {totals.bits_per_byte:.4f}"
            scalars["bpb"] = totals.bits_per_byte
        self._emit(line, scalars, iteration, split)

    def _emit(self, line: str, scalars: dict, iteration: int, group: str) -> None:
        if not self.enabled:
            return
        print(line, flush=True)
        for name, value in scalars.items():
            if self.tensorboard:
                self.tensorboard.add_scalar(f"{group}/{name}", value, iteration)
        if self.wandb:
            self.wandb.log({f"{group}/{k}": v for k, v in scalars.items()}, step=iteration)
        if self.jsonl:
            record = {
                "split": group,
                "iteration": iteration,
                "elapsed_s": round(time.time() - self.start, 3),
                **scalars,
            }
            self.jsonl.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
        if self.jsonl:
            self.jsonl.close()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"
