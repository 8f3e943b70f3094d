"""Rollout engine: agreement with HF generate, log-prob contract, EOS / stop handling, rank lockstep."""

from __future__ import annotations

import dataclasses
import datetime
import os
import string

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from opd_lightning.rollout import Rollout, SamplingConfig, completion_logprobs, generate
from opd_lightning.seeding import row_uniforms

VOCAB, PAD, EOS = 300, 0, 1
# fp32 round-off between one decode step and the teacher-forced forward is ~1e-6 here.
LOGPROB_ATOL = 1e-4


def tiny_model(seed: int = 0, family: str = "qwen3", **overrides) -> nn.Module:
    if family == "gpt2":
        return tiny_gpt2(seed)
    config_cls, model_cls = {
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
    }[family]
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=256,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
        **overrides,
    )
    torch.manual_seed(seed)
    return model_cls(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """Learned absolute positions: RoPE scores depend only on position differences, so a wrong
    left-padding offset is invisible to Qwen3/Llama but not to this model."""
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, pad_token_id=PAD, eos_token_id=EOS
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        # At the default init scale (0.01) positions barely move the argmax; make them matter.
        model.transformer.wpe.weight.normal_(0.0, 1.0)
    return model


def ragged_prompts(lengths=(7, 3, 5, 1), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded [B, P] prompts of different lengths, ids drawn away from PAD/EOS."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(2, VOCAB, (len(lengths), width), generator=g)
    mask = torch.arange(width)[None, :] >= (width - torch.tensor(lengths))[:, None]
    return ids.masked_fill(~mask, PAD), mask


class ForceTokens(nn.Module):
    """Wraps a causal LM: at decode step ``force[row]`` that row's next token becomes
    ``tokens[row]`` (a +1e4 logit); the forced tokens are banned at every other step so nothing
    stops by chance. Counts forward calls (call 0 is the prefill, which yields step 0's logits)."""

    def __init__(self, model: nn.Module, force: list[int | None] = (), tokens: list[int] = ()) -> None:
        super().__init__()
        self.model = model
        self.force, self.tokens = force, tokens
        self.calls = 0

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        step, self.calls = self.calls, self.calls + 1
        last = out.logits[:, -1]
        for row, (at, token) in enumerate(zip(self.force, self.tokens, strict=True)):  # no-op by default
            last[row, sorted(set(self.tokens))] = -1e4
            if at == step:
                last[row, token] = 1e4
        return out


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One character per id, so any sampled id decodes; built locally (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = list(string.ascii_letters + string.digits + string.punctuation + " ")
    chars += [chr(0x100 + i) for i in range(VOCAB - 2 - len(chars))]
    vocab = {"<pad>": PAD, "<eos>": EOS} | {c: i + 2 for i, c in enumerate(chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", clean_up_tokenization_spaces=False
    )


@pytest.mark.parametrize("family", ["qwen3", "llama", "gpt2"])
def test_greedy_matches_hf_generate_token_for_token_on_left_padded_prompts(family):
    model = tiny_model(family=family)
    ids, mask = ragged_prompts()
    kwargs = dict(
        input_ids=ids, attention_mask=mask.long(), do_sample=False, max_new_tokens=12, pad_token_id=PAD
    )
    free = model.generate(**kwargs, eos_token_id=None)[:, ids.shape[1] :]
    # Use a token greedy emits mid-way in row 0 as EOS, so stopping and padding are compared too.
    eos = int(free[0, 4])
    expected = model.generate(**kwargs, eos_token_id=eos)[:, ids.shape[1] :]

    rollout = generate(
        model,
        ids,
        mask,
        SamplingConfig(max_new_tokens=12, temperature=0.0),
        eos_token_id=eos,
        pad_token_id=PAD,
    )

    assert torch.equal(rollout.completion_ids, expected)
    assert not rollout.is_truncated[0]
    assert rollout.completion_lengths[0] <= 5


@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(max_new_tokens=10, temperature=0.0),
        SamplingConfig(max_new_tokens=10, temperature=1.0, num_samples=2),
        SamplingConfig(max_new_tokens=10, temperature=0.7, top_k=20, top_p=0.9, num_samples=2),
    ],
    ids=["greedy", "t1", "t0.7-topk-topp"],
)
def test_behaviour_logprobs_equal_teacher_forced_recompute(config):
    model = tiny_model()
    ids, mask = ragged_prompts()
    eos = [EOS, 2, 3, 4, 5]  # several likely stop tokens, so some rows end early and are masked
    rollout = generate(
        model,
        ids,
        mask,
        config,
        eos_token_id=eos,
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(0),
    )

    recomputed = completion_logprobs(model, rollout, temperature=config.logprob_temperature)
    torch.testing.assert_close(recomputed, rollout.logprobs, atol=LOGPROB_ATOL, rtol=0)
    assert rollout.logprobs.dtype == torch.float32
    assert (rollout.logprobs[~rollout.completion_mask] == 0).all()
    assert (rollout.logprobs[rollout.completion_mask] <= 0).all()
    # A model without `logits_to_keep` in its signature takes the full-logits path.
    plain = completion_logprobs(
        ForceTokens(model), rollout, micro_batch_size=3, temperature=config.logprob_temperature
    )
    torch.testing.assert_close(plain, recomputed, atol=LOGPROB_ATOL, rtol=0)


def test_top_k_one_samples_the_greedy_token_but_reports_full_vocabulary_logprob():
    model = tiny_model()
    ids, mask = ragged_prompts()
    greedy = generate(
        model, ids, mask, SamplingConfig(max_new_tokens=6, temperature=0.0), eos_token_id=[], pad_token_id=PAD
    )
    top1 = generate(
        model,
        ids,
        mask,
        SamplingConfig(max_new_tokens=6, temperature=0.5, top_k=1),
        eos_token_id=[],
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(0),
    )

    assert torch.equal(top1.completion_ids, greedy.completion_ids)
    # The filtered distribution would give log p = 0; the contract reports log_softmax(logits / T).
    assert (top1.logprobs < 0).all()
    torch.testing.assert_close(
        top1.logprobs, completion_logprobs(model, top1, temperature=0.5), atol=LOGPROB_ATOL, rtol=0
    )


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    model = tiny_model()
    ids, mask = ragged_prompts()
    config = SamplingConfig(max_new_tokens=16, temperature=1.0, num_samples=2)

    def sample(seed: int) -> Rollout:
        return generate(
            model,
            ids,
            mask,
            config,
            eos_token_id=EOS,
            pad_token_id=PAD,
            generator=torch.Generator().manual_seed(seed),
        )

    first, again, other = sample(1), sample(1), sample(2)
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert torch.equal(first.logprobs, again.logprobs)
    assert not torch.equal(first.completion_ids, other.completion_ids)


def test_per_row_uniforms_give_a_row_the_same_sample_in_any_batch():
    # what makes rollouts independent of how a step's rows are split over processes and micro-batches
    model = tiny_model()
    ids, mask = ragged_prompts()
    config = SamplingConfig(max_new_tokens=16, temperature=1.0, num_samples=2)
    uniforms = row_uniforms(0, "test", 0, range(8), 16)  # [B * G, C]
    kw = dict(eos_token_id=EOS, pad_token_id=PAD)
    whole = generate(model, ids, mask, config, uniforms=uniforms, **kw)
    for rows in (slice(0, 2), slice(2, 4)):  # prompts 0-1 and 2-3, each with their own 4 rows of uniforms
        part = generate(model, ids[rows], mask[rows], config, uniforms=uniforms[rows.start * 2 : rows.stop * 2], **kw)
        c = part.completion_ids.shape[1]
        assert torch.equal(whole.completion_ids[rows.start * 2 : rows.stop * 2, :c], part.completion_ids)
        torch.testing.assert_close(whole.logprobs[rows.start * 2 : rows.stop * 2, :c], part.logprobs, rtol=0, atol=1e-5)
    assert not torch.equal(whole.completion_ids[0], whole.completion_ids[1]), "a group's rows differ"
    with pytest.raises(ValueError, match=r"uniforms must be \[B \* num_samples, max_new_tokens\] = \[8, 16\]"):
        generate(model, ids, mask, config, uniforms=uniforms[:, :4], **kw)


def test_a_generator_draws_one_uniform_per_row_per_step_in_step_order():
    # The generator path is the uniforms path fed from one stream: seeds keep their samples across engines.
    model = tiny_model()
    ids, mask = ragged_prompts()
    config = SamplingConfig(max_new_tokens=12, temperature=1.0, num_samples=2)
    g = torch.Generator().manual_seed(3)
    uniforms = torch.stack([torch.rand(8, generator=g) for _ in range(12)], dim=1)  # [N, C], step-major draws
    kw = dict(eos_token_id=[EOS, 2, 3], pad_token_id=PAD)
    seeded = generate(model, ids, mask, config, generator=torch.Generator().manual_seed(3), **kw)
    given = generate(model, ids, mask, config, uniforms=uniforms, **kw)
    assert torch.equal(seeded.completion_ids, given.completion_ids)
    assert torch.equal(seeded.logprobs, given.logprobs)


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "t1"])
def test_compiled_decoding_gives_the_eager_samples_and_one_graph_serves_every_shape(temperature):
    from torch._dynamo.utils import counters

    model = tiny_model()
    graphs = [counters["stats"]["unique_graphs"]]
    # a second batch with other prompt lengths, batch size and max_new_tokens must not compile again
    for lengths, new_tokens in (((7, 3, 5, 1), 10), ((9, 2, 4), 6)):
        ids, mask = ragged_prompts(lengths)
        eager_config = SamplingConfig(max_new_tokens=new_tokens, temperature=temperature, num_samples=2)
        uniforms = row_uniforms(0, "test", 0, range(2 * len(lengths)), new_tokens)
        free = generate(model, ids, mask, eager_config, eos_token_id=[], pad_token_id=PAD, uniforms=uniforms)
        # a token row 0 emits at step 2 ends it there, so rows stop at different steps
        kw = dict(eos_token_id=[EOS, int(free.completion_ids[0, 2])], pad_token_id=PAD, uniforms=uniforms)
        eager = generate(model, ids, mask, eager_config, **kw)
        compiled = generate(model, ids, mask, dataclasses.replace(eager_config, compile=True), **kw)
        graphs.append(counters["stats"]["unique_graphs"])
        assert torch.equal(compiled.completion_ids, eager.completion_ids)
        assert torch.equal(compiled.completion_mask, eager.completion_mask)
        torch.testing.assert_close(compiled.logprobs, eager.logprobs, rtol=0, atol=1e-5)
        assert eager.completion_lengths[0] <= 3 and not eager.completion_mask.all()
    assert graphs[1] > graphs[0] and graphs[2] == graphs[1]  # compiled once, for the first batch only
    if temperature == 0.0:  # and still the HF greedy contract
        expected = model.generate(
            input_ids=ids,
            attention_mask=mask.long(),
            do_sample=False,
            max_new_tokens=6,
            pad_token_id=PAD,
            eos_token_id=kw["eos_token_id"],
        )[:, ids.shape[1] :]
        assert torch.equal(compiled.completion_ids[::2], expected)


def test_compile_decodes_eagerly_with_a_warning_where_it_cannot_compile():
    model = tiny_model()
    ids, mask = ragged_prompts()
    kw = dict(eos_token_id=EOS, pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    eager = generate(model, ids, mask, SamplingConfig(max_new_tokens=6), **kw)
    wrapped = ForceTokens(model)  # not a transformers model: no static-cache support to rely on
    with pytest.warns(UserWarning, match="ForceTokens does not support a static KV cache.*decoding eagerly"):
        kw["generator"] = torch.Generator().manual_seed(0)
        fallback = generate(wrapped, ids, mask, SamplingConfig(max_new_tokens=6, compile=True), **kw)
    assert torch.equal(fallback.completion_ids, eager.completion_ids)


def test_compile_needs_transformers_5(monkeypatch):
    monkeypatch.setattr("opd_lightning.rollout.version", lambda package: "4.57.1")
    with pytest.raises(ValueError, match="compile: true needs transformers >= 5.*found 4.57.1.*set compile: false"):
        SamplingConfig(compile=True)
    SamplingConfig(compile=False)  # the eager loop works with any supported version


def test_eos_rows_are_masked_after_eos_and_padded():
    model = tiny_model()
    ids, mask = ragged_prompts()
    eos = [EOS, 7]
    # Row 0 stops at step 0, row 1 at step 3 (with the second EOS id), row 2 at step 5, row 3 never.
    wrapped = ForceTokens(model, force=[0, 3, 5, None], tokens=[EOS, 7, EOS, EOS])
    rollout = generate(
        wrapped,
        ids,
        mask,
        SamplingConfig(max_new_tokens=8),
        eos_token_id=eos,
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(0),
    )

    lengths = torch.tensor([1, 4, 6, 8])
    assert rollout.completion_ids.shape == (4, 8)
    assert torch.equal(rollout.completion_lengths, lengths)
    assert rollout.is_truncated.tolist() == [False, False, False, True]
    expected_mask = torch.arange(8)[None, :] < lengths[:, None]
    assert torch.equal(rollout.completion_mask, expected_mask)
    assert rollout.completion_ids[0, 0] == EOS and rollout.completion_ids[1, 3] == 7
    assert rollout.completion_ids[2, 5] == EOS
    assert (rollout.completion_ids[~expected_mask] == PAD).all()
    assert (rollout.logprobs[~expected_mask] == 0).all()
    # A forced EOS has probability ~1.
    assert rollout.logprobs[0, 0] > -1e-3
    assert rollout.num_completion_tokens == int(lengths.sum())
    assert torch.equal(rollout.input_ids, torch.cat([rollout.prompt_ids, rollout.completion_ids], 1))
    assert torch.equal(rollout.attention_mask[:, ids.shape[1] :], expected_mask)


def test_decoding_stops_once_every_row_is_done():
    model = tiny_model()
    ids, mask = ragged_prompts()
    wrapped = ForceTokens(model, force=[1, 4, 2, 0], tokens=[EOS] * 4)
    rollout = generate(
        wrapped,
        ids,
        mask,
        SamplingConfig(max_new_tokens=32),
        eos_token_id=EOS,
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(0),
    )

    assert wrapped.calls == 5  # prefill + 4 decode steps, not 32
    assert rollout.completion_ids.shape == (4, 5)
    assert rollout.completion_lengths.tolist() == [2, 5, 3, 1]
    assert not rollout.is_truncated.any()


def test_stop_string_ends_a_row_at_the_token_that_completes_it():
    model = tiny_model()
    tokenizer = char_tokenizer()
    ids, mask = ragged_prompts()
    base = SamplingConfig(max_new_tokens=20, temperature=1.0)

    def sample(config: SamplingConfig) -> Rollout:
        return generate(
            model,
            ids,
            mask,
            config,
            eos_token_id=[],
            pad_token_id=PAD,
            tokenizer=tokenizer,
            generator=torch.Generator().manual_seed(0),
        )

    free = sample(base)
    text = free.decode(tokenizer)[0]
    stop = text[5:8]
    stopped = sample(SamplingConfig(max_new_tokens=20, temperature=1.0, stop_strings=(stop,)))

    first_end = text.index(stop) + len(stop)  # one character per token
    assert stopped.completion_lengths[0] == first_end
    assert stopped.decode(tokenizer)[0] == text[:first_end]
    assert not stopped.is_truncated[0]
    # Rows are independent: sampling is identical up to the stop.
    assert torch.equal(stopped.completion_ids[0, :first_end], free.completion_ids[0, :first_end])


def test_decode_drops_special_tokens():
    tokenizer = char_tokenizer()
    model = ForceTokens(tiny_model(), force=[2, None], tokens=[EOS, EOS])
    ids, mask = ragged_prompts(lengths=(3, 2))
    rollout = generate(
        model,
        ids,
        mask,
        SamplingConfig(max_new_tokens=4),
        eos_token_id=EOS,
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(0),
    )

    texts = rollout.decode(tokenizer)
    assert [len(t) for t in texts] == [2, 4]  # EOS of row 0 dropped, no pad text


def test_num_samples_groups_are_contiguous_and_carry_prompt_index_and_domain():
    model = tiny_model()
    ids, mask = ragged_prompts(lengths=(4, 2, 3))
    rollout = generate(
        model,
        ids,
        mask,
        SamplingConfig(max_new_tokens=6, num_samples=4),
        eos_token_id=EOS,
        pad_token_id=PAD,
        domains=["math", "code", "chat"],
        generator=torch.Generator().manual_seed(0),
    )

    assert len(rollout) == 12
    assert rollout.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert rollout.domains == ["math"] * 4 + ["code"] * 4 + ["chat"] * 4
    assert torch.equal(rollout.prompt_ids, ids.repeat_interleave(4, dim=0))
    assert torch.equal(rollout.prompt_mask, mask.repeat_interleave(4, dim=0))
    group = rollout.completion_ids[:4]
    assert len({tuple(row) for row in group.tolist()}) > 1  # a group holds distinct samples


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("temperature", -0.5),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("num_samples", 0),
        ("stop_strings", ("",)),
    ],
)
def test_sampling_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})


def test_generate_rejects_right_padding_and_stop_strings_without_tokenizer():
    model = tiny_model()
    ids, mask = ragged_prompts()
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, mask.flip(1), SamplingConfig(), eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, ids, mask, SamplingConfig(stop_strings=("x",)), eos_token_id=EOS, pad_token_id=PAD)


def test_sampling_runs_in_eval_mode_and_restores_each_modules_mode():
    model = tiny_model(attention_dropout=0.5)
    model.train()
    model.model.layers[0].eval()  # a frozen piece that must stay in eval afterwards
    before = {name: m.training for name, m in model.named_modules()}
    seen = []
    model.register_forward_pre_hook(
        lambda module, args: seen.append(any(m.training for m in module.modules()))
    )
    ids, mask = ragged_prompts()

    generate(model, ids, mask, SamplingConfig(max_new_tokens=3), eos_token_id=EOS, pad_token_id=PAD)

    assert seen and not any(seen)
    assert {name: m.training for name, m in model.named_modules()} == before


def _sync_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        stop_at = 1 if rank == 0 else 6  # rank 0 finishes early, rank 1 late
        ids, mask = ragged_prompts(seed=rank)
        results = {}
        for sync in (True, False):
            wrapped = ForceTokens(tiny_model(), force=[stop_at, stop_at - 1, 0, stop_at], tokens=[EOS] * 4)
            rollout = generate(
                wrapped,
                ids,
                mask,
                SamplingConfig(max_new_tokens=12, sync_ranks=sync),
                eos_token_id=EOS,
                pad_token_id=PAD,
                generator=torch.Generator().manual_seed(rank),
            )
            results[sync] = (
                wrapped.calls,
                rollout.completion_ids,
                rollout.completion_mask,
                rollout.is_truncated,
            )
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.multiprocess
def test_sync_ranks_makes_every_rank_call_forward_equally_often(tmp_path):
    # fork, not spawn: re-importing torch and transformers in fresh interpreters cost ~15 s here.
    torch.multiprocessing.start_processes(
        _sync_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="fork"
    )
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    calls_synced = [r[True][0] for r in results]
    assert calls_synced == [7, 7]  # prefill + 6 decode steps on both ranks
    assert [r[False][0] for r in results] == [2, 7]  # without it, rank 0 stops early
    for rank, stop_at in enumerate((1, 6)):
        _, ids, mask, truncated = results[rank][True]
        lengths = torch.tensor([stop_at, stop_at - 1, 0, stop_at]) + 1
        assert ids.shape == (4, 7)
        assert torch.equal(mask, torch.arange(7)[None, :] < lengths[:, None])
        assert (ids[~mask] == PAD).all() and not truncated.any()
        _, unsynced_ids, _, _ = results[rank][False]
        width = unsynced_ids.shape[1]
        assert torch.equal(ids[:, :width], unsynced_ids)  # extra lockstep steps change nothing


def _brute_force_cost(groups, prompt_lengths, completion_lengths):
    from opd_lightning.rollout import GROUP_OVERHEAD_TOKENS

    return sum(len(g) * int(prompt_lengths[g].max() + completion_lengths[g].max()) for g in groups) + (
        GROUP_OVERHEAD_TOKENS * len(groups)
    )


def test_length_groups_partition_the_rows_at_the_least_padded_cost():
    from itertools import combinations

    from opd_lightning.rollout import length_groups

    g = torch.Generator().manual_seed(0)
    # two populations, like the tiny world's ~17-token math and ~52-token string prompts
    prompts = torch.cat([torch.randint(15, 19, (20,), generator=g), torch.randint(47, 68, (20,), generator=g)])
    completions = torch.cat([torch.randint(2, 5, (20,), generator=g), torch.randint(6, 27, (20,), generator=g)])
    perm = torch.randperm(40, generator=g)
    prompts, completions = prompts[perm], completions[perm]
    groups = length_groups(prompts, completions, max_groups=3)
    assert sorted(torch.cat(groups).tolist()) == list(range(40)), "every row exactly once"
    assert 2 <= len(groups) <= 3
    # brute force over every split of the rows sorted by prompt length into at most 3 contiguous groups
    order = torch.argsort(prompts, stable=True)
    best = min(
        _brute_force_cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, 40))], prompts, completions)
        for k in range(3)
        for cuts in combinations(range(1, 40), k)
    )
    assert _brute_force_cost(groups, prompts, completions) == best
    # one group when asked, and when splitting cannot pay for the extra forward
    assert [len(x) for x in length_groups(prompts, completions, max_groups=1)] == [40]
    same = length_groups(torch.full((8,), 20), torch.full((8,), 3), max_groups=4)
    assert len(same) == 1


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
def test_grouped_completion_logits_equal_one_padded_forward(family):
    """Rows of very different lengths go through several cut-down forwards; the logits at every real
    completion position are those of the one padded forward over the whole batch."""
    from opd_lightning.rollout import _forward_completion, completion_logits, length_groups

    model = tiny_model(family=family)
    prompts, prompt_mask = ragged_prompts(lengths=(40, 3, 38, 2, 39, 4, 41, 3))
    config = SamplingConfig(max_new_tokens=12, temperature=1.0)
    rollout = generate(model, prompts, prompt_mask, config, eos_token_id=[EOS, 2, 3, 4, 5], pad_token_id=PAD,
                       generator=torch.Generator().manual_seed(1))  # fmt: skip
    c = rollout.completion_ids.shape[1]
    mask = rollout.attention_mask
    assert len(length_groups(mask[:, :-c].sum(1), mask[:, -c:].sum(1), 4)) > 1, "the batch is split"
    with torch.no_grad():
        grouped = completion_logits(model, rollout.input_ids, rollout.attention_mask, c)
        padded = _forward_completion(model, rollout.input_ids, rollout.attention_mask, c)
    assert grouped.shape == padded.shape
    m = rollout.completion_mask
    assert not m.all(), "some rows end early, so some positions are cut"
    torch.testing.assert_close(grouped[m], padded[m], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["qwen3", "llama", "gpt2"])
def test_lazy_completion_logits_are_the_lm_head_of_the_same_forward(family):
    """Hidden states + LM head (the O(k)-memory scoring path) reproduce the dense teacher-forced logits at every
    real completion position, ragged batch and length groups included, with the same gradient."""
    from opd_lightning.ops import HiddenLogits
    from opd_lightning.rollout import completion_logits, lazy_completion_logits

    model = tiny_model(family=family)  # eval: no dropout, so two forwards agree
    prompts, prompt_mask = ragged_prompts(lengths=(40, 3, 38, 2, 39, 4))
    with torch.no_grad():
        rollout = generate(model, prompts, prompt_mask, SamplingConfig(max_new_tokens=6),
                           eos_token_id=[EOS, 2, 3, 4], pad_token_id=PAD, generator=torch.Generator().manual_seed(1))  # fmt: skip
    c, m = rollout.completion_ids.shape[1], rollout.completion_mask
    lazy = lazy_completion_logits(model, rollout.input_ids, rollout.attention_mask, c)
    dense = completion_logits(model, rollout.input_ids, rollout.attention_mask, c)
    assert isinstance(lazy, HiddenLogits) and lazy.shape == dense.shape
    torch.testing.assert_close(lazy.dense()[m], dense[m], atol=1e-5, rtol=0)
    (lazy_grad,) = torch.autograd.grad(lazy.dense()[m].logsumexp(-1).sum(), model.get_output_embeddings().weight)
    (dense_grad,) = torch.autograd.grad(dense[m].logsumexp(-1).sum(), model.get_output_embeddings().weight)
    torch.testing.assert_close(lazy_grad, dense_grad, atol=1e-5, rtol=1e-4)


def test_a_model_whose_logits_are_not_its_heads_output_stays_dense():
    """Gemma 2 soft-caps its logits (tanh): applying its LM head to the hidden states would be wrong, so
    lazy_completion_logits falls back to the dense forward, and a plain model keeps its training mode."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from opd_lightning.rollout import completion_logits, lazy_completion_logits, output_head

    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=PAD,
                          final_logit_softcapping=2.0)  # fmt: skip
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(config)
    assert output_head(gemma) is None and gemma.training
    prompts, mask = ragged_prompts()
    out = lazy_completion_logits(gemma, prompts, mask, 2)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, completion_logits(gemma, prompts, mask, 2))
    qwen = tiny_model().train()
    assert output_head(qwen) is qwen.get_output_embeddings() and qwen.training


@pytest.mark.slow
def test_compiled_forwards_give_the_eager_logits_and_gradients_and_one_graph_serves_every_shape():
    """compile_forwards: the policy's teacher-forced logits (with grad) and a frozen model's hidden states (without)
    equal the eager ones, and a second batch of other sizes and lengths compiles nothing new."""
    from torch._dynamo.utils import counters

    from opd_lightning.rollout import compile_forwards, completion_logits, lazy_completion_logits

    eager, compiled = tiny_model(), tiny_model()
    assert compile_forwards(compiled) is None
    graphs = [counters["stats"]["unique_graphs"]]
    for lengths, seed in (((40, 3, 38, 2, 39, 4), 1), ((9, 30, 4, 28, 7), 2)):
        prompts, prompt_mask = ragged_prompts(lengths)
        with torch.no_grad():
            rollout = generate(eager, prompts, prompt_mask, SamplingConfig(max_new_tokens=6 + seed),
                               eos_token_id=[EOS, 2, 3, 4], pad_token_id=PAD, generator=torch.Generator().manual_seed(seed))  # fmt: skip
        c, m = rollout.completion_ids.shape[1], rollout.completion_mask
        assert not m.all(), "rows end early: the batch is cut into length groups"
        out = {}
        for name, model in (("eager", eager), ("compiled", compiled)):
            model.zero_grad(set_to_none=True)
            logits = completion_logits(model, rollout.input_ids, rollout.attention_mask, c)
            logits[m].logsumexp(-1).sum().backward()
            with torch.no_grad():
                hidden = lazy_completion_logits(model, rollout.input_ids, rollout.attention_mask, c).hidden
            out[name] = (logits.detach()[m], hidden[m], [p.grad for p in model.parameters()])
        graphs.append(counters["stats"]["unique_graphs"])
        torch.testing.assert_close(out["compiled"][0], out["eager"][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out["compiled"][1], out["eager"][1], atol=1e-5, rtol=0)
        for got, want in zip(out["compiled"][2], out["eager"][2], strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert graphs[1] > graphs[0], "the forwards compiled"
    assert graphs[2] == graphs[1], "a batch of other sizes and lengths reused the graphs"


def test_compile_forwards_refuses_a_sharded_model_and_leaves_it_eager(monkeypatch):
    import opd_lightning.rollout as rollout_mod

    model = tiny_model()
    monkeypatch.setattr(rollout_mod, "is_sharded", lambda m: m is model)
    assert "FSDP2-sharded" in rollout_mod.compile_forwards(model)
    assert model not in rollout_mod._COMPILED_FORWARDS
    other = tiny_model()
    assert rollout_mod.compile_forwards(other) is None and other in rollout_mod._COMPILED_FORWARDS
