"""Pretrain a dense or LPA GPT on megatron-core.

    torchrun --nproc-per-node 8 pretrain_gpt.py --config examples/configs/llama_130m_lpa.yaml \
        --tensor-model-parallel-size 2 --lpa-attn-rank 128 ...

Every flag is listed by ``python pretrain_gpt.py --help``; a YAML ``--config`` sets the same
options.
"""

import os

from megatron_lpa.platform import sigterm
from megatron_lpa.platform.parent_watch import exit_with_parent

if __name__ == "__main__":
    # Both before the imports below, which take seconds to minutes: a SIGTERM meanwhile is kept
    # for the Trainer, and a rank whose torchrun is killed (SIGKILL reaches only torchrun's own
    # process group, not the sessions it starts its ranks in) does not go on training alone.
    sigterm.remember()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        exit_with_parent(os.getppid(), f"rank {os.environ.get('RANK', '?')}")

from megatron_lpa.config.command_line import parse_args  # noqa: E402
from megatron_lpa.platform.config_errors import reported_once  # noqa: E402
from megatron_lpa.training.trainer import Trainer  # noqa: E402


def main(argv=None) -> None:
    with reported_once(silence_other_ranks=True):
        cfg = parse_args(argv)
    with reported_once():
        trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
