"""Roofline lower bound of one layer's training step, kernel by kernel, dense against the variants.

    python benchmarks/bytes_moved.py --shape 130m --card h100 --micro-batch-size 64

For each variant of ``--shape`` (its config's shapes and ranks) prints every kernel's FLOPs, HBM
bytes, FLOP/byte and bound (``models/bytes_moved.py``), then the layer's summed bound and its
ratio to dense's beside the FLOP-only ratio: how much faster LPA's layer can be on this card at
best. A measured kernel time divided into its bound is that kernel's "share of its bound".
"""

import argparse

from megatron_lpa.config.command_line import parse_args
from megatron_lpa.config.model_config import lpa_config
from megatron_lpa.config.presets import SHAPES, model_flags, variants
from megatron_lpa.models.bytes_moved import CARDS, layer_bound_s, layer_kernels
from megatron_lpa.platform import megatron_patches


def config_of(shape: str, variant: str):
    cfg = parse_args(
        model_flags(shape, variant)
        + ["--mock-data", "--vocab-size", "32000", "--lr", "1e-4", "--train-iters", "1"]
    )
    return lpa_config(cfg, 32000), cfg.model.seq_length


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="130m")
    parser.add_argument("--card", choices=sorted(CARDS), default="h100")
    parser.add_argument("--micro-batch-size", type=int, default=64)
    parser.add_argument("--kernels", action="store_true", help="print every kernel's row")
    args = parser.parse_args()
    megatron_patches.apply()  # the configs' fused RoPE needs megatron's hook filled
    peak, bandwidth = CARDS[args.card]
    totals = {}
    for variant in variants(args.shape):
        config, seq = config_of(args.shape, variant)
        kernels = layer_kernels(config, args.micro_batch_size, seq)
        if args.kernels:
            print(
                f"\n{variant}: {'kernel':<22} {'GFLOP':>8} {'MB':>8} {'FLOP/B':>7} {'bound us':>9}"
            )
            for k in kernels:
                print(
                    f"{'':<{len(variant) + 2}}{k.name:<22} {k.flops / 1e9:8.2f} "
                    f"{k.bytes / 1e6:8.2f}"
                    f" {k.flops / k.bytes:7.0f} {k.bound_s(peak, bandwidth) * 1e6:9.1f}"
                )
        flops = sum(k.flops for k in kernels)
        totals[variant] = (layer_bound_s(config, args.micro_batch_size, seq, args.card), flops)
    dense_bound, dense_flops = totals["dense"]
    print(
        f"\n{args.shape}, micro-batch {args.micro_batch_size}, {args.card} "
        f"({peak / 1e12:.0f} TFLOP/s, {bandwidth / 1e12:.2f} TB/s), one layer fwd+bwd"
    )
    print(f"{'variant':<12} {'bound ms':>9} {'vs dense':>9} {'FLOP ratio':>11}")
    for variant, (bound, flops) in totals.items():
        print(
            f"{variant:<12} {bound * 1e3:9.3f} {bound / dense_bound:9.3f} "
            f"{flops / dense_flops:11.3f}"
        )


if __name__ == "__main__":
    main()
