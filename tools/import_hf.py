"""Import a dense Hugging Face LlamaForCausalLM as a checkpoint to train on, optionally as LPA.

    python tools/import_hf.py --load hf/llama --save runs/llama --seq-length 1024
    python tools/import_hf.py --load hf/llama --save runs/llama_lpa --lpa-attn-rank 128 \
        --tensor-model-parallel-size 2

With ``--lpa-attn-rank`` (``--lpa-ffn-rank``) each attention (FFN) projection ``W`` becomes the
pair ``B A`` of its truncated SVD, the best rank-r approximation (``sqrt`` of the singular values
in each factor). The checkpoint (iteration 0, model only) loads at the chosen TP/PP size, or any
other, and the tool prints the ``pretrain_gpt.py`` flags that match it. Reads
``model.safetensors`` (or its shards) and ``config.json``; the directory's ``tokenizer.json`` or
``tokenizer.model`` becomes the run's tokenizer. Needs ``pip install -e ".[transformers]"``.
"""

import argparse
import shlex

from megatron_lpa.hf.import_llama import LlamaImportError, import_llama


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="the Hugging Face model directory")
    parser.add_argument("--save", required=True, help="the checkpoint directory to write")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument(
        "--lpa-attn-rank",
        type=int,
        default=0,
        help="factor every attention projection at this rank (0: keep dense)",
    )
    parser.add_argument(
        "--lpa-ffn-rank",
        type=int,
        default=0,
        help="factor every FFN projection at this rank (0: keep dense)",
    )
    parser.add_argument(
        "--seq-length",
        type=int,
        help="tokens per training sample (default: max_position_embeddings)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> list:
    args = parse(argv)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    try:
        flags = import_llama(
            args.load,
            args.save,
            tp,
            pp,
            args.lpa_attn_rank,
            args.lpa_ffn_rank,
            args.seq_length or 0,
        )
    except LlamaImportError as error:
        raise SystemExit(f"tools/import_hf.py: {args.load}: {error}") from None
    command = [
        "torchrun",
        "--nproc-per-node",
        str(tp * pp),
        "pretrain_gpt.py",
        *flags,
        "--tensor-model-parallel-size",
        str(tp),
        "--pipeline-model-parallel-size",
        str(pp),
        "--load",
        args.save,
        "--no-load-optim",
    ]
    print(
        f"{args.load} -> {args.save}. Train on from it with these flags, plus your data, "
        f"schedule and --save:\n{shlex.join(command)}"
    )
    return flags


if __name__ == "__main__":
    main()
