"""ColdStart: off-policy warm-up before on-policy distillation, i.e. SFT of the student on its teachers' samples.

Each prompt is routed by its domain tag to that domain's frozen teacher, the teacher samples completions
(several per prompt if asked; optionally only those the task's verifier accepts are kept), and the student
learns them teacher-forced with the SFT loss: sequence-level knowledge distillation (Kim & Rush 2016), the
"cold start" on expert samples that precedes on-policy distillation in DeepSeek-V4 / MiMo / Qwen3-style
pipelines. Its purpose is to make the student's own samples land where the teachers put mass, which the
validation measures directly: the top-k overlap between student and teacher next-token distributions on
held-out *student* rollouts (`val/topk_overlap/<domain>`), which should rise during cold start.

Where the teacher samples come from (`cold_start.cache_dir`):

* `null`: on the fly. Every training batch's prompts are sampled by their teachers inside the step.
* a folder: once, up front (at fit start), the teachers sample `cold_start.cache_prompts` prompts taken from
  the head of the datamodule's own training stream (each data-parallel rank samples its share), and the rows
  are written atomically as a `datasets` folder (one Arrow shard per rank plus `cold_start_meta.json`). A later
  run with the same teachers, tokenizer, sampling and task mixture reuses it without touching the teachers;
  any other settings are refused with the differing fields named (regenerating silently would throw away
  expensive samples, reusing silently would train on the wrong ones). Training steps then draw cached rows in
  a seeded permutation per pass over the cache, addressed by the run's batch index, so resuming is exact.
  The datamodule still drives the loop in this mode: it is the step clock (epochs, validation cadence,
  checkpoint/resume) and `len(batch) * sampling.num_samples` sets the rows per step; the prompts of its
  training batches are not used. `filter_correct` is applied when reading, so changing it needs no new cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_info

from opd_lightning import rewards
from opd_lightning.data.batch import PromptBatch, SFTBatch, make_sft_batch
from opd_lightning.losses import completion_nll, masked_mean
from opd_lightning.metrics import DomainMean
from opd_lightning.rollout import SamplingConfig, completion_logits
from opd_lightning.stages.base import PolicyModule
from opd_lightning.teachers import TeacherPool

CACHE_META = "cold_start_meta.json"
CACHE_FORMAT = 1
VAL_METRICS = (
    "topk_overlap",
    "student_shared_mass",
    "teacher_shared_mass",
    "teacher_sample_nll",
    "teacher_accuracy",
)


@dataclass
class ColdStartConfig:
    """Where teacher samples come from, which are kept, and the validation diagnostics."""

    filter_correct: bool = False
    """Keep only teacher samples the task's verifier scores fully correct (`rewards.correctness` == 1)."""
    cache_dir: str | None = None
    """Folder of teacher samples generated once at fit start and reused by later runs; null samples on the
    fly in every training step."""
    cache_prompts: int = 1024
    """Prompts (all ranks together, from the head of the training stream) the teachers sample into the
    cache; each gives `sampling.num_samples` rows."""
    micro_batch_size: int | None = None
    """Rows per teacher / student forward when scoring at validation; null scores a batch at once."""
    overlap_k: int = 8
    """k of the top-k overlap between student and teacher logged at validation."""
    seed: int = 0
    """Seeds teacher sampling (with the batch index and rank) and the order rows are drawn from the cache."""

    def __post_init__(self) -> None:
        if self.cache_prompts < 1:
            raise ValueError(f"cold_start.cache_prompts must be >= 1, got {self.cache_prompts}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"cold_start.micro_batch_size must be >= 1 or null, got {self.micro_batch_size}")
        if self.overlap_k < 1:
            raise ValueError(f"cold_start.overlap_k must be >= 1, got {self.overlap_k}")


class ColdStart(PolicyModule):
    """Student SFT on completions sampled by each prompt's domain teacher (on the fly or from a disk cache)."""

    train_format = "prompts"
    frozen_modules = ("teachers",)

    def __init__(
        self,
        teachers: dict[str, str],
        sampling: SamplingConfig | None = None,
        cold_start: ColdStartConfig | None = None,
        **kwargs,
    ):
        """
        Args:
            teachers: domain tag -> local HF folder of that domain's frozen teacher; a `default` entry takes
                every domain without its own. Tokenizers must equal the student's (checked here).
            sampling: how teachers sample completions (temperature, max_new_tokens, num_samples per prompt).
            cold_start: sample source (on the fly / cache), the correctness filter, validation diagnostics.
            **kwargs: the policy and optimiser arguments of `PolicyModule` (model, dtype, optimizer, eval, ...).
        """
        super().__init__(**kwargs)
        self.sampling = sampling or SamplingConfig()
        self.config = cold_start or ColdStartConfig()
        self.teachers = TeacherPool(teachers, field="model.init_args.teachers")
        self.teachers.check_tokenizers(self.tokenizer, trust_remote_code=self.hparams.trust_remote_code)
        self.cache = None  # the cached rows (a datasets.Dataset) once loaded, in cache mode
        self._cache_kept: torch.Tensor | None = None  # [K] ids of the cached rows that pass filter_correct
        self._permutation: tuple[int, torch.Tensor] | None = None  # (pass over the cache, its row order)
        self._val_teacher_rows: dict[str, list[dict]] = {}

    # ------------------------------------------------------------------------------------ building

    def configure_model(self) -> None:
        super().configure_model()
        self.teachers.load(dtype=self.hparams.dtype, trust_remote_code=self.hparams.trust_remote_code)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self.trainer.datamodule
        if datamodule.train_format != "prompts":
            raise ValueError(
                "ColdStart trains on prompts: set data.train_format to 'prompts' (the CLI links it)"
            )
        self.teachers.check_domains(datamodule.domains)  # a missing route fails here, before any model loads
        self.val_metrics = torch.nn.ModuleDict({name: DomainMean(datamodule.domains) for name in VAL_METRICS})

    def max_new_tokens(self) -> int:
        return self.sampling.max_new_tokens

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.config.cache_dir is not None:
            self._load_or_build_cache(Path(self.config.cache_dir))

    # ------------------------------------------------------------------------------------ training

    def training_step(self, batch: PromptBatch, batch_idx: int):
        # 1. teacher samples: drawn from the cache, or sampled now by each prompt's routed teacher
        # the batch index counts batches, not optimiser steps (accumulation), and is restored on resume
        step = self.trainer.fit_loop.total_batch_idx
        if self.cache is None:
            rows = self.teacher_rows(batch, self._generator(step, salt=0))
        else:
            rows = self._cached_rows(step, len(batch) * self.sampling.num_samples)
        scores = torch.tensor([r["reward"] for r in rows], device=self.device)
        keep = scores >= 1.0 if self.config.filter_correct else torch.ones_like(scores, dtype=torch.bool)

        # 2. the student, teacher-forced on prompt + teacher completion; loss on the completion tokens (EOS
        # included). Rejected rows stay in the batch with an empty mask, so every rank runs the same forward.
        samples = collate_rows(rows, self.tokenizer.pad_token_id, self.device)
        logits = self.policy(input_ids=samples.input_ids, attention_mask=samples.attention_mask).logits
        targets, mask = samples.input_ids[:, 1:], samples.loss_mask[:, 1:] & keep[:, None]
        loss, metrics = completion_nll(logits[:, :-1], targets, mask, normalizer=self.token_normalizer(mask))

        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()})
        self.log("train/completion_tokens", mask.sum().float(), reduce_fx="sum")
        self.log("train/frac_kept", keep.float().mean())
        if self.cache is None:  # in cache mode: cache/teacher_accuracy, logged once at fit start
            self.log("train/teacher_accuracy", scores.mean())
            for domain in sorted(set(samples.domains)):
                self.log(
                    f"train/teacher_accuracy/{domain}",
                    scores[_is(samples.domains, domain, self.device)].mean(),
                )
        return loss

    @torch.no_grad()
    def teacher_rows(self, batch: PromptBatch, generator: torch.Generator | None) -> list[dict]:
        """`sampling.num_samples` completions of each prompt by its routed teacher, scored by the verifier,
        as rows (the cache's columns): unpadded token ids, domain, task, teacher, reward, truncated."""
        rollout = self.teachers.generate(
            batch.prompt_ids,
            batch.prompt_mask,
            batch.domains,
            self.sampling,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            generator=generator,
            tokenizer=self.tokenizer,
        )
        source = rollout.prompt_index.tolist()  # [N] row of the batch each completion answers
        scores = rewards.correctness(rollout.decode(self.tokenizer), [batch.entries[i] for i in source])
        teachers = self.teachers.route(rollout.domains)
        return [
            {
                "prompt_ids": batch.prompt_ids[i][batch.prompt_mask[i]].tolist(),
                "completion_ids": rollout.completion_ids[j][rollout.completion_mask[j]].tolist(),
                "domain": batch.domains[i],
                "task": batch.tasks[i],
                "teacher": teachers[j],
                "reward": float(scores[j]),
                "truncated": bool(rollout.is_truncated[j]),
            }
            for j, i in enumerate(source)
        ]

    def _generator(self, index: int, salt: int) -> torch.Generator:
        """Seeded by (seed, batch index, rank, purpose), so runs are reproducible and resumable."""
        seed = ((self.config.seed * 1_000_003 + index) * 1_009 + self.global_rank) * 7 + salt
        return torch.Generator(device=self.device).manual_seed(seed)

    # ------------------------------------------------------------------------------------ the cache

    def cache_meta(self) -> dict:
        """What the cached rows depend on; a cache whose meta differs is refused: format, teachers (routes and
        weights), tokenizer, sampling, number of prompts, seed, and the task mixture with its seed. The
        data-parallel layout and batch size are left out: any prompts of the same mixture serve."""
        data = self.trainer.datamodule
        meta = {
            "format": CACHE_FORMAT,
            "routes": self.teachers.routes,
            "teachers": {name: weights_fingerprint(path) for name, path in self.teachers.paths.items()},
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "sampling": {k: v for k, v in asdict(self.sampling).items() if k != "sync_ranks"},
            "cache_prompts": self.config.cache_prompts,
            "seed": self.config.seed,
            "data": {
                "tasks": [asdict(s) for s in data.specs],
                "domain_weights": data.domain_weights,
                "ood_ratio": data.ood_ratio,
                "system_prompt": data.system_prompt,
                "seed": data.seed,
            },
        }
        return json.loads(json.dumps(meta))  # tuples -> lists, as they read back from disk

    def _load_or_build_cache(self, path: Path) -> None:
        import datasets

        field = f"model.init_args.cold_start.cache_dir={str(path)!r}"
        meta = self.cache_meta()
        if not path.exists():
            self._build_cache(path, meta)
        if not (path / CACHE_META).is_file():
            raise ValueError(
                f"{field} exists but is not a cold-start cache (no {CACHE_META}); use another folder"
            )
        stored = json.loads((path / CACHE_META).read_text())
        differ = [k for k in sorted(meta.keys() | stored.keys()) if meta.get(k) != stored.get(k)]
        if differ:
            raise ValueError(
                f"{field} holds teacher samples made with other settings (differing: {', '.join(differ)}). "
                "Delete the folder to regenerate it, or point cache_dir at a new folder."
            )
        shards = sorted(p for p in path.iterdir() if p.name.startswith("shard-"))
        self.cache = datasets.concatenate_datasets([datasets.load_from_disk(str(p)) for p in shards])
        scores = torch.tensor(self.cache["reward"], dtype=torch.float64)
        kept = scores >= 1.0 if self.config.filter_correct else torch.ones_like(scores, dtype=torch.bool)
        self._cache_kept = kept.nonzero().flatten()
        if len(self._cache_kept) == 0:
            raise ValueError(
                f"{field}: none of the {len(scores)} cached teacher samples is correct, so "
                "filter_correct keeps nothing; check the teachers or set filter_correct: false"
            )
        domains = self.cache["domain"]
        stats = {
            "cache/rows": float(len(scores)),
            "cache/frac_kept": kept.double().mean().item(),
            "cache/teacher_accuracy": scores.mean().item(),
        }
        for domain in sorted(set(domains)):
            stats[f"cache/teacher_accuracy/{domain}"] = scores[[d == domain for d in domains]].mean().item()
        rank_zero_info(
            f"[opd] cold start cache {path}: " + ", ".join(f"{k} {v:.3g}" for k, v in stats.items())
        )
        if self.logger is not None:
            self.logger.log_metrics(stats, step=self.global_step)

    def _build_cache(self, path: Path, meta: dict) -> None:
        """Sample this rank's share of the cache prompts; write shards to a temporary sibling, then rename, so
        `path` appears complete or not at all."""
        import datasets

        strategy, rank, world = self.trainer.strategy, self.global_rank, self.trainer.world_size
        tmp = path.with_name(f".{path.name}.tmp")
        if self.trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run that died while writing
            tmp.mkdir(parents=True)
        strategy.barrier("cold_start_cache_tmp")
        share = self.config.cache_prompts // world + int(rank < self.config.cache_prompts % world)
        rows, seen = [], 0
        for g, batch in enumerate(_endless(self.trainer.datamodule.train_dataloader())):  # from batch 0
            if seen >= share:
                break
            batch = move_data_to_device(_head(batch, share - seen), self.device)
            seen += len(batch)
            rows += self.teacher_rows(batch, self._generator(g, salt=1))
            rank_zero_info(f"[opd] cold start cache: rank {rank} sampled {seen}/{share} prompts")
        features = _cache_features()
        columns = {k: [r[k] for r in rows] for k in features}
        datasets.Dataset.from_dict(columns, features=datasets.Features(features)).save_to_disk(
            str(tmp / f"shard-{rank:05d}")
        )
        strategy.barrier("cold_start_cache_written")
        if self.trainer.is_global_zero:
            (tmp / CACHE_META).write_text(json.dumps(meta, indent=2))
            os.rename(tmp, path)
        strategy.barrier("cold_start_cache_renamed")

    def _cached_rows(self, step: int, count: int) -> list[dict]:
        """Positions `[start, start + count)` of an endless stream of seeded permutations of the kept rows,
        each rank and batch its own slice: every kept row is seen once per pass over the cache."""
        n = len(self._cache_kept)
        start = (step * self.trainer.world_size + self.global_rank) * count
        ids = []
        for position in range(start, start + count):
            epoch, i = divmod(position, n)
            if self._permutation is None or self._permutation[0] != epoch:
                gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
                self._permutation = (epoch, torch.randperm(n, generator=gen))
            ids.append(int(self._cache_kept[self._permutation[1][i]]))
        columns = self.cache[ids]
        return [{k: columns[k][j] for k in columns} for j in range(len(ids))]

    # ------------------------------------------------------------------------------------ validation

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)  # greedy accuracy of the student, val/accuracy/<domain>
        m, micro = self.val_metrics, self.config.micro_batch_size

        # the student's own samples (temperature 1, as OPD will draw them) scored by each row's teacher
        config = SamplingConfig(max_new_tokens=self.eval_config.max_new_tokens, temperature=1.0)
        rollout = self.sample(self.policy, batch, config, self._generator(batch_idx, salt=2))
        c = rollout.completion_ids.shape[1]
        for index in torch.arange(len(rollout), device=self.device).split(micro or len(rollout)):
            part = rollout.select(index)
            with torch.no_grad():
                student = completion_logits(self.policy, part.input_ids, part.attention_mask, c)  # [m, C, V]
                stats = self.teachers.score(
                    part, student_logits=student, overlap_k=self.config.overlap_k
                ).stats
            del student
            for domain in sorted(set(part.domains)):
                mask = part.completion_mask & _is(part.domains, domain, self.device)[:, None]
                for name in ("topk_overlap", "student_shared_mass", "teacher_shared_mass"):
                    m[name].update(masked_mean(stats[name], mask), [domain], mask.sum().float())

        # teacher samples on the held-out prompts (sampled once; the teachers are frozen): the student's NLL.
        # Micro-batches of rows, not of domains: under FSDP every rank must run the same number of forwards.
        key = hashlib.sha1(batch.prompt_ids.cpu().numpy().tobytes()).hexdigest()
        if key not in self._val_teacher_rows:
            self._val_teacher_rows[key] = self.teacher_rows(batch, self._generator(batch_idx, salt=3))
        chunk = micro or len(self._val_teacher_rows[key])
        for lo in range(0, len(self._val_teacher_rows[key]), chunk):
            rows = self._val_teacher_rows[key][lo : lo + chunk]
            samples = collate_rows(rows, self.tokenizer.pad_token_id, self.device)
            with torch.no_grad():
                logits = self.policy(
                    input_ids=samples.input_ids, attention_mask=samples.attention_mask
                ).logits
            for domain in sorted(set(samples.domains)):
                mask = samples.loss_mask[:, 1:] & _is(samples.domains, domain, self.device)[:, None]
                _, metrics = completion_nll(logits[:, :-1], samples.input_ids[:, 1:], mask)
                m["teacher_sample_nll"].update(metrics["nll"], [domain], mask.sum().float())
            m["teacher_accuracy"].update(torch.tensor([r["reward"] for r in rows]), samples.domains)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        values = {}
        for name, metric in self.val_metrics.items():
            values.update({f"val/{name}/{d}": v for d, v in metric.compute().items()})
            values[f"val/{name}"] = (metric.total.sum() / metric.count.sum().clamp(min=1)).float()
            metric.reset()
        self.log_val_metrics(values)


# ---------------------------------------------------------------------------------------- row helpers


def _cache_features() -> dict:
    import datasets

    return {
        "prompt_ids": datasets.Sequence(datasets.Value("int32")),  # the prompt, chat template included
        "completion_ids": datasets.Sequence(datasets.Value("int32")),  # the teacher's answer + EOS
        "domain": datasets.Value("string"),
        "task": datasets.Value("string"),
        "teacher": datasets.Value("string"),  # key of `teachers` that sampled it
        "reward": datasets.Value("float32"),  # rewards.correctness of the completion
        "truncated": datasets.Value("bool"),  # hit max_new_tokens without EOS
    }


def collate_rows(rows: list[dict], pad_token_id: int, device) -> SFTBatch:
    """Prompt + completion rows as one right-padded SFT batch with the loss mask on the completion."""
    batch = make_sft_batch([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows],
                           [r["domain"] for r in rows], [r.get("task", "") for r in rows], pad_token_id)
    return move_data_to_device(batch, device)


def _endless(loader):
    """The training stream past epoch ends (each pass over the loader continues where the last stopped)."""
    while True:
        yield from loader


def _is(domains: list[str], domain: str, device) -> torch.Tensor:  # [N] bool
    return torch.tensor([d == domain for d in domains], device=device)


def _head(batch: PromptBatch, n: int) -> PromptBatch:
    if n >= len(batch):
        return batch
    return PromptBatch(
        batch.prompt_ids[:n],
        batch.prompt_mask[:n],
        batch.domains[:n],
        batch.aligned[:n],
        batch.tasks[:n],
        batch.entries[:n],
    )


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id]
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()[:16]


def weights_fingerprint(path: Path, edge_bytes: int = 1 << 20) -> str:
    """A cheap content hash of a model folder: config.json, and each weight file's size, head and tail
    (changes whenever the weights are retrained; survives copying the folder elsewhere)."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(edge_bytes))
            fh.seek(max(0, size - edge_bytes))
            h.update(fh.read(edge_bytes))
    return h.hexdigest()[:16]
