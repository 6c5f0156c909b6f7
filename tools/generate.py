"""Sample text from a checkpoint, with a key/value cache (CPU, or the GPU if there is one).

    python tools/generate.py --load runs/lpa --prompt "The history of" --max-new-tokens 64
    python tools/generate.py --load runs/lpa --prompt-file prompts.txt --top-p 0.9 --seed 1
    python tools/generate.py --load runs/lpa --prompt "def main" --greedy

The checkpoint (saved at any TP/PP size) is loaded at TP=1, PP=1 in this one process and run as
the factored Hugging Face model of ``megatron_lpa/hf/modeling_lpa.py`` (B and A kept apart), the
same function as the trained model: each prompt is encoded with the run's tokenizer, run once, and
then extended one token per step from the cached keys and values, until ``--max-new-tokens``, the
end-of-document token or the model's last position. Needs ``pip install -e ".[transformers]"``.
"""

import argparse
import json
from pathlib import Path

import torch

from megatron_lpa.hf.export import factored_model
from megatron_lpa.hf.generation import Sampling, generate
from megatron_lpa.platform.distributed import destroy_distributed, device_type
from megatron_lpa.training.saved_model import load_saved_model


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="the run's --save directory")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt")
    prompts.add_argument("--prompt-file", help="a text file, one prompt per line")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true", help="always the most likely token")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)"
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="sample among the most likely tokens up to this probability mass",
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--tokenizer-model", help="the tokenizer file, if it moved since training")
    parser.add_argument("--output", help="also write {prompt, completion, ids} JSON lines here")
    args = parser.parse_args(argv)
    if args.temperature <= 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        parser.error(
            "--temperature must be > 0, --top-p in (0, 1], --top-k >= 0 "
            "(use --greedy for the most likely token)"
        )
    return args


def main(argv=None) -> list:
    args = parse(argv)
    prompts = (
        [args.prompt]
        if args.prompt is not None
        else Path(args.prompt_file).read_text().splitlines()
    )
    saved = load_saved_model(args.load, tokenizer_model=args.tokenizer_model)
    try:
        if saved.tokenizer is None:
            raise SystemExit(
                f"{args.load} was trained without a tokenizer (--mock-data); it has "
                "no text to continue."
            )
        model, tokenizer = factored_model(saved), saved.tokenizer
    finally:
        destroy_distributed()
    sampling = Sampling(args.greedy, args.temperature, args.top_k, args.top_p)
    generator = torch.Generator(device_type()).manual_seed(args.seed)
    results = []
    longest = saved.config.max_sequence_length
    for prompt in prompts:
        # An empty prompt starts a new document.
        prompt_ids = tokenizer.tokenize(prompt) or [tokenizer.eod]
        if len(prompt_ids) >= longest:
            raise SystemExit(
                f"a prompt of {len(prompt_ids)} tokens leaves no room: the model "
                f"takes {longest} positions; shorten it."
            )
        ids = generate(
            model,
            prompt_ids,
            args.max_new_tokens,
            sampling,
            stop_id=tokenizer.eod,
            max_length=longest,
            generator=generator,
        )
        results.append({"prompt": prompt, "completion": tokenizer.detokenize(ids), "ids": ids})
        print(f">>> {prompt}\n{results[-1]['completion']}", flush=True)
    if args.output:
        Path(args.output).write_text("".join(json.dumps(r) + "\n" for r in results))
    return results


if __name__ == "__main__":
    main()
