"""Batched, KV-cached sampling from a causal LM into a :class:`Rollout`.

One engine feeds GRPO, ColdStart and MultiExpertOPD: prompts in, completions with masks and the
behaviour log-probs of every sampled token out.

Why an own decode loop rather than wrapping ``model.generate``
--------------------------------------------------------------
Measured 2026-11 on the project CPU (shared machine, so 1 thread, ``nice -n 15`` and process CPU time,
which moved ~5% between runs while wall clock moved 5x), random Qwen3 from PLATFORM.md, batch 32 x 64
new tokens, temperature 1, median of 7 interleaved runs, tokens per second:

    model   this loop   generate + output_logits   plain generate
    1.1M    5,988       5,145                       5,242          loop 1.16x the wrapper
    10.1M   1,206       1,152                       1,170          loop 1.05x the wrapper

The model's own forward is the same in both; the difference is bookkeeping outside it: 20 ms per
rollout here vs 73 ms in ``generate`` (1.1M model, ~310 / 377 ms in all). Beyond speed,
``generate`` samples from the global RNG (no ``torch.Generator``), and ``output_logits`` keeps
every step's ``[N, V]`` logits until the end (20 GB in fp32 for N=64, C=512, V=152k) where the
loop keeps one float per token. Tried and dropped: ``StaticCache`` and preallocated KV buffers in
place of ``DynamicCache``'s ``torch.cat`` (no gain, -3% for the buffers: SDPA on strided views);
``torch.multinomial`` (see :func:`_sample`). Greedy output equals ``model.generate(do_sample=False)``
token for token (tests/test_rollout.py). On GPUs with real models the forward dominates either way.

Where a decode step goes, and ``SamplingConfig.compile``
-------------------------------------------------------
Measured 2026-11, same machine and method, one process, engines alternating, median of 7: the tiny
models of ``opd-tiny --size 1m / 10m`` (vocabulary 1,024), prompts of 12-24 tokens, 32 new tokens at
temperature 1 (``tools/bench_rollout.py``). Tokens per CPU-second for the whole call (prefill included);
in brackets the CPU-ms of one decode step (whole call at 32 tokens minus at 1, over 31) and the profiler
ops per decode step (every nesting level; no load moves it). "linears alone" (the next run) applies each
``nn.Linear`` of the model once to ``[rows, in]``: the rate the step's matmuls allow, weights from memory.

    model rows  previous loop       this loop           compile=True        model.generate      linears alone
    1m     8    3,042 (2.47, 1205)  3,081 (2.43, 1190)  5,649 (1.14, 262)   2,756 (2.72, 1251)  20,510
    1m    32    7,896 (3.52)        8,058 (3.43)        10,854 (2.29)       6,642 (4.26)        35,550
    10m    8      628 (11.6, 2681)    627 (11.6, 2666)    779 (8.91, 583)     616 (11.8, 2727)   1,259
    10m   32    1,381 (18.5)        1,407 (18.2)        1,523 (16.2)        1,385 (18.5)        3,139

Eager, a step is ~1,200 (1m) / ~2,700 (10m) small ops, whatever the rows: at 1m it is overhead-bound.
"This loop" trims only what it owns (~15 ops: positions, no per-step masking of finished rows, the
cache passed under its current name); the rest is the model's own forward, 80 ops of them its mask.
At 10m the matmuls stream the 40 MB of weights every step (5.8 of the 11.6 ms at 8 rows) and
``DynamicCache`` re-copies the whole KV cache with ``torch.cat`` (2.1 ms at 8 rows, 7 ms at 32).

``compile=True`` runs the step as one ``torch.compile``d graph over a ``StaticCache``: 1.9x the
tokens per CPU-second at 1m x 8 (2.2x per decode step), 1.3-1.4x at 32 rows, 1.25x and 1.1x at 10m.
Its first call compiles for 10-20 CPU-s (~30 with a cold on-disk cache); with ``dynamic=True`` one
graph then serves every batch size, prompt length and ``max_new_tokens`` (a static-shape graph would
recompile for each). What remains at 1m x 8 (profiler, per step): generated kernels and their Python
wrapper 0.34 ms, matmuls 0.24, SDPA 0.12, dynamo's guard check and pre-graph code 0.11. At 10m x 32
the compiled step gains little because transformers' SDPA path repeats the grouped KV heads
(``repeat_kv``) under compile, copying the whole static cache every layer and step, where eager it
folds them into the query. Tried and dropped: inductor's ``cpp_wrapper`` (no gain per step, longer
compile) and ``max-autotune-no-cudagraphs`` (a step 1.6x faster than eager, against 2.3x by default).
The compile is not the default: it pays off after a few hundred rollouts, and every test and first step
would pay for it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from opd_lightning.metrics import token_entropy
from opd_lightning.ops import HiddenLogits, token_logprobs
from opd_lightning.sharding import is_sharded

__all__ = [
    "Rollout",
    "SamplingConfig",
    "completion_logits",
    "completion_logprobs",
    "compile_forwards",
    "generate",
    "lazy_completion_logits",
    "length_groups",
    "output_head",
]


@dataclass
class SamplingConfig:
    """How to sample completions (one GRPO group per prompt when ``num_samples > 1``)."""

    max_new_tokens: int = 64
    """Most tokens generated per completion, EOS included."""
    temperature: float = 1.0
    """Softmax temperature; 0.0 means greedy decoding."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 turns the filter off."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p; 1.0 is off."""
    num_samples: int = 1
    """Completions per prompt. A prompt's completions are contiguous in the output."""
    stop_strings: tuple[str, ...] = ()
    """A row also stops once its decoded text contains one of these (needs a tokenizer)."""
    sync_ranks: bool = False
    """Keep decoding until every data-parallel rank is done. FSDP2 gathers parameters inside each
    forward, so ranks that stop at different steps deadlock (see PLATFORM.md)."""
    compile: bool = False
    """Decode with a static KV cache and one ``torch.compile``d step (model forward + sampling) per token.
    Same samples and behaviour log-probs as the eager loop (to float32 round-off). Measured on the CPU at
    1 thread (module docstring): 1.9x the tokens per CPU-second on the 1M tiny model at 8 rows, 1.1-1.4x
    at 32 rows or 10M parameters, after a first call that compiles for 10-20 CPU-s (~30 with torch's
    on-disk cache cold). One graph serves every batch size, prompt length and max_new_tokens; each model
    and sampling setting (greedy or not, top-k, top-p) compiles its own. Needs transformers >= 5;
    FSDP2-sharded models and models without static-cache support decode eagerly, with a warning."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.compile and int(version("transformers").split(".")[0]) < 5:
            raise ValueError(
                f"compile: true needs transformers >= 5 (a static KV cache that tracks its own length), found "
                f"{version('transformers')}; upgrade transformers or set compile: false"
            )
        # jsonargparse hands lists from YAML; a tuple keeps the config hashable and immutable.
        self.stop_strings = tuple(self.stop_strings)
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def logprob_temperature(self) -> float:
        """The temperature the behaviour log-probs use; pass it to :func:`completion_logprobs` so a
        recompute matches (greedy reports plain, temperature-1 log-probs)."""
        return 1.0 if self.greedy else self.temperature


@dataclass
class Rollout:
    """Completions sampled for a batch of prompts. ``N = B * num_samples``, rows of one prompt are
    contiguous; ``P`` is the padded prompt length and ``C`` the longest completion in the batch."""

    prompt_ids: Tensor  # [N, P] long, left-padded
    prompt_mask: Tensor  # [N, P] bool
    completion_ids: Tensor  # [N, C] long, pad_token_id after the stop token
    completion_mask: Tensor  # [N, C] bool, generated tokens up to and including EOS
    logprobs: Tensor  # [N, C] float32 behaviour log p(token), 0 where masked
    prompt_index: Tensor  # [N] long, row of the source prompt in the input batch
    domains: list[str]  # [N]
    is_truncated: Tensor  # [N] bool, hit max_new_tokens without EOS or a stop string

    @property
    def input_ids(self) -> Tensor:  # [N, P + C]
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:  # [N, P + C] bool
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def completion_lengths(self) -> Tensor:  # [N] long
        return self.completion_mask.sum(dim=1)

    @property
    def num_completion_tokens(self) -> int:
        return int(self.completion_mask.sum())

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def select(self, rows: Tensor) -> Rollout:
        """The rows ``rows`` ([n] long) of this rollout, e.g. a minibatch; ``prompt_index`` still points
        into the source batch."""
        picked = rows.tolist()
        return dataclasses.replace(
            self,
            **{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self) if f.name != "domains"},
            domains=[self.domains[i] for i in picked],
        )

    def decode(self, tokenizer) -> list[str]:
        """Completion texts, special tokens (EOS, pad) dropped."""
        rows = self.completion_ids.tolist()
        lengths = self.completion_lengths.tolist()
        return tokenizer.batch_decode(
            [row[:n] for row, n in zip(rows, lengths, strict=True)], skip_special_tokens=True
        )


def _accepts(model: nn.Module, name: str) -> bool:
    # Models differ in optional forward arguments; this is how HF generate itself decides.
    return name in inspect.signature(model.forward).parameters


def _position_ids(attention_mask: Tensor) -> Tensor:
    # Same rule as HF generate: positions count real tokens only, so left padding does not shift
    # RoPE; pad slots get 0 (they are masked anyway).
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 0)


def _filter_logits(scaled: Tensor, top_k: int, top_p: float) -> Tensor:
    """Mask tokens outside top-k / the top-p nucleus with -inf (HF warper order: k, then p)."""
    if top_k and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p; the first always stays.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def _sample(probs: Tensor, uniform: Tensor) -> Tensor:
    """Inverse-CDF draw: one uniform per row, ``uniform [N]`` in [0, 1) -> token ids ``[N]``.
    ``torch.multinomial`` draws one exponential per vocabulary entry instead, which on CPU cost
    0.75 ms of a ~6 ms decode step (N=32, V=1k) and 108 ms vs 5 ms at V=152k."""
    cdf = probs.cumsum(dim=-1)  # [N, V]
    total = cdf[:, -1:]
    # Keep u strictly below the total so rounding can never select past the last token.
    uniform = uniform.to(probs.dtype)[:, None]
    u = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    # right=True skips zero-probability tokens: their cdf equals their predecessor's.
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


def _next_token(
    logits: Tensor, uniform: Tensor | None, temperature: float, top_k: int, top_p: float
) -> tuple[Tensor, Tensor]:
    """The next token of every row and its behaviour log-prob, ``([N] long, [N] float32)``, from the last
    position's ``logits [N, V]``: greedy when ``uniform`` is None, else drawn with ``uniform [N]``."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = logits.log_softmax(dim=-1)  # [N, V]
    if uniform is None:
        token = logits.argmax(dim=-1)
    elif top_k or top_p < 1.0:
        token = _sample(_filter_logits(logits, top_k, top_p).softmax(-1), uniform)
    else:
        token = _sample(logp.exp(), uniform)
    return token, logp.gather(1, token[:, None]).squeeze(1)


def _decode_step(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    cache,
    cache_arg: str,
    uniform: Tensor | None,
    temperature: float,
    top_k: int,
    top_p: float,
) -> tuple[Tensor, Tensor]:
    """One decode forward (``input_ids [N, 1]``, the fed-back tokens) and the token it yields."""
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        return_dict=True,
        **{cache_arg: cache},
    ).logits[:, -1]
    return _next_token(logits, uniform, temperature, top_k, top_p)


@functools.cache
def _compiled(fn: Callable, fullgraph: bool = False) -> Callable:
    # dynamic=True: one graph serves every batch size and length (for the decode step, the static cache's length
    # P + max_new_tokens changes from batch to batch); a graph per shape would compile again for each. (Sizes that
    # happen to be equal in the first call, e.g. that length and head_dim, are assumed equal by the first graph,
    # which costs one more compile when they first differ.)
    return torch.compile(fn, fullgraph=fullgraph, dynamic=True)


def _compile_refused(model: nn.Module) -> str | None:
    """Why ``model`` decodes eagerly although ``SamplingConfig.compile`` is set, or None."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or not model._can_compile_fullgraph:
        return f"{type(model).__name__} does not support a static KV cache under torch.compile"
    if is_sharded(model):
        # FSDP2 gathers parameters in forward hooks, which the compiled step would trace into its graph.
        return "it is FSDP2-sharded"
    return None


def _all_ranks_done(local_done: bool, device: torch.device) -> bool:
    flag = torch.tensor([1 if local_done else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class _StopStrings:
    """Checks only the tail of each running row: a stop string that just completed lies within the
    last ``window`` tokens, because every token decodes to at least one character (a few spare
    tokens cover byte-level pieces that decode to nothing on their own)."""

    def __init__(self, stop_strings: Sequence[str], tokenizer) -> None:
        self.stop_strings = tuple(stop_strings)
        self.tokenizer = tokenizer
        self.window = max(len(s) for s in self.stop_strings) + 4

    def __call__(self, out_ids: Tensor, step: int, running: Tensor) -> Tensor:  # -> [N] bool
        hit = torch.zeros_like(running)
        rows = running.nonzero().flatten().tolist()
        if not rows:
            return hit
        lo = max(0, step + 1 - self.window)
        tails = self.tokenizer.batch_decode(out_ids[rows, lo : step + 1].tolist())
        for row, text in zip(rows, tails, strict=True):
            hit[row] = any(s in text for s in self.stop_strings)
        return hit


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    config: SamplingConfig,
    *,
    eos_token_id: int | list[int],
    pad_token_id: int,
    domains: list[str] | None = None,
    generator: torch.Generator | None = None,
    uniforms: Tensor | None = None,
    tokenizer=None,
) -> Rollout:
    """Sample ``config.num_samples`` completions for each left-padded prompt.

    The behaviour log-prob of a token is ``log_softmax(logits / T)`` over the full vocabulary at
    the sampled token, with ``T = config.logprob_temperature``: top-k / top-p decide which tokens can
    be drawn, never the reported probability (as TRL's GRPO recompute does). A teacher-forced
    :func:`completion_logprobs` at the same temperature reproduces them to float32 round-off.

    Runs under ``no_grad`` rather than ``inference_mode`` on purpose: the returned log-probs enter
    the loss as constants, and inference tensors cannot be saved for backward.

    Args:
        model: any HF causal LM (``model(input_ids, attention_mask, position_ids, cache or
            past_key_values, use_cache)`` returning ``.logits`` and the cache). Switched to eval mode while
            sampling (dropout off) and restored module by module afterwards.
        prompt_ids: ``[B, P]`` token ids, left-padded.
        prompt_mask: ``[B, P]`` 1/True for real tokens.
        eos_token_id: one id or several; a row stops at the first of any.
        pad_token_id: written after a row stops.
        domains: ``[B]`` tags carried to every completion of the prompt; ``""`` when omitted.
        generator: seeds sampling, so the same seed gives the same completions.
        uniforms: ``[B * num_samples, max_new_tokens]`` in [0, 1), token ``t`` of output row ``i`` drawn
            with ``uniforms[i, t]`` (:func:`opd_lightning.seeding.row_uniforms`): each row's sample then
            depends on its own uniforms only, not on the other rows of the batch. Replaces ``generator``.
        tokenizer: needed only for ``config.stop_strings``.
    """
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(
            f"prompt_ids and prompt_mask must both be [B, P], got {tuple(prompt_ids.shape)} and "
            f"{tuple(prompt_mask.shape)}"
        )
    prompt_mask = prompt_mask.bool()
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: prompt_mask[:, -1] has padding")
    batch = prompt_ids.shape[0]
    if domains is not None and len(domains) != batch:
        raise ValueError(f"domains has {len(domains)} entries for {batch} prompts")
    if config.stop_strings and tokenizer is None:
        raise ValueError("SamplingConfig.stop_strings needs the tokenizer passed to generate()")

    device = prompt_ids.device
    g = config.num_samples
    prompt_index = torch.arange(batch, device=device).repeat_interleave(g)  # [N]
    prompt_ids = prompt_ids.repeat_interleave(g, dim=0)  # [N, P]
    prompt_mask = prompt_mask.repeat_interleave(g, dim=0)  # [N, P]
    domains_out = [d for d in (domains or [""] * batch) for _ in range(g)]
    n, p, c_max = prompt_ids.shape[0], prompt_ids.shape[1], config.max_new_tokens
    if uniforms is not None and tuple(uniforms.shape) != (n, c_max):
        raise ValueError(
            f"uniforms must be [B * num_samples, max_new_tokens] = {[n, c_max]}, got {list(uniforms.shape)}"
        )

    # An empty list is allowed and never stops a row (benchmarks use it for fixed-length output).
    eos = torch.as_tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
        dtype=torch.long,
        device=device,
    )
    stop_strings = _StopStrings(config.stop_strings, tokenizer) if config.stop_strings else None
    sync = config.sync_ranks and dist.is_available() and dist.is_initialized()
    temperature = config.logprob_temperature
    top_k, top_p = (0, 1.0) if config.greedy else (config.top_k, config.top_p)
    refusal = _compile_refused(model) if config.compile else None
    if refusal is not None:
        warnings.warn(
            f"SamplingConfig.compile is set but {refusal}: decoding eagerly (same samples)", stacklevel=2
        )
    compiled = config.compile and refusal is None
    # transformers 5 renamed the cache argument; the old name still works there but warns on every call.
    cache_arg = "cache" if _accepts(model, "cache") else "past_key_values"

    # Preallocated once: the decode loop then only writes one column per step. Tokens and log-probs of
    # rows that already stopped are written too and masked once at the end (fewer ops per step).
    out_ids = torch.empty((n, c_max), dtype=torch.long, device=device)  # [N, C]
    out_lp = torch.empty((n, c_max), dtype=torch.float32, device=device)  # [N, C]
    stopped = torch.zeros((n, c_max), dtype=torch.bool, device=device)  # [N, C] row done before step t
    attn = torch.ones((n, p + c_max), dtype=torch.long, device=device)  # [N, P + C]
    attn[:, :p] = prompt_mask
    done = torch.zeros(n, dtype=torch.bool, device=device)  # [N]
    position = _position_ids(prompt_mask)  # [N, P]

    prefill_kwargs = {"use_cache": True, "return_dict": True}
    if _accepts(model, "logits_to_keep"):
        # Without it the prefill materialises [N, P, vocab] logits, gigabytes for real vocabularies.
        prefill_kwargs["logits_to_keep"] = 1
    if compiled:
        from transformers import StaticCache

        # Fixed-size KV buffers written in place: the compiled step sees the same tensors at every step.
        prefill_kwargs[cache_arg] = StaticCache(config=model.config, max_cache_len=p + c_max)
    step = _compiled(_decode_step, fullgraph=True) if compiled else _decode_step

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        out = model(input_ids=prompt_ids, attention_mask=attn[:, :p], position_ids=position, **prefill_kwargs)
        cache = out.cache if cache_arg == "cache" else out.past_key_values
        logits = out.logits[:, -1]  # [N, V]
        steps = 0
        for t in range(c_max):
            if config.greedy:
                uniform = None
            elif uniforms is not None:
                # A copy, not a view: the compiled step would specialise on a view's strides and offset.
                uniform = uniforms[:, t].clone()
            else:
                uniform = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
            if t == 0:
                token, token_lp = _next_token(logits, uniform, temperature, top_k, top_p)
                position = position[:, -1:]  # [N, 1]
            else:
                position = position + 1
                # The static cache attends over its whole length (future slots are masked causally), so the
                # compiled step gets the full mask; the dynamic cache grows by one column per step.
                token, token_lp = step(
                    model,
                    token[:, None],
                    attn if compiled else attn[:, : p + t],
                    position,
                    cache,
                    cache_arg,
                    uniform,
                    temperature,
                    top_k,
                    top_p,
                )
            out_ids[:, t] = token
            out_lp[:, t] = token_lp
            stopped[:, t] = done
            done |= torch.isin(token, eos)
            if stop_strings is not None:
                done |= stop_strings(out_ids, t, ~done)
            steps = t + 1
            all_done = bool(done.all())
            if sync:
                all_done = _all_ranks_done(all_done, device)
            if all_done:
                break
    finally:
        for module, mode in modes.items():
            module.training = mode

    completion_mask = ~stopped[:, :steps]  # [N, steps]
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        # masked_fill copies: a column slice would keep the whole max_new_tokens buffer alive
        completion_ids=out_ids[:, :steps].masked_fill(stopped[:, :steps], pad_token_id),
        completion_mask=completion_mask,
        logprobs=out_lp[:, :steps].masked_fill(stopped[:, :steps], 0.0),
        prompt_index=prompt_index,
        domains=domains_out,
        is_truncated=~done,
    )


def length_groups(prompt_lengths: Tensor, completion_lengths: Tensor, max_groups: int) -> list[Tensor]:
    """Rows split into at most ``max_groups`` groups of similar length: ``[n]`` lengths -> row-index tensors.

    Why: a batch that mixes short and long prompts pads every row to the longest (the tiny world's
    math prompts are ~17 tokens, its string prompts ~52), so most of a padded forward is wasted.
    A forward per group of similar lengths costs far less: on the 1M tiny model, forward + backward
    of a 64-row SFT batch took 0.42 s padded and 0.27 s in two groups (1 thread, 2026-11).

    The split minimises the tokens forwarded, ``sum_g rows_g * (longest prompt_g + longest completion_g)``,
    plus :data:`GROUP_OVERHEAD_TOKENS` per extra forward (the per-forward cost measured in tokens), by
    dynamic programming over the distinct prompt lengths in sorted order (a few dozen): exact for splits
    along prompt length, and cheap.
    """
    n = len(prompt_lengths)
    if max_groups <= 1 or n <= 1:
        return [torch.arange(n, device=prompt_lengths.device)]
    order = torch.argsort(prompt_lengths, stable=True)
    prompts = prompt_lengths[order].tolist()
    completions = completion_lengths[order].tolist()
    # atoms: runs of equal prompt length, as (end row in `order`, prompt length, longest completion)
    atoms: list[tuple[int, int, int]] = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if atoms and atoms[-1][1] == p:
            atoms[-1] = (i + 1, p, max(atoms[-1][2], c))
        else:
            atoms.append((i + 1, p, c))
    m = len(atoms)

    def cost(i: int, j: int) -> int:  # one forward over atoms i..j-1
        rows = atoms[j - 1][0] - (atoms[i - 1][0] if i else 0)
        return rows * (atoms[j - 1][1] + max(a[2] for a in atoms[i:j])) + GROUP_OVERHEAD_TOKENS

    # best[k][j]: cheapest split of the first j atoms into k + 1 groups; cut[k][j] the start of the last
    inf = float("inf")
    best = [[cost(0, j) if j else inf for j in range(m + 1)]]
    cut = [[0] * (m + 1)]
    for k in range(1, min(max_groups, m)):
        row, cuts = [inf] * (m + 1), [0] * (m + 1)
        for j in range(k + 1, m + 1):
            for i in range(k, j):
                value = best[k - 1][i] + cost(i, j)
                if value < row[j]:
                    row[j], cuts[j] = value, i
        best.append(row)
        cut.append(cuts)
    k = min(range(len(best)), key=lambda k: best[k][m])
    ends, j = [], m
    while k >= 0:
        ends.append(atoms[j - 1][0])
        j = cut[k][j]
        k -= 1
    bounds = [0, *reversed(ends)]
    return [order[lo:hi] for lo, hi in zip(bounds, bounds[1:])]


GROUP_OVERHEAD_TOKENS = 64
"""What one extra forward costs, in padded tokens: measured on the 1M tiny model (1 thread), a forward +
backward costs ~5 ms plus ~85 us per token, so a split must save at least ~64 padded tokens to pay."""

MAX_LENGTH_GROUPS = 4
"""Most forwards :func:`completion_logits` splits a batch into."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def completion_logits(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_length: int
) -> Tensor:
    """Teacher-forced logits that predict each completion token: ``[n, C, V]``, in the model's dtype.

    ``input_ids`` / ``attention_mask`` are ``[n, P + C]`` prompt (left-padded) + completion (right-padded), as in
    ``Rollout.input_ids``; position ``j`` of the output is the distribution of completion token ``j``. Same
    position ids as sampling (real tokens only, so left padding does not shift RoPE), hence the same
    distributions the rollout saw. The one forward rule shared by the policy (SFT, ColdStart, GRPO, OPD),
    the reference and the teachers. Grad mode is the caller's.

    Rows are forwarded in groups of similar length (:func:`length_groups`), each cut to its own longest
    prompt and completion: the result is the same, the padding is not computed. Positions past a group's
    longest completion are masked everywhere and hold zeros. Under data parallelism the batch stays one
    forward (cut to the batch's own longest prompt and completion): FSDP2 gathers parameters inside each
    forward, so every rank must run the same number of them.
    """
    return _grouped_forward(_forward_completion, model, input_ids, attention_mask, completion_length)


def lazy_completion_logits(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_length: int
) -> Tensor | HiddenLogits:
    """:func:`completion_logits` as :class:`opd_lightning.ops.HiddenLogits` (the final hidden states ``[n, C, H]``
    and the LM head) where the model allows it, so that no ``[n, C, V]`` tensor is made; the dense logits
    otherwise. Same forward rule (length groups, position ids); grad mode is the caller's.

    Allowed where :func:`output_head` finds the LM head: an unsharded model whose logits are that head applied
    to its base model's last hidden state. FSDP2-sharded models stay dense: their LM head belongs to the root's
    sharded group, gathered only inside the root's forward.
    """
    head = output_head(model)
    if head is None:
        return completion_logits(model, input_ids, attention_mask, completion_length)
    return HiddenLogits(
        _grouped_forward(_forward_hidden, model, input_ids, attention_mask, completion_length), head
    )


_COMPILED_FORWARDS: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def compile_forwards(model: nn.Module) -> str | None:
    """Run ``model``'s teacher-forced forwards (:func:`completion_logits`, :func:`lazy_completion_logits`,
    :func:`completion_logprobs`: the policy's with grad, a teacher's or reference's without) as ``torch.compile``d
    graphs from now on; returns why not (the forwards then stay eager) or None.

    One graph per forward kind (logits or hidden states), model and grad mode, with dynamic shapes: batch size,
    prompt and completion lengths do not compile again. Inductor fuses the norms, RoPE and activations that eager
    runs as separate small ops. Measured on the 2-core CPU, 1 thread, CPU time, the benchmark's batch (8 rows, 52
    prompt + 32 completion tokens): the 10M teacher's scoring forward 158 -> 136 ms (-14%), the 1M student's
    forward + backward 71 -> 54 ms (-24%), after a first call that compiles for ~25-35 CPU-s per model and grad
    mode; the whole OPD step with ``sampling.compile`` too is 1.3x faster (``tools/bench.py --compile``).
    Refused for FSDP2-sharded models, whose forward hooks gather parameters. Torch keeps at most
    ``torch._dynamo.config.recompile_limit`` (8) graphs per forward kind: past it (many teachers), further models
    run eagerly, with torch's warning.
    """
    if is_sharded(model):
        return "it is FSDP2-sharded (its forward hooks gather parameters inside the graph)"
    _COMPILED_FORWARDS.add(model)
    return None


_HEADS: weakref.WeakKeyDictionary[nn.Module, nn.Module | None] = weakref.WeakKeyDictionary()


@torch.no_grad()
def output_head(model: nn.Module) -> nn.Module | None:
    """``model``'s LM head if its logits are exactly ``head(model.base_model(...).last_hidden_state)``, else None.

    True of Qwen, Llama, Mistral and GPT-2; not of models that scale or soft-cap their logits (Gemma 2, Cohere,
    Granite), whose heads a chunked path would silently get wrong, nor of sharded models (see
    :func:`lazy_completion_logits`). Checked once per model, by one 2-token forward in eval mode (no dropout,
    no random draw), and remembered.
    """
    if is_sharded(model):
        return None
    if model not in _HEADS:
        head, base, found = model.get_output_embeddings(), model.base_model, None
        if head is not None and base is not model:
            ids = torch.tensor([[0, 1]], device=head.weight.device)
            inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            training = model.training
            model.eval()
            try:
                full = model(**inputs).logits
                mine = head(base(**inputs).last_hidden_state)
            finally:
                model.train(training)
            if full.shape == mine.shape and torch.allclose(full, mine, rtol=1e-4, atol=1e-5):
                found = head
        _HEADS[model] = found
    return _HEADS[model]


def _grouped_forward(
    forward: Callable[[nn.Module, Tensor, Tensor, int], Tensor],
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_length: int,
) -> Tensor:
    c = completion_length
    if c == 0 or input_ids.shape[0] == 0:
        return forward(model, input_ids, attention_mask, c)
    compiled = model in _COMPILED_FORWARDS
    if compiled:
        forward = _compiled(forward)
    p = input_ids.shape[1] - c
    mask = attention_mask.bool()
    prompt_lengths, completion_lengths = mask[:, :p].sum(1), mask[:, p:].sum(1)
    groups = length_groups(prompt_lengths, completion_lengths, 1 if _distributed() else MAX_LENGTH_GROUPS)
    pieces = []
    for rows in groups:
        whole = len(groups) == 1
        pg = int(prompt_lengths[rows].max())
        cg = max(int(completion_lengths[rows].max()), 1)
        ids, att = (input_ids, mask) if whole else (input_ids[rows], mask[rows])
        ids, att = ids[:, p - pg : p + cg], att[:, p - pg : p + cg]
        if compiled:  # a column slice's strides and offset would be guarded on, compiling again per width
            ids, att = ids.contiguous(), att.contiguous()
        out = forward(model, ids, att, cg)  # [m, cg, V or H]
        pieces.append(F.pad(out, (0, 0, 0, c - cg)) if cg < c else out)
    if len(groups) == 1:
        return pieces[0]
    order = torch.cat(groups)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return torch.cat(pieces)[inverse]


def _forward_completion(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, c: int) -> Tensor:
    attention_mask = attention_mask.long()
    kwargs = {"use_cache": False, "return_dict": True}
    if _accepts(model, "logits_to_keep"):
        # Only positions P-1 .. P+C-1 are needed; the last predicts past the completion and is dropped.
        kwargs["logits_to_keep"] = c + 1
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=_position_ids(attention_mask),
        **kwargs,
    ).logits
    return logits[:, -(c + 1) : -1]


def _forward_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, c: int) -> Tensor:
    attention_mask = attention_mask.long()
    hidden = model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=_position_ids(attention_mask),
        use_cache=False,
    ).last_hidden_state
    return hidden[:, -(c + 1) : -1]


def completion_logprobs(
    model: nn.Module,
    rollout: Rollout,
    *,
    temperature: float = 1.0,
    micro_batch_size: int | None = None,
    entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Teacher-forced ``log p(completion token | prefix)`` under ``model``: ``[N, C]`` float32, 0
    where ``completion_mask`` is False. With ``entropy``, also the (detached) entropy of
    ``softmax(logits / temperature)`` at each completion position, ``[N, C]``, 0 where masked: read off
    the same forward, at no extra one (GRPO logs the policy's entropy on its own samples).

    One forward over ``rollout.input_ids`` with the same position ids as sampling, so at
    ``temperature=config.logprob_temperature`` it reproduces ``rollout.logprobs`` for the model
    that sampled. Grad mode is the caller's: wrap in ``torch.no_grad()`` for a reference model,
    leave it on for the policy. Under FSDP every rank must make the same number of micro-batches.
    """
    n = rollout.prompt_ids.shape[0]
    c = rollout.completion_ids.shape[1]
    mask = rollout.completion_mask
    if c == 0:
        empty = torch.zeros((n, 0), dtype=torch.float32, device=rollout.completion_ids.device)
        return (empty, empty) if entropy else empty
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask  # [N, P + C]
    chunk = micro_batch_size or n
    pieces, entropies = [], []
    for lo in range(0, n, chunk):
        rows = slice(lo, lo + chunk)
        logits = completion_logits(model, input_ids[rows], attention_mask[rows], c)  # [n, C, V]
        pieces.append(token_logprobs(logits, rollout.completion_ids[rows], temperature=temperature))
        if entropy:
            entropies.append(token_entropy(logits.detach() / temperature))
    logprobs = torch.cat(pieces, dim=0).masked_fill(~mask, 0.0)
    if entropy:
        return logprobs, torch.cat(entropies, dim=0).masked_fill(~mask, 0.0)
    return logprobs
