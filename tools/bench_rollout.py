"""Throughput of opd_lightning.rollout.generate against HF ``model.generate`` on tiny Qwen3 models.

    python tools/bench_rollout.py --sizes 1m 10m --batch 32 --new-tokens 64 --repeats 3

Both engines sample at temperature 1 with no top-k / top-p and never stop at EOS, so each run
produces exactly batch x new_tokens tokens. Models are random, built from a config (no download).
tokens/s is wall clock; tokens per CPU-second (all threads of this process) is printed too,
because on a shared machine it moves far less with other people's load.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from opd_lightning.rollout import SamplingConfig, generate

# Sizes from PLATFORM.md ("Tiny offline models").
# Tied embeddings, SwiGLU width 4 x hidden: 1.11M and 10.1M parameters.
SIZES = {
    "1m": dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=512,
    ),
    "10m": dict(
        hidden_size=256,
        num_hidden_layers=10,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        intermediate_size=1024,
    ),
}
PAD = 0


def build(size: str) -> Qwen3ForCausalLM:
    cfg = Qwen3Config(
        **SIZES[size],
        vocab_size=1024,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=PAD,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    return Qwen3ForCausalLM(cfg).eval()


def prompts(batch: int, vocab: int, max_len: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(max_len // 2, max_len + 1, (batch,), generator=g)
    ids = torch.randint(1, vocab, (batch, max_len), generator=g)
    mask = torch.arange(max_len)[None, :] >= (max_len - lengths)[:, None]  # left padding
    return ids.masked_fill(~mask, PAD), mask.long()


def run_ours(model, ids, mask, new_tokens: int, seed: int) -> int:
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0)
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


ENGINES = {"ours": run_ours, "model.generate": run_hf}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["1m", "10m"], choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"torch threads {torch.get_num_threads()}, batch {args.batch}, new tokens {args.new_tokens}, "
        f"median of {args.repeats} after one warm-up"
    )
    print(
        f"| {'model':<6} | {'params':>7} | {'engine':<14} | {'tokens/s':>9} | {'speedup':>7} "
        f"| {'tok/CPU-s':>9} | {'speedup':>7} |"
    )
    print(f"|{'-' * 8}|{'-' * 9}|{'-' * 16}|{'-' * 11}|{'-' * 9}|{'-' * 11}|{'-' * 9}|")
    for size in args.sizes:
        model = build(size)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        ids, mask = prompts(args.batch, model.config.vocab_size)
        wall = {name: [] for name in ENGINES}
        cpu = {name: [] for name in ENGINES}
        for engine in ENGINES.values():
            engine(model, ids, mask, args.new_tokens, seed=0)  # warm-up
        # Engines take turns within each repeat, so load from other users of the machine hits both.
        for r in range(args.repeats):
            for name, engine in ENGINES.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                tokens = engine(model, ids, mask, args.new_tokens, seed=r + 1)
                wall[name].append(tokens / (time.perf_counter() - start))
                cpu[name].append(tokens / (time.process_time() - start_cpu))
                assert tokens == args.batch * args.new_tokens, (name, tokens)
        rate = {name: statistics.median(v) for name, v in wall.items()}
        cpu_rate = {name: statistics.median(v) for name, v in cpu.items()}
        for name in ENGINES:
            print(
                f"| {size:<6} | {params:>6.2f}M | {name:<14} | {rate[name]:>9.0f} "
                f"| {rate[name] / rate['model.generate']:>6.2f}x | {cpu_rate[name]:>9.0f} "
                f"| {cpu_rate[name] / cpu_rate['model.generate']:>6.2f}x |"
            )


if __name__ == "__main__":
    main()
