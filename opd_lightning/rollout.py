"""Batched, KV-cached sampling from a causal LM into a :class:`Rollout`.

One engine feeds GRPO, ColdStart and MultiExpertOPD: prompts in, completions with masks and the
behaviour log-probs of every sampled token out.

Why an own decode loop rather than wrapping ``model.generate``
--------------------------------------------------------------
Measured 2026-11 on the project CPU (shared machine, so 1 thread and process CPU time, which
moved ~5% between runs while wall clock moved 5x), random Qwen3 from PLATFORM.md, batch 32 x 64
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
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


def _sample(probs: Tensor, generator: torch.Generator | None, uniform: Tensor | None = None) -> Tensor:
    """Inverse-CDF draw: one uniform per row (``uniform [N]`` when given, else from ``generator``).
    ``torch.multinomial`` draws one exponential per vocabulary entry instead, which on CPU cost
    0.75 ms of a ~6 ms decode step (N=32, V=1k) and 108 ms vs 5 ms at V=152k."""
    cdf = probs.cumsum(dim=-1)  # [N, V]
    total = cdf[:, -1:]
    if uniform is None:
        uniform = torch.rand(total.shape, generator=generator, device=probs.device, dtype=probs.dtype)
    else:
        uniform = uniform.to(probs.dtype)[:, None]
    # Keep u strictly below the total so rounding can never select past the last token.
    u = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    # right=True skips zero-probability tokens: their cdf equals their predecessor's.
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


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
        model: any HF causal LM (``model(input_ids, attention_mask, position_ids, past_key_values,
            use_cache)`` returning ``.logits`` and ``.past_key_values``). Switched to eval mode while
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
    filtering = not config.greedy and (config.top_k > 0 or config.top_p < 1.0)

    # Preallocated once: the decode loop then only writes one column per step.
    out_ids = torch.full((n, c_max), pad_token_id, dtype=torch.long, device=device)  # [N, C]
    out_mask = torch.zeros((n, c_max), dtype=torch.bool, device=device)  # [N, C]
    out_lp = torch.zeros((n, c_max), dtype=torch.float32, device=device)  # [N, C]
    attn = torch.ones((n, p + c_max), dtype=torch.long, device=device)  # [N, P + C]
    attn[:, :p] = prompt_mask
    done = torch.zeros(n, dtype=torch.bool, device=device)  # [N]
    position = _position_ids(prompt_mask)  # [N, P]

    step_kwargs = {"use_cache": True, "return_dict": True}
    prefill_kwargs = dict(step_kwargs)
    if _accepts(model, "logits_to_keep"):
        # Without it the prefill materialises [N, P, vocab] logits, gigabytes for real vocabularies.
        prefill_kwargs["logits_to_keep"] = 1

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        out = model(input_ids=prompt_ids, attention_mask=attn[:, :p], position_ids=position, **prefill_kwargs)
        position = position[:, -1:]  # [N, 1]
        steps = 0
        for t in range(c_max):
            if t > 0:
                position = position + 1
                out = model(
                    input_ids=out_ids[:, t - 1 : t],
                    attention_mask=attn[:, : p + t],
                    position_ids=position,
                    past_key_values=out.past_key_values,
                    **step_kwargs,
                )
            logits = out.logits[:, -1].float()  # [N, V]
            if temperature != 1.0:
                logits = logits / temperature
            logp = logits.log_softmax(dim=-1)  # [N, V]
            if config.greedy:
                token = logits.argmax(dim=-1)
            else:
                probs = (
                    _filter_logits(logits, config.top_k, config.top_p).softmax(-1)
                    if filtering
                    else logp.exp()
                )
                token = _sample(probs, generator, None if uniforms is None else uniforms[:, t])
            running = ~done
            token_lp = logp.gather(1, token[:, None]).squeeze(1)
            out_ids[:, t] = token.masked_fill(done, pad_token_id)
            out_lp[:, t] = token_lp.masked_fill(done, 0.0)
            out_mask[:, t] = running
            done = done | torch.isin(token, eos)
            if stop_strings is not None:
                done = done | stop_strings(out_ids, t, running & ~done)
            steps = t + 1
            all_done = bool(done.all())
            if sync:
                all_done = _all_ranks_done(all_done, device)
            if all_done:
                break
    finally:
        for module, mode in modes.items():
            module.training = mode

    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        # contiguous: a column slice would keep the whole max_new_tokens buffer alive
        completion_ids=out_ids[:, :steps].contiguous(),
        completion_mask=out_mask[:, :steps].contiguous(),
        logprobs=out_lp[:, :steps].contiguous(),
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
        out = forward(model, ids[:, p - pg : p + cg], att[:, p - pg : p + cg], cg)  # [m, cg, V or H]
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
