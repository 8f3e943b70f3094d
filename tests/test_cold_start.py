"""ColdStart: the student learns its teachers' samples, so its own samples move into the teachers' top-k; teacher
samples are cached once on disk (atomically) and reused without the teachers, and refused once anything they
depend on changed; the correctness filter drops wrong samples; routing and tokenizer mistakes fail before
training."""

import json
import os
import shutil

import datasets
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from opd_lightning.cli import build_cli
from opd_lightning.data import PromptDataModule, TaskSpec
from opd_lightning.data.teacher_samples import CACHE_FORMAT, CACHE_META, TeacherSampleCache, model_fingerprint
from opd_lightning.models import build_tiny_model, build_tiny_tokenizer, load_tokenizer, tiny_corpus
from opd_lightning.rollout import SamplingConfig
from opd_lightning.stages import SFT, ColdStart, ColdStartConfig, WarmupLinearDecay
from tests.conftest import EASY_MATH, cpu_trainer
from tests.test_teachers import make_teacher

MATH = TaskSpec("basic_arithmetic", "math", config=EASY_MATH, size=2000, val_size=40)
STRING = TaskSpec(
    "spell_backward", "string", config=dict(min_word_len=3, max_word_len=4), size=500, val_size=8
)
TEACHER_SFT_STEPS = 80


@pytest.fixture(scope="module")
def teacher_dir(tiny_dir, tmp_path_factory):
    return sft_math_teacher(tiny_dir, tmp_path_factory.mktemp("teacher"), TEACHER_SFT_STEPS)


def sft_math_teacher(tiny_dir, root, steps: int):
    """A different tiny model (other init seed, the student's tokenizer) SFT'd briefly on easy sums, so its
    samples are structured ("7<|im_end|>") and right a fair share of the time."""
    tokenizer = load_tokenizer(tiny_dir)
    build_tiny_model(tokenizer, "1m", seed=1).save_pretrained(root / "init")
    tokenizer.save_pretrained(root / "init")
    L.seed_everything(1)
    sft = SFT(
        model=str(root / "init"),
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0),
        lr_scheduler=lambda o: WarmupLinearDecay(o, warmup_steps=10, min_ratio=0.1),
    )
    data = PromptDataModule(
        tokenizer=tokenizer,
        tasks=[MATH],
        train_format="sft",
        batch_size=64,
        steps_per_epoch=steps,
        max_prompt_length=32,
        max_answer_length=6,
    )
    trainer(root, steps).fit(sft, datamodule=data)
    sft.policy.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    return root / "hf"


def make(
    student, teachers, tasks=(MATH,), batch_size=32, sampling=None, lr=3e-3, steps_per_epoch=100, **config
):
    module = ColdStart(
        model=str(student),
        teachers={k: str(v) for k, v in teachers.items()},
        sampling=sampling or SamplingConfig(max_new_tokens=6, temperature=1.0),
        cold_start=ColdStartConfig(**config),
        optimizer=lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0),
    )
    module.eval_config.max_new_tokens = 6
    data = PromptDataModule(
        tokenizer=module.tokenizer,
        tasks=list(tasks),
        batch_size=batch_size,
        val_batch_size=40,
        steps_per_epoch=steps_per_epoch,
        max_prompt_length=32,
    )
    return module, data


def trainer(root, steps, callbacks=(), **kw):
    return cpu_trainer(root, steps, callbacks, **kw)


class Record(L.Callback):
    """Per-step logged scalars."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(
            {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        )


def count_calls(module):
    """Forward calls of every teacher, counted by a hook."""
    module.configure_model()
    calls = [0]
    for model in module.teachers.models.values():
        model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def params(module):
    return torch.cat([p.detach().flatten().clone() for p in module.policy.parameters()])


def spy_on_samples(module):
    """The rows each training step draws (from the cache or the teachers)."""
    drawn, take = [], module.teacher_samples
    module.teacher_samples = lambda batch, step: drawn.append(take(batch, step)) or drawn[-1]
    return drawn


def rewrite(path, data: bytes):
    """Replace a file as tools that save atomically do (a new inode, whatever the mtime resolution)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_cold_start_raises_topk_overlap_on_student_rollouts_and_lowers_nll_on_teacher_samples(
    tiny_dir, teacher_dir, tmp_path
):
    L.seed_everything(0)
    module, data = make(tiny_dir, {"math": teacher_dir})
    rec = Record()
    t = trainer(tmp_path, 40, [rec], limit_val_batches=1, val_check_interval=40)
    before = t.validate(module, datamodule=data, verbose=False)[0]
    t.fit(module, datamodule=data)
    after = {k: float(v) for k, v in t.callback_metrics.items()}
    for key in (
        "val/topk_overlap/math",
        "val/student_shared_mass/math",
        "val/teacher_shared_mass/math",
        "val/teacher_sample_nll/math",
        "val/teacher_accuracy/math",
    ):
        print(f"{key}: {before[key]:.3f} -> {after[key]:.3f}")
    nll = [s["train/nll"] for s in rec.steps]
    print(f"train nll {sum(nll[:5]) / 5:.3f} -> {sum(nll[-5:]) / 5:.3f}")
    assert (
        before["val/topk_overlap/math"] < 0.2
        and after["val/topk_overlap/math"] > before["val/topk_overlap/math"] + 0.3
    )
    assert after["val/student_shared_mass/math"] > before["val/student_shared_mass/math"] + 0.3
    assert after["val/teacher_sample_nll/math"] < 0.5 * before["val/teacher_sample_nll/math"]
    assert sum(nll[-5:]) < 0.5 * sum(nll[:5])
    assert before["val/teacher_accuracy/math"] == after["val/teacher_accuracy/math"]  # sampled once, reused


def test_cache_is_written_once_then_reused_without_calling_the_teacher(tiny_dir, teacher_dir, tmp_path):
    cache = tmp_path / "cache"
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, num_samples=2)
    module, data = make(
        tiny_dir,
        {"math": teacher_dir},
        batch_size=16,
        sampling=sampling,
        steps_per_epoch=2,  # 32 prompts per epoch: the cache's 40 reach into the second
        cache_dir=str(cache),
        cache_prompts=40,
    )
    calls = count_calls(module)
    trainer(tmp_path, 2).fit(module, datamodule=data)
    assert calls[0] > 0 and (cache / CACHE_META).is_file()
    rows = datasets.load_from_disk(str(cache / "shard-00000"))
    assert len(rows) == 40 * 2  # num_samples rows per prompt
    assert set(rows.column_names) >= {"prompt_ids", "completion_ids", "domain", "task", "teacher", "reward"}
    assert set(rows["teacher"]) == {"math"} and set(rows["domain"]) == {"math"}
    assert all(
        ids[-1] == module.tokenizer.eos_token_id
        for ids, cut in zip(rows["completion_ids"], rows["truncated"])
        if not cut
    )

    module, data = make(
        tiny_dir,
        {"math": teacher_dir},
        batch_size=16,
        sampling=sampling,
        cache_dir=str(cache),
        cache_prompts=40,
    )
    calls = count_calls(module)
    start = params(module)
    drawn = spy_on_samples(module)
    trainer(tmp_path, 3).fit(module, datamodule=data)
    assert calls[0] == 0, "the second run must not run the teacher"
    assert not torch.equal(start, params(module)), "the student trained on the cached samples"
    assert [len(d) for d in drawn] == [32, 32, 32]  # batch_size * num_samples rows per step
    cached = {tuple(c) for c in rows["completion_ids"]}
    assert all(tuple(r["completion_ids"]) in cached for d in drawn for r in d)

    module, data = make(
        tiny_dir,
        {"math": teacher_dir},
        batch_size=16,
        cache_dir=str(cache),
        cache_prompts=40,
        sampling=SamplingConfig(max_new_tokens=6, temperature=0.7, num_samples=2),
    )
    with pytest.raises(
        ValueError, match=r"cold_start.cache_dir=.*other settings \(differing: sampling.temperature\)"
    ):
        trainer(tmp_path, 1).fit(module, datamodule=data)


def test_cache_appears_atomically_even_when_generation_dies_midway(tiny_dir, teacher_dir, tmp_path):
    cache = tmp_path / "cache"
    module, data = make(
        tiny_dir, {"math": teacher_dir}, batch_size=16, cache_dir=str(cache), cache_prompts=48
    )
    module.configure_model()
    prefills = [0]

    def die(model, args, kwargs, output):
        prefills[0] += kwargs["input_ids"].shape[1] > 1  # one prefill per generate call
        if prefills[0] == 2:  # the second of three prompt batches
            raise RuntimeError("teacher died")

    module.teachers.models["math"].register_forward_hook(die, with_kwargs=True)
    with pytest.raises(RuntimeError, match="teacher died"):
        trainer(tmp_path, 1).fit(module, datamodule=data)
    assert not cache.exists(), "no half-written cache"

    module, data = make(
        tiny_dir, {"math": teacher_dir}, batch_size=16, cache_dir=str(cache), cache_prompts=48
    )
    trainer(tmp_path, 1).fit(module, datamodule=data)
    assert len(datasets.load_from_disk(str(cache / "shard-00000"))) == 48
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".cache")] == [], (
        "temporary folder removed"
    )
    assert json.loads((cache / CACHE_META).read_text())["cache_prompts"] == 48


def test_filter_correct_gives_wrong_teacher_samples_no_loss(tiny_dir, teacher_dir, tmp_path):
    # a cooler teacher is right more often, so every step has both kinds of samples
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.5)
    module, data = make(
        tiny_dir, {"math": teacher_dir}, batch_size=64, sampling=sampling, filter_correct=True
    )
    sampled = []
    sample = module.teacher_rows
    module.teacher_rows = lambda batch, **kw: sampled.append(sample(batch, **kw)) or sampled[-1]
    rec = Record()
    trainer(tmp_path, 3, [rec]).fit(module, datamodule=data)
    assert len(sampled) == len(rec.steps) == 3
    kept = sum(r["correct"] for rows in sampled for r in rows)
    print(f"teacher samples kept: {kept} of {3 * 64}")
    assert 0 < kept < 3 * 64, "the teacher is right sometimes, so there is something to filter"
    for rows, logged in zip(sampled, rec.steps):
        correct = [r for r in rows if r["correct"]]
        assert all(r["reward"] == 1.0 for r in correct)
        assert logged["train/frac_kept"] == pytest.approx(len(correct) / len(rows))
        # completion tokens in the loss (the causal shift drops none: completions follow the prompt)
        assert logged["train/completion_tokens"] == sum(len(r["completion_ids"]) for r in correct)

    # cache mode filters when reading: every drawn row is correct
    module, data = make(
        tiny_dir,
        {"math": teacher_dir},
        batch_size=16,
        filter_correct=True,
        cache_dir=str(tmp_path / "cache"),
        cache_prompts=64,
    )
    drawn = spy_on_samples(module)
    trainer(tmp_path, 2).fit(module, datamodule=data)
    correct = datasets.load_from_disk(str(tmp_path / "cache" / "shard-00000"))["correct"]
    assert not all(correct) and len(module.cache.kept) == sum(correct)
    assert all(r["correct"] for d in drawn for r in d)


def test_cache_of_only_wrong_samples_with_filter_correct_is_an_error(tiny_dir, tmp_path):
    # the untrained tiny model as teacher never answers correctly
    module, data = make(
        tiny_dir,
        {"math": tiny_dir},
        batch_size=16,
        filter_correct=True,
        cache_dir=str(tmp_path / "cache"),
        cache_prompts=16,
    )
    with pytest.raises(ValueError, match="filter_correct keeps nothing"):
        trainer(tmp_path, 1).fit(module, datamodule=data)


def test_resumed_cached_run_draws_the_same_rows_and_ends_with_the_same_weights(
    tiny_dir, teacher_dir, tmp_path
):
    cache = tmp_path / "cache"

    def run(steps, root, ckpt_path=None):
        L.seed_everything(0)
        module, data = make(
            tiny_dir, {"math": teacher_dir}, batch_size=8, cache_dir=str(cache), cache_prompts=20
        )
        drawn = spy_on_samples(module)
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_last=True, save_top_k=-1)
        # weights_only=False: built in Python (not by the CLI), the hparams hold config dataclasses
        trainer(root, steps, [ckpt], enable_checkpointing=True).fit(
            module, datamodule=data, ckpt_path=ckpt_path, weights_only=False
        )
        return module, drawn

    straight, drawn_straight = run(6, tmp_path / "straight")  # 48 rows: more than one pass over the 20
    run(4, tmp_path / "interrupted")
    resumed, drawn_resumed = run(
        6, tmp_path / "interrupted", str(tmp_path / "interrupted" / "ckpt" / "last.ckpt")
    )
    assert drawn_resumed == drawn_straight[4:]
    assert not any(
        k.startswith("teachers.")
        for k in torch.load(tmp_path / "interrupted" / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    )
    torch.testing.assert_close(params(straight), params(resumed), rtol=0, atol=1e-6)


def test_resumed_on_the_fly_run_samples_the_same_rows_and_ends_with_the_same_weights(tiny_dir, tmp_path):
    teacher = make_teacher(tiny_dir, tmp_path / "teacher", seed=1)

    def run(steps, root, ckpt_path=None):
        L.seed_everything(0)
        module, data = make(tiny_dir, {"math": teacher}, batch_size=4, steps_per_epoch=10)
        drawn, rec = spy_on_samples(module), Record()
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_last=True, save_top_k=-1)
        # weights_only=False: built in Python (not by the CLI), the hparams hold config dataclasses
        trainer(root, steps, [ckpt, rec], enable_checkpointing=True).fit(
            module, datamodule=data, ckpt_path=ckpt_path, weights_only=False
        )
        return module, drawn, [step["train/loss"] for step in rec.steps]

    straight, drawn_straight, losses_straight = run(5, tmp_path / "straight")
    run(2, tmp_path / "interrupted")
    resumed, drawn_resumed, losses_resumed = run(
        5, tmp_path / "interrupted", str(tmp_path / "interrupted" / "ckpt" / "last.ckpt")
    )
    assert drawn_resumed == drawn_straight[2:], "the teachers sample the same completions after resuming"
    assert losses_resumed == pytest.approx(losses_straight[2:], abs=1e-6)
    torch.testing.assert_close(params(straight), params(resumed), rtol=0, atol=1e-6)


def test_teacher_fingerprint_reads_the_whole_weight_file_and_the_generation_config(tmp_path):
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3", "transformers_version": "4.0"}))
    weights = bytearray(os.urandom(3 << 20))
    (folder / "model.safetensors").write_bytes(weights)
    before = model_fingerprint(folder)
    weights[len(weights) // 2] ^= 1  # one bit, beyond the first and last MiB
    rewrite(folder / "model.safetensors", bytes(weights))
    after = model_fingerprint(folder)
    assert after["weights"]["model.safetensors"] != before["weights"]["model.safetensors"]
    assert after["config"] == before["config"] and after["generation_config"] is None
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    assert model_fingerprint(folder)["generation_config"] is not None
    # the same config written by another transformers version: the samples do not change
    rewrite(folder / "config.json", json.dumps({"model_type": "qwen3", "transformers_version": "4.1"}).encode())
    assert model_fingerprint(folder)["config"] == before["config"]


def _cache_run(student, teacher, cache, tmp_path):
    module, data = make(student, {"math": teacher}, batch_size=8, cache_dir=str(cache), cache_prompts=8)
    trainer(tmp_path, 1).fit(module, datamodule=data)


def test_cache_is_refused_after_a_teacher_weight_changes_past_the_first_and_last_mib(tiny_dir, tmp_path):
    teacher, cache = tmp_path / "teacher", tmp_path / "cache"
    shutil.copytree(tiny_dir, teacher)
    _cache_run(tiny_dir, teacher, cache, tmp_path)
    weights = bytearray((teacher / "model.safetensors").read_bytes())
    assert len(weights) > 3 << 20
    weights[len(weights) // 2] ^= 1  # the low bit of one float32 weight
    rewrite(teacher / "model.safetensors", bytes(weights))
    with pytest.raises(
        ValueError, match=r"other settings \(differing: teachers\.math\.weights\.model\.safetensors\)"
    ):
        _cache_run(tiny_dir, teacher, cache, tmp_path)


def test_cache_is_refused_after_the_chat_template_changes(tiny_dir, tmp_path):
    student, teacher, cache = tmp_path / "student", tmp_path / "teacher", tmp_path / "cache"
    shutil.copytree(tiny_dir, student)
    shutil.copytree(tiny_dir, teacher)
    _cache_run(student, teacher, cache, tmp_path)
    # student and teacher change together (a teacher whose template differs from the student's is refused
    # earlier, by the tokenizer check); the edit renders the same prompts: only the template differs
    for model in (student, teacher):
        template = model / "chat_template.jinja"
        rewrite(template, template.read_bytes() + b"{# edited #}")
    with pytest.raises(
        ValueError, match=r"other settings \(differing: chat_template, tokenizer\.chat_template\.jinja\)"
    ):
        _cache_run(student, teacher, cache, tmp_path)


def test_a_cache_from_an_older_format_is_refused_saying_so(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / CACHE_META).write_text(json.dumps({"format": 1}))
    with pytest.raises(ValueError, match=rf"written in cache format 1, this version reads format {CACHE_FORMAT}"):
        TeacherSampleCache(tmp_path / "cache", {"format": CACHE_FORMAT}, filter_correct=False, seed=0, field="f")


def test_a_domain_without_teacher_is_an_error_at_setup_naming_it(tiny_dir, teacher_dir, tmp_path):
    module, data = make(tiny_dir, {"math": teacher_dir}, tasks=(MATH, STRING))
    with pytest.raises(
        ValueError, match=r"domain\(s\) \['string'\] with no teacher.*model.init_args.teachers"
    ):
        trainer(tmp_path, 1).fit(module, datamodule=data)
    assert module.policy is None, "failed before loading any model"


def test_a_teacher_with_another_tokenizer_is_refused_when_the_stage_is_built(tiny_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    build_tiny_tokenizer(tiny_corpus(num_per_task=50, seed=5), vocab_size=900).save_pretrained(other)
    with pytest.raises(ValueError, match=r"model.init_args.teachers.math: tokenizer does not match"):
        make(tiny_dir, {"math": other})


@pytest.mark.parametrize("field, value", [("cache_prompts", 0), ("overlap_k", 0), ("micro_batch_size", 0)])
def test_bad_cold_start_settings_name_their_field(field, value):
    with pytest.raises(ValueError, match=f"cold_start.{field}"):
        ColdStartConfig(**{field: value})


def test_tiny_yaml_builds_with_the_cli(tiny_dir, teacher_dir):
    teachers = json.dumps({"math": str(teacher_dir), "string": str(teacher_dir)})
    cli = build_cli(
        [
            "--config",
            "configs/tiny/defaults.yaml",
            "--config",
            "configs/tiny/cold_start.yaml",
            f"--model.init_args.model={tiny_dir}",
            f"--model.init_args.teachers={teachers}",
        ],
        run=False,
    )
    assert isinstance(cli.model, ColdStart) and cli.datamodule.train_format == "prompts"
    assert sorted(cli.model.teachers.routes) == ["math", "string"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_each_data_parallel_rank_samples_its_share_of_the_cache(tiny_dir, teacher_dir, tmp_path):
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    cache = tmp_path / "cache"
    module = ColdStart(  # no lambdas: the module is pickled into the spawned processes
        model=str(tiny_dir),
        teachers={"math": str(teacher_dir)},
        sampling=SamplingConfig(max_new_tokens=6),
        cold_start=ColdStartConfig(cache_dir=str(cache), cache_prompts=25),
    )
    data = PromptDataModule(tokenizer=module.tokenizer, tasks=[MATH], batch_size=8, steps_per_epoch=10)
    strategy = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=120))
    trainer(tmp_path, 2, strategy=strategy, devices=2).fit(module, datamodule=data)
    assert [len(datasets.load_from_disk(str(cache / f"shard-{r:05d}"))) for r in (0, 1)] == [13, 12]
    assert (cache / CACHE_META).is_file() and not (tmp_path / ".cache.tmp").exists()
