"""Where the router features' time goes: dtype, threads and batch size, side by side on the same prompts.

    python benchmarks/router_features.py [--checkpoint HOME_DIR] [--prompts 512] [--threads 1 2] [--batch 8 32]
                                         [--dtypes stored float32]

Loads a HOME checkpoint (default: the embedded default's cached cold start) in this process as the router
stage's HomeModelActor holds it, renders `--prompts` prompts of the router stage's default mix with the
router's template, and times `compute_features` for every (dtype, threads, batch size): the checkpoint's
stored dtype (bfloat16 for the embedded default) against float32, which the router stage's actor computes in
where the CPU only emulates bfloat16 (run with HOME_RL_CPU_BF16=0 to see what that CPU picks). Each run's
largest difference from the first run's features is reported. Prints one JSON object; run it with nothing else on the machine.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="", help="HOME checkpoint (default: the cached cold start)")
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--dtypes", nargs="+", default=["stored", "float32"])
    args = ap.parse_args()

    import torch

    from home_rl.model import HomeModel
    from home_rl.router.config import RouterActorConfig, RouterStageConfig, SyntheticMixConfig
    from home_rl.router.features import compute_features, router_inputs
    from home_rl.trainer.cold_start import cold_start_dir
    from home_rl.trainer.router_data import load_rows
    from home_rl.trainer.startup import load_processor

    checkpoint = Path(args.checkpoint) if args.checkpoint else cold_start_dir()
    stage = RouterStageConfig(checkpoint=str(checkpoint))
    processor = load_processor(checkpoint)
    rows = load_rows(stage.data, SyntheticMixConfig(rows=args.prompts), Path(tempfile.mkdtemp()) / "data", processor)
    items = router_inputs(rows, RouterActorConfig().template, processor, stage.data)
    home = HomeModel.from_pretrained(checkpoint).eval().requires_grad_(False)
    stored = home.base.dtype
    runs, reference = [], None
    for dtype in args.dtypes:
        home.to(stored if dtype == "stored" else getattr(torch, dtype))
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batch:
                start = time.perf_counter()
                features = compute_features(home, items, batch)
                seconds = time.perf_counter() - start
                reference = features if reference is None else reference
                runs.append({"dtype": str(home.base.dtype).replace("torch.", ""), "threads": threads, "batch": batch,
                             "seconds": round(seconds, 2), "s_per_prompt": round(seconds / len(items), 4),
                             "max_abs_diff": float((features - reference).abs().max())})
    print(json.dumps({"benchmark": "router_features", "checkpoint": str(checkpoint), "prompts": len(items),
                      "router_layer": home.home_config["router_layer"], "stored_dtype": str(stored),
                      "mean_prompt_tokens": sum(len(i["input_ids"]) for i in items) / len(items), "runs": runs}))


if __name__ == "__main__":
    main()
