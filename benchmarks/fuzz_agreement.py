"""Fuzz the measurement engine against the estimator: >= 200 examples per model family, worst disagreement.

For each family (the same strategies as tests/test_fuzz.py) and backend, ``fuzz()`` runs N hypothesis
examples at rtol 2% and prints examples run and the worst relative disagreement of the peak and of any
compared row (params, grads, optimizer, batch, activations, peak). A disagreement over 2% stops that
family with its example (shrunk unless --no-shrink) and its estimated-vs-measured table.

    python benchmarks/fuzz_agreement.py [--examples 200] [--backends cpu,emulated] [--families mlp,cnn]
                                        [--optimizers sgd,sgd_momentum,adam,adamw] [--no-shrink] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hypothesis import Phase, settings  # noqa: E402

from pytest_gpumem import strategies as gst  # noqa: E402
from pytest_gpumem._tools.coding_styles import coding_style_configs, style_loss  # noqa: E402
from pytest_gpumem._tools.fuzz import FuzzFailure, fuzz  # noqa: E402

#: Layers start at 8 units: below that a few-byte estimator gap exceeds 2% of the whole step (see tests).
FAMILIES = {
    "mlp": gst.mlp_configs(min_width=8, max_width=256, min_in_features=8, max_in_features=128),
    "cnn": gst.cnn_configs(max_depth=3, min_channels=8, max_channels=16, min_image_size=8, max_image_size=16),
    "transformer": gst.transformer_configs(max_depth=1, min_head_dim=8, max_head_dim=16, max_ffn_width=32,
                                           max_seq_len=8, max_vocab_size=32),
    # coding styles: modules or functions, tuple/list/dict/namedtuple/dataclass batches, widths 1-8 or
    # 256-1024, a model returning its own loss; judged at 2% or the check's 256 KiB floor
    "styles": coding_style_configs(),
}
#: loss per family (None: the step's default)
LOSSES = {"styles": style_loss}


def run(family: str, backend: str, examples: int, kinds: list[str], shrink: bool) -> dict:
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else [])
    chosen = settings(max_examples=examples, deadline=None, database=None, phases=phases)
    start = time.perf_counter()
    row = {"family": family, "backend": backend, "examples_asked": examples}
    try:
        result = fuzz(FAMILIES[family], batch_sizes=gst.batch_sizes(max_value=16),
                      optimizer=gst.optimizers(kinds=kinds), backend=backend, rtol=0.02, settings=chosen,
                      loss_fn=LOSSES.get(family), atol=256 * 1024 if family == "styles" else 0)
        row.update(ok=True, examples=result.examples, worst_peak=result.worst_peak,
                   worst_row=result.worst_row, worst_row_name=result.worst_row_name,
                   worst_case=repr(result.worst_row_case))
    except FuzzFailure as failure:
        row.update(ok=False, case=repr(failure.case), message=str(failure).split("\nExplanation")[0])
    row["seconds"] = time.perf_counter() - start
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--backends", default="cpu,emulated")
    parser.add_argument("--families", default="mlp,cnn,transformer")
    parser.add_argument("--optimizers", default="sgd,sgd_momentum,adam,adamw")
    parser.add_argument("--no-shrink", action="store_true", help="report the first disagreement as found")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    rows = []
    for backend in args.backends.split(","):
        for family in args.families.split(","):
            row = run(family, backend, args.examples, args.optimizers.split(","), not args.no_shrink)
            rows.append(row)
            if row["ok"]:
                print(f"{backend:<9}{family:<12} {row['examples']:>4} examples  worst peak "
                      f"{row['worst_peak']:.3%}  worst row {row['worst_row_name']} {row['worst_row']:.3%}  "
                      f"({row['seconds']:.0f} s)  at {row['worst_case']}", flush=True)
            else:
                print(f"{backend:<9}{family:<12} DISAGREES over 2% ({row['seconds']:.0f} s):\n{row['message']}\n",
                      flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
