"""`opd check`: catch a doomed run before it burns compute. Reads a stage's config as `opd fit` does, loads its
models and data, trains nothing, writes no run, prints one table and exits 1 if any check failed.

    opd check --config configs/tiny/defaults.yaml --config configs/tiny/opd.yaml [overrides] [--check.prompts 32]

The parser is `opd fit`'s (same classes, links and refusals; `opd check --help` lists every option), plus the
`check.*` options of :class:`CheckConfig`. Rows, in order (a failed row skips those that need it):

* **tokenizer**: the student's tokenizer against each teacher's and the reference's (vocabulary and ids,
  special tokens, EOS set, chat template, and the ids of a sample conversation rendered by each), read from the
  folders before any weights load; the exact difference when they disagree (:func:`models.tokenizer_differences`).
* **build**: the stage and the data are instantiated (the constructors' own refusals).
* **routes**: every data domain has a teacher (:meth:`TeacherRoutes.check_domains`).
* **prompts**: every prompt (and SFT answer) fits `data.max_prompt_length` (`data.max_answer_length`).
* **context**: prompt + completion fit every model's context (:meth:`PolicyModule._check_context`).
* **sampling**: the training samples are the student's own distribution where the loss needs that
  (temperature 1, no top-k / top-p filter for OPD; GRPO's ratio ignores a filter).
* **self-distillation**: the stage's own loss function with the student scored as its own teacher is zero; a
  loss that is not zero there is a bug. **on-policy ratio** (GRPO, sampled reverse KL): recomputed log-probs
  of the student's samples equal the ones recorded while sampling.
* **probe <domain>**: `check.prompts` held-out prompts per domain; the student samples, the routed teacher
  scores (:func:`probe.overlap_probe`): top-k overlap, shared mass, reverse KL; greedy accuracy of student and
  teacher. Overlap under `check.min_overlap` fails an OPD run (it would stall): run ColdStart first.
* **memory**: parameters, gradients, optimiser state (measured after the timed step), frozen models, and the
  logits one step holds at this vocabulary, batch and `top_k`.
* **step time**: one real training step, on the check's own trainer (no logger, no checkpoint, one device, in a
  temporary folder); its optimiser and weights are thrown away with the process.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from transformers import GenerationConfig

from opd_lightning.cli import _REFUSALS, OPDCLI, build_cli, user_error
from opd_lightning.evaluation import greedy_exact
from opd_lightning.models import load_tokenizer, tokenizer_differences
from opd_lightning.ops import LOGIT_CHUNK_ELEMENTS
from opd_lightning.probe import overlap_probe, probe_batches
from opd_lightning.rollout import completion_logits, completion_logprobs, lazy_completion_logits
from opd_lightning.stages import GRPO, SFT, ColdStart, MultiExpertOPD
from opd_lightning.stages.opd import distillation_loss
from opd_lightning.teachers import DEFAULT_ROUTE, TeacherPool

__all__ = ["CheckConfig", "check_main"]

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
SAMPLE_CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "Calculate 57 + 8."},
    {"role": "assistant", "content": "65"},
]


@dataclass
class CheckConfig:
    """What `opd check` measures (not part of any stage's config)."""

    prompts: int = 32
    """Held-out prompts per domain the probe samples and scores."""
    min_overlap: float = 0.5
    """An OPD domain whose student/teacher top-k overlap is below this fails: the run would stall there."""
    tolerance: float = 1e-3
    """Largest self-distillation loss (and on-policy log-ratio) still read as zero."""
    timed_step: bool = True
    """Time one real training step (nothing is written; its updates are thrown away)."""

    def __post_init__(self) -> None:
        if self.prompts < 1:
            raise ValueError(f"check.prompts must be >= 1, got {self.prompts}")
        if not 0.0 <= self.min_overlap <= 1.0:
            raise ValueError(f"check.min_overlap must be in [0, 1], got {self.min_overlap}")


@dataclass
class Row:
    check: str
    status: str
    detail: str


class Report:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, check: str, status: str, detail: str) -> None:
        self.rows.append(Row(check, status, detail))

    @property
    def failed(self) -> bool:
        return any(r.status == FAIL for r in self.rows)

    def table(self) -> str:
        width = max([len(r.check) for r in self.rows] + [5])
        lines = [f"{'check':<{width}}  status  detail"]
        for r in self.rows:
            first, *rest = r.detail.splitlines() or [""]
            lines.append(f"{r.check:<{width}}  {r.status:<6}  {first}")
            lines += [f"{'':<{width}}  {'':<6}  {line}" for line in rest]
        return "\n".join(lines)


class CheckCLI(OPDCLI):
    """`opd fit`'s parser and instantiation, plus `check.*`; a refusal becomes a row instead of an exit."""

    def __init__(self, *args, **kwargs) -> None:
        self.report = Report()
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_class_arguments(CheckConfig, "check")

    def before_instantiate_classes(self) -> None:
        tokenizer_rows(self.report, self.config.model.init_args)

    def instantiate_classes(self) -> None:
        self.model = self.datamodule = None
        if self.report.failed:
            return  # the stage's constructor refuses the same tokenizer, with less detail
        try:
            LightningCLI.instantiate_classes(self)  # not OPDCLI's, which ends the process on a refusal
        except _REFUSALS as err:
            cause = user_error(err, ours_only=False)
            if cause is None or os.environ.get("OPD_TRACEBACK"):
                raise
            self.report.add("build", FAIL, str(cause))


# ---------------------------------------------------------------------------------------------- tokenizer


def tokenizer_rows(report: Report, init) -> None:
    """Student vs every teacher / reference folder named in the parsed config (tokenizer files only)."""
    student_path = Path(init.model)
    frozen = {f"model.init_args.teachers.{d}": p for d, p in (init.get("teachers") or {}).items()}
    if init.get("ref_model"):
        frozen["model.init_args.ref_model"] = init.ref_model
    frozen = {f: Path(p) for f, p in frozen.items() if Path(p).is_dir()}  # missing folders: `build` names them
    if not frozen:
        return
    if not student_path.is_dir():
        report.add("tokenizer", SKIP, f"model.init_args.model={str(student_path)!r} does not exist yet")
        return
    trust = bool(init.get("trust_remote_code"))
    student = load_tokenizer(student_path, trust_remote_code=trust)
    student_ids, student_eos = _rendered(student), _eos_set(student, student_path)
    same = []
    for field, path in frozen.items():
        other = load_tokenizer(path, trust_remote_code=trust)
        problems = tokenizer_differences(student, other)
        if problems:
            report.add("tokenizer", FAIL, f"{field}: {'; '.join(problems)}")
            continue
        other_ids = _rendered(other)
        if other_ids != student_ids:
            at = next((i for i, (a, b) in enumerate(zip(student_ids, other_ids)) if a != b), len(student_ids))
            report.add(
                "tokenizer", WARN,
                f"{field}: same vocabulary and template, but the sample conversation tokenizes differently "
                f"(first difference at token {at}: {other_ids[at:at + 3]} vs the student's {student_ids[at:at + 3]}): "
                "another pre-tokenizer or merges; the teacher reads the student's tokenization",
            )  # fmt: skip
        elif _eos_set(other, path) != student_eos:
            report.add(
                "tokenizer", WARN,
                f"{field}: EOS set {sorted(_eos_set(other, path))} vs the student's {sorted(student_eos)} "
                "(tokenizer + generation_config): its own samples (ColdStart, off-policy batches) end elsewhere",
            )  # fmt: skip
        else:
            same.append(field)
    if same:
        report.add(
            "tokenizer", OK,
            f"{', '.join(same)}: as the student's (vocabulary {len(student)}, special tokens, EOS set "
            f"{sorted(student_eos)}, chat template; a sample conversation renders to the same {len(student_ids)} ids)",
        )  # fmt: skip


def _rendered(tokenizer) -> list[int]:
    if tokenizer.chat_template is None:
        return []
    text = tokenizer.apply_chat_template(SAMPLE_CONVERSATION, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _eos_set(tokenizer, path: Path) -> set[int]:
    """The ids that end a sample (:func:`models.stop_token_ids`), from the folder's files, no weights."""
    ids = {tokenizer.eos_token_id}
    if (path / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(path, local_files_only=True).eos_token_id
        ids |= set([eos] if isinstance(eos, int) else eos or [])
    return ids


# --------------------------------------------------------------------------------------------- set-up rows


def setup_rows(report: Report, module, data) -> None:
    if "teachers" in module.frozen_modules:
        try:
            module.teachers.check_domains(data.domains)
            routed = zip(data.domains, module.teachers.route(data.domains), strict=True)
            report.add("routes", OK, ", ".join(f"{d} -> {module.teachers.paths[t]}" for d, t in routed))
        except ValueError as err:
            report.add("routes", FAIL, str(err))
    else:
        report.add("routes", SKIP, f"{type(module).__name__} has no teachers")
    data.write_cache = False  # the encoding cache is read if there, never written: the check writes nothing
    try:
        data.setup("fit")
    except ValueError as err:
        report.add("prompts", FAIL, str(err))
        return
    examples = [e for pool in data.train_pools.values() for e in pool] + data.val_examples
    longest = max(examples, key=lambda e: len(e.prompt_ids))
    detail = (
        f"{len(examples):,} prompts; the longest, {len(longest.prompt_ids)} tokens ({longest.task}), fits "
        f"data.max_prompt_length={data.max_prompt_length}"
    )
    if data.train_format == "sft":
        answer = max(len(e.answer_ids) for e in examples)
        detail += f"; the longest answer, {answer} tokens, fits data.max_answer_length={data.max_answer_length}"
    report.add("prompts", OK, detail)


def sampling_row(report: Report, module) -> None:
    if isinstance(module, MultiExpertOPD):
        s, loss = module.sampling, module.distill.loss
        off = [f"temperature {s.temperature}"] if s.temperature != 1.0 else []
        off += [f"top_k {s.top_k}"] if s.top_k else []
        off += [f"top_p {s.top_p}"] if s.top_p < 1.0 else []
        if off:
            report.add(
                "sampling", FAIL,
                f"model.init_args.sampling has {', '.join(off)}: the student's samples then come from another "
                f"distribution than the one {loss} compares with its teacher (at temperature 1), so the run is "
                "off-policy. Set sampling.temperature: 1.0, top_k: 0, top_p: 1.0.",
            )  # fmt: skip
            return
        mixed = module.distill.off_policy_ratio
        extra = f"; {mixed:.0%} of batches are the teachers' samples (distill.off_policy_ratio)" if mixed else ""
        report.add("sampling", OK, f"temperature 1, no top-k / top-p filter: on-policy for {loss}{extra}")
    elif isinstance(module, GRPO):
        s = module.sampling
        if s.top_k or s.top_p < 1.0:
            report.add(
                "sampling", WARN,
                f"model.init_args.sampling filters (top_k {s.top_k}, top_p {s.top_p}): the recorded behaviour "
                "log-probs are the unfiltered ones, so the importance ratio ignores the filter",
            )  # fmt: skip
        else:
            report.add("sampling", OK, f"temperature {s.temperature}, no filter: the ratio's log-probs match")
    elif isinstance(module, ColdStart):
        report.add("sampling", OK, "the teachers' samples: off-policy by design (SFT on them)")
    else:
        report.add("sampling", SKIP, f"{type(module).__name__} trains on reference answers, it samples nothing")


# ------------------------------------------------------------------------------------- rows that need models


class _Abort(Exception):
    """A row failed that every later one needs."""


class CheckCallback(L.Callback):
    """Runs the model rows at fit start (models loaded, trainer attached), then times the one training step."""

    def __init__(self, report: Report, config: CheckConfig, cold_start_threshold: float | None) -> None:
        self.report, self.config, self.cold_start_threshold = report, config, cold_start_threshold
        self.started = self.seconds = None
        self.optimizer_bytes: int | None = None

    def on_fit_start(self, trainer, module) -> None:
        data = trainer.datamodule
        try:
            module._check_context(data)
        except ValueError as err:
            self.report.add("context", FAIL, str(err))
            raise _Abort from err
        models = {"model.init_args.model": module.policy, **module.frozen_models()}
        limits = [getattr(m.config, "max_position_embeddings", None) for m in models.values()]
        known = [v for v in limits if v is not None]  # not every config states one
        new_tokens = max(module.eval_max_new_tokens(), module.max_new_tokens())
        self.report.add(
            "context", OK,
            f"prompt <= {data.max_prompt_length} + completion <= {new_tokens} tokens fit the context of all "
            f"{len(models)} model(s)" + (f" (the shortest: {min(known)} positions)" if known else ""),
        )  # fmt: skip
        batches = probe_batches(data, self.config.prompts, module.device)
        self_distillation_rows(self.report, module, batches, self.config.tolerance)
        probe_rows(self.report, module, batches, self.config.min_overlap, self.cold_start_threshold)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        _sync(module.device)
        self.started = self.started or time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        _sync(module.device)
        self.seconds = time.perf_counter() - self.started
        self.optimizer_bytes = sum(
            _bytes(v) for o in trainer.optimizers for state in o.state.values() for v in state.values()
        )


def self_distillation_rows(report: Report, module, batches, tolerance: float) -> None:
    batch = next(iter(batches.values()))
    generator = torch.Generator(device=module.device).manual_seed(0)
    if isinstance(module, MultiExpertOPD):
        with torch.no_grad():
            rollout = module.sample(module.policy, batch, module.sampling, generator=generator)
            d = module.distill
            forward = completion_logits if d.needs_teacher_logits else lazy_completion_logits  # as training_step
            student = forward(
                module.policy, rollout.input_ids, rollout.attention_mask, rollout.completion_ids.shape[1]
            )  # fmt: skip
            itself = TeacherPool({DEFAULT_ROUTE: module.model_path})
            itself.models[DEFAULT_ROUTE] = module.policy
            scores = itself.score(
                rollout, student_logits=student, keep_logits=d.needs_teacher_logits, top_k=d.top_k,
                top_k_from=d.top_k_from, overlap_k=d.overlap_k, micro_batch_size=d.micro_batch_size,
                token_budget=d.teacher_token_budget,
            )  # fmt: skip
            loss, _ = distillation_loss(d, student, rollout, scores, temperature=module.sampling.logprob_temperature)
        status = OK if abs(float(loss)) <= tolerance else FAIL
        report.add(
            "self-distillation", status,
            f"{d.loss} of the student against itself on {len(rollout)} of its samples: {float(loss):.2e} "
            f"(tolerance {tolerance:g})" + ("" if status == OK else ": a loss that is not zero here is a bug"),
        )  # fmt: skip
        if d.loss != "sampled_reverse_kl":
            return
        config = module.sampling
    elif isinstance(module, GRPO):
        config = module.sampling
        rollout = module.sample(module.policy, batch, config, generator=generator)
    else:
        report.add("self-distillation", SKIP, f"{type(module).__name__}'s loss is an NLL of fixed targets")
        return
    with torch.no_grad():
        logp = completion_logprobs(module.policy, rollout, temperature=config.logprob_temperature)
    gap = float((logp - rollout.logprobs).abs().masked_fill(~rollout.completion_mask, 0).max())
    report.add(
        "on-policy ratio", OK if gap <= tolerance else FAIL,
        f"recomputed vs sampled log-probs of the student's tokens: max |log ratio| {gap:.2e} (tolerance {tolerance:g})",
    )  # fmt: skip


def probe_rows(report: Report, module, batches, min_overlap: float, cold_start_threshold: float | None) -> None:
    tokenizer, budget = module.tokenizer, module.eval_max_new_tokens()

    def accuracy(sample, batch) -> float:
        return float(greedy_exact(sample, tokenizer, batch, budget)[1].float().mean())

    def student(batch, config):
        return module.sample(module.policy, batch, config)

    teachers = module.teachers if "teachers" in module.frozen_modules else None
    if teachers is None:
        for domain, batch in batches.items():
            acc = accuracy(student, batch)
            weak = isinstance(module, GRPO) and acc == 0.0
            report.add(
                f"probe {domain}", WARN if weak else OK,
                f"student greedy accuracy {acc:.2f} ({len(batch)} prompts)"
                + ("; GRPO learns nothing where no sample is ever right: SFT first" if weak else ""),
            )  # fmt: skip
        return

    def teacher(batch, config):
        return teachers.generate(
            batch.prompt_ids, batch.prompt_mask, batch.domains, config, eos_token_id=module.eos_token_ids,
            pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer,
        )  # fmt: skip

    k = module.distill.overlap_k if isinstance(module, MultiExpertOPD) else module.config.overlap_k
    stats = overlap_probe(module, teachers, batches, max_new_tokens=module.max_new_tokens(), overlap_k=k)
    for domain, batch in batches.items():
        s = stats[domain]
        overlap = s["topk_overlap"]
        detail = (
            f"top-{k} overlap {overlap:.2f}, shared mass student {s['student_shared_mass']:.2f} / teacher "
            f"{s['teacher_shared_mass']:.2f}, reverse KL {s['reverse_kl']:.3f}, entropy student "
            f"{s['student_entropy']:.2f} / teacher {s['teacher_entropy']:.2f}; greedy accuracy student "
            f"{accuracy(student, batch):.2f} / teacher {accuracy(teacher, batch):.2f} ({len(batch)} prompts)"
        )
        status = OK
        if s["teacher_entropy"] > 0.9 * math.log(len(tokenizer)):
            status = WARN
            detail += (f"\nthe teacher is close to uniform here (entropy {s['teacher_entropy']:.2f} of at most "
                       f"{math.log(len(tokenizer)):.2f} nats): it has little to teach, and the overlap means little")  # fmt: skip
        if isinstance(module, MultiExpertOPD) and overlap < min_overlap:
            if cold_start_threshold is not None and overlap < cold_start_threshold:
                status = WARN
                detail += (f"\nbelow overlap_cold_start.below_overlap={cold_start_threshold}: the fit warms this "
                           "domain up on its teacher's samples before OPD")  # fmt: skip
            else:
                status = FAIL
                detail += f"\noverlap < check.min_overlap={min_overlap}: OPD stalls here. {_cold_start_advice(module)}"
        report.add(f"probe {domain}", status, detail)


def _cold_start_advice(module: MultiExpertOPD) -> str:
    teachers = " ".join(
        f"--model.init_args.teachers.{d}={module.teachers.paths[t]}"
        for d, t in module.teachers.routes.items()
    )  # fmt: skip
    return (
        "Run ColdStart first: opd fit --config configs/tiny/defaults.yaml --config configs/tiny/cold_start.yaml "
        f"--model.init_args.model={module.model_path} {teachers}, then OPD from its export; or let the fit do it: "
        "--model.init_args.overlap_cold_start.below_overlap=<threshold>"
    )


# --------------------------------------------------------------------------------------- memory and time


def memory_row(report: Report, module, data, optimizer_bytes: int | None) -> None:
    policy = module.policy
    params = sum(p.numel() for p in policy.parameters())
    weights = sum(_bytes(p) for p in policy.parameters())
    grads = sum(_bytes(p) for p in policy.parameters() if p.requires_grad)
    frozen = {f: sum(_bytes(p) for p in m.parameters()) for f, m in module.frozen_models().items()}
    vocab, width = len(module.tokenizer), policy.get_input_embeddings().weight.element_size()
    opt = f"{_mib(optimizer_bytes)} (measured)" if optimizer_bytes is not None else "not measured (no step)"
    parts = [f"policy {params / 1e6:.2f}M parameters: weights {_mib(weights)}, grads {_mib(grads)}, optimiser state "
             f"{opt}"]  # fmt: skip
    if frozen:
        parts.append(f"frozen models {len(frozen)} × {_mib(max(frozen.values()))} = {_mib(sum(frozen.values()))}")
    total = weights + grads + (optimizer_bytes or 0) + sum(frozen.values())
    if isinstance(module, SFT):
        rows, tokens = data.batch_size, data.max_prompt_length + data.max_answer_length
    else:
        rows, tokens = data.batch_size * module.sampling.num_samples, module.max_new_tokens()
        if isinstance(module, (GRPO, ColdStart)):
            tokens += data.max_prompt_length  # their loss forward covers prompt + completion
        if isinstance(module, GRPO):
            rows //= module.config.num_minibatches
    logits = rows * tokens * vocab * width
    # OPD keeps hidden states and makes logits a chunk of positions at a time, for every loss
    lazy = isinstance(module, MultiExpertOPD)
    chunk = min(rows * tokens, max(1, LOGIT_CHUNK_ELEMENTS // vocab))
    if lazy:
        hidden = rows * tokens * policy.get_input_embeddings().weight.shape[1] * width
        parts.append(f"student hidden states [{rows}, {tokens}, H] {_mib(hidden)} (+ their gradient), logits "
                     f"[{chunk}, {vocab}] at a time (the whole [{rows}, {tokens}, {vocab}] would be {_mib(logits)})")  # fmt: skip
        total += 2 * hidden + chunk * vocab * 4
    else:
        parts.append(f"student logits [{rows}, {tokens}, {vocab}] {_mib(logits)} (+ their gradient)")
        total += 2 * logits
    if isinstance(module, MultiExpertOPD):
        d = module.distill
        full = rows * tokens * vocab * width
        if d.needs_teacher_logits:  # every routed teacher's hidden states, for the loss to make logits from
            width_t = max(m.get_input_embeddings().weight.shape[1] for m in module.teachers.models.values())
            teacher = rows * tokens * width_t * width
            parts.append(f"teacher hidden states [{rows}, {tokens}, {width_t}] {_mib(teacher)} (full-vocabulary "
                         f"loss, logits [{chunk}, {vocab}] at a time; the whole logits would be {_mib(full)})")  # fmt: skip
        elif d.top_k is not None:
            support = d.top_k * (2 if d.top_k_from == "union" else 1)
            teacher = rows * tokens * support * 13  # int64 id, float32 log-prob, bool valid
            parts.append(f"teacher top-{d.top_k} support [{rows}, {tokens}, {support}] {_mib(teacher)} "
                         f"(the full [{rows}, {tokens}, {vocab}] would be {_mib(full)})")  # fmt: skip
        else:
            teacher = rows * tokens * 4
            parts.append(f"teacher log-probs [{rows}, {tokens}] {_mib(teacher)} (sampled reverse KL)")
        micro = d.micro_batch_size or rows
        if d.teacher_token_budget is not None:  # the rows one forward takes at the longest rows
            micro = min(micro, max(1, d.teacher_token_budget // (data.max_prompt_length + tokens)))
        if lazy:
            parts.append(f"scoring holds one teacher's hidden states and [{chunk}, {vocab}] logits at a time")
            total += teacher + chunk * vocab * 4
        else:
            parts.append(f"scoring holds one teacher's [{micro}, {tokens}, {vocab}] logits at a time")
            total += teacher + micro * tokens * vocab * width
    peak = ""
    if module.device.type == "cuda":
        peak = f"; peak allocated in the timed step {_mib(torch.cuda.max_memory_allocated(module.device))}"
    report.add("memory", OK, f"≈ {_mib(total)} before activations{peak}: " + "; ".join(parts))


def time_row(report: Report, module, data, seconds: float | None, max_steps: int, note: str = "") -> None:
    if seconds is None:
        report.add("step time", SKIP, "not measured (check.timed_step: false)")
        return
    per = f"{seconds:.2f} s per optimiser step on one {module.device.type} device"
    shape = f"data.batch_size {data.batch_size}"
    if not isinstance(module, SFT):
        shape += f" prompts × {module.sampling.num_samples} sample(s) × ≤ {module.max_new_tokens()} new tokens"
    total = f"; trainer.max_steps {max_steps} ≈ {seconds * max_steps / 60:.1f} min" if max_steps > 0 else ""
    report.add("step time", OK, f"{per} ({shape}){total}{note}")


# ------------------------------------------------------------------------------------------------- driver


def run_checks(cli: CheckCLI) -> None:
    report, config = cli.report, cli.config_init.check
    module, data = cli.model, cli.datamodule
    setup_rows(report, module, data)
    sampling_row(report, module)
    if report.failed:
        return
    cold_start_threshold = None
    if isinstance(module, MultiExpertOPD) and module.overlap_cold_start is not None:
        cold_start_threshold = module.overlap_cold_start.below_overlap
        module.overlap_cold_start = None  # reported by the probe rows, not run
    note = ""
    if isinstance(module, ColdStart) and module.config.cache_dir is not None:
        module.config.cache_dir = None  # the cache would be written at fit start
        note = "; the teachers sample inside this step, a cold_start.cache_dir run reads their samples from disk"
    callback = CheckCallback(report, config, cold_start_threshold)
    with tempfile.TemporaryDirectory(prefix="opd-check-") as root:
        trainer = L.Trainer(
            accelerator=cli.trainer.accelerator, devices=1, precision=cli.trainer.precision,
            gradient_clip_val=cli.trainer.gradient_clip_val, accumulate_grad_batches=cli.trainer.accumulate_grad_batches,
            max_steps=1, limit_train_batches=None if config.timed_step else 0, limit_val_batches=0,
            num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=root, callbacks=[callback],
        )  # fmt: skip
        try:
            trainer.fit(module, datamodule=data)
        except _Abort:
            return
        except _REFUSALS as err:  # a set-up hook's refusal (e.g. GRPO's minibatch split)
            cause = user_error(err, ours_only=False)
            if cause is None or os.environ.get("OPD_TRACEBACK"):
                raise
            report.add("setup", FAIL, str(cause))
            return
    memory_row(report, module, data, callback.optimizer_bytes)
    time_row(report, module, data, callback.seconds, cli.trainer.max_steps, note)


def check_main(args: list[str] | None = None) -> None:
    start = time.perf_counter()
    with warnings.catch_warnings():
        # `opd check ...` hands its own arguments on, past the subcommand: not the mix-up Lightning warns about
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = build_cli(args, run=False, cli_class=CheckCLI, parser_kwargs={"prog": "opd check"})
    if cli.model is not None:
        run_checks(cli)
    report = cli.report
    print(report.table())
    failed = sum(r.status == FAIL for r in report.rows)
    warned = sum(r.status == WARN for r in report.rows)
    verdict = f"{failed} check(s) FAILED" if failed else "passed"
    print(f"opd check: {verdict}, {warned} warning(s), in {time.perf_counter() - start:.1f} s; nothing was written")
    sys.exit(1 if failed else 0)


def _bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _mib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels are asynchronous: time the work, not the launch
