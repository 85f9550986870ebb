"""CPU time of S-CFG's segmentation alone, on the attention recorded from one real U-Net call.

    python benchmarks/segment_bench.py --model builtin
    python benchmarks/segment_bench.py --model sd15 --size 512 --compare old_segmentation.py

``--compare`` loads another version of ``attnguide/segmentation.py`` (e.g. from ``git show
REV:attnguide/segmentation.py``) and times both on the same records, interleaved, reporting the
largest score difference and whether the masks agree. Times are thread CPU time (robust to other
load on the machine), median and minimum over rounds.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from attnguide import attention, segmentation  # noqa: E402
from attnguide.evaluation import bench  # noqa: E402


def _load_module(path: str):
    spec = importlib.util.spec_from_file_location("attnguide._segmentation_compared", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _records(pipe, size: int):
    unet = pipe.unet
    pairs = attention.scfg_layers(unet, attention.default_scfg_levels(unet))
    factors = {layer.name: layer.factor for layer in attention.list_layers(unet)}
    ids = pipe.tokenizer(["a red circle to the left of a blue square"] * 2, padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    latent = size // pipe.vae_scale_factor
    with torch.no_grad(), attention.attention_taps(unet, record=pairs) as taps:
        context = pipe.text_encoder(ids)[0]
        taps.branches = taps.record_branches = ("uncond", "cond")
        unet(torch.randn(2, unet.config.in_channels, latent, latent), 500, encoder_hidden_states=context)
        records = dict(taps.records)
    return records, [(s, c, factors[c]) for s, c in pairs], (latent, latent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "builtin", "sd15", "sdxl"], default="builtin")
    parser.add_argument("--size", type=int, default=None, help="image size in pixels [default: the model's]")
    parser.add_argument("--compare", default=None, help="path of another segmentation.py to time beside this one")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pipe = bench.build_pipeline(args.model)
    size = args.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    records, pairs, latent_hw = _records(pipe, size)
    modules = {"current": segmentation}
    if args.compare:
        modules = {"compared": _load_module(args.compare), **modules}

    def run(module):
        return module.segment(records, pairs, latent_hw, "reference", 4, True, slice(1, 2), slice(0, 1))

    print(f"{args.model} at {size} px: {len(pairs)} layer pairs, latent {latent_hw}")
    if args.compare:
        a, b = run(modules["compared"]), run(segmentation)
        print(f"max score difference {(a.scores - b.scores).abs().max().item():.2e}; "
              f"masks equal: {torch.equal(a.token_masks, b.token_masks) and torch.equal(a.foreground, b.foreground)}")
    first = time.thread_time()
    run(segmentation)
    calls = max(1, min(20, int(0.2 / max(time.thread_time() - first, 1e-4))))
    times = {name: [] for name in modules}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, module in modules.items():
                start = time.thread_time()
                for _ in range(calls):
                    run(module)
                times[name].append((time.thread_time() - start) / calls * 1000)
    for name, values in times.items():
        print(f"{name:>9}: median {statistics.median(values):8.3f} ms   min {min(values):8.3f} ms")


if __name__ == "__main__":
    main()
