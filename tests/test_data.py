from collections import Counter

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
    for ids, mask, att in zip(batch.input_ids, batch.loss_mask, batch.attention_mask):
        answer = tiny_tokenizer.decode(ids[mask])
        assert answer.endswith("<|im_end|>")
        prompt = tiny_tokenizer.decode(ids[att & ~mask])
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
