"""Decode throughput of opd_lightning.rollout.generate, eager and compiled, against HF ``model.generate``.

    nice -n 15 python tools/bench_rollout.py --sizes 1m 10m --rows 8 32 --new-tokens 32 --repeats 5 --ops

Models are the random tiny Qwen3s of ``opd-tiny --size 1m / 10m`` (opd_lightning.models.TINY_SIZES, vocabulary
1,024), built from a config: no download. Every engine samples at temperature 1 with no top-k / top-p and never
stops at EOS, so each run makes exactly rows x new_tokens tokens. The figure is tokens per CPU-second of this
process (``time.process_time``) at one torch thread: on a shared machine wall clock moves with other people's
load, CPU time far less (~5% between runs). Engines take turns within each repeat, after one warm-up run each
(for ``ours compile`` the warm-up is the compile, reported separately). ``--ops`` adds the number of profiler
ops per decode step (all rows), a figure no load can move.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import Qwen3Config, Qwen3ForCausalLM

from opd_lightning.models import TINY_SIZES
from opd_lightning.rollout import SamplingConfig, generate

PAD = 0
VOCAB = 1024


def build(size: str) -> Qwen3ForCausalLM:
    cfg = Qwen3Config(
        **TINY_SIZES[size],
        vocab_size=VOCAB,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=PAD,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    return Qwen3ForCausalLM(cfg).eval()


def prompts(rows: int, max_len: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(max_len // 2, max_len + 1, (rows,), generator=g)
    ids = torch.randint(1, VOCAB, (rows, max_len), generator=g)
    mask = torch.arange(max_len)[None, :] >= (max_len - lengths)[:, None]  # left padding
    return ids.masked_fill(~mask, PAD), mask.long()


def run_ours(model, ids, mask, new_tokens: int, seed: int, compile: bool = False) -> int:
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, compile=compile)
    # An empty EOS list never stops a row, so every run makes exactly new_tokens per row.
    rollout = generate(
        model,
        ids,
        mask,
        cfg,
        eos_token_id=[],
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(seed),
    )
    return rollout.num_completion_tokens


def run_compiled(model, ids, mask, new_tokens: int, seed: int) -> int:
    return run_ours(model, ids, mask, new_tokens, seed, compile=True)


def run_hf(model, ids, mask, new_tokens: int, seed: int) -> int:
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new_tokens,
        min_new_tokens=0,
        pad_token_id=PAD,
        eos_token_id=None,
    )
    return out[:, ids.shape[1] :].numel()


ENGINES = {"ours": run_ours, "ours compile": run_compiled, "model.generate": run_hf}


def ops_per_step(engine, model, ids, mask, new_tokens: int) -> float:
    """Profiler ops (every level of nesting) per decode step: the difference between a long and a short run,
    so the prefill and per-call setup cancel."""
    counts = []
    for tokens in (new_tokens // 2, new_tokens):
        engine(model, ids, mask, tokens, seed=0)  # a compiled step may recompile once for a new length
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine(model, ids, mask, tokens, seed=0)
        counts.append(len(prof.events()))
    return (counts[1] - counts[0]) / (new_tokens - new_tokens // 2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["1m", "10m"], choices=sorted(TINY_SIZES))
    parser.add_argument("--rows", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ops", action="store_true", help="also count profiler ops per decode step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.new_tokens} new tokens, "
        f"median of {args.repeats} after one warm-up; tokens per CPU-second of this process"
    )
    ops_head = " ops/step |" if args.ops else ""
    print(f"| model | rows | engine         | tok/CPU-s | vs generate |{ops_head}")
    print(f"|---|---|---|---|---|{'---|' if args.ops else ''}")
    for size in args.sizes:
        model = build(size)
        for rows in args.rows:
            ids, mask = prompts(rows)
            for name, engine in ENGINES.items():
                start, start_wall = time.process_time(), time.perf_counter()
                engine(model, ids, mask, args.new_tokens, seed=0)  # warm-up (the compile, for ours compile)
                if name == "ours compile":
                    print(
                        f"  {size} x {rows}: first compiled run {time.process_time() - start:.1f} CPU-s in this "
                        f"process, {time.perf_counter() - start_wall:.1f} s wall (compilers run in subprocesses)"
                    )
            rates = collections.defaultdict(list)
            for r in range(args.repeats):
                for name, engine in ENGINES.items():
                    start = time.process_time()
                    tokens = engine(model, ids, mask, args.new_tokens, seed=r + 1)
                    rates[name].append(tokens / (time.process_time() - start))
                    assert tokens == rows * args.new_tokens, (name, tokens)
            rate = {name: statistics.median(v) for name, v in rates.items()}
            for name, engine in ENGINES.items():
                ops = f" {ops_per_step(engine, model, ids, mask, args.new_tokens):8.0f} |" if args.ops else ""
                print(
                    f"| {size} | {rows} | {name:<14} | {rate[name]:9.0f} "
                    f"| {rate[name] / rate['model.generate']:10.2f}x |{ops}"
                )


if __name__ == "__main__":
    main()
