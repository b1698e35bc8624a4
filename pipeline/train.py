"""Data-parallel fine-tuning inside the replicas: settings, examples, the training loop, checkpoints.

Every replica holds the same parameters and a different slice of each global batch. The loss of a
micro-batch is its summed token loss divided by the number of target tokens in the whole global batch,
and gradients are summed across replicas (by DistributedDataParallel), so N replicas compute exactly the
gradient one process would on the N-times-larger batch (up to float rounding), whatever the padding and lengths.

A step whose loss or gradient is not finite is skipped by every replica alike, and nothing non-finite is
ever saved: too many skips in a row, or a non-finite weight, stop the run with a TrainingError.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from model.storage import atomic_path, sync_file

from .errors import InputError, OutputError
from .footers import inspect_shards
from .listing import list_shards
from .optim import linear_schedule, make_optimizer
from .units import plan_units, read_unit

METHODS = ("full", "lora", "qlora")
CHECKPOINTS = "_checkpoints"
TRAIN_LOG = "train_log.jsonl"


class TrainingError(Exception):
    """Training cannot go on without making the model worse: the loss or gradient stayed non-finite, or a
    weight became non-finite. Nothing non-finite was saved; the message says which step and what to change."""


@dataclass(frozen=True)
class FinetuneSettings:
    model: str
    train: str
    output_model: str
    eval: str | None = None
    method: str = "full"
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 5e-4
    optimizer: str = "adafactor"
    weight_decay: float = 0.0
    batch_size: int = 8  # per replica and micro-batch
    grad_accum: int = 1
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.1
    max_input_tokens: int = 512
    max_target_tokens: int = 84
    text_column: str = "text"
    summary_column: str = "summary"
    dtype: str = "auto"  # auto: bf16 autocast on GPU with float32 master weights; float32 on CPU
    gradient_checkpointing: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    seed: int = 0
    save_every: int = 100
    log_every: int = 1
    max_nonfinite_steps: int = 8  # skipped steps in a row before the run stops

    def __post_init__(self):
        if self.dtype in ("float16", "fp16"):
            raise ValueError(
                "fp16 training is refused: mT5 diverges in float16 (its activations overflow). "
                "Use --dtype bfloat16 (or auto, which picks bfloat16 on GPU)."
            )
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"--dtype {self.dtype!r}: use auto, float32 or bfloat16")
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r}: use one of {', '.join(METHODS)}")
        for name in (
            "batch_size",
            "grad_accum",
            "max_input_tokens",
            "max_target_tokens",
            "save_every",
            "log_every",
            "max_nonfinite_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError("give --epochs > 0 or --max-steps")
        if self.lr <= 0:
            raise ValueError("--lr must be > 0")

    def order_defining(self) -> dict:
        """What must match for --resume to continue the same run (the data order and the updates). A run that
        stopped on non-finite steps may be resumed with a higher --max-nonfinite-steps."""
        return {
            k: v for k, v in asdict(self).items() if k not in ("save_every", "log_every", "eval", "max_nonfinite_steps")
        }


# --- examples ---------------------------------------------------------------------------------------


def load_examples(source: str, text_column: str, summary_column: str, storage_options=None) -> list[tuple[str, str]]:
    """(text, summary) pairs from Parquet / Arrow shards. Anything wrong is an InputError naming the place."""
    fs, shards = list_shards(source, storage_options)
    infos, unreadable = inspect_shards(fs, shards)
    if unreadable:
        raise InputError(f"{unreadable[0]}: training data must be readable in full")
    examples = []
    for info in infos:
        for column in (text_column, summary_column):
            if column not in info.schema.names:
                raise InputError(
                    f"{info.shard.relative}: column {column!r} is missing "
                    f"(columns: {', '.join(info.schema.names)}); pass --{_flag(column, text_column)}"
                )
        for unit in plan_units([info], max(info.num_rows, 1)):
            row = 0
            for batch in read_unit(fs, unit, columns=[text_column, summary_column]):
                for text, summary in zip(
                    batch.column(text_column).to_pylist(), batch.column(summary_column).to_pylist()
                ):
                    if not text or not text.strip():
                        raise InputError(f"{info.shard.relative} row {row}: empty {text_column!r}")
                    if not summary or not summary.strip():
                        raise InputError(
                            f"{info.shard.relative} row {row}: empty target {summary_column!r}; "
                            f"every training row needs a summary"
                        )
                    examples.append((text, summary))
                    row += 1
    if not examples:
        raise InputError(f"{source}: no training rows")
    return examples


def _flag(column: str, text_column: str) -> str:
    return "text-column" if column == text_column else "summary-column"


# --- the loop ---------------------------------------------------------------------------------------


class Trainer:
    """Runs in every replica. rank 0 writes the log, the checkpoints and the final model.

    With a process group (every replica's, at world size 1 too) the model trains wrapped in DDP, so that one
    GPU runs the path many do; without one (world size 1 only) it trains as it is."""

    def __init__(
        self,
        model,
        tokenizer,
        settings: FinetuneSettings,
        examples: list[tuple[str, str]],
        rank: int,
        world: int,
        device: str,
        lora_config=None,
    ):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.examples, self.rank, self.world, self.device = examples, rank, world, device
        self.lora_config = lora_config
        self.distributed = dist.is_initialized()
        if world > 1 and not self.distributed:
            raise ValueError(f"{world} replicas train in a process group: initialise it before the Trainer")
        # Every trainable parameter takes part in every forward, so DDP needs no search for unused ones.
        self.ddp = DistributedDataParallel(model) if self.distributed else None
        self.out = Path(settings.output_model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.global_batch = settings.batch_size * settings.grad_accum * world
        self.steps_per_epoch = max(1, math.ceil(len(examples) / self.global_batch))
        self.total_steps = settings.max_steps or math.ceil(settings.epochs * self.steps_per_epoch)
        self.optimizer = make_optimizer(settings.optimizer, self.params, settings.lr, settings.weight_decay)
        self.schedule = linear_schedule(self.optimizer, settings.warmup_steps, self.total_steps)
        self.step = 0
        self.skipped_steps = 0  # steps skipped for a non-finite loss or gradient, in the whole run
        self.nonfinite_in_row = 0
        self.autocast = device.startswith("cuda") and settings.dtype in ("auto", "bfloat16")

    # data order: a permutation per epoch, the same on every replica
    def _rows(self, step: int) -> list[list[int]]:
        """This replica's micro-batches (example indices) for a global step."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.settings.seed + epoch))
        chosen = order[index * self.global_batch : (index + 1) * self.global_batch].tolist()
        b = self.settings.batch_size
        return [
            chunk
            for a in range(self.settings.grad_accum)
            if (chunk := chosen[(a * self.world + self.rank) * b : (a * self.world + self.rank + 1) * b])
        ]

    def _batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        texts = [self.examples[i][0] for i in rows]
        summaries = [self.examples[i][1] for i in rows]
        enc = self.tokenizer(
            texts, max_length=self.settings.max_input_tokens, truncation=True, padding=True, return_tensors="pt"
        )
        tgt = self.tokenizer(
            summaries, max_length=self.settings.max_target_tokens, truncation=True, padding=True, return_tensors="pt"
        )
        labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, -100).to(self.device)
        return {
            "input_ids": enc["input_ids"].to(self.device),
            "attention_mask": enc["attention_mask"].to(self.device),
            # the model's own shift of the labels: it then returns logits only, and train_step takes the one loss
            "decoder_input_ids": self.model.shift_right(labels),
            "labels": labels,
        }

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Summed over the replicas in place; `tensor` is on self.device (NCCL takes CUDA tensors only)."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def _micro_batch(self, last: bool):
        """DDP reduces gradients in the backward of a step's last micro-batch; the others accumulate locally."""
        if self.ddp is None or last:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def train_step(self) -> dict:
        start = time.perf_counter()
        batches = [self._batch(rows) for rows in self._rows(self.step)]
        counts = torch.zeros(2, device=self.device)  # [target tokens, input tokens] of this replica's rows
        for batch in batches:
            counts += torch.stack([(batch["labels"] != -100).sum(), batch["attention_mask"].sum()])
        if not batches:
            # The short last batch of an epoch can leave this replica no rows, but DDP reduces gradients inside
            # backward, so every replica must run one: a batch whose every target is ignored adds zero gradient.
            empty = self._batch([0])
            empty["labels"].fill_(-100)
            batches = [empty]
        totals = self._all_reduce(counts)  # [target tokens, input tokens] of the whole global batch
        global_tokens = totals[0]
        self.model.train()
        self.optimizer.zero_grad()
        forward = self.ddp if self.ddp is not None else self.model
        loss_sum = torch.zeros((), device=self.device)
        for index, batch in enumerate(batches):
            with self._micro_batch(last=index == len(batches) - 1):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                    logits = forward(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        decoder_input_ids=batch["decoder_input_ids"],
                    ).logits
                loss = (
                    F.cross_entropy(
                        logits.float().view(-1, logits.shape[-1]),
                        batch["labels"].view(-1),
                        ignore_index=-100,
                        label_smoothing=self.settings.label_smoothing,
                        reduction="sum",
                    )
                    / global_tokens
                )
                # DDP averages gradients over the replicas; scaling the loss by their number turns that average
                # into the sum, the gradient of the whole global batch (exact for a power-of-two world, else to
                # an ulp). Simpler than a summing comm hook, and it keeps DDP's own reducer.
                (loss * self.world).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
        # Skip on a flag summed over the replicas, so that all of them skip the same steps and keep equal weights.
        nonfinite = ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
        reduced = self._all_reduce(torch.stack([loss_sum, nonfinite.float()]))
        # the step's one host read: whether to skip it, and what the log says of it
        loss_total, nonfinite_replicas, grad_norm, target_tokens, input_tokens = torch.cat(
            [reduced, grad_norm.float().view(1), totals]
        ).tolist()
        skipped = nonfinite_replicas > 0
        if skipped:
            self.skipped_steps += 1
            self.nonfinite_in_row += 1
        else:
            self.optimizer.step()
            self.nonfinite_in_row = 0
        # A skipped step still uses up its rows and its place in the schedule: step N always means the same
        # batch and learning rate, in the log and on --resume.
        self.schedule.step()
        self.step += 1
        seconds = time.perf_counter() - start
        return {
            "step": self.step,
            "loss": _finite_or_none(loss_total),
            "lr": self.schedule.get_last_lr()[0],
            "grad_norm": _finite_or_none(grad_norm),
            "tokens_per_second": (input_tokens + target_tokens) / seconds,
            "skipped": skipped,
            "skipped_steps": self.skipped_steps,
        }

    def run(self, resume: bool) -> dict:
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            if not resume:  # a fresh run: earlier checkpoints and log are not ours to continue
                shutil.rmtree(self.out / CHECKPOINTS, ignore_errors=True)
                (self.out / TRAIN_LOG).unlink(missing_ok=True)
        self._barrier()
        if resume:
            self.load_latest_checkpoint()
            if self.rank == 0:  # the steps after the checkpoint are trained again, and logged again
                _truncate_log(self.out / TRAIN_LOG, self.step)
        losses = []
        log = open(self.out / TRAIN_LOG, "a", encoding="utf-8") if self.rank == 0 else None
        try:
            while self.step < self.total_steps:
                record = self.train_step()
                if not record["skipped"]:
                    losses.append(record["loss"])
                if log and (
                    record["skipped"] or self.step % self.settings.log_every == 0 or self.step == self.total_steps
                ):
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if self.nonfinite_in_row >= self.settings.max_nonfinite_steps:
                    first = self.step - self.nonfinite_in_row + 1
                    raise TrainingError(
                        f"steps {first}-{self.step}: the loss or gradient was not finite {self.nonfinite_in_row} "
                        f"steps in a row (--max-nonfinite-steps {self.settings.max_nonfinite_steps}), so training "
                        f"stopped; those steps were skipped and nothing non-finite was saved. Lower --lr and "
                        f"start again without --resume"
                    )
                if self.step % self.settings.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            if log:
                log.close()
        return {
            "steps": self.step,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
        }

    # --- checkpoints: safetensors and JSON only, never pickles ---------------------------------------

    def _checkpoint_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        tensors = {f"param/{names[id(p)]}": p.detach().contiguous().cpu() for p in self.params}
        state = self.optimizer.state_dict()
        meta = {"param_groups": state["param_groups"], "scalars": {}}
        for index, entry in state["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer/{index}/{key}"] = value.detach().contiguous().cpu()
                else:
                    meta["scalars"][f"{index}/{key}"] = value
        return tensors, meta

    def _check_finite_state(self) -> None:
        """Raise TrainingError on every replica if any replica's weights or optimizer state are not finite
        (finite gradients can still overflow them); the flag is summed so that no replica waits alone."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        checked = [(names[id(p)], p) for p in self.params] + [
            (f"optimizer state {key!r} of {names[id(p)]}", value)
            for p, state in self.optimizer.state.items()
            for key, value in state.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point()
        ]
        # one flag per tensor, on the device (AdamW keeps its step count on CPU), read back once
        finite = torch.stack([torch.isfinite(t).all().to(self.device) for _, t in checked])
        if self._all_reduce((~finite).any().float()).item() > 0:
            bad = [name for (name, _), ok in zip(checked, finite.tolist()) if not ok]
            raise TrainingError(
                f"step {self.step}: non-finite values in {_some(bad) or 'another replica'}; the "
                f"checkpoint was not saved. Lower --lr and start again without --resume"
            )

    def save_checkpoint(self) -> None:
        """<output-model>/_checkpoints/step-N: trainable weights, optimizer and schedule (rank 0), and each
        replica's RNG state. Written under .tmp, fsynced and renamed when complete, so neither a kill nor a
        power cut leaves half a one under the final name."""
        self._check_finite_state()
        folder = self.out / CHECKPOINTS / f"step-{self.step:08d}"
        tmp = folder.with_name(folder.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            tensors, meta = self._checkpoint_tensors()
            save_file(tensors, tmp / "state.safetensors")
            sync_file(tmp / "state.safetensors")
            meta.update(
                step=self.step,
                schedule=self.schedule.state_dict(),
                world=self.world,
                settings=self.settings.order_defining(),
                skipped_steps=self.skipped_steps,
                nonfinite_in_row=self.nonfinite_in_row,
            )
            (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=str))
            sync_file(tmp / "state.json")
        self._barrier()
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, tmp / f"rng-{self.rank}.safetensors")
        sync_file(tmp / f"rng-{self.rank}.safetensors")
        self._barrier()
        if self.rank == 0:
            sync_file(tmp)  # the folder's entries, before the rename publishes them
            os.replace(tmp, folder)
            sync_file(folder.parent)  # the rename itself
            for old in sorted(p for p in (self.out / CHECKPOINTS).glob("step-*") if p.suffix != ".tmp")[:-2]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def load_latest_checkpoint(self) -> None:
        folder = latest_checkpoint(self.out)
        if folder is None:
            return
        meta = check_resume(folder, self.settings, self.world)
        tensors = load_file(folder / "state.safetensors")
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for key, value in tensors.items():
                if key.startswith("param/"):
                    named[key[len("param/") :]].copy_(value)
        state = {"param_groups": meta["param_groups"], "state": {}}
        for key, value in tensors.items():
            if key.startswith("optimizer/"):
                _, index, name = key.split("/", 2)
                state["state"].setdefault(int(index), {})[name] = value.to(self.device)
        for key, value in meta["scalars"].items():
            index, name = key.split("/", 1)
            state["state"].setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict(state)
        self.schedule.load_state_dict(meta["schedule"])
        rng = load_file(folder / f"rng-{self.rank}.safetensors")
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        self.step = meta["step"]
        self.skipped_steps = meta.get("skipped_steps", 0)  # absent from checkpoints written before skipping
        self.nonfinite_in_row = meta.get("nonfinite_in_row", 0)


def latest_checkpoint(output: Path) -> Path | None:
    """The newest complete checkpoint under <output-model>/_checkpoints, or None."""
    folders = sorted(p for p in (Path(output) / CHECKPOINTS).glob("step-*") if not p.name.endswith(".tmp"))
    return folders[-1] if folders else None


def check_resume(folder: Path, settings: FinetuneSettings, world: int) -> dict:
    """The checkpoint's state.json, if --resume with `settings` on `world` replicas continues its run;
    otherwise an OutputError that names every flag that differs."""
    meta = json.loads((folder / "state.json").read_text())
    saved, now = meta["settings"], json.loads(json.dumps(settings.order_defining(), default=str))
    differ = [
        f"--{key.replace('_', '-')} {saved.get(key)!r} (now {now.get(key)!r})"
        for key in sorted(saved.keys() | now.keys())
        if saved.get(key) != now.get(key)
    ]
    if meta["world"] != world:
        differ.append(f"--replicas {meta['world']} (now {world})")
    if differ:
        raise OutputError(
            f"{folder}: --resume must continue the run with the settings it was started with, and "
            f"this checkpoint was written with {'; '.join(differ)}. Rerun with the checkpoint's "
            f"values, or drop --resume to start a new run in --output-model"
        )
    return meta


def _truncate_log(log: Path, step: int) -> None:
    """Keep the log's lines up to `step`, the checkpoint a resumed run continues from; a line cut short by
    the kill is dropped too. Rewritten whole and renamed, so a second kill leaves one log or the other."""
    if not log.exists():
        return
    kept = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= step:
            kept.append(line)
    with atomic_path(log) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN or Infinity: the log writes null for them."""
    return value if math.isfinite(value) else None


# --- before and after ----------------------------------------------------------------------------


def prepare_for_training(model, settings: FinetuneSettings):
    """Full: every weight trains. LoRA / QLoRA: adapters on q, k, v, o, wi_0, wi_1, wo; the rest is frozen
    (for QLoRA the base was loaded 4-bit). Returns the LoRA config, or None for full fine-tuning."""
    from model.packed import unpack

    unpack(model)  # a replica packs its CPU layers for summarizing; backward needs the plain ones
    for module in (model.encoder, model.decoder):
        module.gradient_checkpointing = settings.gradient_checkpointing
    if settings.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return None
    from model.lora import LoraConfig, add_lora

    config = LoraConfig(rank=settings.lora_rank, alpha=settings.lora_alpha, dropout=settings.lora_dropout)
    add_lora(model, config)
    return config


def save_final(model, tokenizer, settings: FinetuneSettings, lora_config, *, write: bool) -> None:
    """The Hugging Face layout that transformers and jobs/summarize.py load. Adapters are merged into the
    base (and saved apart under adapter/ too). Every replica merges, so all keep serving the same model."""
    out = Path(settings.output_model)
    # Checked before anything is written, and on every replica (each holds the same weights), so that no
    # replica goes on serving a broken model either.
    bad = [name for name, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise TrainingError(
            f"non-finite values in the trained {_some(bad)}; the final model was not saved. "
            f"Lower --lr and start again without --resume"
        )
    if lora_config is not None:
        from model.lora import merge_lora, save_adapters

        if write:
            save_adapters(model, out / "adapter", lora_config)
        merge_lora(model)
    if write:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        for path in [*sorted(p for p in Path(out).iterdir() if p.is_file()), Path(out)]:
            sync_file(path)  # on the device before the job reports success (weights are synced as written)
