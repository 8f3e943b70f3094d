"""Teacher samples for ColdStart: routed teachers' completions as rows, and the disk cache that keeps them.

A *row* is one teacher completion of one prompt, with the prompt, the domain that routed it, the teacher, and
the verifier's reading of it (`reward`: partial credit, `correct`: exact match); see :func:`features`.

The cache (`cold_start.cache_dir`): once, at fit start, the teachers sample `cold_start.cache_prompts` prompts
from the head of the datamodule's own training stream (each data-parallel rank its share), and the rows are
written atomically as a `datasets` folder (one Arrow shard per rank plus `cold_start_meta.json`). A later run
whose samples would come out the same (:func:`cache_meta`) reuses it without touching the teachers; any other
settings are refused with the differing fields named: regenerating silently would throw away expensive
samples, reusing silently would train on the wrong ones. :class:`TeacherSampleCache` draws rows in a seeded
permutation per pass over the cache, addressed by the run's batch index, so resuming is exact;
`filter_correct` is applied when reading, so changing it needs no new cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_info

from opd_lightning import rewards
from opd_lightning.data.batch import PromptBatch, SFTBatch, make_sft_batch
from opd_lightning.rollout import Rollout, SamplingConfig
from opd_lightning.seeding import make_generator
from opd_lightning.sharding import lockstep_counts

if TYPE_CHECKING:
    from opd_lightning.data.datamodule import PromptDataModule
    from opd_lightning.teachers import TeacherPool

__all__ = [
    "CACHE_FORMAT",
    "CACHE_META",
    "TeacherSampleCache",
    "cache_meta",
    "collate_rows",
    "file_digest",
    "model_fingerprint",
    "rows_from_rollout",
    "write_cache",
]

CACHE_META = "cold_start_meta.json"
CACHE_FORMAT = 3
"""2: a `correct` column; teachers fingerprinted by whole weight files; tokenizer files and chat template.
3: samples seeded per row of the stream (`seeding.row_uniforms`), rows read in a `seeding` permutation."""
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)  # fmt: skip


def features() -> dict:
    import datasets

    return {
        "prompt_ids": datasets.Sequence(datasets.Value("int32")),  # the prompt, chat template included
        "completion_ids": datasets.Sequence(datasets.Value("int32")),  # the teacher's answer + EOS
        "domain": datasets.Value("string"),
        "task": datasets.Value("string"),
        "teacher": datasets.Value("string"),  # name of the teacher that sampled it
        "reward": datasets.Value("float32"),  # the verifier's partial credit
        "correct": datasets.Value("bool"),  # exact match: full credit
        "truncated": datasets.Value("bool"),  # hit max_new_tokens without EOS
    }


# ---------------------------------------------------------------------------------------------- rows


def rows_from_rollout(batch: PromptBatch, rollout: Rollout, teachers: list[str], tokenizer) -> list[dict]:
    """The completions of a teacher rollout of `batch` (`teachers`: [N] the teacher of each row), verified,
    as rows: unpadded token ids and the columns of :func:`features`."""
    source = rollout.prompt_index.tolist()  # [N] row of the batch each completion answers
    reward, correct = rewards.verify(rollout.decode(tokenizer), [batch.entries[i] for i in source])
    return [
        {
            "prompt_ids": batch.prompt_ids[i][batch.prompt_mask[i]].tolist(),
            "completion_ids": rollout.completion_ids[j][rollout.completion_mask[j]].tolist(),
            "domain": batch.domains[i],
            "task": batch.tasks[i],
            "teacher": teachers[j],
            "reward": float(reward[j]),
            "correct": bool(correct[j]),
            "truncated": bool(rollout.is_truncated[j]),
        }
        for j, i in enumerate(source)
    ]


def collate_rows(rows: list[dict], pad_token_id: int, device) -> SFTBatch:
    """Prompt + completion rows as one SFT batch (prompts left-, completions right-padded)."""
    batch = make_sft_batch([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows],
                           [r["domain"] for r in rows], [r["task"] for r in rows], pad_token_id)  # fmt: skip
    return move_data_to_device(batch, device)


# ---------------------------------------------------------------------------------------- fingerprint

_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """blake2b of a file's whole content, streamed in 8 MiB chunks. At ~1 GB/s (disk or page cache) a 16 GB
    teacher adds ~16 s to a cached run's start, once per process: the digest is kept per (path, inode, size,
    mtime) for later fits in the same process (a notebook, a sweep)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.blake2b(digest_size=16)
        with path.open("rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def _json_digest(path: Path) -> str | None:
    """A JSON config's content, less the version of `transformers` that happened to write it."""
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    config.pop("transformers_version", None)
    return _digest(config)


def _digest(value) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True).encode(), digest_size=16).hexdigest()


def model_fingerprint(folder: Path) -> dict:
    """What a teacher's samples depend on in its folder: each weight file's whole content, `config.json`, and
    `generation_config.json` (its stop tokens). Not the folder's path: a copy of the teacher reuses the cache."""
    weights = sorted({f for pattern in WEIGHT_FILES for f in folder.glob(pattern)})
    return {
        "weights": {f.name: file_digest(f) for f in weights},
        "config": _json_digest(folder / "config.json"),
        "generation_config": _json_digest(folder / "generation_config.json"),
    }


def _prompts_fingerprint(datamodule: PromptDataModule) -> str:
    """The training pools as encoded (tokens after the chat template, domain, answer): catches an edited
    prompt file, which the task specs alone would not."""
    h = hashlib.blake2b(digest_size=16)
    for task in sorted(datamodule.train_pools):
        for e in datamodule.train_pools[task]:
            h.update(json.dumps([task, e.prompt_ids, e.domain, e.aligned, str(e.entry["answer"])]).encode())
    return h.hexdigest()


def cache_meta(
    *,
    teachers: TeacherPool,
    dtype: str,
    tokenizer,
    tokenizer_dir: Path,
    sampling: SamplingConfig,
    cache_prompts: int,
    seed: int,
    datamodule: PromptDataModule,
) -> dict:
    """Everything the cached rows depend on; a cache whose meta differs is refused, naming the fields. The
    teachers (routes; weights, config and generation config by content; dtype), the student's tokenizer files
    and chat template (they make the prompt tokens), sampling, number of prompts, seed, and the task mixture
    with its seed and its encoded prompts. The data-parallel layout and batch size are left out: any prompts
    of the same mixture serve."""
    meta = {
        "format": CACHE_FORMAT,
        "routes": teachers.routes,
        "teachers": {name: model_fingerprint(path) for name, path in teachers.paths.items()},
        "dtype": str(dtype),
        "tokenizer": {
            f: file_digest(tokenizer_dir / f) for f in TOKENIZER_FILES if (tokenizer_dir / f).is_file()
        },
        "chat_template": _digest(tokenizer.chat_template),
        "sampling": {k: v for k, v in asdict(sampling).items() if k != "sync_ranks"},
        "cache_prompts": cache_prompts,
        "seed": seed,
        "data": {
            "tasks": [asdict(s) for s in datamodule.specs],
            "domain_weights": datamodule.domain_weights,
            "ood_ratio": datamodule.ood_ratio,
            "system_prompt": datamodule.system_prompt,
            "seed": datamodule.seed,
            "stream_seed": datamodule.stream_seed,
            "prompts": _prompts_fingerprint(datamodule),
        },
    }
    return json.loads(json.dumps(meta))  # tuples -> lists, as they read back from disk


def _flatten(meta: dict, prefix: str = "") -> dict:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`, so a refusal names the innermost differing field."""
    out = {}
    for key, value in meta.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ------------------------------------------------------------------------------------------- the cache


def write_cache(
    path: Path,
    meta: dict,
    *,
    loader: Iterable[PromptBatch],
    prompts: int,
    sample: Callable[[PromptBatch, int], list[dict]],
    strategy,
    device,
) -> None:
    """Sample this rank's share of `prompts` prompts from the head of `loader` (the training stream from batch
    0) with `sample(batch, batch_index) -> rows`; write the shards to a temporary sibling, then rename, so
    `path` appears complete or not at all. `strategy`: the trainer's, for rank, world size and barriers."""
    import datasets

    rank, world = strategy.global_rank, strategy.world_size
    tmp = path.with_name(f".{path.name}.tmp")
    if strategy.is_global_zero:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run that died while writing
        tmp.mkdir(parents=True)
    strategy.barrier("cold_start_cache_tmp")
    share = prompts // world + int(rank < prompts % world)
    rows, seen = [], 0
    for g, batch in enumerate(_endless(loader)):
        # Every rank samples until the rank with the largest share is done: sharded (FSDP2) teachers decode in
        # lockstep, so a rank that stopped early would leave the others waiting. Extra calls keep nothing.
        if not lockstep_counts([int(seen < share)], device)[0]:
            break
        batch = move_data_to_device(_head(batch, max(share - seen, 1)), device)
        if seen >= share:
            sample(batch, g)
            continue
        seen += len(batch)
        rows += sample(batch, g)
        rank_zero_info(f"[opd] cold start cache: rank {rank} sampled {seen}/{share} prompts")
    columns = features()
    datasets.Dataset.from_dict(
        {k: [r[k] for r in rows] for k in columns}, features=datasets.Features(columns)
    ).save_to_disk(str(tmp / f"shard-{rank:05d}"))
    strategy.barrier("cold_start_cache_written")
    if strategy.is_global_zero:
        (tmp / CACHE_META).write_text(json.dumps(meta, indent=2))
        os.rename(tmp, path)
    strategy.barrier("cold_start_cache_renamed")


class TeacherSampleCache:
    """A written cache, checked against `meta` (refused with the differing fields named), read as an endless
    stream of seeded permutations of its kept rows (all rows, or only the correct ones with `filter_correct`).

    Args:
        path: the cache folder.
        meta: what the rows must have been made with (:func:`cache_meta`).
        filter_correct: keep only the rows the verifier scored fully correct.
        seed: seeds the row order.
        field: the YAML field that names the folder, for errors.
    """

    def __init__(self, path: Path, meta: dict, *, filter_correct: bool, seed: int, field: str):
        import datasets

        where = f"{field}={str(path)!r}"
        if not (path / CACHE_META).is_file():
            raise ValueError(
                f"{where} exists but is not a cold-start cache (no {CACHE_META}); use another folder"
            )
        stored = json.loads((path / CACHE_META).read_text())
        fix = "Delete the folder to regenerate it, or point cache_dir at a new folder."
        if stored.get("format") != meta["format"]:
            raise ValueError(
                f"{where} was written in cache format {stored.get('format')}, this version reads format "
                f"{meta['format']}. {fix}"
            )
        now, then = _flatten(meta), _flatten(stored)
        differ = [k for k in sorted(now.keys() | then.keys()) if now.get(k) != then.get(k)]
        if differ:
            raise ValueError(
                f"{where} holds teacher samples made with other settings (differing: {', '.join(differ)}). "
                + fix
            )
        shards = sorted(p for p in path.iterdir() if p.name.startswith("shard-"))
        self.data = datasets.concatenate_datasets([datasets.load_from_disk(str(p)) for p in shards])
        correct = torch.tensor(self.data["correct"], dtype=torch.bool)  # [R]
        self.kept = (
            correct.nonzero().flatten() if filter_correct else torch.arange(len(correct))
        )  # [K] row ids
        if len(self.kept) == 0:
            raise ValueError(
                f"{where}: none of the {len(correct)} cached teacher samples is correct, so filter_correct "
                "keeps nothing; check the teachers or set filter_correct: false"
            )
        self.seed = seed
        self._permutation: tuple[int, torch.Tensor] | None = None  # (pass over the cache, its row order)

    def rows(self, step: int, rank: int, world_size: int, count: int) -> list[dict]:
        """`count` rows for batch `step` of `rank`: positions `[start, start + count)` of the endless stream,
        each rank and batch its own slice, so every kept row is seen once per pass over the cache."""
        n = len(self.kept)
        start = (step * world_size + rank) * count
        ids = []
        for position in range(start, start + count):
            epoch, i = divmod(position, n)
            if self._permutation is None or self._permutation[0] != epoch:
                gen = make_generator(self.seed, "cache_order", epoch)
                self._permutation = (epoch, torch.randperm(n, generator=gen))
            ids.append(int(self.kept[self._permutation[1][i]]))
        columns = self.data[ids]
        return [{k: columns[k][j] for k in columns} for j in range(len(ids))]

    def stats(self) -> dict[str, float]:
        """Size, share kept, and the teachers' accuracy (exact match) and reward (partial credit)."""
        reward = torch.tensor(self.data["reward"], dtype=torch.float64)
        correct = torch.tensor(self.data["correct"], dtype=torch.float64)
        domains = self.data["domain"]
        stats = {
            "cache/rows": float(len(correct)),
            "cache/frac_kept": len(self.kept) / len(correct),
            "cache/teacher_accuracy": correct.mean().item(),
            "cache/teacher_reward": reward.mean().item(),
        }
        for domain in sorted(set(domains)):
            stats[f"cache/teacher_accuracy/{domain}"] = correct[[d == domain for d in domains]].mean().item()
        return stats


def _endless(loader):
    """The training stream past epoch ends (each pass over the loader continues where the last stopped)."""
    while True:
        yield from loader


def _head(batch: PromptBatch, n: int) -> PromptBatch:
    if n >= len(batch):
        return batch
    return PromptBatch(
        batch.prompt_ids[:n], batch.prompt_mask[:n], batch.domains[:n], batch.aligned[:n], batch.tasks[:n],
        batch.entries[:n],
    )  # fmt: skip
