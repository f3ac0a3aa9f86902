"""python -m data_pipelines.synthetic --task {math,arith,ocr,vqa,extract,mix} --n N --seed S --out DIR"""
from __future__ import annotations

import argparse
import sys

from home_rl.errors import HomeRLError

from data_pipelines.synthetic import DEFAULT_RATIO, TASKS, generate, parse_levels, parse_ratio


def _ratio(text: str) -> dict:
    try:
        return parse_ratio(text)
    except HomeRLError as e:  # argparse prints this one after "argument --ratio:"
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.synthetic", description=__doc__)
    parser.add_argument("--task", required=True, choices=TASKS, help="family to generate, or mix")
    parser.add_argument("--n", type=int, required=True, help="number of rows")
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files")
    parser.add_argument("--out", required=True, help="output folder (data.jsonl and images/)")
    parser.add_argument("--levels", type=parse_levels, default=None,
                        help="difficulty levels to draw from, e.g. 1-3 (math: steps 1-6; ocr, extract: 1-3; vqa: 1-2; arith: 1)")
    parser.add_argument("--ratio", type=_ratio, default=None,
                        help="mix weights, e.g. math=0.5,extract=0.5 (default: " +
                             ",".join(f"{k}={v}" for k, v in DEFAULT_RATIO.items()) + ")")
    parser.add_argument("--image-fraction", type=float, default=0.0,
                        help="share of math problems rendered into an image instead of text")
    parser.add_argument("--vqa-split", choices=("train", "test"), default="train", help="easy-vqa split to draw from")
    args = parser.parse_args(argv)
    try:
        path = generate(args.task, args.n, args.seed, args.out, args.levels, args.ratio, args.image_fraction,
                        args.vqa_split)
    except HomeRLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} {args.task} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
