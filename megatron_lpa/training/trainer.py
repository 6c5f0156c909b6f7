"""The training loop on megatron-core: build in a fixed order, then step, evaluate, save.

Build order: process groups and seeds -> tokenizer -> model chunk (this pipeline stage) wrapped in
megatron's DDP -> optimizer -> LR schedule -> checkpoint -> data iterators. A step runs megatron's
forward-backward schedule (1F1B when pipelined; gradient accumulation over micro-batches), which
also finalises gradients (DP reduce, TP reduce of sequence-parallel grads, tied embeddings). With
``--cuda-graph`` that whole schedule is captured once in a CUDA graph (megatron-core's
full-iteration graph) and replayed each step; the optimizer step stays outside it. Nothing in a
step waits for the device (with the fused kernels the optimizer decides clipping and skipping on
the device too), so the host queues step t+1 while the GPU runs step t and reads each step's loss
and gradient norm a step late.
"""

import math
import time
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.full_cuda_graph import FullCudaGraphWrapper
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_lpa.config.model_config import lpa_config, padded_vocab_size
from megatron_lpa.config.training_config import TrainingConfig
from megatron_lpa.models.builder import build_model
from megatron_lpa.models.flops import training_flops_per_token
from megatron_lpa.platform import megatron_patches, sigterm
from megatron_lpa.platform.distributed import (
    destroy_distributed,
    device_type,
    initialize_distributed,
    set_seed,
)
from megatron_lpa.platform.megatron_warnings import optional_kernels_line
from megatron_lpa.tokenizers import build_tokenizer
from megatron_lpa.training.checkpoint_publishing import CheckpointPublisher
from megatron_lpa.training.data_loading import (
    build_datasets,
    check_data,
    check_data_vocabulary,
    micro_batches,
)
from megatron_lpa.training.evaluation import (
    evaluate,
    forward_step,
    reduce_reports,
    token_bytes_on_device,
)
from megatron_lpa.training.metrics import MetricsLogger
from megatron_lpa.training.optimizer import (
    build_optimizer,
    build_scheduler,
    optimizer_step,
    use_fused_kernels,
)
from megatron_lpa.training.resume import resume
from megatron_lpa.training.step_readout import LogWindow, StepReadout

# Eager steps before the graph is captured: allocator, cuBLAS and SDPA settle first.
CUDA_GRAPH_WARMUP_STEPS = 3


class Trainer:
    """Pretraining of one ``TrainingConfig``: ``Trainer(cfg).train()``."""

    def __init__(self, cfg: TrainingConfig):
        self.cfg = cfg
        # First, so that a SIGTERM during start-up is honoured (with a save) after the first step
        # (pretrain_gpt.py has been remembering SIGTERM since its first line).
        if cfg.run.exit_signal_handler:
            sigterm.remember()
        else:
            sigterm.forget()
        check_data(cfg)
        initialize_distributed(
            cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
        )
        if dist.get_rank() == 0 and optional_kernels_line():
            print(optional_kernels_line(), flush=True)
        self._default_stream = None
        if cfg.compute.cuda_graph:
            # Autograd accumulates each parameter's gradient on the stream that was current when
            # megatron's DDP made its accumulator; CUDA will not let the legacy default stream
            # wait on a capturing stream, so the whole run moves to a side stream.
            self._default_stream = torch.cuda.current_stream()
            torch.cuda.set_stream(torch.cuda.Stream())
        set_seed(cfg.run.seed, graph_safe=cfg.compute.cuda_graph)
        self.tokenizer = None
        vocab = cfg.data.vocab_size
        if cfg.data.tokenizer_type:
            data = cfg.data
            self.tokenizer = build_tokenizer(
                data.tokenizer_type,
                data.tokenizer_model,
                data.vocab_file,
                data.merge_file,
                data.vocab_size,
            )
            vocab = self.tokenizer.vocab_size
            check_data_vocabulary(cfg, self.tokenizer)
        self.config = lpa_config(cfg, padded_vocab_size(vocab, cfg))
        self.forward_step = partial(
            forward_step, token_bytes=token_bytes_on_device(self.tokenizer, self.config.vocab_size)
        )
        self.model = [self._build_model()]
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.state = {"iteration": 0, "consumed_train_samples": 0, "consumed_valid_samples": 0}
        if cfg.checkpoint.load:
            self.state.update(resume(cfg, self.model, self.optimizer, self.scheduler) or {})
        use_fused_kernels(self.optimizer, enabled=not cfg.compute.no_fused_kernels)
        self.forward_backward = get_forward_backward_func()
        if cfg.compute.cuda_graph:
            self.forward_backward = FullCudaGraphWrapper(
                self.forward_backward, CUDA_GRAPH_WARMUP_STEPS
            )
        self.train_data, self.valid_data, self.test_data = build_datasets(
            cfg, self.tokenizer, self.config.vocab_size
        )
        dp_rank = parallel_state.get_data_parallel_rank()
        vocab = self.config.vocab_size
        self.train_iterator = micro_batches(
            self.train_data, self.state["consumed_train_samples"], cfg, dp_rank, vocab
        )
        self.valid_iterator = micro_batches(
            self.valid_data, self.state["consumed_valid_samples"], cfg, dp_rank, vocab
        )
        self.logger = MetricsLogger(
            cfg,
            training_flops_per_token(self.config, cfg.model.seq_length),
            dist.get_world_size(),
            enabled=dist.get_rank() == dist.get_world_size() - 1,
        )
        self.publisher = CheckpointPublisher(
            cfg, self.model, self.optimizer, self.scheduler, reports=self.logger.enabled
        )
        self._last_step_finite = True

    # ----- build -----------------------------------------------------------------------------
    def _build_model(self) -> DistributedDataParallel:
        model = build_model(
            self.config,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )
        if device_type() == "cuda":
            model.cuda(torch.cuda.current_device())
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=self.cfg.parallel.overlap_grad_reduce,
            overlap_param_gather=self.cfg.parallel.overlap_param_gather,
            use_distributed_optimizer=self.cfg.parallel.use_distributed_optimizer,
        )
        ddp = DistributedDataParallel(self.config, ddp_config, model)
        self.config.finalize_model_grads_func = finalize_model_grads
        if self.cfg.parallel.overlap_grad_reduce:
            self.config.no_sync_func = ddp.no_sync
        return ddp

    # ----- steps -----------------------------------------------------------------------------
    def _run_schedule(self, iterator, forward_only: bool) -> list:
        if isinstance(self.forward_backward, FullCudaGraphWrapper):
            megatron_patches.order_static_loader_after_replay(self.forward_backward)
        return self.forward_backward(
            forward_step_func=self.forward_step,
            data_iterator=iterator,
            model=self.model,
            num_microbatches=self.cfg.schedule.num_microbatches,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.schedule.micro_batch_size,
            forward_only=forward_only,
        )

    def train_step(self) -> torch.Tensor:
        """Queues one optimizer step without waiting for the device.

        Returns ``[loss sum, tokens, grad norm, skipped]`` (fp32, on the device; the loss summed
        over micro-batches and DP ranks). The LR schedule follows the iteration count, skipped
        steps included: whether a step was skipped is only known on the device.
        """
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        total = reduce_reports(self._run_schedule(self.train_iterator, forward_only=False))[:2]
        grad_norm, skipped = optimizer_step(
            self.optimizer,
            self.cfg.optimizer.clip_grad,
            fused=not self.cfg.compute.no_fused_kernels,
        )
        self.scheduler.step(increment=1)
        self.state["iteration"] += 1
        self.state["consumed_train_samples"] += self.cfg.schedule.global_batch_size
        return torch.cat([total.float(), grad_norm.reshape(1).float(), skipped.reshape(1).float()])

    @torch.no_grad()
    def evaluate(self, iterator, split: str) -> float:
        """Mean token loss over ``eval_iters`` steps of ``iterator`` (logged with perplexity and,
        with a tokenizer, bits per byte)."""
        for chunk in self.model:
            chunk.eval()
        totals = evaluate(
            partial(self._run_schedule, forward_only=True), iterator, self.cfg.evaluation.eval_iters
        )
        if split == "validation":
            self.state["consumed_valid_samples"] += (
                self.cfg.evaluation.eval_iters * self.cfg.schedule.global_batch_size
            )
        for chunk in self.model:
            chunk.train()
        if parallel_state.is_pipeline_last_stage():
            self.logger.log_eval(self.state["iteration"], split, totals)
        return totals.loss

    # ----- loop ------------------------------------------------------------------------------
    def train(self) -> None:
        """Steps until ``--train-iters``, an exit condition or too many non-finite steps.

        The host reads a step's statistics one step late (``StepReadout``), so it queues step
        ``t + 1`` while the device still runs step ``t``; steps that log, evaluate, save or exit
        are read at once, and so is the step after a save: a checkpoint saved at an interval is
        published only once the next step, run from its weights, has a finite loss and gradient
        norm (``CheckpointPublisher``).
        """
        cfg = self.cfg
        self._start, self._nonfinite, self._window = time.time(), 0, LogWindow()
        lagging = None
        while self.state["iteration"] < cfg.schedule.train_iters:
            stats = self.train_step()
            iteration = self.state["iteration"]
            exit_flag = self._exit_flag()
            readout = StepReadout(
                iteration, stats if exit_flag is None else torch.cat([stats, exit_flag])
            )
            stop = bool(cfg.run.exit_interval) and iteration % cfg.run.exit_interval == 0
            if lagging is not None:
                stop |= self._account(lagging)
            lagging = readout
            evaluate = bool(
                self.valid_iterator
                and cfg.evaluation.eval_iters
                and iteration % cfg.evaluation.eval_interval == 0
            )
            save = bool(
                cfg.checkpoint.save
                and cfg.checkpoint.save_interval
                and iteration % cfg.checkpoint.save_interval == 0
            )
            if stop or evaluate or save or self.publisher.pending or self._logs_at(iteration):
                stop |= self._account(lagging)
                lagging = None
                self.publisher.settle(self._last_step_finite)
            if evaluate:
                self.evaluate(self.valid_iterator, "validation")
            if save:
                self.save(final=stop or iteration == cfg.schedule.train_iters)
            if stop:
                if self.logger.enabled:
                    print(
                        f"Exiting at iteration {iteration} (signal, time or exit interval).",
                        flush=True,
                    )
                if cfg.checkpoint.save and not save:
                    self.save()
                return
        if (
            self.valid_iterator
            and cfg.evaluation.eval_iters
            and self.state["iteration"] % cfg.evaluation.eval_interval
        ):
            self.evaluate(self.valid_iterator, "validation")
        if self.test_data is not None and cfg.evaluation.eval_iters:
            self.evaluate(
                micro_batches(
                    self.test_data,
                    0,
                    cfg,
                    parallel_state.get_data_parallel_rank(),
                    self.config.vocab_size,
                ),
                "test",
            )
        if cfg.checkpoint.save and self.publisher.saved_at != self.state["iteration"]:
            self.save()

    def _logs_at(self, iteration: int) -> bool:
        return (
            iteration % self.cfg.logging.log_interval == 0
            or iteration == self.cfg.schedule.train_iters
        )

    def _account(self, readout: "StepReadout") -> bool:
        """Waits for ``readout``'s step; counts it into the log window, warns about a skipped
        step (stopping after ``--max-nonfinite-steps`` in a row) and logs at log steps.
        Returns whether any rank asked to exit at that step."""
        cfg, window = self.cfg, self._window
        values = readout.read()
        loss_sum, tokens, grad_norm, skipped = values[:4]
        iteration = readout.iteration
        window.steps += 1
        self._last_step_finite = not skipped and math.isfinite(loss_sum)
        if skipped:
            self._nonfinite, window.skipped = self._nonfinite + 1, window.skipped + 1
            if self.logger.enabled:
                print(
                    f"WARNING: iteration {iteration}: non-finite loss or gradient, step "
                    f"skipped ({self._nonfinite} in a row).",
                    flush=True,
                )
            if self._nonfinite >= cfg.optimizer.max_nonfinite_steps:
                raise SystemExit(
                    f"Stopping: {self._nonfinite} steps in a row had a non-finite loss or "
                    "gradient. Lower --lr, raise --lr-warmup-iters, use --bf16 instead of --fp16, "
                    "or resume from an earlier checkpoint."
                )
        else:
            self._nonfinite = 0
            window.loss_sum, window.tokens = window.loss_sum + loss_sum, window.tokens + tokens
        if self._logs_at(iteration):
            if device_type() == "cuda":
                torch.cuda.synchronize()
            step_seconds = (time.time() - window.start) / window.steps
            loss = window.loss_sum / window.tokens if window.tokens > 0 else float("nan")
            if parallel_state.is_pipeline_last_stage():
                self.logger.log_train(
                    iteration,
                    loss,
                    self.scheduler.get_lr(self.optimizer.param_groups[0]),
                    None if skipped else grad_norm,
                    step_seconds,
                    window.skipped,
                )
            self._window = LogWindow()
        return len(values) > 4 and values[4] > 0

    def _exit_flag(self):
        """``[1]`` on the device, 1.0 on every rank once any rank got SIGTERM or ran past
        ``--exit-duration-in-mins`` (queued, read with the step); None when neither is asked for."""
        cfg = self.cfg
        if not (cfg.run.exit_signal_handler or cfg.run.exit_duration_in_mins is not None):
            return None
        minutes = (time.time() - self._start) / 60
        stop = sigterm.received() or (
            cfg.run.exit_duration_in_mins is not None and minutes > cfg.run.exit_duration_in_mins
        )
        flag = torch.full((1,), float(stop), device=device_type())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag

    def save(self, final: bool = True) -> None:
        """Saves a checkpoint of the state after the last step (``CheckpointPublisher``)."""
        self.publisher.save(self.state, self._last_step_finite, final)

    def close(self, keep_process_group: bool = False) -> None:
        """Closes the loggers and megatron's groups (the process group too, unless kept)."""
        self.logger.close()
        if self.cfg.compute.cuda_graph:
            megatron_patches.forget_full_cuda_graphs()
            torch.cuda.current_stream().synchronize()
            torch.cuda.set_stream(self._default_stream)
        destroy_distributed(keep_process_group)
