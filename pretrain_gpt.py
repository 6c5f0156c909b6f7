"""Pretrain a dense or LPA GPT on megatron-core.

    torchrun --nproc-per-node 8 pretrain_gpt.py --config examples/configs/llama_130m_lpa.yaml \
        --tensor-model-parallel-size 2 --lpa-attn-rank 128 ...

Every flag is listed by ``python pretrain_gpt.py --help``; a YAML ``--config`` sets the same options.
"""

from megatron_lpa.platform.config_errors import reported_once
from megatron_lpa.training.arguments import parse_args
from megatron_lpa.training.trainer import Trainer


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
