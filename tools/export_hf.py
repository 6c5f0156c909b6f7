"""Export a checkpoint as a Hugging Face model directory (safetensors, config, tokenizer).

    python tools/export_hf.py --load runs/lpa --save hf/lpa --format factored
    python tools/export_hf.py --load runs/dense --save hf/dense --format merged

``--format merged`` folds every LPA pair into one dense weight (``W = B A``, exact in fp32) and
writes a ``LlamaForCausalLM``; it refuses, saying why, a model that Llama cannot express
(LayerNorm, GELU/ReLU, learned positions, the output-norm block, an output-layer bias).
``--format factored`` keeps each pair's two factors (LPA's savings at inference) in the model of
``megatron_lpa/hf/modeling_lpa.py``, copied into the directory: every variant and block form;
load it with ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``.

The checkpoint may have been saved at any TP/PP size: it is loaded at TP=1, PP=1 in this one
process (CPU, or the GPU if there is one); nothing is written unless the export completes.
Needs ``pip install -e ".[transformers]"``.
"""

import argparse

from megatron_lpa.hf.export import FORMS, ExportError, export
from megatron_lpa.platform.distributed import destroy_distributed
from megatron_lpa.training.saved_model import load_saved_model


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="the run's --save directory")
    parser.add_argument("--save", required=True, help="the Hugging Face directory to write (new)")
    parser.add_argument(
        "--format",
        choices=FORMS,
        required=True,
        help="merged: LlamaForCausalLM with W = B A; factored: the LPA model "
        "with B and A kept apart (trust_remote_code)",
    )
    parser.add_argument("--tokenizer-model", help="the tokenizer file, if it moved since training")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    saved = load_saved_model(args.load, tokenizer_model=args.tokenizer_model)
    try:
        tokenizer = export(saved, args.save, args.format)
    except ExportError as error:
        raise SystemExit(f"tools/export_hf.py: {error}") from None
    finally:
        destroy_distributed()
    print(
        f"{args.load} (iteration {saved.iteration}) -> {args.save} ({args.format}); "
        f"tokenizer: {tokenizer}"
    )


if __name__ == "__main__":
    main()
