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
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.full_cuda_graph import FullCudaGraphWrapper, StaticBufferLoader
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer import optimizer as mcore_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_lpa.models.builder import build_model
from megatron_lpa.models.flops import training_flops_per_token
from megatron_lpa.models.lpa_config import LPAConfig
from megatron_lpa.platform import sigterm
from megatron_lpa.platform.distributed import (
    destroy_distributed,
    device_type,
    initialize_distributed,
    set_seed,
)
from megatron_lpa.platform.megatron_warnings import optional_kernels_line
from megatron_lpa.tokenizers import build_tokenizer
from megatron_lpa.training.arguments import TrainingConfig
from megatron_lpa.training.checkpointing import (latest_iteration, load_checkpoint,
                                                 save_checkpoint)
from megatron_lpa.training.data_loading import (build_datasets, check_data,
                                                 check_data_vocabulary, micro_batches)
from megatron_lpa.training.evaluation import (evaluate, forward_step, reduce_reports,
                                              token_bytes_on_device)
from megatron_lpa.training.metrics import MetricsLogger
from megatron_lpa.training.optimizer_kernels import (step_without_host_sync,
                                                       use_fast_optimizer_kernels)

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}
# Eager steps before the graph is captured: allocator, cuBLAS and SDPA settle first.
CUDA_GRAPH_WARMUP_STEPS = 3


def padded_vocab_size(vocab_size: int, cfg: TrainingConfig) -> int:
    """Megatron-LM's padding: a multiple of ``make_vocab_size_divisible_by * TP``."""
    multiple = cfg.make_vocab_size_divisible_by * cfg.tensor_model_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def model_config(cfg: TrainingConfig, vocab_size: int) -> LPAConfig:
    """The model's ``LPAConfig`` from the run's flags."""
    params_dtype = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else torch.float32
    return LPAConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels, ffn_hidden_size=cfg.ffn_hidden_size or 4 * cfg.hidden_size,
        normalization=cfg.normalization, layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=cfg.swiglu,
        activation_func=F.silu if cfg.swiglu else _ACTIVATIONS[cfg.activation],
        add_bias_linear=not cfg.disable_bias_linear, hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout, embedding_dropout=cfg.embedding_dropout,
        init_method_std=cfg.init_method_std, init_style=cfg.init_style, init_seed=cfg.seed,
        sublayer_norm=cfg.sublayer_norm, output_layer_bias=cfg.output_layer_bias,
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        sequence_parallel=cfg.sequence_parallel, bf16=cfg.bf16, fp16=cfg.fp16,
        params_dtype=params_dtype, pipeline_dtype=params_dtype,
        recompute_granularity=cfg.recompute_granularity, recompute_method=cfg.recompute_method,
        recompute_num_layers=cfg.recompute_num_layers,
        use_cpu_initialization=device_type() == "cpu",
        lpa_attn_rank=cfg.lpa_attn_rank, lpa_ffn_rank=cfg.lpa_ffn_rank, lpa_init=cfg.lpa_init,
        vocab_size=vocab_size,
        max_sequence_length=cfg.max_position_embeddings or cfg.seq_length,
        position_embedding_type=cfg.position_embedding_type, rotary_base=cfg.rotary_base,
        share_embeddings_and_output_weights=not cfg.untie_embeddings_and_output_weights,
        core_attention=cfg.core_attention, fused_kernels=not cfg.no_fused_kernels,
        # megatron's backward needs a GPU for it (it allocates the placeholder gradient there).
        gradient_accumulation_fusion=not cfg.no_fused_kernels and device_type() == "cuda",
    )


class Trainer:
    """Pretraining of one ``TrainingConfig``: ``Trainer(cfg).train()``."""

    def __init__(self, cfg: TrainingConfig):
        self.cfg = cfg
        # First, so that a SIGTERM during start-up is honoured (with a save) after the first step
        # (pretrain_gpt.py has been remembering SIGTERM since its first line).
        self._saved_at = None
        if cfg.exit_signal_handler:
            sigterm.remember()
        else:
            sigterm.forget()
        check_data(cfg)
        initialize_distributed(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size)
        if dist.get_rank() == 0 and optional_kernels_line():
            print(optional_kernels_line(), flush=True)
        self._default_stream = None
        if cfg.cuda_graph:
            # Autograd accumulates each parameter's gradient on the stream that was current when
            # megatron's DDP made its accumulator; CUDA will not let the legacy default stream
            # wait on a capturing stream, so the whole run moves to a side stream.
            self._default_stream = torch.cuda.current_stream()
            torch.cuda.set_stream(torch.cuda.Stream())
        set_seed(cfg.seed, graph_safe=cfg.cuda_graph)
        self.tokenizer = None
        vocab = cfg.vocab_size
        if cfg.tokenizer_type:
            self.tokenizer = build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model,
                                             cfg.vocab_file, cfg.merge_file, cfg.vocab_size)
            vocab = self.tokenizer.vocab_size
            check_data_vocabulary(cfg, self.tokenizer)
        self.config = model_config(cfg, padded_vocab_size(vocab, cfg))
        self.forward_step = partial(
            forward_step, token_bytes=token_bytes_on_device(self.tokenizer, self.config.vocab_size))
        self.model = [self._build_model()]
        self.optimizer = get_megatron_optimizer(self._optimizer_config(), self.model)
        self.scheduler = self._build_scheduler()
        self.state = {"iteration": 0, "consumed_train_samples": 0, "consumed_valid_samples": 0}
        if cfg.load:
            self._resume(cfg.load)
        use_fast_optimizer_kernels(self.optimizer, enabled=not cfg.no_fused_kernels)
        self.forward_backward = get_forward_backward_func()
        if cfg.cuda_graph:
            self.forward_backward = FullCudaGraphWrapper(self.forward_backward,
                                                         CUDA_GRAPH_WARMUP_STEPS)
        self.train_data, self.valid_data, self.test_data = build_datasets(
            cfg, self.tokenizer, self.config.vocab_size)
        dp_rank = parallel_state.get_data_parallel_rank()
        vocab = self.config.vocab_size
        self.train_iterator = micro_batches(self.train_data, self.state["consumed_train_samples"],
                                            cfg, dp_rank, vocab)
        self.valid_iterator = micro_batches(self.valid_data, self.state["consumed_valid_samples"],
                                            cfg, dp_rank, vocab)
        self.logger = MetricsLogger(
            cfg, training_flops_per_token(self.config, cfg.seq_length), dist.get_world_size(),
            enabled=dist.get_rank() == dist.get_world_size() - 1)

    # ----- build -----------------------------------------------------------------------------
    def _resume(self, load_dir: str) -> None:
        """Loads the latest checkpoint of ``load_dir``; none yet (a first run) starts from scratch."""
        loaded = None
        if Path(load_dir).is_dir():
            loaded = load_checkpoint(load_dir, self.model, self.optimizer, self.scheduler,
                                     load_optim=not self.cfg.no_load_optim,
                                     fall_back=self.cfg.fallback_to_previous_checkpoint)
        if dist.get_rank() == 0:
            print(f"--load {load_dir}: no checkpoint yet, starting from scratch." if loaded is None
                  else f"Resumed from {load_dir} at iteration {loaded['iteration']} "
                       f"({loaded['consumed_train_samples']} samples consumed).", flush=True)
        if loaded is not None:
            self.state.update(loaded)

    def _build_model(self) -> DistributedDataParallel:
        model = build_model(self.config, pre_process=parallel_state.is_pipeline_first_stage(),
                            post_process=parallel_state.is_pipeline_last_stage())
        if device_type() == "cuda":
            model.cuda(torch.cuda.current_device())
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=self.cfg.overlap_grad_reduce,
            overlap_param_gather=self.cfg.overlap_param_gather,
            use_distributed_optimizer=self.cfg.use_distributed_optimizer)
        ddp = DistributedDataParallel(self.config, ddp_config, model)
        self.config.finalize_model_grads_func = finalize_model_grads
        if self.cfg.overlap_grad_reduce:
            self.config.no_sync_func = ddp.no_sync
        return ddp

    def _optimizer_config(self) -> OptimizerConfig:
        cfg = self.cfg
        return OptimizerConfig(
            optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
            clip_grad=cfg.clip_grad, bf16=cfg.bf16, fp16=cfg.fp16,
            params_dtype=self.config.params_dtype,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
            overlap_param_gather=cfg.overlap_param_gather)

    def _build_scheduler(self) -> OptimizerParamScheduler:
        cfg = self.cfg
        decay_steps = cfg.lr_decay_iters or cfg.train_iters
        warmup = (int(cfg.lr_warmup_fraction * decay_steps) if cfg.lr_warmup_fraction is not None
                  else cfg.lr_warmup_iters)
        return OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr,
            lr_warmup_steps=warmup, lr_decay_steps=decay_steps,
            lr_decay_style="WSD" if cfg.lr_decay_style == "wsd" else cfg.lr_decay_style,
            start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=cfg.train_iters,
            wd_incr_style="constant", wsd_decay_steps=cfg.lr_wsd_decay_iters,
            lr_wsd_decay_style=cfg.lr_wsd_decay_style)

    # ----- steps -----------------------------------------------------------------------------
    def _run_schedule(self, iterator, forward_only: bool) -> list:
        if isinstance(self.forward_backward, FullCudaGraphWrapper):
            # megatron's StaticBufferLoader copies the next batch into the graph's input buffers on
            # its own stream without waiting for the last replay, which may still be reading them:
            # back-to-back validation replays read one batch's tokens against the next one's labels
            # (BENCHMARKS.md). Order the copy after everything queued so far.
            self.forward_backward.static_loader.stream.wait_stream(torch.cuda.current_stream())
        return self.forward_backward(
            forward_step_func=self.forward_step, data_iterator=iterator, model=self.model,
            num_microbatches=self.cfg.num_microbatches, seq_length=self.cfg.seq_length,
            micro_batch_size=self.cfg.micro_batch_size, forward_only=forward_only)

    @torch.no_grad()
    def _optimizer_step(self) -> tuple:
        """megatron's optimizer step, skipped when the gradient norm is not finite.

        Returns the gradient norm and whether the step was skipped, 0-dim tensors on the device.
        The norm megatron computes for clipping is the check (a non-finite loss gives non-finite
        gradients); every rank gets the same norm. With the fused kernels nothing here waits for
        the device (``step_without_host_sync``); megatron's own path (``--no-fused-kernels``)
        reads the norm on the host, as megatron does. With fp16, megatron's loss scaler also skips
        (and lowers its scale) when the scaled gradients overflow.
        """
        optimizer, device = self.optimizer, device_type()
        if optimizer.prepare_grads():
            return (torch.full((), math.nan, device=device),
                    torch.ones((), dtype=torch.bool, device=device))
        if not self.cfg.no_fused_kernels:
            return step_without_host_sync(optimizer, self.cfg.clip_grad)
        grad_norm = optimizer.get_grad_norm()
        skipped = not math.isfinite(grad_norm)
        if not skipped:
            if self.cfg.clip_grad > 0:
                for part in getattr(optimizer, "chained_optimizers", [optimizer]):
                    params = part.get_parameters()
                    if params:
                        # Looked up on the module at call time: CPU support wraps it there.
                        mcore_optimizer.clip_grad_by_total_norm_fp32(
                            params, self.cfg.clip_grad, grad_norm,
                            part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
            optimizer.step_with_ready_grads()
        return (torch.full((), grad_norm, device=device),
                torch.full((), skipped, dtype=torch.bool, device=device))

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
        grad_norm, skipped = self._optimizer_step()
        self.scheduler.step(increment=1)
        self.state["iteration"] += 1
        self.state["consumed_train_samples"] += self.cfg.global_batch_size
        return torch.cat([total.float(), grad_norm.reshape(1).float(), skipped.reshape(1).float()])

    @torch.no_grad()
    def evaluate(self, iterator, split: str) -> float:
        """Mean token loss over ``eval_iters`` steps of ``iterator`` (logged with perplexity and,
        with a tokenizer, bits per byte)."""
        for chunk in self.model:
            chunk.eval()
        totals = evaluate(partial(self._run_schedule, forward_only=True), iterator,
                          self.cfg.eval_iters)
        if split == "validation":
            self.state["consumed_valid_samples"] += self.cfg.eval_iters * self.cfg.global_batch_size
        for chunk in self.model:
            chunk.train()
        if parallel_state.is_pipeline_last_stage():
            self.logger.log_eval(self.state["iteration"], split, totals)
        return totals.loss

    # ----- loop ------------------------------------------------------------------------------
    def train(self) -> None:
        """Steps until ``--train-iters``, an exit condition or too many non-finite steps.

        The host reads a step's statistics one step late (``_StepReadout``), so it queues step
        ``t + 1`` while the device still runs step ``t``; steps that log, evaluate, save or exit
        are read at once, and so is the step after a save: a checkpoint saved at an interval is
        published only once the next step, run from its weights, has a finite loss and gradient
        norm (``_settle_unpublished``).
        """
        cfg = self.cfg
        self._start, self._nonfinite, self._window = time.time(), 0, _LogWindow()
        self._last_step_finite, self._unpublished = True, None
        lagging = None
        while self.state["iteration"] < cfg.train_iters:
            stats = self.train_step()
            iteration = self.state["iteration"]
            exit_flag = self._exit_flag()
            readout = _StepReadout(iteration, stats if exit_flag is None
                                   else torch.cat([stats, exit_flag]))
            stop = bool(cfg.exit_interval) and iteration % cfg.exit_interval == 0
            if lagging is not None:
                stop |= self._account(lagging)
            lagging = readout
            evaluate = bool(self.valid_iterator and cfg.eval_iters
                            and iteration % cfg.eval_interval == 0)
            save = bool(cfg.save and cfg.save_interval and iteration % cfg.save_interval == 0)
            if stop or evaluate or save or self._unpublished or self._logs_at(iteration):
                stop |= self._account(lagging)
                lagging = None
                self._settle_unpublished()
            if evaluate:
                self.evaluate(self.valid_iterator, "validation")
            if save:
                self.save(final=stop or iteration == cfg.train_iters)
            if stop:
                if self.logger.enabled:
                    print(f"Exiting at iteration {iteration} (signal, time or exit interval).",
                          flush=True)
                if cfg.save and not save:
                    self.save()
                return
        if self.valid_iterator and cfg.eval_iters and self.state["iteration"] % cfg.eval_interval:
            self.evaluate(self.valid_iterator, "validation")
        if self.test_data is not None and cfg.eval_iters:
            self.evaluate(micro_batches(self.test_data, 0, cfg,
                                        parallel_state.get_data_parallel_rank(),
                                        self.config.vocab_size), "test")
        if cfg.save and self._saved_at != self.state["iteration"]:
            self.save()

    def _logs_at(self, iteration: int) -> bool:
        return iteration % self.cfg.log_interval == 0 or iteration == self.cfg.train_iters

    def _account(self, readout: "_StepReadout") -> bool:
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
                print(f"WARNING: iteration {iteration}: non-finite loss or gradient, step "
                      f"skipped ({self._nonfinite} in a row).", flush=True)
            if self._nonfinite >= cfg.max_nonfinite_steps:
                raise SystemExit(
                    f"Stopping: {self._nonfinite} steps in a row had a non-finite loss or "
                    "gradient. Lower --lr, raise --lr-warmup-iters, use --bf16 instead of --fp16, "
                    "or resume from an earlier checkpoint.")
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
                    iteration, loss, self.scheduler.get_lr(self.optimizer.param_groups[0]),
                    None if skipped else grad_norm, step_seconds, window.skipped)
            self._window = _LogWindow()
        return len(values) > 4 and values[4] > 0

    def _exit_flag(self):
        """``[1]`` on the device, 1.0 on every rank once any rank got SIGTERM or ran past
        ``--exit-duration-in-mins`` (queued, read with the step); None when neither is asked for."""
        cfg = self.cfg
        if not (cfg.exit_signal_handler or cfg.exit_duration_in_mins is not None):
            return None
        minutes = (time.time() - self._start) / 60
        stop = sigterm.received() or (cfg.exit_duration_in_mins is not None
                                      and minutes > cfg.exit_duration_in_mins)
        flag = torch.full((1,), float(stop), device=device_type())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag

    def save(self, final: bool = True) -> None:
        """Saves a checkpoint of the state after the last step, which has been accounted for.

        Nothing is saved when that step's loss or gradient norm, or any weight, is not finite:
        resuming from it would repeat the divergence, so the last good checkpoint stays the
        latest. Weights can be finite and still broken (a huge update); the next step shows it,
        so a save that is not ``final`` stays unpublished until then.
        """
        iteration = self._saved_at = self.state["iteration"]
        if not self._all_finite(weights=True):
            self._warn_not_saved(f"not saving iteration {iteration}: its loss, gradient norm or "
                                 "weights are not finite")
            return
        self._unpublished = save_checkpoint(
            self.cfg.save, iteration, self.model, self.optimizer, self.scheduler,
            dict(self.state), self.cfg.to_dict(), publish=final)

    def _settle_unpublished(self) -> None:
        """Publishes the checkpoint saved before the step just accounted for, if that step was
        finite; else deletes it."""
        written, self._unpublished = self._unpublished, None
        if written is None:
            return
        if self._all_finite(weights=False):
            written.publish()
            return
        written.discard()
        self._warn_not_saved(f"dropped the checkpoint of iteration {written.iteration}: the step "
                             "after it had a non-finite loss or gradient norm")

    @torch.no_grad()
    def _all_finite(self, weights: bool) -> bool:
        """Whether the last step's loss and gradient norm were finite on every rank (and, with
        ``weights``, every weight is)."""
        finite = torch.tensor(self._last_step_finite, device=device_type())
        if weights:
            params = [param for chunk in self.model for param in chunk.parameters()]
            finite &= torch.stack([torch.isfinite(param).all() for param in params]).all()
        finite = finite.float().reshape(1)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def _warn_not_saved(self, what: str) -> None:
        if self.logger.enabled:
            latest = latest_iteration(self.cfg.save)
            kept = (f"the latest checkpoint in {self.cfg.save} stays iteration {latest}"
                    if latest is not None else "no checkpoint has been published yet")
            print(f"WARNING: {what}; {kept}.", flush=True)

    def close(self, keep_process_group: bool = False) -> None:
        """Closes the loggers and megatron's groups (the process group too, unless kept)."""
        self.logger.close()
        if self.cfg.cuda_graph:
            _forget_cuda_graphs()
            torch.cuda.current_stream().synchronize()
            torch.cuda.set_stream(self._default_stream)
        destroy_distributed(keep_process_group)


@dataclass
class _LogWindow:
    """What the next log line averages: the steps since the last one."""

    loss_sum: float = 0.0
    tokens: float = 0.0
    steps: int = 0
    skipped: int = 0
    start: float = field(default_factory=time.time)


class _StepReadout:
    """One step's statistics on their way to the host.

    The copy is queued right behind the step, so ``read`` waits for that step only, not for the
    steps queued after it (``.item()`` or ``.cpu()`` would wait for everything queued so far).
    """

    def __init__(self, iteration: int, stats: torch.Tensor):
        self.iteration, self.ready = iteration, None
        if stats.is_cuda:
            self.values = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
            self.values.copy_(stats, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.values = stats

    def read(self) -> list:
        if self.ready is not None:
            self.ready.synchronize()
        return self.values.tolist()


def _forget_cuda_graphs() -> None:
    """Drops the captured graphs and their static inputs.

    megatron-core keeps them in class attributes of ``FullCudaGraphWrapper``, so a later Trainer in
    the same process (``tools/bench_train.py``) would otherwise replay this one's graph.
    """
    FullCudaGraphWrapper.curr_iteration = {"training": 0, "validation": 0}
    FullCudaGraphWrapper.cuda_graph = {"training": None, "validation": None}
    FullCudaGraphWrapper.result = {"training": None, "validation": None}
    StaticBufferLoader.static_buffers = {"training": [], "validation": []}
