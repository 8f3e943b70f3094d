"""Benchmarks: our OPD and GRPO steps against TRL's trainers on the same tiny models, and what a step costs.

    python tools/bench.py                          # everything (~12 min on the 2-core CPU), into artifacts/bench
    python tools/bench.py --quick --skip-trl       # smoke test: a few steps of each part, no TRL
    python tools/bench.py --only memory --before /work/main   # peak memory, this checkout against another

Setup (PLATFORM.md's): a 1M student and 10M teachers (`opd-tiny DIR --size 1m|10m`, teachers sharpened as trained
ones are), fp32, 1 torch thread, the tiny world's math and string prompts, 8 prompts x 32 new tokens per OPD step
(fully on-policy, full-vocabulary reverse KL, as TRL's DistillationTrainer with beta=1), 2 prompts x 4 completions
per GRPO step (dapo aggregation, no reference, as TRL's GRPOTrainer defaults). The systems compared run in
alternating rounds in one process, each round's first step a warm-up, so a machine shared with other work slows
them alike: read the ratios, not the seconds. Parts (``--only``):

* ``steps``: median s/step and completion tokens/s, ours vs TRL (OPD against DistillationTrainer and against
  GKDTrainer fully on-policy, lmbda=1, beta=1), and with ``--compile`` our steps compiled too; our OPD step's phases
  (sampling, student forward, teacher scoring, loss, backward, optimiser, logging); each of our steps' useful FLOPs
  (GRPO: sampling and the policy's forward and backward) against torch.mm's rate at the
  step's own shapes, measured in the same run.
* ``scaling``: our OPD step time against the completion length (32/64/128) and the number of teachers (1-4).
* ``memory``: peak memory of one OPD step (sampling, student forward, teacher scoring, loss, backward) at
  vocabularies 1k / 32k / 152k for each loss, each in a fresh process. Method: resident set size, glibc told to
  return every block over 64 KiB to the OS on free (``MALLOC_MMAP_THRESHOLD_``), the high-water mark reset
  (``/proc/self/clear_refs``) after a warm-up step; the figure is the peak over the step minus the resident size
  before it (weights and optimiser-free state excluded). ``--before PATH`` runs the same children against another
  checkout's package (e.g. the code before a change). TRL's DistillationTrainer and GKDTrainer steps are measured
  the same way on the same models and prompts (``trl_memory_child``), beside ours, unless ``--skip-trl``.

Writes ``bench.md`` (the tables), ``results.json`` and PNGs to ``--out``. Not a test: nothing here asserts speed.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

VOCABS = {"1k": 1024, "32k": 32768, "152k": 152064}
LOSSES = {  # name -> DistillConfig fields
    "sampled_reverse_kl": dict(loss="sampled_reverse_kl"),
    "top_k=8": dict(loss="reverse_kl", top_k=8),
    "reverse_kl (full V)": dict(loss="reverse_kl"),
    "forward_kl (full V)": dict(loss="forward_kl"),
    "generalized_jsd (full V)": dict(loss="generalized_jsd"),
}
# TRL's steps on the same work, for the memory table: TRL 1.16's DistillationTrainer has one loss, a generalized JSD
# over the full vocabulary, chunked (beta=1: reverse KL; its top-k support lives only in the experimental
# AsyncDistillationTrainer, which scores with a vLLM teacher server), and GKDTrainer materialises full logits
TRL_MEMORY = ("TRL DistillationTrainer (beta=1)", "TRL GKDTrainer (lmbda=1, beta=1)")
MATH = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2, operators=["+"], allow_parentheses=False,
            allow_negation=False)  # fmt: skip
TASKS = [  # (task, domain, config): the tiny world's aligned tasks, then OOD ones as extra domains for 3-4 teachers
    ("basic_arithmetic", "math", MATH),
    ("word_sequence_reversal", "string", dict(min_words=3, max_words=4)),
    ("chain_sum", "sum", dict(min_terms=3, max_terms=3, min_digits=1, max_digits=1)),
    ("spell_backward", "spell", dict(min_word_len=3, max_word_len=5)),
]


# ----------------------------------------------------------------------------------------------- set-up


def build_models(workdir: Path, teachers: int = 4) -> tuple[Path, list[Path]]:
    """The 1M student and up to 4 different 10M teachers on its tokenizer (built once under ``workdir``)."""
    import torch

    from opd_lightning.models import build_tiny, build_tiny_model, load_tokenizer

    student = build_tiny(workdir / "student-1m", "1m", seed=0)
    tokenizer = load_tokenizer(student)
    paths = []
    for seed in range(1, teachers + 1):
        out = workdir / f"teacher-10m-{seed}"
        if not (out / "config.json").exists():
            model = build_tiny_model(tokenizer, "10m", seed=seed)
            with torch.no_grad():
                model.model.norm.weight.mul_(4.0)  # peaked next-token distributions, as a trained teacher's
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
        paths.append(out)
    return student, paths


def datamodule(tokenizer, batch_size: int, domains: int = 2):
    from opd_lightning.data import PromptDataModule, TaskSpec

    tasks = [TaskSpec(name, domain, config=config, size=400, val_size=0) for name, domain, config in TASKS[:domains]]
    return PromptDataModule(tokenizer=tokenizer, tasks=tasks, batch_size=batch_size, steps_per_epoch=10_000,
                            max_prompt_length=64)  # fmt: skip


class StepTimer:
    """Wall time of each training step (a Lightning callback; TRL's trainers get :meth:`hf_callback`)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def begin(self) -> None:
        self._start = time.perf_counter()

    def end(self) -> None:
        self.times.append(time.perf_counter() - self._start)

    def lightning(self):
        import lightning as L

        timer = self

        class Callback(L.Callback):
            def on_train_batch_start(self, *args):
                timer.begin()

            def on_train_batch_end(self, *args):
                timer.end()

        return Callback()

    def hf_callback(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, *args, **kwargs):
                timer.begin()

            def on_step_end(self, *args, **kwargs):
                timer.end()

        return Callback()


class Phases:
    """Seconds spent in named calls during a step: functions are wrapped in place (and restored by ``close``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._undo: list = []

    def wrap(self, owner, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.add(label, time.perf_counter() - start)

        setattr(owner, attr, timed)
        self._undo.append(lambda: setattr(owner, attr, original))

    def add(self, label: str, seconds: float) -> None:
        self.seconds[label] = self.seconds.get(label, 0.0) + seconds

    def close(self) -> None:
        for undo in reversed(self._undo):
            undo()


def lightning_trainer(steps: int, callbacks):
    import lightning as L

    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                     num_sanity_val_steps=0, log_every_n_steps=10, callbacks=callbacks)  # fmt: skip


# --------------------------------------------------------------------------------------------- our steps


class OursOPD:
    """Our MultiExpertOPD step, with its phases timed and each step's real token counts kept (for FLOPs)."""

    def __init__(self, student: Path, teachers: list[Path], new_tokens: int = 32, batch: int = 8, loss=None,
                 compile: bool = False):  # fmt: skip
        import torch
        from lightning.pytorch.utilities import disable_possible_user_warnings

        from opd_lightning.rollout import SamplingConfig
        from opd_lightning.stages.opd import DistillConfig, MultiExpertOPD

        disable_possible_user_warnings()
        domains = [domain for _, domain, _ in TASKS]
        routes = {domains[i]: str(path) for i, path in enumerate(teachers[:-1])} | {"default": str(teachers[-1])}
        self.module = MultiExpertOPD(
            model=str(student), teachers=routes, distill=DistillConfig(**(loss or dict(loss="reverse_kl"))),
            sampling=SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, compile=compile),
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-5), **compiled_forwards(compile),
        )  # fmt: skip
        self.data = datamodule(self.module.tokenizer, batch, domains=max(2, len(teachers)))
        self.timer, self.phases, self.shapes = StepTimer(), Phases(), []

    def run(self, steps: int) -> None:
        import opd_lightning.stages.opd as opd

        m, phases = self.module, self.phases
        phases.wrap(m, "sample", "sampling")
        for forward in ("completion_logits", "lazy_completion_logits"):  # the stage imports one or both
            if hasattr(opd, forward):
                phases.wrap(opd, forward, "student forward")
        phases.wrap(m.teachers, "score", "teacher scoring")
        phases.wrap(opd, "distillation_loss", "loss")
        phases.wrap(opd.rewards, "verify", "reward")
        phases.wrap(m, "_log_routed", "logging")
        score = m.teachers.score

        def recording_score(rollout, **kwargs):  # real prompt / completion lengths of every step, for FLOPs
            p = rollout.prompt_mask.sum(-1).tolist()
            self.shapes.append((p, rollout.completion_mask.sum(-1).tolist()))
            return score(rollout, **kwargs)

        m.teachers.score = recording_score
        timer, add = self.timer, phases.add

        import lightning as L

        class Hooks(L.Callback):  # backward and optimiser step: Lightning runs them around training_step
            def on_before_backward(self, *a):
                self.t = time.perf_counter()

            def on_after_backward(self, *a):
                add("backward", time.perf_counter() - self.t)
                self.t = time.perf_counter()

            def on_train_batch_end(self, *a):
                add("optimiser + clip", time.perf_counter() - self.t)

        try:
            lightning_trainer(steps, [timer.lightning(), Hooks()]).fit(m, datamodule=self.data)
        finally:
            m.teachers.score = score
            phases.close()


def compiled_forwards(compile: bool) -> dict:
    """``compile_forwards`` for the stage where ``compile`` is set (absent from checkouts before it)."""
    return {"compile_forwards": True} if compile else {}


class OursGRPO:
    def __init__(self, student: Path, completions: int = 4, prompts: int = 2, new_tokens: int = 32,
                 compile: bool = False):  # fmt: skip
        import torch

        from opd_lightning.rollout import SamplingConfig
        from opd_lightning.stages.grpo import GRPO, GRPOConfig

        self.module = GRPO(model=str(student),
                           sampling=SamplingConfig(max_new_tokens=new_tokens, num_samples=completions, compile=compile),
                           grpo=GRPOConfig(loss_type="dapo", max_grad_norm=None),
                           optimizer=lambda p: torch.optim.AdamW(p, lr=1e-5), **compiled_forwards(compile))  # fmt: skip
        self.data = datamodule(self.module.tokenizer, prompts)
        self.timer, self.shapes = StepTimer(), []

    def run(self, steps: int) -> None:
        sample = self.module.sample

        def counted(*args, **kwargs):
            rollout = sample(*args, **kwargs)
            self.shapes.append((rollout.prompt_mask.sum(-1).tolist(), rollout.completion_mask.sum(-1).tolist()))
            return rollout

        self.module.sample = counted
        try:
            lightning_trainer(steps, [self.timer.lightning()]).fit(self.module, datamodule=self.data)
        finally:
            self.module.sample = sample


# ------------------------------------------------------------------------------------------------ TRL's


def trl_dataset(data, n: int = 400):
    from datasets import Dataset

    data.setup("fit")
    pools = list(data.train_pools.values())
    items = [pool[i % len(pool)].entry for i in range(n) for pool in pools][:n]  # the same prompts, interleaved
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": e["question"]}] for e in items],
        "answer": [str(e["answer"]) for e in items],
    })  # fmt: skip


def trl_common(out: Path, steps: int) -> dict:
    return dict(output_dir=str(out), max_steps=steps, learning_rate=1e-5, bf16=False, gradient_checkpointing=False,
                use_cpu=True, report_to="none", logging_steps=10, save_strategy="no", disable_tqdm=True,
                dataloader_pin_memory=False, seed=0, temperature=1.0)  # fmt: skip


class TRLTrainer:
    """A TRL trainer built once; :meth:`run` trains ``steps`` more steps (a fresh optimiser each call). Its sampling
    method ``sampler`` is wrapped to keep each step's completion-token count (``count`` of what it returns)."""

    def __init__(self, make, sampler: str = "_generate_and_score_completions",
                 count=lambda out: out["completion_mask"].sum()) -> None:  # fmt: skip
        self.make, self.trainer, self.timer = make, None, StepTimer()
        self.sampler, self.count = sampler, count
        self.tokens: list[int] = []

    def run(self, steps: int) -> None:
        if self.trainer is None:
            self.trainer = self.make(steps, [self.timer.hf_callback()])
            generate = getattr(self.trainer, self.sampler)

            def counted(*args, **kwargs):
                out = generate(*args, **kwargs)
                self.tokens.append(int(self.count(out)))
                return out

            setattr(self.trainer, self.sampler, counted)
        self.trainer.args.max_steps = steps
        self.trainer.train()


def trl_distillation(student: Path, teacher: Path, data, workdir: Path) -> TRLTrainer:
    def make(steps, callbacks):
        from transformers import AutoModelForCausalLM
        from trl import DistillationConfig, DistillationTrainer

        from opd_lightning.models import load_tokenizer

        tokenizer = load_tokenizer(student)
        tokenizer.padding_side = "left"
        args = DistillationConfig(**trl_common(workdir / "trl-distill", steps), per_device_train_batch_size=8,
                                  max_completion_length=32, beta=1.0)  # fmt: skip
        return DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student),
                                   teacher_model=AutoModelForCausalLM.from_pretrained(teacher), args=args,
                                   train_dataset=trl_dataset(data), processing_class=tokenizer,
                                   callbacks=callbacks)  # fmt: skip

    return TRLTrainer(make)


def trl_gkd(student: Path, teacher: Path, data, workdir: Path) -> TRLTrainer:
    """GKDTrainer fully on-policy (lmbda=1: every step samples from the student) with beta=1 (reverse KL), the
    same work as the DistillationTrainer row; its loss takes both models' full logits over the whole sequence."""

    def make(steps, callbacks):
        from datasets import Dataset
        from transformers import AutoModelForCausalLM
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        from opd_lightning.models import load_tokenizer

        tokenizer = load_tokenizer(student)
        tokenizer.padding_side = "left"
        prompts = trl_dataset(data)
        messages = [[*p, {"role": "assistant", "content": a}] for p, a in zip(prompts["prompt"], prompts["answer"])]
        args = GKDConfig(**trl_common(workdir / "trl-gkd", steps), per_device_train_batch_size=8, max_new_tokens=32,
                         lmbda=1.0, beta=1.0)  # fmt: skip
        return GKDTrainer(model=AutoModelForCausalLM.from_pretrained(student),
                          teacher_model=AutoModelForCausalLM.from_pretrained(teacher), args=args,
                          train_dataset=Dataset.from_dict({"messages": messages}), processing_class=tokenizer,
                          callbacks=callbacks)  # fmt: skip

    # it returns (ids, attention mask, labels), the labels -100 outside the completion
    return TRLTrainer(make, sampler="generate_on_policy_outputs", count=lambda out: (out[2] != -100).sum())


def trl_grpo(student: Path, data, workdir: Path, completions: int = 4, prompts: int = 2) -> TRLTrainer:
    def reward(completions, answer, **kwargs):  # exact answer anywhere in the text: cheap, as ours
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(a in t) for t, a in zip(texts, answer, strict=True)]

    def make(steps, callbacks):
        from transformers import AutoModelForCausalLM
        from trl import GRPOConfig, GRPOTrainer

        from opd_lightning.models import load_tokenizer

        tokenizer = load_tokenizer(student)
        tokenizer.padding_side = "left"
        args = GRPOConfig(**trl_common(workdir / "trl-grpo", steps), per_device_train_batch_size=prompts * completions,
                          num_generations=completions, max_completion_length=32, loss_type="dapo", beta=0.0)  # fmt: skip
        return GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(student), reward_funcs=reward, args=args,
                           train_dataset=trl_dataset(data), processing_class=tokenizer, callbacks=callbacks)  # fmt: skip

    return TRLTrainer(make)


# --------------------------------------------------------------------------------------------- FLOPs


def model_dims(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    per_layer = h * head_dim * (heads + 2 * kv) + heads * head_dim * h + 3 * h * inter  # matmul weights
    return dict(hidden=h, inter=inter, layers=layers, attn=heads * head_dim, body=layers * per_layer,
                head=h * config["vocab_size"])  # fmt: skip


def forward_flops(dims: dict, tokens: int, context: int, head_positions: int) -> float:
    """Matmul FLOPs of a forward: weights (2 per weight per token), attention scores and values (4 x attention
    width per (query, key) pair, ``context`` summed over queries), the LM head at ``head_positions`` only."""
    return 2 * dims["body"] * tokens + 4 * dims["layers"] * dims["attn"] * context + 2 * dims["head"] * head_positions


def opd_step_flops(student: dict, teacher: dict, prompts: list[int], completions: list[int]) -> dict[str, float]:
    """Useful FLOPs of one OPD step, on real tokens only (no padding): sampling (prefill, then one token at a time
    with a KV cache), teacher scoring, student forward and backward (2x the forward) at completion positions."""
    out = {"sampling": 0.0, "teacher scoring": 0.0, "student forward + backward": 0.0}
    for p, c in zip(prompts, completions, strict=True):
        out["sampling"] += forward_flops(student, p, p * (p + 1) // 2, 1)
        out["sampling"] += sum(forward_flops(student, 1, p + t + 1, 1) for t in range(max(c - 1, 0)))
        n, ctx = p + c, (p + c) * (p + c + 1) // 2
        out["teacher scoring"] += forward_flops(teacher, n, ctx, c)
        out["student forward + backward"] += 3 * forward_flops(student, n, ctx, c)
    return out


def grpo_step_flops(student: dict, prompts: list[int], completions: list[int]) -> dict[str, float]:
    """Useful FLOPs of one GRPO step (no reference model), on real tokens only: sampling and the policy's forward
    and backward, as in :func:`opd_step_flops`."""
    out = opd_step_flops(student, student, prompts, completions)
    return {"sampling": out["sampling"], "student forward + backward": out["student forward + backward"]}


def mm_rate(m: int, k: int, n: int, seconds: float = 0.3) -> float:
    """torch.mm FLOP/s at [m, k] x [k, n], fp32, this process's thread setting (median of repeats)."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times)


# -------------------------------------------------------------------------------------------- the parts


def alternate(systems: dict, rounds: int, steps: int) -> dict[str, list[float]]:
    """Each system runs ``steps`` steps per round, in turn; the first step of each round is dropped (warm-up)."""
    kept = {name: [] for name in systems}
    for _ in range(rounds):
        for name, system in systems.items():
            before = len(system.timer.times)
            system.run(steps)
            kept[name] += system.timer.times[before + 1 :]
    return kept


COMPILED = "ours OPD, compiled"
GRPO_COMPILED = "ours GRPO, compiled"


def part_steps(args, student: Path, teachers: list[Path]) -> dict:
    opd = OursOPD(student, teachers[:1])
    grpo = OursGRPO(student)
    systems = {"ours OPD": opd, "ours GRPO": grpo}
    if args.compile:  # sampling.compile + compile_forwards; the one-off compiles fall in the first round's warm-up
        systems[COMPILED] = OursOPD(student, teachers[:1], compile=True)
        systems[GRPO_COMPILED] = OursGRPO(student, compile=True)
    if not args.skip_trl:
        systems["TRL DistillationTrainer"] = trl_distillation(student, teachers[0], opd.data, args.workdir)
        systems["TRL GRPOTrainer"] = trl_grpo(student, grpo.data, args.workdir)
        systems["TRL GKDTrainer"] = trl_gkd(student, teachers[0], opd.data, args.workdir)
    times = alternate(systems, args.rounds, args.steps)
    medians = {name: statistics.median(t) for name, t in times.items()}
    ours = {name: system for name, system in systems.items() if name.startswith("ours")}
    tokens = {name: statistics.mean(sum(c) for _, c in system.shapes) for name, system in ours.items()}
    for name, system in systems.items():
        if isinstance(system, TRLTrainer) and system.tokens:
            tokens[name] = statistics.mean(system.tokens)

    # our OPD step's phases (per measured step)
    n_steps = len(opd.timer.times)
    phases = {k: v / n_steps for k, v in opd.phases.seconds.items()}
    phases["other (Lightning, data)"] = statistics.mean(opd.timer.times) - sum(phases.values())
    # each of our steps' useful FLOPs against torch.mm's rate at the step's own shapes: the time its work would take
    s_dims, t_dims = model_dims(student), model_dims(teachers[0])
    work = {}
    for name, system in ours.items():
        opd_like = isinstance(system, OursOPD)
        per_step = [opd_step_flops(s_dims, t_dims, p, c) if opd_like else grpo_step_flops(s_dims, p, c)
                    for p, c in system.shapes]  # fmt: skip
        flops = {k: statistics.mean(f[k] for f in per_step) for k in per_step[0]}
        rows = int(statistics.mean(sum(p) + sum(c) for p, c in system.shapes))  # a forward's rows: real tokens
        decode_rows = len(system.shapes[0][1])
        rates = {"sampling": mm_rate(decode_rows, s_dims["hidden"], s_dims["inter"]),
                 "teacher scoring": mm_rate(rows, t_dims["hidden"], t_dims["inter"]),
                 "student forward + backward": mm_rate(rows, s_dims["hidden"], s_dims["inter"])}  # fmt: skip
        work[name] = dict(flops=flops, rates={k: rates[k] for k in flops},
                          limit_seconds=sum(flops[k] / rates[k] for k in flops))  # fmt: skip
    return dict(medians=medians, times=times, tokens=tokens, phases=phases, work=work,
                flops=work["ours OPD"]["flops"], rates=work["ours OPD"]["rates"],
                limit_seconds=work["ours OPD"]["limit_seconds"])  # fmt: skip


def part_scaling(args, student: Path, teachers: list[Path]) -> dict:
    lengths = [32, 64] if args.quick else [32, 64, 128]
    counts = [1, 2] if args.quick else [1, 2, 3, 4]
    by_length = {n: OursOPD(student, teachers[:1], new_tokens=n) for n in lengths}
    by_teachers = {k: OursOPD(student, teachers[:k]) for k in counts}
    t_len = alternate({str(n): s for n, s in by_length.items()}, args.rounds, args.steps)
    t_teach = alternate({str(k): s for k, s in by_teachers.items()}, args.rounds, args.steps)
    return dict(
        length={n: statistics.median(t_len[str(n)]) for n in lengths},
        length_tokens={n: statistics.mean(sum(c) for _, c in s.shapes) for n, s in by_length.items()},
        teachers={k: statistics.median(t_teach[str(k)]) for k in counts},
    )


def memory_world(vocab: int):
    """What every memory cell shares: the 1M student and 10M teacher at ``vocab`` (random weights, same seeds) and
    8 left-padded prompts of the tiny world's length mix, ``(student, teacher, ids, mask, generator)``."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opd_lightning.models import TINY_SIZES

    torch.set_num_threads(1)

    def model(size: str, seed: int):
        torch.manual_seed(seed)
        config = Qwen3Config(vocab_size=vocab, max_position_embeddings=1024, tie_word_embeddings=True,
                             pad_token_id=0, bos_token_id=None, eos_token_id=None, **TINY_SIZES[size])  # fmt: skip
        return Qwen3ForCausalLM(config)

    student, teacher = model("1m", 0), model("10m", 1).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([16, 49, 18, 47, 20, 45, 33, 36])  # the tiny world's mix: mean 33, padded to 52 (+3)
    width = 52
    ids = torch.randint(1, vocab, (8, width), generator=g)
    mask = torch.arange(width)[None] >= (width - lengths)[:, None]
    return student, teacher, ids.masked_fill(~mask, 0), mask, g


def rss(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(field)


def peak(fn) -> tuple[float, object]:
    """``fn()``'s resident high-water mark over the resident size before it (MiB), and its result."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = rss("VmRSS")
    out = fn()
    return rss("VmHWM") - base, out


def memory_row(vocab: int, loss: str, stats: bool, student, sample, score_and_train, tokens) -> dict:
    """The peaks of ``sample()`` and ``score_and_train(its result)`` after a warm-up step; ``tokens`` counts a
    sample's completion tokens (the same 8 x 32 for every system: a check that they did the same work)."""
    grads = sum(p.numel() * p.element_size() for p in student.parameters()) / 2**20  # O(V x H): tied embedding
    score_and_train(sample())  # warm-up: lazy initialisations, the LM-head check
    sampling, rollout = peak(sample)
    scoring, _ = peak(lambda: score_and_train(rollout))
    return dict(vocab=vocab, loss=loss, stats=stats, sampling_mib=round(sampling, 1), step_mib=round(max(sampling, scoring), 1),
                scoring_mib=round(scoring, 1), rss_mib=round(rss("VmRSS"), 1), weight_grad_mib=round(grads, 1),
                completion_tokens=int(tokens(rollout)))  # fmt: skip


def memory_child(vocab: int, loss: str, stats: bool) -> dict:
    """One configuration's peak (run in a fresh process; see the module docstring for the method)."""
    if loss in TRL_MEMORY:
        return trl_memory_child(vocab, loss)
    import torch

    import opd_lightning.rollout as rollout_mod
    from opd_lightning.rollout import SamplingConfig, completion_logits, generate
    from opd_lightning.stages.opd import DistillConfig, distillation_loss
    from opd_lightning.teachers import TeacherPool

    student, teacher, ids, mask, g = memory_world(vocab)
    pool = TeacherPool({"default": tempfile.gettempdir()})
    pool.models["default"] = teacher
    config = DistillConfig(**LOSSES[loss])
    lazy = getattr(rollout_mod, "lazy_completion_logits", None)  # absent before the hidden-state path
    score_kwargs = {"stats": stats} if "stats" in inspect.signature(pool.score).parameters else {}
    # the full-vocabulary losses from hidden states too, where the checkout has them (as its training_step)
    lazy_full = "lazy_logits" in inspect.signature(pool.score).parameters
    score_kwargs |= {"lazy_logits": True} if lazy_full else {}

    def sample():
        with torch.no_grad():
            return generate(student, ids, mask, SamplingConfig(max_new_tokens=32), eos_token_id=[], pad_token_id=0,
                            domains=["x"] * 8, generator=g)  # fmt: skip

    def score_and_train(rollout):
        forward = completion_logits if (config.needs_teacher_logits and not lazy_full) or lazy is None else lazy
        c = rollout.completion_ids.shape[1]
        student_logits = forward(student, rollout.input_ids, rollout.attention_mask, c)
        wants_student = stats or config.top_k_from != "teacher"
        scores = pool.score(rollout, student_logits=student_logits.detach() if wants_student else None,
                            keep_logits=config.needs_teacher_logits, top_k=config.top_k, **score_kwargs)  # fmt: skip
        loss, _ = distillation_loss(config, student_logits, rollout, scores)
        loss.backward()
        student.zero_grad(set_to_none=True)

    return memory_row(vocab, loss, stats, student, sample, score_and_train, lambda r: r.completion_mask.sum())


def trl_memory_child(vocab: int, system: str) -> dict:
    """TRL's step on the same models and prompts, through its trainer's own methods: its sampling (transformers'
    ``generate``, 32 tokens forced as ours are by having no stop token) and its loss + backward (``compute_loss``:
    the teacher forward and the divergence). No gradient checkpointing, as ours."""
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    student, teacher, ids, mask, _ = memory_world(vocab)
    torch.manual_seed(0)  # TRL samples from the global generator
    # ids are given, never text: the tokenizer only names the pad and stop tokens
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1}, "<pad>")),
                                        pad_token="<pad>", eos_token="<eos>", padding_side="left")  # fmt: skip
    prompts = [row[m].tolist() for row, m in zip(ids, mask, strict=True)]
    common = trl_common(Path(tempfile.mkdtemp()), 1) | dict(per_device_train_batch_size=8, dataloader_num_workers=0)
    if system.startswith("TRL DistillationTrainer"):
        from trl import DistillationConfig, DistillationTrainer

        args = DistillationConfig(**common, max_completion_length=32, beta=1.0, generation_kwargs={"min_new_tokens": 32})
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                                      train_dataset=Dataset.from_dict({"prompt": ["x"] * 8}))  # fmt: skip
        trainer._tokenize_prompts = lambda texts: (prompts, None, {})

        def sample():
            return trainer._generate_and_score_completions([{"prompt": "x"}] * 8)

        def tokens(inputs):
            return inputs["completion_mask"].sum()

    else:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(**common, max_new_tokens=32, lmbda=1.0, beta=1.0)
        messages = [[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]] * 8
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_dict({"messages": messages}))  # fmt: skip
        trainer.generation_config.min_new_tokens = 32

        def sample():
            with torch.no_grad():
                batch = {"prompts": ids, "prompt_attention_mask": mask.long()}
                input_ids, attention_mask, labels = trainer.generate_on_policy_outputs(student, batch,
                                                                                       trainer.generation_config)  # fmt: skip
            return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

        def tokens(inputs):
            return (inputs["labels"] != -100).sum()

    trainer.model.train()

    def score_and_train(inputs):
        loss = trainer.compute_loss(trainer.model, inputs)
        trainer.accelerator.backward(loss)
        trainer.model.zero_grad(set_to_none=True)

    return memory_row(vocab, system, True, student, sample, score_and_train, tokens)


def measure_memory(root: Path, vocab: int, loss: str, stats: bool) -> dict:
    """:func:`memory_child` in a fresh process, with ``root``'s package and glibc returning freed blocks."""
    env = {**os.environ, "PYTHONPATH": str(root), "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--memory-child", str(vocab), loss, str(int(stats))]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def part_memory(args) -> list[dict]:
    vocabs = args.vocabs or (["1k"] if args.quick else list(VOCABS))
    checkouts = {"after": Path(__file__).resolve().parents[1]}
    if args.before:
        checkouts["before"] = Path(args.before)
    cells = []  # (version, root, vocab, loss, stats)
    for version, root in checkouts.items():
        for name in vocabs:
            for loss in args.losses or LOSSES:
                for stats in (True, False) if version == "after" and not args.quick else (True,):
                    cells.append((version, root, name, loss, stats))
    if not args.skip_trl:  # TRL's figures do not depend on our checkout: once, beside "after"
        cells += [("TRL", checkouts["after"], name, system, True) for name in vocabs for system in TRL_MEMORY]
    rows = []
    for version, root, name, loss, stats in cells:
        row = measure_memory(root, VOCABS[name], loss, stats) | {"version": version, "vocab_name": name}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ report


def report(results: dict, out: Path) -> str:
    lines = []
    if "steps" in results:
        r = results["steps"]
        med, tok = r["medians"], r["tokens"]
        work = r.get("work", {})
        lines += ["| step | s/step (median) | completion tokens/s | TRL's s/step over this | share of the fp32 limit |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for family, reference in (("OPD", "TRL DistillationTrainer"), ("GRPO", "TRL GRPOTrainer")):
            names = [n for n in med if n.startswith(f"ours {family}")]
            names += [n for n in med if n.startswith("TRL") and (family == "GRPO") == n.endswith("GRPOTrainer")]
            for name in names:
                rate = f"{tok[name] / med[name]:.0f}" if name in tok else "-"
                ratio = f"{med[reference] / med[name]:.2f}x" if reference in med and name.startswith("ours") else ""
                share = f"{work[name]['limit_seconds'] / med[name]:.0%}" if name in work else ""
                lines.append(f"| {name} | {med[name]:.3f} | {rate} | {ratio} | {share} |")
        step = med["ours OPD"]
        lines += ["", "Our OPD step by phase (mean per step):", "", "| phase | ms | share |", "|---|---|---|"]
        for name, seconds in sorted(r["phases"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {name} | {1e3 * seconds:.1f} | {seconds / step:.0%} |")
        lines += ["", "| useful work of our OPD step | GFLOP | torch.mm rate at its shapes (GFLOP/s) |", "|---|---|---|"]
        for name, flops in r["flops"].items():
            lines.append(f"| {name} | {flops / 1e9:.2f} | {r['rates'][name] / 1e9:.0f} |")
        lines += ["", f"At those rates the step's useful work takes {1e3 * r['limit_seconds']:.0f} ms: the step "
                      f"({1e3 * step:.0f} ms) runs at {r['limit_seconds'] / step:.0%} of the machine's fp32 limit."]  # fmt: skip
    if "scaling" in results:
        r = results["scaling"]
        lines += ["", "| completion length | s/step | completion tokens/step |", "|---|---|---|"]
        lines += [f"| {n} | {s:.3f} | {r['length_tokens'][n]:.0f} |" for n, s in r["length"].items()]
        lines += ["", "| teachers | s/step |", "|---|---|"]
        lines += [f"| {k} | {s:.3f} |" for k, s in r["teachers"].items()]
    if "memory" in results:
        rows = results["memory"]
        grads = {r["vocab_name"]: r["weight_grad_mib"] for r in rows}
        lines += ["", "Peak memory of one OPD step over the resident size before it (MiB; 8 x 32 completion tokens). "
                  "Every figure includes the student's weight gradient, the model's own O(V x H) size: "
                  + ", ".join(f"{v:.0f} MiB at {k}" for k, v in grads.items()) + ".",
                  "", "| loss | vocab | before | after, diagnostics step | after, other steps |", "|---|---|---|---|---|"]  # fmt: skip
        for loss in LOSSES:
            for name in VOCABS:
                cells = {}
                for row in rows:
                    if row["loss"] == loss and row["vocab_name"] == name:
                        cells[(row["version"], row["stats"])] = row["step_mib"]
                if cells:
                    keys = (("before", True), ("after", True), ("after", False))
                    values = " | ".join(f"{cells[key]:.0f}" if key in cells else "-" for key in keys)
                    lines.append(f"| {loss} | {name} | {values} |")
        trl = [system for system in TRL_MEMORY if any(r["loss"] == system for r in rows)]
        if trl:
            step = {(r["version"], r["loss"], r["stats"], r["vocab_name"]): r["step_mib"] for r in rows}

            def ours(loss: str, name: str) -> str:
                if ("after", loss, True, name) not in step:
                    return "-"
                other = step.get(("after", loss, False, name))
                return f"{step['after', loss, True, name]:.0f}" + ("" if other is None else f" ({other:.0f})")

            lines += ["", "Ours against TRL, same models, prompts and 8 x 32 completion tokens (MiB; ours on a "
                      "diagnostics step, in brackets on the other steps; TRL logs its entropy on every step):", "",
                      "| vocab | " + " | ".join(f"ours {loss}" for loss in LOSSES) + " | " + " | ".join(trl) + " |",
                      "|---" * (1 + len(LOSSES) + len(trl)) + "|"]  # fmt: skip
            for name in VOCABS:
                if any(("TRL", system, True, name) in step for system in trl):
                    theirs = [f"{step[key]:.0f}" if (key := ("TRL", system, True, name)) in step else "-" for system in trl]
                    lines.append(f"| {name} | " + " | ".join([*(ours(loss, name) for loss in LOSSES), *theirs]) + " |")
    text = "\n".join(lines) + "\n"
    (out / "bench.md").write_text(text)
    plots(results, out)
    return text


def plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "memory" in results:
        fig, ax = plt.subplots(figsize=(6, 4))
        for loss in (*LOSSES, *TRL_MEMORY):
            for version, stats, style in (("before", True, "--"), ("after", True, "-"), ("after", False, ":"),
                                          ("TRL", True, "-.")):  # fmt: skip
                points = [(VOCABS[r["vocab_name"]], r["step_mib"]) for r in results["memory"]
                          if r["loss"] == loss and r["version"] == version and r["stats"] == stats]  # fmt: skip
                if points:
                    label = loss if version == "TRL" else f"{loss}, {version}" + ("" if stats else " (no diagnostics)")
                    ax.plot(*zip(*sorted(points)), style, marker="o", label=label)
        ax.set(xscale="log", xlabel="vocabulary", ylabel="step peak over baseline (MiB)", title="OPD step memory")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "memory.png", dpi=120)
        plt.close(fig)
    if "scaling" in results:
        fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.5))
        r = results["scaling"]
        a.plot(list(r["length"]), list(r["length"].values()), marker="o")
        a.set(xlabel="completion length (tokens)", ylabel="s/step", title="OPD step vs length")
        b.plot(list(r["teachers"]), list(r["teachers"].values()), marker="o")
        b.set(xlabel="teachers", ylabel="s/step", title="OPD step vs teachers")
        fig.tight_layout()
        fig.savefig(out / "scaling.png", dpi=120)
        plt.close(fig)
    if "steps" in results:
        r = results["steps"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = list(r["medians"])
        ax.barh(names, [r["medians"][n] for n in names])
        ax.set(xlabel="s/step (median)", title="steps, same models and work")
        fig.tight_layout()
        fig.savefig(out / "steps.png", dpi=120)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench"))
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "opd-bench")
    parser.add_argument("--only", nargs="+", choices=["steps", "scaling", "memory"], default=None)
    parser.add_argument("--quick", action="store_true", help="a smoke test: 1 round of 2 steps, the 1k vocabulary")
    parser.add_argument("--skip-trl", action="store_true", help="ours only (TRL is the optional `bench` extra)")
    parser.add_argument("--compile", action="store_true",
                        help="steps: also our OPD and GRPO steps with sampling.compile and compile_forwards "
                             "(one-off compiles: ~2 min here)")
    parser.add_argument("--before", help="another checkout's root: its package's memory, as the 'before' column")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per round (the first is a warm-up)")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    # memory cells take minutes each at 152k on a shared CPU: measure a subset
    parser.add_argument("--losses", nargs="+", choices=list(LOSSES), help="memory: only these losses")
    parser.add_argument("--vocabs", nargs="+", choices=list(VOCABS), help="memory: only these vocabularies")
    args = parser.parse_args()
    if args.memory_child:
        vocab, loss, stats = args.memory_child
        print(json.dumps(memory_child(int(vocab), loss, bool(int(stats)))))
        return
    import torch

    torch.set_num_threads(1)  # a shared machine: one thread per process, see PLATFORM.md
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.steps = args.steps or (2 if args.quick else 10)  # 10: one diagnostics step per round, as log_every_n_steps
    if not args.skip_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            sys.exit("TRL is not installed: pip install -e '.[bench]' (or pass --skip-trl)")
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    parts = args.only or ["steps", "scaling", "memory"]
    results: dict = {}
    student, teachers = build_models(args.workdir)
    warnings.filterwarnings("ignore")  # Lightning's and transformers' advice, once per round
    if "steps" in parts:
        results["steps"] = part_steps(args, student, teachers)
    if "scaling" in parts:
        results["scaling"] = part_scaling(args, student, teachers)
    if "memory" in parts:
        results["memory"] = part_memory(args)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(report(results, args.out))


if __name__ == "__main__":
    main()
