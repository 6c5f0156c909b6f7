# The mechanics of a requeueable training job; sourced by train_1node.sbatch and
# train_multinode.sbatch after their settings, not submitted by itself. Nothing here is edited per
# run: the settings are the variables at the top of those scripts.
#
# One Slurm task per node runs torchrun; the torchruns meet in a c10d rendezvous hosted on the
# allocation's first node and start GPUS_PER_NODE trainer processes each. Slurm's warning before the
# time limit (`#SBATCH --signal=B:USR1@SECONDS`, delivered to this shell) is turned into SIGTERM for
# every trainer process (`--exit-signal-handler`: finish the step, save, exit); once the trainers
# have exited this job requeues itself, and the next start resumes from the latest checkpoint.

# Not `set -e`: the training step's exit status is inspected below, not fatal by itself.
set -uo pipefail

fail() {
    echo "ERROR: $*" >&2
    exit 1
}

[[ -n "${SLURM_JOB_ID:-}" ]] || fail "submit this with sbatch; it needs the Slurm job environment."
cd "$MEGATRON_LPA" 2>/dev/null && [[ -f pretrain_gpt.py ]] ||
    fail "MEGATRON_LPA=$MEGATRON_LPA is not the megatron_lpa checkout; set it at the top of the" \
        "sbatch script to the directory holding pretrain_gpt.py."
[[ -f "$CONFIG" ]] || fail "CONFIG=$CONFIG does not exist (relative paths start at" \
    "$MEGATRON_LPA); pick one of examples/configs/*.yaml."

# Per run (RUN_NAME): checkpoints, TensorBoard events, and one log per job and start, so that a
# requeued or resubmitted job of the same run resumes from the same checkpoints.
RUN_DIR="$RUNS_DIR/$RUN_NAME"
CHECKPOINTS="$RUN_DIR/checkpoints"
RESTART="${SLURM_RESTART_COUNT:-0}"
LOG="$RUN_DIR/logs/job-${SLURM_JOB_ID}-start-${RESTART}.log"
mkdir -p "$CHECKPOINTS" "$RUN_DIR/logs" "$RUN_DIR/tensorboard" ||
    fail "cannot create $RUN_DIR; point RUNS_DIR at a writable shared filesystem."
POINTER="$CHECKPOINTS/latest_checkpointed_iteration.txt"  # written by megatron_lpa's checkpointing

# megatron-core needs one CUDA stream queue per device so that its TP/SP communication kernels are
# scheduled in the order they were issued (overlap of communication with compute relies on it).
export CUDA_DEVICE_MAX_CONNECTIONS=1
# A failed or timed-out NCCL collective ends the job with an error instead of hanging until the time
# limit; records of freed tensors are not kept across streams (lower peak memory).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_NCCL_AVOID_RECORD_STREAMS=1
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export PYTHONUNBUFFERED=1

NODES="${SLURM_JOB_NUM_NODES:-1}"
if [[ "$LAYOUT_ARGS" == auto ]]; then
    # The config states its suggested layouts as "# layout  64 GPUs: --flags ..." comment lines.
    gpus=$((NODES * GPUS_PER_NODE))
    LAYOUT_ARGS="$(sed -n "s/^# layout *$gpus GPUs: *//p" "$CONFIG" | head -n 1)"
fi
HEAD_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
# Rendezvous port: one per job, so that jobs sharing a node do not collide (not MASTER_PORT, which
# the submitting shell may hold for something else: sbatch passes its environment on). The
# rendezvous id is new at every start: a requeued start must not join the previous one's.
RDZV_PORT="${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
RDZV_ID="$SLURM_JOB_ID-$RESTART"

# Every node's torchrun records its pid under TORCHRUN_PIDS (in the run directory, which all nodes
# share), where the warning handler's step on that node finds it. The commands are single-quoted:
# they are expanded on each node, with that node's SLURM_NODEID.
export TORCHRUN_PIDS="$RUN_DIR/logs/.torchrun-job$SLURM_JOB_ID"
mkdir -p "$TORCHRUN_PIDS"
record_pid_then_exec='echo $$ >"$TORCHRUN_PIDS/node$SLURM_NODEID" && exec "$@"'
signal_trainers='pkill -TERM -P "$(cat "$TORCHRUN_PIDS/node$SLURM_NODEID")"'

warned=0
on_time_limit_warning() {
    ((warned)) && return  # once: a second SIGTERM could interrupt the save the first one started
    warned=1
    echo "$(date '+%F %T') Slurm's time-limit warning: sending SIGTERM to the trainers on every" \
        "node (they finish the step, save and exit)."
    # SIGTERM to the trainer processes alone (torchrun's children), through a small step on every
    # node; torchrun then sees them finish and exits normally. Neither torchrun (it forwards
    # SIGTERM with killpg, to each trainer's whole process group) nor `scancel --signal=TERM`
    # (every process of the step) may be used: both also kill the helper process that megatron-
    # core's checkpoint writer starts at the first save and needs for every later one, so the save
    # the signal asks for fails. Nor `kill` on srun: srun turns SIGTERM into SIGKILL.
    if ! srun --overlap --nodes="$NODES" --ntasks-per-node=1 --cpus-per-task=1 \
        bash -c "$signal_trainers"; then
        echo "ERROR: could not signal the trainers through srun --overlap (needs Slurm 20.11" \
            "or later); signalling the whole step instead, which can make their save fail." >&2
        scancel --signal=TERM "$SLURM_JOB_ID"
    fi
}
trap on_time_limit_warning USR1

if [[ -f "$POINTER" ]]; then
    echo "$(date '+%F %T') Job $SLURM_JOB_ID start $RESTART: resuming from iteration" \
        "$(cat "$POINTER") of $CHECKPOINTS."
else
    echo "$(date '+%F %T') Job $SLURM_JOB_ID start $RESTART: no checkpoint in $CHECKPOINTS yet," \
        "training from scratch."
fi
echo "Run $RUN_NAME: $NODES node(s) x $GPUS_PER_NODE processes, layout [${LAYOUT_ARGS}]," \
    "rendezvous $HEAD_NODE:$RDZV_PORT, log $LOG"

# One task per node: record the pid, then become torchrun (exec keeps the pid).
# shellcheck disable=SC2086  # DATA_ARGS, LAYOUT_ARGS and EXTRA_ARGS are lists of flags
srun --nodes="$NODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
    --cpu-bind=none --kill-on-bad-exit=1 \
    bash -c "$record_pid_then_exec" torchrun \
    "$PYTHON" -m torch.distributed.run \
    --nnodes="$NODES" --nproc-per-node="$GPUS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:$RDZV_PORT" --rdzv-id="$RDZV_ID" \
    pretrain_gpt.py --config "$CONFIG" $DATA_ARGS $LAYOUT_ARGS \
    --save "$CHECKPOINTS" --load "$CHECKPOINTS" --tensorboard-dir "$RUN_DIR/tensorboard" \
    --exit-signal-handler $EXTRA_ARGS \
    >>"$LOG" 2>&1 &
training=$!

# `wait` also returns when the warning's trap runs; keep waiting until the training step has ended.
while :; do
    wait "$training"
    status=$?
    if ((status > 128)) && kill -0 "$training" 2>/dev/null; then
        continue
    fi
    break
done

rm -rf "$TORCHRUN_PIDS"
if ((warned && status == 0)) && ! grep -q "^Exiting at iteration" "$LOG"; then
    warned=0  # the trainers had finished the whole run before the warning reached them
fi
saved="none"
[[ -f "$POINTER" ]] && saved="$(cat "$POINTER")"
if ((warned)); then
    if ((RESTART < MAX_RESTARTS)); then
        echo "$(date '+%F %T') Trainers exited after the warning; latest checkpoint: iteration" \
            "$saved. Requeueing job $SLURM_JOB_ID (start $((RESTART + 1)), at most" \
            "$MAX_RESTARTS restarts)."
        # Ends this shell too; Slurm holds the job for about two minutes, then starts it again.
        scontrol requeue "$SLURM_JOB_ID"
        sleep 60
        fail "scontrol requeue $SLURM_JOB_ID did not end this job; is the job requeueable" \
            "(#SBATCH --requeue, JobRequeue)?"
    fi
    echo "$(date '+%F %T') Trainers exited after the warning; latest checkpoint: iteration" \
        "$saved. Not requeueing: this job has restarted MAX_RESTARTS=$MAX_RESTARTS times. Submit" \
        "it again with RUN_NAME=$RUN_NAME to continue from that checkpoint."
    exit 0
fi
if ((status != 0)); then
    echo "ERROR: training exited with status $status. The trainers' errors, then the end of" \
        "$LOG:" >&2
    # The trainers' own messages (a configuration error says what to change), before torchrun's
    # traceback of its failed child that ends the log.
    grep -E "(Configuration error|Error|error):" "$LOG" | grep -v -E "ChildFailedError|^srun: " |
        head -n 10 >&2
    tail -n 15 "$LOG" >&2
    exit "$status"
fi
echo "$(date '+%F %T') Training finished; latest checkpoint: iteration $saved."
