"""When a checkpoint is saved and when it becomes the one a resume loads.

A checkpoint of a step whose loss or gradient norm, or any weight, is not finite is never saved:
resuming from it would repeat the divergence, so the last good checkpoint stays the latest.
Weights can be finite and still broken (a huge update); the next step shows it, so a checkpoint
saved at an interval stays unpublished (in its temp directory, where no load looks) until the
step after it has been read back finite, and is deleted otherwise.
"""

from typing import Optional

import torch
import torch.distributed as dist

from megatron_lpa.checkpointing.checkpoint import UnpublishedCheckpoint, save_checkpoint
from megatron_lpa.checkpointing.files import latest_iteration
from megatron_lpa.config.training_config import TrainingConfig
from megatron_lpa.platform.distributed import device_type


class CheckpointPublisher:
    """Saves ``--save`` checkpoints of one run and publishes each once the next step is finite."""

    def __init__(self, cfg: TrainingConfig, model: list, optimizer, scheduler, reports: bool):
        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.reports = reports
        self.saved_at: Optional[int] = None
        self.pending: Optional[UnpublishedCheckpoint] = None

    def save(self, state: dict, last_step_finite: bool, final: bool) -> None:
        """Saves the state after the last step (already read back); a collective call.

        ``final`` publishes at once (no step follows); otherwise the checkpoint waits for
        ``settle`` after the next step.
        """
        iteration = self.saved_at = state["iteration"]
        if not self._all_finite(last_step_finite, weights=True):
            self._warn_not_saved(
                f"not saving iteration {iteration}: its loss, gradient norm or "
                "weights are not finite"
            )
            return
        self.pending = save_checkpoint(
            self.cfg.checkpoint.save,
            iteration,
            self.model,
            self.optimizer,
            self.scheduler,
            dict(state),
            self.cfg.to_dict(),
            publish=final,
        )

    def settle(self, last_step_finite: bool) -> None:
        """Publishes the checkpoint saved before the step just read back, if that step was
        finite; else deletes it."""
        written, self.pending = self.pending, None
        if written is None:
            return
        if self._all_finite(last_step_finite, weights=False):
            written.publish()
            return
        written.discard()
        self._warn_not_saved(
            f"dropped the checkpoint of iteration {written.iteration}: the step "
            "after it had a non-finite loss or gradient norm"
        )

    @torch.no_grad()
    def _all_finite(self, last_step_finite: bool, weights: bool) -> bool:
        """Whether the last step was finite on every rank (and, with ``weights``, every weight
        is)."""
        finite = torch.tensor(last_step_finite, device=device_type())
        if weights:
            params = [param for chunk in self.model for param in chunk.parameters()]
            finite &= torch.stack([torch.isfinite(param).all() for param in params]).all()
        finite = finite.float().reshape(1)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def _warn_not_saved(self, what: str) -> None:
        if self.reports:
            latest = latest_iteration(self.cfg.checkpoint.save)
            kept = (
                f"the latest checkpoint in {self.cfg.checkpoint.save} stays iteration {latest}"
                if latest is not None
                else "no checkpoint has been published yet"
            )
            print(f"WARNING: {what}; {kept}.", flush=True)
