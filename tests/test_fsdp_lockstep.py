"""Sharded (FSDP2) models decode and score in lockstep across ranks, whatever each rank's rows are.

A sharded forward all-gathers each layer's parameters, so a rank that skips a forward leaves the others
waiting: PLATFORM.md saw HF generate deadlock that way. Two gloo processes with a short timeout (a hang fails
the test instead of blocking CI); the ranks get different prompts, stop at different steps, route their
rows to different teachers and cut them into different numbers of forwards (a token budget). Sharded results
must equal the unsharded models' on the same rows.
"""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from opd_lightning.models import load_causal_lm, load_tokenizer
from opd_lightning.rollout import SamplingConfig, generate
from opd_lightning.sharding import ShardingConfig, is_sharded, shard_model
from opd_lightning.teachers import TeacherPool, forward_chunks
from tests import test_teachers

teachers = test_teachers.teachers  # the fixture: two tiny teachers on the student's tokenizer
TIMEOUT = datetime.timedelta(seconds=20)  # any wait this long is a hang, not slowness


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(rank: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=TIMEOUT)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_two_ranks(fn, *args) -> None:
    """`fn(rank, *args)` in two forked processes joined by gloo; an exception (or a timeout) in either fails."""
    mp.start_processes(_ranks, args=(_free_port(), fn, args), nprocs=2, start_method="fork")


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2,))


def _prompts(tokenizer, texts):
    ids = tokenizer([tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                   add_generation_prompt=True) for t in texts],
                    padding=True, return_tensors="pt")  # fmt: skip
    return ids.input_ids, ids.attention_mask.bool()


def _sampling_stops_at_different_steps(rank, tiny_dir, out):
    tokenizer = load_tokenizer(tiny_dir)
    policy = load_causal_lm(tiny_dir)
    shard_model(policy, _mesh(), ShardingConfig(), field="model.init_args.model")
    shard_model(policy, _mesh(), ShardingConfig(), field="model.init_args.model")  # idempotent
    assert is_sharded(policy) and sum(is_sharded(m) for m in policy.modules()) == 1 + policy.config.num_hidden_layers
    assert policy.lm_head.weight is policy.model.embed_tokens.weight, "tied embeddings stay one parameter"
    ids, mask = _prompts(tokenizer, [["What is 2 + 3?", "Spell cat backwards."][rank]] * (rank + 1))
    # rank 0 stops at its first token (every id ends it), rank 1 never stops early
    stop = list(range(len(tokenizer))) if rank == 0 else []
    config = SamplingConfig(max_new_tokens=7, temperature=0.0, sync_ranks=True)
    rollout = generate(policy, ids, mask, config, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
    torch.save({"lengths": rollout.completion_lengths, "width": rollout.completion_ids.shape[1]},
               f"{out}/rank{rank}.pt")  # fmt: skip


@pytest.mark.multiprocess
def test_sharded_sampling_keeps_ranks_in_lockstep_when_they_stop_at_different_steps(tiny_dir, tmp_path):
    run_two_ranks(_sampling_stops_at_different_steps, str(tiny_dir), str(tmp_path))
    zero, one = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert zero["lengths"].tolist() == [1] and one["lengths"].tolist() == [7, 7]
    assert zero["width"] == one["width"] == 7, "rank 0 kept decoding (padding) until rank 1 was done"


def _teachers_on_disjoint_rows(rank, tiny_dir, math_dir, string_dir, out):
    tokenizer = load_tokenizer(tiny_dir)
    pool = TeacherPool({"math": math_dir, "string": string_dir})
    pool.load(dtype="float32")
    plain = TeacherPool({"math": math_dir, "string": string_dir})
    plain.load(dtype="float32")
    for field, model in {m.yaml_field: m for m in pool.models.values()}.items():
        shard_model(model, _mesh(), ShardingConfig(), field=field, frozen=True)
    assert pool.sharded and not plain.sharded
    # rank 0 has three math prompts, rank 1 one string prompt: each teacher runs on one rank only
    texts, domains = (["What is 2 + 3?", "What is 4 + 1?", "What is 7 - 2?"], ["math"] * 3) if rank == 0 else (
        ["Spell dog backwards."], ["string"])
    ids, mask = _prompts(tokenizer, texts)
    config = SamplingConfig(max_new_tokens=6, temperature=1.0, num_samples=2)
    kw = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    sharded_rollout = pool.generate(ids, mask, domains, config, generator=torch.Generator().manual_seed(rank), **kw)
    plain_rollout = plain.generate(ids, mask, domains, config, generator=torch.Generator().manual_seed(rank), **kw)
    # micro-batches of one row: 6 teacher forwards on rank 0, 2 on rank 1, all on different teachers
    sharded_scores = pool.score(sharded_rollout, micro_batch_size=1)
    plain_scores = plain.score(sharded_rollout, micro_batch_size=1)
    # a token budget of two of the longest rows: rank 0's 6 math rows take several forwards, rank 1's 2 string
    # rows one, so each rank runs throw-away forwards of the other's teacher, as many as the other's real ones
    prompt_lengths, completion_lengths = sharded_rollout.prompt_mask.sum(-1), sharded_rollout.completion_mask.sum(-1)
    longest = (prompt_lengths + completion_lengths.clamp(min=1)).max()
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    budget = 2 * int(longest)
    rows = torch.arange(len(prompt_lengths))
    assert len(forward_chunks(rows, prompt_lengths, completion_lengths, None, budget)) == (3 if rank == 0 else 1)
    budget_scores = pool.score(sharded_rollout, token_budget=budget)
    torch.save({"sharded": sharded_rollout.completion_ids, "plain": plain_rollout.completion_ids,
                "sharded_logprobs": sharded_rollout.logprobs, "plain_logprobs": plain_rollout.logprobs,
                "sharded_scores": sharded_scores.logprobs, "plain_scores": plain_scores.logprobs,
                "budget_scores": budget_scores.logprobs}, f"{out}/rank{rank}.pt")  # fmt: skip


@pytest.mark.multiprocess
def test_sharded_teachers_sample_and_score_in_lockstep_when_ranks_route_to_different_teachers(
    tiny_dir, teachers, tmp_path
):
    math_dir, string_dir = teachers
    run_two_ranks(_teachers_on_disjoint_rows, str(tiny_dir), str(math_dir), str(string_dir), str(tmp_path))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        # the same samples as unsharded teachers with the same generator (the throw-away decode draws nothing)
        assert torch.equal(got["sharded"], got["plain"]), rank
        torch.testing.assert_close(got["sharded_logprobs"], got["plain_logprobs"], rtol=0, atol=1e-5)
        torch.testing.assert_close(got["sharded_scores"], got["plain_scores"], rtol=0, atol=1e-5)
        # forwards cut by a token budget, as many on each rank (a hang otherwise), score the same
        torch.testing.assert_close(got["budget_scores"], got["plain_scores"], rtol=0, atol=1e-5)
