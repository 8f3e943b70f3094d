"""The one `PromptDataModule` every stage shares.

Training batches mix the teacher-aligned pool (weighted by domain) with a fixed share `ood_ratio` of
out-of-distribution prompts, which is the recipe's guard against entropy collapse in OPD. The global batch of
optimiser step `s` (`batch_size × world size × accumulate_grad_batches` prompts) is drawn from a generator seeded
by `(stream_seed, s)` alone (stream_seed defaults to seed); each (micro-batch, rank) takes its slice. So the stream is deterministic, resumable at any
step without replaying it, and the same rows make up a step whether they are spread over processes or
micro-batches. Validation keeps one held-out set per task.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from opd_lightning.data.batch import PromptBatch, SFTBatch, make_sft_batch, pad_sequences
from opd_lightning.data.tasks import DEFAULT_TASKS, TaskSpec, build_task
from opd_lightning.seeding import make_generator

ENCODING_CACHE_FORMAT = 1
"""Bumped whenever the encoding itself changes, so no cache from older code is read."""


@dataclass
class Example:
    """One tokenized item of a task pool."""

    prompt_ids: list[int]
    answer_ids: list[int]  # answer + EOS as the model should generate it; loss goes here in SFT
    domain: str
    aligned: bool
    task: str
    entry: dict


def _conversation(question: str, system_prompt: str | None, answer: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def encode_prompts(tokenizer, questions: list[str], system_prompt: str | None = None) -> list[list[int]]:
    """Token ids of each question as a chat prompt (the generation prompt included).

    Batched on purpose (speed, measured on 2,000 prompts: 0.34 s against 0.53 s one call per prompt, 1.6x;
    answers 0.43 s against 0.92 s), since every stage start encodes the tiny world's ~46k prompts. The ids are
    the same: apply_chat_template tokenizes its rendering without special tokens, as here.
    """
    if not questions:
        return []
    texts = tokenizer.apply_chat_template([_conversation(q, system_prompt) for q in questions],
                                          add_generation_prompt=True, tokenize=False)  # fmt: skip
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def encode_prompt(tokenizer, question: str, system_prompt: str | None = None) -> list[int]:
    return encode_prompts(tokenizer, [question], system_prompt)[0]


def encode_answers(
    tokenizer, prompts: list[list[int]], questions: list[str], answers: list[str], system_prompt: str | None
) -> list[list[int]]:
    """The completion tokens the model is trained to produce after each prompt (batched like the prompts).

    Taken from the chat template's assistant mask (`{% generation %}` markers) when the template has them;
    templates without them (e.g. Qwen3's) fall back to "full conversation minus the generation prompt".
    Either way the result must extend the generation prompt exactly, or training and sampling would see
    different token sequences.
    """
    if not questions:
        return []
    conversations = [_conversation(q, system_prompt, a) for q, a in zip(questions, answers, strict=True)]
    template = tokenizer.chat_template or ""
    if "{% generation %}" in template or "{%- generation %}" in template:
        out = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)  # fmt: skip
        spans = []
        for ids, mask in zip(out["input_ids"], out["assistant_masks"], strict=True):
            ids, mask = list(ids), list(mask)
            start = mask.index(1) if 1 in mask else len(ids)
            end = len(mask) - mask[::-1].index(1) if 1 in mask else len(ids)
            spans.append((ids[:start], ids[start:end]))
    else:
        texts = tokenizer.apply_chat_template(conversations, tokenize=False)
        spans = []
        for prompt, ids in zip(prompts, tokenizer(texts, add_special_tokens=False)["input_ids"], strict=True):
            completion = list(ids[len(prompt):])
            # the template's closing newline etc. after EOS is not something the model generates
            if tokenizer.eos_token_id in completion:
                completion = completion[: completion.index(tokenizer.eos_token_id) + 1]
            spans.append((list(ids[: len(prompt)]), completion))
    for prompt, (prefix, completion) in zip(prompts, spans, strict=True):
        if prefix != prompt or not completion:
            raise ValueError(
                "the tokenizer's chat template does not render the conversation as generation prompt + answer; "
                "the SFT loss mask cannot be derived from it (check tokenizer.chat_template)"
            )
    return [completion for _, completion in spans]


class MixtureSampler:
    """Which items make up batch `g`: an exact OOD share, then domains by weight, tasks by weight within a
    domain, then a uniform item of that task and domain; finally shuffled, so position carries no signal."""

    def __init__(self, pools: dict[str, list[Example]], specs: list[TaskSpec], domain_weights: dict[str, float],
                 ood_ratio: float, seed: int):
        self.seed, self.ood_ratio = seed, ood_ratio
        self.domains = sorted(domain_weights)
        self.domain_probs = torch.tensor([domain_weights[d] for d in self.domains], dtype=torch.float64)
        # per domain: the (task, domain) sub-pools with their task weights; a task whose rows carry several
        # domains takes part in each of them with its own weight
        self.aligned = {
            d: self._choices([(s.weight, [e for e in pools[s.name] if e.domain == d]) for s in specs if s.aligned],
                             f"domain {d!r}")
            for d in self.domains
        }
        ood = [(s.weight, pools[s.name]) for s in specs if not s.aligned]
        self.ood = self._choices(ood, "the OOD share (data.ood_ratio)") if ood_ratio > 0 else ([], torch.zeros(0))

    @staticmethod
    def _choices(candidates: list[tuple[float, list[Example]]], what: str) -> tuple[list[list[Example]], torch.Tensor]:
        kept = [(w, pool) for w, pool in candidates if w > 0 and pool]
        if not kept:
            raise ValueError(
                f"data.tasks: {what} has no training item under a task of positive weight (every row may have "
                "gone to validation); raise the task's size or weight, or lower its val_size"
            )
        return [pool for _, pool in kept], torch.tensor([w for w, _ in kept], dtype=torch.float64)

    def batch(self, step: int, size: int) -> list[Example]:
        """The `size` items of optimiser step `step`: a function of (seed, step) only, so random access makes
        resuming free and every decomposition of the step into ranks and micro-batches slices the same rows."""
        gen = make_generator(self.seed, "data", step)
        # stochastic rounding keeps the OOD share exact in expectation for any batch size
        n_ood = math.floor(self.ood_ratio * size)
        n_ood += int(torch.rand((), generator=gen) < self.ood_ratio * size - n_ood)
        picks = [self._pick(*self.ood, gen) for _ in range(n_ood)]
        if n_ood < size:  # ood_ratio 1 (or rounding up to the whole batch) leaves no aligned slot
            domains = torch.multinomial(self.domain_probs, size - n_ood, replacement=True, generator=gen)
            picks += [self._pick(*self.aligned[self.domains[d]], gen) for d in domains.tolist()]
        # OOD items are drawn first; without the shuffle they would always lead the batch
        return [picks[i] for i in torch.randperm(len(picks), generator=gen).tolist()]

    @staticmethod
    def _pick(pools: list[list[Example]], weights: torch.Tensor, gen: torch.Generator) -> Example:
        pool = pools[torch.multinomial(weights, 1, generator=gen).item()]
        return pool[torch.randint(len(pool), (), generator=gen).item()]


@dataclass(frozen=True)
class BatchLayout:
    """How an optimiser step's global batch is split: `accumulate` micro-batches on each of `world` ranks, each
    `batch_size` rows (data.batch_size, per process and micro-batch, as in Lightning and TRL). Micro-batch `j` of
    rank `r` holds rows `[(j * world + r) * batch_size, ... + batch_size)` of the global batch."""

    batch_size: int
    rank: int = 0
    world: int = 1
    accumulate: int = 1

    @property
    def global_size(self) -> int:
        return self.batch_size * self.world * self.accumulate

    def position(self, cursor: int) -> tuple[int, int]:
        """(optimiser step, index of its first row in that step's global batch) of this rank's micro-batch
        `cursor` (micro-batches since the run started, the loader's resumable count)."""
        step, micro = divmod(cursor, self.accumulate)
        return step, (micro * self.world + self.rank) * self.batch_size


class _MixtureStream(IterableDataset):
    """Yields whole collated batches; `len` is one epoch. A cursor counts micro-batches since the run started."""

    def __init__(self, sampler: MixtureSampler, collate: Callable, steps_per_epoch: int, layout: BatchLayout):
        self.sampler, self.collate, self.steps, self.layout = sampler, collate, steps_per_epoch, layout
        self.cursor = 0
        self._drawn: tuple[int, list[Example]] | None = None  # the last global batch, reused by its micro-batches

    def micro_batch(self, cursor: int) -> list[Example]:
        step, first = self.layout.position(cursor)
        if self._drawn is None or self._drawn[0] != step:
            self._drawn = (step, self.sampler.batch(step, self.layout.global_size))
        return self._drawn[1][first : first + self.layout.batch_size]

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator:
        # an epoch ends on the next multiple of steps_per_epoch, so a run resumed mid-epoch finishes it
        end = (self.cursor // self.steps + 1) * self.steps
        while self.cursor < end:
            batch = self.collate(self.micro_batch(self.cursor))
            self.cursor += 1
            yield batch


class ResumableLoader(DataLoader):
    """A DataLoader Lightning saves and restores (it is `_Stateful`), so a resumed run continues the stream.

    The saved position is the number of batches the trainer has *processed*, not the number this loader has
    yielded: Lightning prefetches one batch ahead, so the latter would skip one batch on every resume.
    """

    def __init__(self, stream: _MixtureStream, processed: Callable[[], int] | None):
        super().__init__(stream, batch_size=None, num_workers=0)
        self._processed = processed

    def state_dict(self) -> dict[str, int]:
        return {"batches_processed": self._processed() if self._processed else self.dataset.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.dataset.cursor = int(state["batches_processed"])


class PromptDataModule(L.LightningDataModule):
    """Prompts from procedural tasks and local datasets, tagged by domain and teacher-aligned / OOD."""

    def __init__(
        self,
        tokenizer: Any = None,
        tasks: list[TaskSpec] | None = None,
        domain_weights: dict[str, float] | None = None,
        ood_ratio: float = 0.0,
        batch_size: int = 32,
        val_batch_size: int = 64,
        steps_per_epoch: int = 200,
        max_prompt_length: int = 96,
        max_answer_length: int = 32,
        system_prompt: str | None = None,
        train_format: Literal["sft", "prompts"] = "prompts",
        seed: int = 0,
        stream_seed: int | None = None,
        cache_dir: str | None = None,
    ):
        """
        Args:
            tokenizer: the policy's tokenizer; linked from the model by the CLI (said once), or a local path.
            tasks: prompt sources with their domain tags and aligned/OOD flags (default: the tiny world's tasks).
            domain_weights: sampling weight of each aligned domain (default: uniform over aligned domains).
            ood_ratio: share of every training batch drawn from the OOD tasks (`aligned: false`).
            batch_size: prompts (or SFT examples) per training micro-batch, per process: an optimiser step
                takes batch_size × processes × trainer.accumulate_grad_batches of them.
            val_batch_size: prompts per validation batch.
            steps_per_epoch: training (micro-)batches per epoch: sets the cadence of validation and epoch-end
                hooks; a multiple of trainer.accumulate_grad_batches.
            max_prompt_length: longest allowed prompt in tokens (chat template included); longer is an error.
            max_answer_length: longest allowed reference answer in tokens (SFT), EOS included.
            system_prompt: optional system message prepended to every prompt (real chat models).
            train_format: "sft" yields prompt+answer batches, "prompts" prompt-only; set by the stage.
            seed: seeds task generation (each task's train items and held-out split) and, unless
                stream_seed is set, the batch stream.
            stream_seed: seeds only the batch stream (which training items each step draws, and in what
                mix), keeping the tasks and the held-out split of `seed`: so runs that share trained models
                can vary their prompt stream and still validate on prompts none of them trained on.
            cache_dir: folder that keeps each task's tokenized prompts (and answers), keyed by the tokenizer,
                its chat template, the system prompt and the items' text, so a later run with the same inputs
                skips the encoding (~8 s per start for the tiny world's 46k items; the pipeline's stages share
                one). None encodes at every start.
        """
        super().__init__()
        # logger=False: HParamsWithFinalMetrics records these as data.* at fit end; Lightning's fit-start merge
        # with the stage's hparams would refuse a stage `seed` (MultiExpertOPD's rollouts) unlike data.seed
        self.save_hyperparameters(ignore=["tokenizer"], logger=False)
        self.specs = list(tasks) if tasks is not None else list(DEFAULT_TASKS)
        if not self.specs:
            raise ValueError("data.tasks is empty: list at least one task")
        # build (and so name-check) every task now, before any data or model is touched
        self.tasks = [build_task(s, f"data.tasks[{i}]") for i, s in enumerate(self.specs)]
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"data.tasks: task names must be unique, got {names}; give each a distinct `name`")
        # reads every file task now (cheap, no tokenizer): a bad file, and the domains its rows carry, are
        # known before any model loads
        task_domains = [task.domains() for task in self.tasks]
        aligned_domains = sorted(set().union(*(d for d, s in zip(task_domains, self.specs) if s.aligned)))
        if domain_weights is None:
            domain_weights = {d: 1.0 for d in aligned_domains}
        for d, w in domain_weights.items():
            if d not in aligned_domains:
                raise ValueError(
                    f"data.domain_weights has {d!r}, but no teacher-aligned task has that domain "
                    f"(aligned domains: {aligned_domains}); add a task with domain {d!r} or remove the weight"
                )
            if w < 0:
                raise ValueError(f"data.domain_weights[{d!r}] = {w} must be >= 0")
        self.domain_weights = {d: w for d, w in domain_weights.items() if w > 0}
        if not 0.0 <= ood_ratio <= 1.0:
            raise ValueError(f"data.ood_ratio must be in [0, 1], got {ood_ratio}")
        if ood_ratio > 0 and all(s.aligned for s in self.specs):
            raise ValueError("data.ood_ratio > 0 but no task has `aligned: false`; add an OOD task or set ood_ratio: 0")
        if ood_ratio < 1 and not self.domain_weights:
            raise ValueError(
                f"data.ood_ratio={ood_ratio} leaves room for teacher-aligned prompts, but no aligned domain has a "
                f"positive weight (aligned domains: {aligned_domains}, data.domain_weights: {domain_weights}); add "
                "an `aligned: true` task or a positive weight, or set data.ood_ratio: 1.0 for all-OOD batches"
            )
        for field_name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size),
                                  ("steps_per_epoch", steps_per_epoch), ("max_prompt_length", max_prompt_length),
                                  ("max_answer_length", max_answer_length)):
            if value < 1:
                raise ValueError(f"data.{field_name} must be >= 1, got {value}")
        self.tokenizer = tokenizer
        self.ood_ratio, self.batch_size, self.val_batch_size = ood_ratio, batch_size, val_batch_size
        self.steps_per_epoch, self.seed, self.system_prompt = steps_per_epoch, seed, system_prompt
        self.stream_seed = seed if stream_seed is None else stream_seed
        self.max_prompt_length, self.max_answer_length = max_prompt_length, max_answer_length
        self.train_format = train_format
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.write_cache = True  # `opd check` reads the cache but writes nothing
        self._encoding_key = None  # the tokenizer's and settings' part of every cache key (see _encoded)
        self.domains = sorted(set().union(*task_domains))
        self.aligned_domains = aligned_domains  # what a stage is judged on
        self.ood_domains = sorted(set().union(*(d for d, s in zip(task_domains, self.specs) if not s.aligned)))
        self.train_pools: dict[str, list[Example]] = {}
        self.val_examples: list[Example] = []
        self.sampler: MixtureSampler | None = None

    # ------------------------------------------------------------------------------------------- setup

    def setup(self, stage: str | None = None) -> None:
        self.layout()  # a step split the stream cannot follow fails now, before any data or model loads
        if self.train_pools:
            return
        if self.tokenizer is None:
            raise ValueError("data.tokenizer is not set: the CLI links it from the model; pass one when used alone")
        if isinstance(self.tokenizer, str):
            from opd_lightning.models import check_local_path, load_tokenizer

            self.tokenizer = load_tokenizer(check_local_path(self.tokenizer, "data.tokenizer"))
        for i, (spec, task) in enumerate(zip(self.specs, self.tasks)):
            # seeded by name, not position: a task's held-out set is the same in every config that uses it
            train, val = task.split(self.seed + zlib.crc32(spec.name.encode()))
            self.train_pools[spec.name] = self._encode(spec, train, i)
            self.val_examples += self._encode(spec, val, i)
        self.sampler = MixtureSampler(self.train_pools, self.specs, self.domain_weights, self.ood_ratio,
                                    self.stream_seed)

    def _encode(self, spec: TaskSpec, items: list[dict], i: int) -> list[Example]:
        prompts, answers = self._encoded(items)
        for item, prompt in zip(items, prompts):
            if len(prompt) > self.max_prompt_length:
                raise ValueError(
                    f"data.max_prompt_length={self.max_prompt_length} is shorter than a prompt of task "
                    f"data.tasks[{i}] ({spec.name!r}): {len(prompt)} tokens for {item['question'][:80]!r}. "
                    "Raise data.max_prompt_length or make the task's prompts shorter."
                )
        if self.train_format == "sft":
            longest = max(answers, key=len, default=[])
            if len(longest) > self.max_answer_length:
                raise ValueError(
                    f"data.max_answer_length={self.max_answer_length} is shorter than a reference answer of task "
                    f"data.tasks[{i}] ({spec.name!r}): {len(longest)} tokens. Raise data.max_answer_length."
                )
        return [Example(prompt, answer, self.tasks[i].domain_of(item), spec.aligned, spec.name, item)
                for item, prompt, answer in zip(items, prompts, answers)]  # fmt: skip

    def _encoded(self, items: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids of each item's prompt and (SFT) answer, from `cache_dir` when an earlier run made them."""
        questions = [item["question"] for item in items]
        path = None
        if self.cache_dir is not None and self.tokenizer.is_fast:  # a slow tokenizer has no serialised form
            if self._encoding_key is None:  # what every task's key shares, hashed once (a real tokenizer is MBs)
                self._encoding_key = hashlib.blake2b(digest_size=16)
                for part in (ENCODING_CACHE_FORMAT, self.tokenizer.backend_tokenizer.to_str(),
                             self.tokenizer.chat_template, self.tokenizer.eos_token, self.system_prompt,
                             self.train_format):  # fmt: skip
                    self._encoding_key.update(json.dumps(part).encode() + b"\0")
            key = self._encoding_key.copy()
            for item in items:
                key.update(json.dumps([item["question"], str(item["answer"])]).encode() + b"\0")
            path = self.cache_dir / f"{key.hexdigest()}.pt"
            if path.is_file():
                cached = torch.load(path, weights_only=True)
                return cached["prompts"], cached["answers"]
        prompts = encode_prompts(self.tokenizer, questions, self.system_prompt)
        answers: list[list[int]] = [[] for _ in items]
        if self.train_format == "sft":
            answers = encode_answers(self.tokenizer, prompts, questions, [item["answer"] for item in items],
                                     self.system_prompt)  # fmt: skip
        if path is not None and self.write_cache:  # written whole, then renamed: a run killed mid-write leaves no half file
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save({"prompts": prompts, "answers": answers}, partial)
            os.replace(partial, path)
        return prompts, answers

    # ---------------------------------------------------------------------------------------- loaders

    def layout(self) -> BatchLayout:
        """This process's share of every optimiser step's global batch (the trainer's ranks and accumulation)."""
        trainer = self.trainer
        if trainer is None:
            return BatchLayout(self.batch_size)
        layout = BatchLayout(self.batch_size, trainer.global_rank, trainer.world_size, trainer.accumulate_grad_batches)
        if self.steps_per_epoch % layout.accumulate:
            # Lightning steps the optimiser at an epoch's end whatever it has accumulated: a short step would
            # shift every later step's rows off the data stream's steps
            raise ValueError(
                f"data.steps_per_epoch={self.steps_per_epoch} is not a multiple of "
                f"trainer.accumulate_grad_batches={layout.accumulate}; make it one (e.g. "
                f"{self.steps_per_epoch // layout.accumulate * layout.accumulate or layout.accumulate})"
            )
        return layout

    def train_dataloader(self) -> DataLoader:
        collate = self.collate_sft if self.train_format == "sft" else self.collate_prompts
        trainer = self.trainer
        processed = (lambda: trainer.fit_loop.epoch_loop.batch_progress.total.processed) if trainer else None
        return ResumableLoader(_MixtureStream(self.sampler, collate, self.steps_per_epoch, self.layout()), processed)

    def val_dataloader(self) -> DataLoader:
        # validation is by generation on prompts; every rank takes its own slice (Lightning's distributed
        # sampler handles the split) and per-domain metrics are summed across ranks
        return DataLoader(self.val_examples, batch_size=self.val_batch_size, shuffle=False,
                          collate_fn=self.collate_prompts)

    def collate_prompts(self, examples: list[Example]) -> PromptBatch:
        ids = pad_sequences([e.prompt_ids for e in examples], self.tokenizer.pad_token_id, "left")
        mask = pad_sequences([[1] * len(e.prompt_ids) for e in examples], 0, "left", dtype=torch.bool)
        return PromptBatch(
            prompt_ids=ids, prompt_mask=mask, domains=[e.domain for e in examples],
            aligned=torch.tensor([e.aligned for e in examples]), tasks=[e.task for e in examples],
            entries=[e.entry for e in examples],
        )

    def collate_sft(self, examples: list[Example]) -> SFTBatch:
        return make_sft_batch([e.prompt_ids for e in examples], [e.answer_ids for e in examples],
                              [e.domain for e in examples], [e.task for e in examples], self.tokenizer.pad_token_id)
