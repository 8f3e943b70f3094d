from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from opd_lightning.data import PromptDataModule, TaskSpec
from opd_lightning.data.tasks import build_task
from tests.conftest import EASY_MATH

MATH = TaskSpec("basic_arithmetic", "math", config=EASY_MATH, size=300, val_size=20)
STRING = TaskSpec("spell_backward", "string", config=dict(min_word_len=3, max_word_len=4), size=300, val_size=20)
OOD = TaskSpec("chain_sum", "math", aligned=False, config=dict(min_terms=3, max_terms=3, min_digits=1, max_digits=1),
               size=300, val_size=20)


def make(tok, **kw):
    kw.setdefault("tasks", [MATH, STRING, OOD])
    dm = PromptDataModule(tokenizer=tok, **kw)
    dm.setup("fit")
    return dm


def domains_of(dm, n):
    it = iter(dm.train_dataloader())
    return [d for _ in range(n) for d in next(it).domains]


def test_stream_is_deterministic_under_a_seed_and_changes_with_it(tiny_tokenizer):
    a = next(iter(make(tiny_tokenizer, seed=1).train_dataloader()))
    b = next(iter(make(tiny_tokenizer, seed=1).train_dataloader()))
    c = next(iter(make(tiny_tokenizer, seed=2).train_dataloader()))
    assert torch.equal(a.prompt_ids, b.prompt_ids) and a.tasks == b.tasks
    assert not torch.equal(a.prompt_ids, c.prompt_ids)


def test_stream_seed_varies_the_batches_but_not_the_items_or_the_held_out_split(tiny_tokenizer):
    base, same, other = make(tiny_tokenizer, seed=1), make(tiny_tokenizer, seed=1, stream_seed=1), \
        make(tiny_tokenizer, seed=1, stream_seed=7)
    for dm in (base, same, other):
        dm.setup()
    assert [e.prompt_ids for e in other.val_examples] == [e.prompt_ids for e in base.val_examples]
    assert {k: [e.prompt_ids for e in v] for k, v in other.train_pools.items()} == \
        {k: [e.prompt_ids for e in v] for k, v in base.train_pools.items()}
    a, b, c = (next(iter(dm.train_dataloader())) for dm in (base, same, other))
    assert torch.equal(a.prompt_ids, b.prompt_ids), "stream_seed defaults to seed"
    assert not torch.equal(a.prompt_ids, c.prompt_ids)


def test_ood_ratio_sets_the_share_of_each_batch(tiny_tokenizer):
    dm = make(tiny_tokenizer, ood_ratio=0.25, batch_size=16)
    it = iter(dm.train_dataloader())
    for _ in range(5):
        batch = next(it)
        assert int((~batch.aligned).sum()) == 4  # exactly 0.25 x 16
        assert all(t == "chain_sum" for t, a in zip(batch.tasks, batch.aligned.tolist()) if not a)


def test_domain_weights_set_the_domain_mix(tiny_tokenizer):
    counts = Counter(domains_of(make(tiny_tokenizer, domain_weights={"math": 3.0, "string": 1.0}, batch_size=50), 8))
    assert 0.68 < counts["math"] / 400 < 0.82


def test_validation_is_held_out_per_task_and_carries_tags(tiny_tokenizer):
    dm = make(tiny_tokenizer)
    val_q = {e.entry["question"] for e in dm.val_examples}
    train_q = {e.entry["question"] for pool in dm.train_pools.values() for e in pool}
    assert val_q and not (val_q & train_q)
    assert Counter(e.task for e in dm.val_examples) == {"basic_arithmetic": 20, "spell_backward": 20, "chain_sum": 20}
    batch = next(iter(dm.val_dataloader()))
    assert batch.prompt_ids.shape[0] == len(batch.domains) == len(batch.entries)
    assert (batch.prompt_mask[:, -1]).all(), "prompts are left-padded"


def test_sft_batches_mask_exactly_the_answer_and_eos(tiny_tokenizer):
    dm = make(tiny_tokenizer, train_format="sft", tasks=[MATH])
    batch = next(iter(dm.train_dataloader()))
    assert batch.prompt_mask[:, -1].all() and batch.completion_mask[:, 0].all(), "prompts left-, answers right-padded"
    for ids, mask, prompt_ids, prompt_mask in zip(batch.completion_ids, batch.completion_mask, batch.prompt_ids,
                                                  batch.prompt_mask):
        answer = tiny_tokenizer.decode(ids[mask])
        assert answer.endswith("<|im_end|>")
        prompt = tiny_tokenizer.decode(prompt_ids[prompt_mask])
        assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    # the answer tokens are what generation would produce after the generation prompt
    ex = dm.train_pools["basic_arithmetic"][0]
    assert tiny_tokenizer.decode(ex.answer_ids) == ex.entry["answer"] + "<|im_end|>"


def test_resumed_loader_continues_the_stream_where_it_stopped(tiny_tokenizer):
    dm = make(tiny_tokenizer, steps_per_epoch=10)
    full = [b.prompt_ids for b in dm.train_dataloader()]
    resumed = dm.train_dataloader()
    resumed.load_state_dict({"batches_processed": 4})
    rest = [b.prompt_ids for b in resumed]
    assert len(rest) == 6 and all(torch.equal(x, y) for x, y in zip(rest, full[4:]))


def step_questions(dm, step, batch_size, world, accumulate):
    """The questions of optimiser step `step`, micro-batch by micro-batch and rank by rank, in the order of the
    global batch (slice j * world + r), read through each rank's own train loader."""
    dm.batch_size, questions = batch_size, []
    loaders = []
    for rank in range(world):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, accumulate_grad_batches=accumulate)
        loaders.append(dm.train_dataloader())
        loaders[-1].load_state_dict({"batches_processed": step * accumulate})
    iters = [iter(loader) for loader in loaders]
    for _ in range(accumulate):
        for it in iters:
            questions += [entry["question"] for entry in next(it).entries]
    return questions


def test_a_steps_global_batch_is_the_same_at_any_split_into_processes_and_micro_batches(tiny_tokenizer):
    dm = make(tiny_tokenizer, ood_ratio=0.25, steps_per_epoch=12)
    for step in range(3):
        one = step_questions(dm, step, 16, world=1, accumulate=1)
        assert len(one) == 16
        assert one == step_questions(dm, step, 8, world=2, accumulate=1)  # 2 processes x 8
        assert one == step_questions(dm, step, 8, world=1, accumulate=2)  # 1 process x 8 x accumulation 2
        assert one == step_questions(dm, step, 4, world=2, accumulate=2)
    assert step_questions(dm, 0, 16, 1, 1) != step_questions(dm, 1, 16, 1, 1)


def test_steps_per_epoch_must_be_a_multiple_of_the_accumulation(tiny_tokenizer):
    dm = make(tiny_tokenizer, steps_per_epoch=5)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, accumulate_grad_batches=2)
    with pytest.raises(ValueError, match=r"data.steps_per_epoch=5 is not a multiple of "
                                         r"trainer.accumulate_grad_batches=2; make it one \(e.g. 4\)"):
        dm.setup("fit")


def test_jsonl_source_reads_local_rows(tiny_tokenizer, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(f'{{"q": "What is {i} plus one?", "a": "{i + 1}"}}\n' for i in range(30)))
    spec = TaskSpec("plus_one", "math", path=str(path), question_field="q", answer_field="a", val_size=5)
    dm = make(tiny_tokenizer, tasks=[spec], train_format="sft")
    assert len(dm.train_pools["plus_one"]) == 25 and len(dm.val_examples) == 5


# ------------------------------------------------------------------------------ bad input fails early


def test_unknown_task_name_is_an_error_with_a_suggestion():
    with pytest.raises(ValueError, match=r"data.tasks\[0\].name='basic_arithmetik' is not a reasoning_gym task.*basic_arithmetic"):
        PromptDataModule(tasks=[TaskSpec("basic_arithmetik", "math")])


def test_domain_weight_for_a_domain_without_tasks_is_an_error():
    with pytest.raises(ValueError, match=r"data.domain_weights has 'code'.*no teacher-aligned task"):
        PromptDataModule(tasks=[MATH], domain_weights={"math": 1.0, "code": 1.0})


def test_ood_ratio_without_ood_tasks_is_an_error():
    with pytest.raises(ValueError, match=r"data.ood_ratio > 0 but no task has `aligned: false`"):
        PromptDataModule(tasks=[MATH], ood_ratio=0.2)


def test_prompt_longer_than_max_prompt_length_is_an_error(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"data.max_prompt_length=5 is shorter than a prompt of task data.tasks\[0\]"):
        make(tiny_tokenizer, tasks=[MATH], max_prompt_length=5)


def test_empty_local_dataset_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match=r"data.tasks\[0\].path=.* is empty"):
        build_task(TaskSpec("empty", "math", path=str(path)), "data.tasks[0]").split(0)


def test_bad_reasoning_gym_config_names_the_field():
    with pytest.raises(ValueError, match=r"data.tasks\[0\].config for 'basic_arithmetic' is invalid"):
        build_task(TaskSpec("basic_arithmetic", "math", config=dict(min_digits=5, max_digits=1)),
                   "data.tasks[0]").split(0)


# ------------------------------------------------------------------------------ batch composition


def test_ood_prompts_take_random_positions_in_the_batch(tiny_tokenizer):
    dm = make(tiny_tokenizer, ood_ratio=0.25, batch_size=16)
    it = iter(dm.train_dataloader())
    positions = [tuple((~next(it).aligned).nonzero().flatten().tolist()) for _ in range(6)]
    # drawn first, OOD items used to sit at 0..3 in every batch: a position signal for the model to learn
    assert any(p != (0, 1, 2, 3) for p in positions), positions
    assert len(set(positions)) > 1
    assert all(len(p) == 4 for p in positions), "shuffling must not change the OOD share"


@pytest.mark.parametrize("tasks", [[OOD], [MATH, OOD]], ids=["only-ood-tasks", "aligned-and-ood-tasks"])
def test_ood_ratio_one_gives_all_ood_batches(tiny_tokenizer, tasks):
    dm = make(tiny_tokenizer, tasks=tasks, ood_ratio=1.0, batch_size=8)
    it = iter(dm.train_dataloader())
    for _ in range(3):
        batch = next(it)
        assert len(batch) == 8 and not batch.aligned.any()


def test_ood_share_rounding_up_to_the_whole_batch_still_draws(tiny_tokenizer):
    # 0.9 x 1 rounds stochastically to a batch that is all OOD most of the time
    dm = make(tiny_tokenizer, ood_ratio=0.9, batch_size=1)
    it = iter(dm.train_dataloader())
    shares = [int((~next(it).aligned).sum()) for _ in range(20)]
    assert set(shares) == {0, 1}


def test_aligned_share_without_an_aligned_task_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"data.ood_ratio=0.5 leaves room for teacher-aligned prompts.*ood_ratio: 1.0"):
        PromptDataModule(tasks=[OOD], ood_ratio=0.5)


def test_a_domain_whose_tasks_all_weigh_zero_is_refused(tiny_tokenizer):
    zero = TaskSpec("basic_arithmetic", "math", config=EASY_MATH, size=50, val_size=5, weight=0.0)
    with pytest.raises(ValueError, match=r"domain 'math' has no training item under a task of positive weight"):
        make(tiny_tokenizer, tasks=[zero])


# ------------------------------------------------------------------------------ custom data


def write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa_rows(n, domain=None):
    return [{"q": f"What is {i} plus one?", "a": str(i + 1), **({"domain": domain(i)} if domain else {})}
            for i in range(n)]


def test_per_row_domain_column_routes_each_row_to_its_domain(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", qa_rows(60, domain=lambda i: "even" if i % 2 == 0 else "odd"))
    spec = TaskSpec("mixed", path=str(path), question_field="q", answer_field="a", domain_field="domain", val_size=10)
    dm = make(tiny_tokenizer, tasks=[spec], domain_weights={"even": 3.0, "odd": 1.0}, batch_size=40)
    assert dm.domains == ["even", "odd"], "the DataModule's domains (metrics, teacher routes) come from the rows"

    def parity(example):
        return "even" if int(example.entry["answer"]) % 2 == 1 else "odd"  # answer = i + 1

    assert all(e.domain == parity(e) for e in dm.train_pools["mixed"] + dm.val_examples)
    assert {e.domain for e in dm.val_examples} == {"even", "odd"}
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(5)]
    for batch in batches:
        assert all(d == ("even" if int(e["answer"]) % 2 else "odd") for d, e in zip(batch.domains, batch.entries))
    share = Counter(d for b in batches for d in b.domains)["even"] / 200
    assert 0.65 < share < 0.85, "domain_weights apply to per-row domains"


def test_per_row_domain_weight_for_an_unknown_domain_names_the_known_ones(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", qa_rows(10, domain=lambda i: "a"))
    spec = TaskSpec("mixed", path=str(path), question_field="q", answer_field="a", domain_field="domain", val_size=2)
    with pytest.raises(ValueError, match=r"data.domain_weights has 'b'.*aligned domains: \['a'\]"):
        PromptDataModule(tasks=[spec], domain_weights={"b": 1.0})


def test_rows_without_a_domain_take_the_task_domain_or_are_refused(tiny_tokenizer, tmp_path):
    rows = qa_rows(20, domain=lambda i: "x" if i < 10 else "")
    path = write_jsonl(tmp_path / "some.jsonl", rows)
    spec = dict(path=str(path), question_field="q", answer_field="a", domain_field="domain", val_size=0)
    dm = make(tiny_tokenizer, tasks=[TaskSpec("some", "fallback", **spec)])
    assert dm.domains == ["fallback", "x"]
    with pytest.raises(ValueError, match=r"data.tasks\[0\]: line 11 of .*some.jsonl' has an empty 'domain'"):
        PromptDataModule(tasks=[TaskSpec("some", **spec)])


def test_per_row_domains_give_per_domain_validation_accuracy(tiny_dir, tiny_tokenizer, tmp_path):
    from opd_lightning.stages import SFT
    from tests.conftest import cpu_trainer

    path = write_jsonl(tmp_path / "mixed.jsonl", qa_rows(30, domain=lambda i: "even" if i % 2 == 0 else "odd"))
    spec = TaskSpec("mixed", path=str(path), question_field="q", answer_field="a", domain_field="domain", val_size=8)
    module = SFT(model=str(tiny_dir))
    module.eval_config.max_new_tokens = 2
    data = PromptDataModule(tokenizer=module.tokenizer, tasks=[spec], train_format="sft", val_batch_size=8)
    metrics = cpu_trainer(tmp_path, 1, limit_val_batches=1).validate(module, datamodule=data, verbose=False)[0]
    assert {"val/accuracy/even", "val/accuracy/odd"} <= set(metrics)


def test_save_to_disk_folder_is_read(tiny_tokenizer, tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(qa_rows(20))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(5))}).save_to_disk(str(tmp_path / "saved_dict"))
    common = dict(question_field="q", answer_field="a", val_size=2)
    dm = make(tiny_tokenizer, tasks=[TaskSpec("one", "math", path=str(tmp_path / "saved"), **common),
                                     TaskSpec("dict", "math", path=str(tmp_path / "saved_dict"), split="test", **common)])
    assert len(dm.train_pools["one"]) == 18 and len(dm.train_pools["dict"]) == 3
    with pytest.raises(ValueError, match=r"data.tasks\[0\].split='validation' is not in .*\['test', 'train'\]"):
        PromptDataModule(tasks=[TaskSpec("dict", "math", path=str(tmp_path / "saved_dict"), split="validation",
                                         **common)])


def test_malformed_jsonl_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "1+1?", "answer": "2"}\n\n{"question": "2+2?", "answer": 4,}\n')
    with pytest.raises(ValueError, match=r"data.tasks\[0\].path='.*bad.jsonl': line 3 is not valid JSON .*Fix that line"):
        PromptDataModule(tasks=[TaskSpec("bad", "math", path=str(path))])
    path.write_text('{"question": "1+1?", "answer": "2"}\n["2+2?", "4"]\n')
    with pytest.raises(ValueError, match=r"line 2 is a list, not a JSON object"):
        PromptDataModule(tasks=[TaskSpec("bad", "math", path=str(path))])


def test_missing_column_names_the_row_and_the_field_to_set(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", qa_rows(5))
    with pytest.raises(ValueError, match=r"line 1 of .* has no column 'question' \(it has \['a', 'q'\]\); set "
                                         r"data.tasks\[0\].question_field"):
        PromptDataModule(tasks=[TaskSpec("qa", "math", path=str(path))])


def test_the_encoding_cache_returns_what_encoding_makes_and_keys_on_the_chat_template(tiny_tokenizer, tmp_path,
                                                                                      monkeypatch):
    import copy

    from opd_lightning.data import datamodule

    calls = []
    encode = datamodule.encode_prompts
    monkeypatch.setattr(datamodule, "encode_prompts", lambda *a, **k: calls.append(1) or encode(*a, **k))
    fresh = make(tiny_tokenizer, train_format="sft")
    cached = make(tiny_tokenizer, train_format="sft", cache_dir=str(tmp_path))  # encodes and writes
    assert len(list(tmp_path.glob("*.pt"))) == 6, "one file per task and split"
    calls.clear()
    again = make(tiny_tokenizer, train_format="sft", cache_dir=str(tmp_path))  # reads
    assert not calls, "a second run with the same inputs encodes nothing"
    for dm in (cached, again):
        for task, pool in fresh.train_pools.items():
            assert [(e.prompt_ids, e.answer_ids) for e in dm.train_pools[task]] == [
                (e.prompt_ids, e.answer_ids) for e in pool]
        assert [e.prompt_ids for e in dm.val_examples] == [e.prompt_ids for e in fresh.val_examples]
    # another chat template makes other prompt tokens: another key, so it is encoded, not read
    other = copy.deepcopy(tiny_tokenizer)
    other.chat_template = "Q " + tiny_tokenizer.chat_template
    changed = make(other, train_format="sft", cache_dir=str(tmp_path))
    assert len(calls) == 6 and len(list(tmp_path.glob("*.pt"))) == 12
    assert changed.train_pools["basic_arithmetic"][0].prompt_ids != fresh.train_pools["basic_arithmetic"][0].prompt_ids
