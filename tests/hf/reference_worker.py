"""One process: a checkpoint at TP=1, PP=1, our own logits and greedy continuation, and its
Hugging Face exports.

Saves ``{"tokens", "logits" [b, s, vocab], "prompt", "greedy" (ids by step-by-step argmax of the
full forward, no cache), "refused" {form: message}}`` to ``--out`` and writes each form that the
model allows to ``--export-dir/<form>``.
"""

import argparse

import torch

from megatron_lpa.hf.export import ExportError, export
from megatron_lpa.platform.distributed import destroy_distributed
from megatron_lpa.training.saved_model import load_saved_model

GREEDY_TOKENS = 12


def our_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)  # [b, s, vocab] (padded rows included)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--export-dir", required=True)
    parser.add_argument("--prompt", required=True)
    args = parser.parse_args()
    saved = load_saved_model(args.load)
    vocab = saved.tokenizer.vocab_size
    tokens = torch.randint(
        0, vocab, (2, saved.cfg.model.seq_length), generator=torch.Generator().manual_seed(5)
    )
    result = {
        "tokens": tokens,
        "logits": our_logits(saved.model, tokens)[..., :vocab],
        "prompt": saved.tokenizer.tokenize(args.prompt),
        "refused": {},
    }
    sequence = list(result["prompt"])
    for _ in range(GREEDY_TOKENS):
        sequence.append(
            int(our_logits(saved.model, torch.tensor([sequence]))[0, -1, :vocab].argmax())
        )
    result["greedy"] = sequence[len(result["prompt"]) :]
    for form in ("merged", "factored"):
        try:
            export(saved, f"{args.export_dir}/{form}", form)
        except ExportError as error:
            result["refused"][form] = str(error)
    torch.save(result, args.out)
    destroy_distributed()


if __name__ == "__main__":
    main()
