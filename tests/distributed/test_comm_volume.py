"""LPA's TP traffic per attention block scales with r, not d; dense's scales with d."""

import json

from tests.launch import torchrun


def test_lpa_attention_tp_traffic_scales_with_rank_not_width():
    output = torchrun("distributed/comm_volume_worker.py", 2)
    rows = [
        json.loads(line.split("VOLUME ", 1)[1]) for line in output.splitlines() if "VOLUME " in line
    ]
    volume = {(row["d"], row["r"], row["sp"]): row["elements"] / row["tokens"] for row in rows}
    assert len(volume) == 12
    for sp in (False, True):
        # LPA: column backward 3r (+ forward 3r all-gather with SP), row forward r
        # (+ backward r all-gather with SP); nothing d-wide.
        per_rank_unit = 8 if sp else 4
        for d in (64, 128):
            for r in (4, 8):
                assert volume[(d, r, sp)] == per_rank_unit * r
        # Dense: d-wide collectives, so doubling d doubles the traffic; LPA at r << d is far below.
        assert volume[(128, 0, sp)] == 2 * volume[(64, 0, sp)]
        assert volume[(128, 0, sp)] >= 2 * 128
        assert volume[(128, 8, sp)] < volume[(128, 0, sp)] / 4
