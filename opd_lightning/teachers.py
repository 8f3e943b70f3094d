"""Routing each sample to its domain's teacher, and scoring rollouts under the routed teachers.

:class:`TeacherRoutes` says which teacher takes which sample: the YAML mapping ``domain -> teacher folder``,
with ``default`` catching domains with no entry (untagged or OOD prompts). :class:`TeacherPool` adds the
frozen teachers themselves (MiMo's multi-teacher OPD, DeepSeek-V4's domain experts). MultiExpertOPD scores
the student's samples with it; ColdStart samples from it (:meth:`TeacherPool.generate`, the routed teacher
answers each prompt). A stage wires it in three calls: :meth:`TeacherPool.for_student` in ``__init__``,
:meth:`TeacherPool.load` in ``configure_frozen_models`` and :meth:`TeacherRoutes.check_domains` in ``setup``.

Mechanics, in the order a batch meets them:

* **Routes.** Folders shared by several domains load once, under one name (``"math+code"``); names are
  unique ModuleDict keys and log tags. :meth:`TeacherRoutes.check_domains` compares the routes with the
  data's domains at start-up.
* **Scoring** (:meth:`TeacherPool.score`) runs each teacher only on the rows routed to it, one
  teacher-forced forward per micro-batch (bounded in rows and in padded tokens, :func:`forward_chunks`), under
  ``no_grad``. It returns the teacher log-probs of the sampled tokens and, as the loss needs them, either the
  full teacher logits of the completion positions (dense, or kept as hidden states and LM heads for the losses
  to make a chunk at a time) or only a top-k support (O(k) per token). Unless the dense full logits are asked
  for, the forward stops at the final hidden states and the LM head runs on a chunk of completion positions at
  a time, each chunk reduced before the next (:mod:`opd_lightning.ops`), so the top-k and sampled-token paths
  never hold ``[N, C, V]``. Given the student's logits it also returns
  :func:`opd_lightning.metrics.distillation_stats` (exact reverse KL, entropies, top-k overlap), computed on
  the same chunks, so top-k mode monitors the exact KL.
* Teachers stay in eval mode whatever ``.train()`` says, and never hold gradients (``load_frozen``).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from opd_lightning.metrics import DISTILLATION_STATS, distillation_stats
from opd_lightning.models import (
    check_local_path,
    check_same_tokenizer,
    load_frozen,
    load_tokenizer,
    stop_token_ids,
)
from opd_lightning.ops import (
    HiddenLogits,
    RoutedLogits,
    logits_at,
    position_chunks,
    support_logprobs,
    token_logprobs,
    topk_support,
)
from opd_lightning.rollout import (
    Rollout,
    SamplingConfig,
    completion_logits,
    generate,
    lazy_completion_logits,
    output_head,
)
from opd_lightning.sharding import is_sharded, lockstep_counts

__all__ = ["DEFAULT_ROUTE", "TeacherPool", "TeacherRoutes", "TeacherScores", "forward_chunks"]

DEFAULT_ROUTE = "default"
"""Key of the teacher that takes every domain without a route of its own."""


@dataclass
class TeacherScores:
    """Routed teacher scores of a rollout's completions (``N`` rows, ``C`` completion positions)."""

    teacher: list[str]  # [N] name of the teacher each row was routed to
    logprobs: Tensor  # [N, C] float32 log p_T(sampled token), 0 where the completion mask is False
    logits: Tensor | RoutedLogits | None = None  # [N, C, V] teacher logits at completion positions (full mode)
    support_ids: Tensor | None = None  # [N, C, K] top-k support (top-k mode), from ops.topk_support
    support_logprobs: Tensor | None = None  # [N, C, K] float32 log p_T at support_ids
    support_valid: Tensor | None = None  # [N, C, K] bool, False for duplicate ids of a "union" support
    stats: dict[str, Tensor] = field(default_factory=dict)
    """Per-token diagnostics ``[N, C]`` float32 of :func:`opd_lightning.metrics.distillation_stats` (only when
    the student's logits were given). Unmasked: reduce with the completion mask."""
    seconds: dict[str, float] = field(default_factory=dict)  # teacher -> wall time of its forwards
    tokens: dict[str, int] = field(default_factory=dict)  # teacher -> completion tokens it scored


def _safe_name(domains: Sequence[str], taken: set[str]) -> str:
    # ModuleDict keys may not contain "." nor shadow a ModuleDict attribute; "/" would nest log tags.
    name = re.sub(r"[^0-9A-Za-z_+-]", "_", "+".join(domains))
    name = f"{name}_teacher" if hasattr(nn.ModuleDict, name) else name
    # Sanitising is not one-to-one ("a.b" and "a_b" both give "a_b"): a repeated name would make one
    # teacher silently replace the other, so later folders get a numbered suffix.
    unique, n = name, 2
    while unique in taken:
        unique, n = f"{name}_{n}", n + 1
    return unique


def forward_chunks(
    rows: Tensor,
    prompt_lengths: Tensor,
    completion_lengths: Tensor,
    max_rows: int | None = None,
    token_budget: int | None = None,
) -> list[Tensor]:
    """The row sets of one teacher's scoring forwards: ``rows [n]`` (indices into the ``[N]`` lengths) cut into
    pieces of at most ``max_rows`` rows and ``token_budget`` padded tokens each.

    A forward of rows ``R`` computes ``|R| x (longest prompt + longest completion)`` tokens: the rollout forward
    cuts a batch to its own longest prompt and completion (:func:`opd_lightning.rollout.completion_logits`), whose
    length groups then only ever split it further. Rows split by ``max_rows`` in routed order, as without a
    budget, wherever that already fits it (the same forwards, the same results); otherwise they are taken in order
    of prompt length, so that rows of similar length share a forward, and a forward closes when the next row would
    take it over either bound. Under data parallelism the number of pieces may differ between ranks: a sharded
    teacher's caller evens it out (:meth:`TeacherPool.idle_forwards`).
    """
    plain = list(rows.split(max_rows or max(len(rows), 1)))
    if token_budget is None:
        return plain
    p, c = prompt_lengths.tolist(), completion_lengths.clamp(min=1).tolist()  # a forward keeps >= 1 position

    def padded(piece: Tensor) -> int:
        index = piece.tolist()
        return len(index) * (max(p[i] for i in index) + max(c[i] for i in index))

    longest = max(rows.tolist(), key=lambda i: p[i] + c[i])
    if p[longest] + c[longest] > token_budget:
        raise ValueError(
            f"distill.teacher_token_budget={token_budget}: one row alone is {p[longest] + c[longest]} padded tokens "
            f"(prompt {p[longest]} + completion {c[longest]}) and a forward takes whole rows; raise it to at least "
            "data.max_prompt_length + sampling.max_new_tokens"
        )
    if all(padded(piece) <= token_budget for piece in plain):
        return plain
    pieces: list[list[int]] = []
    longest_p = longest_c = 0  # of the open piece
    for i in rows[torch.argsort(prompt_lengths[rows], stable=True)].tolist():
        if pieces:
            longest_p, longest_c = max(longest_p, p[i]), max(longest_c, c[i])
            fits = (len(pieces[-1]) + 1) * (longest_p + longest_c) <= token_budget
            if fits and not (max_rows and len(pieces[-1]) == max_rows):
                pieces[-1].append(i)
                continue
        pieces.append([i])
        longest_p, longest_c = p[i], c[i]
    return [torch.tensor(piece, dtype=rows.dtype, device=rows.device) for piece in pieces]


class TeacherRoutes:
    """The ``domain -> teacher`` routes: which teacher (one per distinct folder) takes which sample.

    Args:
        routes: ``domain -> local teacher folder``; the key ``"default"`` takes unrouted domains.
        field: the YAML field the routes come from, named in errors (``<field>.<domain>``).
    """

    def __init__(self, routes: Mapping[str, str | os.PathLike], field: str = "model.init_args.teachers"):
        if not routes:
            raise ValueError(
                f"{field} is empty: map each data domain to a teacher folder (`math: path/to/hf`)"
            )
        self.field = field
        by_folder: dict[Path, list[str]] = {}
        for domain, path in routes.items():
            if not isinstance(domain, str) or not domain:
                raise ValueError(f"{field}: domain keys must be non-empty strings, got {domain!r}")
            folder = check_local_path(path, f"{field}.{domain}").resolve()
            by_folder.setdefault(folder, []).append(domain)
        self.paths: dict[str, Path] = {}  # teacher name -> folder
        self.fields: dict[str, str] = {}  # teacher name -> the YAML field that names it first
        self.routes: dict[str, str] = {}  # domain -> teacher name
        for folder, domains in by_folder.items():
            name = _safe_name(domains, set(self.paths))
            self.paths[name], self.fields[name] = folder, f"{field}.{domains[0]}"
            self.routes.update(dict.fromkeys(domains, name))

    @property
    def names(self) -> list[str]:
        """Teacher names, one per distinct folder, in the order of the YAML mapping."""
        return list(self.paths)

    def check_domains(self, domains: Sequence[str], data_field: str = "data.tasks") -> None:
        """Every data domain needs a route (its own or ``default``); fail at start-up, before any training."""
        if DEFAULT_ROUTE not in self.routes:
            missing = sorted(d for d in set(domains) if d not in self.routes)
            if missing:
                raise ValueError(
                    f"{data_field} has domain(s) {missing} with no teacher in {self.field} (routes: "
                    f"{sorted(self.routes)}). Add `{missing[0]}: <teacher folder>` under {self.field}, or a "
                    f"`{DEFAULT_ROUTE}: <teacher folder>` entry for every unrouted domain."
                )
        unused = sorted(d for d in self.routes if d != DEFAULT_ROUTE and d not in set(domains))
        if unused:
            rank_zero_warn(f"{self.field} routes domain(s) {unused} that no task in {data_field} has")

    def route(self, domains: Sequence[str]) -> list[str]:
        """The teacher name for each domain tag (``[N]`` -> ``[N]``); ``default`` takes unrouted ones."""
        fallback = self.routes.get(DEFAULT_ROUTE)
        out = []
        for d in domains:
            name = self.routes.get(d, fallback)
            if name is None:
                raise KeyError(f"domain {d!r} has no teacher in {self.field} and there is no `default`")
            out.append(name)
        return out

    def rows(self, domains: Sequence[str], device: torch.device | None = None) -> dict[str, Tensor]:
        """``teacher name -> row indices [n_t]`` routed to it; teachers without rows are left out."""
        routed = self.route(domains)
        out = {}
        for name in self.names:
            idx = [i for i, t in enumerate(routed) if t == name]
            if idx:
                out[name] = torch.tensor(idx, dtype=torch.long, device=device)
        return out


class TeacherPool(TeacherRoutes, nn.Module):
    """The routed teachers themselves: :class:`TeacherRoutes` plus a ``ModuleDict`` of frozen models keyed by
    teacher name, scored (:meth:`score`) or sampled (:meth:`generate`) row by routed row.

    Construction is cheap: it checks the folders exist and groups domains that share one, but loads no
    weights; :meth:`load` (called from the stage's ``configure_frozen_models``) does, once per folder.
    """

    def __init__(self, routes: Mapping[str, str | os.PathLike], field: str = "model.init_args.teachers"):
        nn.Module.__init__(self)
        TeacherRoutes.__init__(self, routes, field)
        self.models = nn.ModuleDict()

    @classmethod
    def for_student(
        cls,
        routes: Mapping[str, str | os.PathLike],
        tokenizer,
        *,
        trust_remote_code: bool = False,
        field: str = "model.init_args.teachers",
    ) -> TeacherPool:
        """The pool a stage builds in ``__init__``: folders checked, every teacher's tokenizer and chat
        template equal to the student's ``tokenizer`` (tokenizer files only, no weights), so a bad teacher
        fails before anything loads. Then ``pool.load(...)`` in ``configure_frozen_models`` and
        ``pool.check_domains(...)`` in ``setup``."""
        pool = cls(routes, field=field)
        pool.check_tokenizers(tokenizer, trust_remote_code=trust_remote_code)
        return pool

    def check_tokenizers(self, tokenizer, *, trust_remote_code: bool = False) -> None:
        """Each teacher's tokenizer must equal the student's (vocabulary, special tokens, chat template):
        token-level distillation compares distributions id by id. Reads tokenizer files only, no weights."""
        for name, path in self.paths.items():
            other = load_tokenizer(path, trust_remote_code=trust_remote_code)
            check_same_tokenizer(tokenizer, other, self.fields[name])

    def load(self, *, dtype: torch.dtype | str, trust_remote_code: bool = False) -> None:
        """Load every teacher (eval, no grad, in ``dtype``); idempotent, like Lightning's ``configure_model``."""
        for name, path in self.paths.items():
            if name not in self.models:
                self.models[name] = load_frozen(
                    path, dtype=dtype, field=self.fields[name], trust_remote_code=trust_remote_code
                )
                output_head(self.models[name])  # its one check forward runs here, not in the first scoring

    def train(self, mode: bool = True) -> TeacherPool:
        # Lightning calls .train() on the whole LightningModule at fit start: teachers must stay frozen
        # references (no dropout), whatever the student does.
        return super().train(False)

    @property
    def sharded(self) -> bool:
        """The teachers are FSDP2-sharded (ModelParallelStrategy): each of their forwards is a collective."""
        return any(is_sharded(model) for model in self.models.values())

    def idle_forwards(self, counts: dict[str, int], device: torch.device) -> dict[str, int]:
        """``teacher -> throw-away forwards this rank runs`` so that every rank runs as many forwards of each
        teacher as the busiest rank (``counts``: this rank's real ones). All 0 unless the teachers are sharded."""
        if not self.sharded:
            return dict.fromkeys(self.names, 0)
        mine = [counts.get(name, 0) for name in self.names]
        return {name: most - have for name, have, most in zip(self.names, mine, lockstep_counts(mine, device))}

    # ------------------------------------------------------------------------------------------- scoring

    @torch.no_grad()
    def score(
        self,
        rollout: Rollout,
        *,
        student_logits: Tensor | HiddenLogits | None = None,
        stats: bool = True,
        keep_logits: bool = False,
        lazy_logits: bool = False,
        top_k: int | None = None,
        top_k_from: Literal["teacher", "student", "union"] = "teacher",
        overlap_k: int = 8,
        micro_batch_size: int | None = None,
        token_budget: int | None = None,
    ) -> TeacherScores:
        """Score the completions of ``rollout`` under each row's routed teacher.

        Each teacher runs only on its rows, at most ``micro_batch_size`` rows and ``token_budget`` padded tokens
        per forward (default: all of them; :func:`forward_chunks`). Unless ``keep_logits`` without
        ``lazy_logits``, a forward yields the teacher's final hidden states
        (:func:`opd_lightning.rollout.lazy_completion_logits`) and its logits are made
        :data:`opd_lightning.ops.LOGIT_CHUNK_ELEMENTS` at a time, at completion positions only, each chunk
        reduced to what is asked for before the next: memory O(k) per token plus one chunk, not O(V).

        Args:
            rollout: completions to score; ``rollout.domains`` routes the rows.
            student_logits: the student's completion logits ``[N, C, V]`` (detached; dense or
                :class:`~opd_lightning.ops.HiddenLogits`), aligned with the rollout. Needed for ``top_k_from``
                "student" / "union" and for the diagnostics in ``stats``.
            stats: compute :func:`opd_lightning.metrics.distillation_stats` (when ``student_logits`` is given);
                the stage turns them off on the steps that do not log them (``distill.stats_every``).
            keep_logits: return the full teacher logits ``[N, C, V]`` (full-vocabulary losses).
            lazy_logits: with ``keep_logits``, return them as :class:`~opd_lightning.ops.RoutedLogits`: each
                forward's final hidden states and its teacher's LM head (dense where a teacher has no separable
                head, :func:`~opd_lightning.rollout.output_head`), so the losses make them a chunk at a time.
            top_k: return a top-k support instead (``ops.topk_support`` + ``ops.support_logprobs``), O(k)
                per token; ``None`` for none.
            top_k_from: whose top-k ids make the support.
            overlap_k: k of the top-k overlap diagnostic (:func:`opd_lightning.metrics.distillation_stats`).
            micro_batch_size: rows per teacher forward; bounds the teacher's activation memory.
            token_budget: padded tokens per teacher forward, rows x (longest prompt + longest completion) of its
                rows: bounds the activation memory on long completions too. A row longer than it is an error.

        Positions outside the completion mask get no logits: there ``logprobs`` and ``stats`` are 0, the support
        is ids ``0..K-1``, all valid, with log-prob 0 (finite fillers that masked losses never read).
        """
        n, c = rollout.completion_ids.shape
        device = rollout.completion_ids.device
        input_ids, attention_mask, mask = rollout.input_ids, rollout.attention_mask, rollout.completion_mask
        teacher_logprobs = torch.zeros((n, c), dtype=torch.float32, device=device)  # [N, C]
        outputs: dict[str, Tensor] = {}  # logits / support_* fields of TeacherScores
        with_stats = stats and student_logits is not None
        # the student's logits are made only where something reads them: the diagnostics or its top-k ids
        if not with_stats and (top_k is None or top_k_from == "teacher"):
            student_logits = None
        diagnostics = {key: torch.zeros_like(teacher_logprobs) for key in DISTILLATION_STATS if with_stats}
        seconds: dict[str, float] = {}
        tokens: dict[str, int] = {}
        kept: list[tuple[Tensor, Tensor | HiddenLogits]] = []  # (rows, logits) per forward, for lazy_logits

        routed = self.rows(rollout.domains, device)
        lengths = rollout.prompt_mask.sum(-1), mask.sum(-1)  # [N], [N]
        chunks = {name: forward_chunks(rows, *lengths, micro_batch_size, token_budget) for name, rows in routed.items()}
        idle = self.idle_forwards({name: len(parts) for name, parts in chunks.items()}, device)
        forward = completion_logits if keep_logits and not lazy_logits else lazy_completion_logits
        for name in self.names:
            model = self.models[name]
            for _ in range(idle[name]):  # a sharded teacher's forward is a collective: join the other ranks'
                completion_logits(model, input_ids[:1], attention_mask[:1], c)
            if name not in routed:
                continue
            rows = routed[name]
            start = time.perf_counter()
            for chunk in chunks[name]:
                teacher = forward(model, input_ids[chunk], attention_mask[chunk], c)  # [m, C, V]
                if keep_logits and lazy_logits:
                    kept.append((chunk, teacher))
                elif keep_logits:
                    if "logits" not in outputs:
                        outputs["logits"] = teacher.new_empty((n, *teacher.shape[1:]))
                    outputs["logits"][chunk] = teacher
                student = None if student_logits is None else student_logits[chunk].detach()
                if top_k is not None and "support_ids" not in outputs:
                    width = min(top_k, teacher.shape[-1]) * (2 if top_k_from == "union" else 1)
                    outputs["support_ids"] = torch.arange(width, device=device).expand(n, c, width).clone()
                    outputs["support_valid"] = torch.ones((n, c, width), dtype=torch.bool, device=device)
                    outputs["support_logprobs"] = torch.zeros((n, c, width), device=device)
                for local_rows, cols in position_chunks(mask[chunk], teacher.shape[-1]):
                    at = (chunk[local_rows], cols)  # these positions in the whole batch
                    logits = logits_at(teacher, local_rows, cols)  # [p, V]
                    teacher_logprobs[at] = token_logprobs(logits, rollout.completion_ids[at])
                    other = None if student is None else logits_at(student, local_rows, cols)  # [p, V]
                    if top_k is not None:
                        ids, valid = topk_support(other, logits, k=top_k, source=top_k_from)  # [p, K]
                        outputs["support_ids"][at], outputs["support_valid"][at] = ids, valid
                        outputs["support_logprobs"][at] = support_logprobs(logits, ids).float()
                    if with_stats:
                        for key, value in distillation_stats(other, logits, overlap_k).items():
                            diagnostics[key][at] = value
                del teacher  # the next micro-batch's forward may reuse this memory
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # kernels are asynchronous: time the work, not the launch
            seconds[name] = time.perf_counter() - start
            tokens[name] = int(mask[rows].sum())
        if kept:
            outputs["logits"] = RoutedLogits(kept, n)
        return TeacherScores(
            teacher=self.route(rollout.domains),
            logprobs=teacher_logprobs,
            stats=diagnostics,
            seconds=seconds,
            tokens=tokens,
            **outputs,
        )

    # ------------------------------------------------------------------------------------------ sampling

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        domains: Sequence[str],
        config: SamplingConfig,
        *,
        eos_token_id: int | list[int],
        pad_token_id: int,
        generator: torch.Generator | None = None,
        uniforms: Tensor | None = None,
        tokenizer=None,
    ) -> Rollout:
        """Completions sampled by each prompt's routed teacher, as one :class:`Rollout` in prompt order.

        For GKD's off-policy share (Agarwal et al. 2024) and ColdStart's teacher rollouts. Each teacher
        samples only its prompts; rows are padded to the longest completion of the batch. The behaviour
        log-probs are the teachers'. A teacher's sample ends at ``eos_token_id`` (the stage's stop ids) or
        at any EOS id of that teacher's own generation config (:func:`opd_lightning.models.stop_token_ids`).
        ``config.sync_ranks`` is ignored: unsharded teachers need no rank lockstep, and sharded ones (FSDP2)
        always decode in lockstep, a rank with no prompt for a teacher decoding a throw-away one meanwhile.
        """
        g = config.num_samples
        sharded = self.sharded
        if config.sync_ranks != sharded:
            config = SamplingConfig(**{**config.__dict__, "sync_ranks": sharded})
        routed = self.rows(domains, prompt_ids.device)
        idle = self.idle_forwards(dict.fromkeys(routed, 1), prompt_ids.device)
        parts = []
        for name in self.names:
            model = self.models[name]
            if idle[name]:
                # Greedy, so it draws nothing from `generator` (the real samples stay as they were), and every id
                # stops it: done at its first token, it only follows the other ranks' decode steps.
                throwaway = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=0.0, sync_ranks=True)
                every_id = list(range(model.get_output_embeddings().weight.shape[0]))
                generate(model, prompt_ids[:1], prompt_mask[:1], throwaway, eos_token_id=every_id,
                         pad_token_id=pad_token_id)  # fmt: skip
            if name not in routed:
                continue
            rows = routed[name]
            out_rows = (rows[:, None] * g + torch.arange(g, device=rows.device)).reshape(-1)  # [n_t * G]
            part = generate(
                model,
                prompt_ids[rows],
                prompt_mask[rows],
                config,
                eos_token_id=stop_token_ids(model, eos_token_id),
                pad_token_id=pad_token_id,
                domains=[domains[i] for i in rows.tolist()],
                generator=generator,
                # each output row keeps its own uniforms, so routing does not change what a row draws
                uniforms=None if uniforms is None else uniforms[out_rows],
                tokenizer=tokenizer,
            )
            parts.append((out_rows, part))
        n, c = prompt_ids.shape[0] * g, max(part.completion_ids.shape[1] for _, part in parts)
        device = prompt_ids.device

        def merged(attr: str, fill) -> Tensor:
            first = getattr(parts[0][1], attr)
            out = torch.full((n, c), fill, dtype=first.dtype, device=device)
            for out_rows, part in parts:
                value = getattr(part, attr)
                out[out_rows, : value.shape[1]] = value
            return out

        truncated = torch.zeros(n, dtype=torch.bool, device=device)
        for out_rows, part in parts:
            truncated[out_rows] = part.is_truncated
        return Rollout(
            prompt_ids=prompt_ids.repeat_interleave(g, dim=0),
            prompt_mask=prompt_mask.bool().repeat_interleave(g, dim=0),
            completion_ids=merged("completion_ids", pad_token_id),
            completion_mask=merged("completion_mask", False),
            logprobs=merged("logprobs", 0.0),
            prompt_index=torch.arange(prompt_ids.shape[0], device=device).repeat_interleave(g),
            domains=[d for d in domains for _ in range(g)],
            is_truncated=truncated,
        )
