"""Our LoRA and QLoRA (jobs/finetune.py) against peft's on transformers: the same loss curve within seed noise?

The task is benchmarks/description_task.py's (Debian package descriptions -> synopses). LoRA on a random model
learns little, so the starting model is first fully fine-tuned with our job on one part of the task (en, fr, de:
Latin scripts), and then adapted with LoRA to the other part (ja, ru, zh_CN, es: CJK, Cyrillic and one more Latin
language): new scripts and new languages on top of a model that has learned what a synopsis is.

On that starting checkpoint, every run sees the same rows in the same order (pipeline/train.py's permutation,
taken from its own code), truncated alike, with the same rank, alpha, dropout (0, so that nothing random but the
adapters' initialisation and the data order differs), target modules (model/lora.py's defaults, which are
transformers' module names), optimizer (Adafactor without parameter scaling or relative steps: ours, and
transformers' for peft), linear schedule, gradient clipping and plain cross-entropy (label smoothing 0, the loss
transformers returns):
- ours: `jobs/finetune.py --method lora|qlora` on a local Ray, one replica, one core; per-step losses from its
  train_log.jsonl;
- peft: transformers' MT5ForConditionalGeneration with peft's LoraConfig in a plain training loop; for QLoRA the
  base is loaded by transformers with BitsAndBytesConfig (nf4, double quantization, float32 compute: our CPU
  choices) and passed through peft's prepare_model_for_kbit_training, as peft's users do;
- peft-our-init: the same peft run, its adapters initialised with the very values our job draws for that seed,
  and for QLoRA its 4-bit layers holding our NF4 codes and scales. Everything else being equal, its curve must
  follow ours to float rounding: the check that the comparison compares like with like (the same rows, tokens,
  loss, optimizer and schedule). The NF4 bases differ otherwise: ours quantizes fused q|k|v, k|v and wi_0|wi_1
  tensors, and double quantization (the block scales quantized again, in blocks of 256 around their mean) then
  groups other scales than transformers' per-projection tensors do: the same codes, slightly different scales.
Seeds change the adapters' initialisation and, as in our job, the data order. The held-out loss is measured on the
evaluation split of the adapted languages, the same way for every run (transformers' forward of the final model).

    .venv/bin/python benchmarks/lora_vs_peft.py            # about 40 minutes on 2 cores: 2 runs at a time
    .venv/bin/python benchmarks/lora_vs_peft.py --seeds 0 --impls ours,peft-our-init --methods lora   # a quick look

Runs are cached under --work (delete a run's folder to redo it); the results JSON is rebuilt from them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IMPLS = ("ours", "peft", "peft-our-init")
METHODS = ("lora", "qlora")
START_LANGUAGES = ("en", "fr", "de")
ADAPT_LANGUAGES = ("ja", "ru", "zh_CN", "es")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".cache" / "lora-vs-peft")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lora-vs-peft.json")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--parallel", type=int, default=2, help="runs at once, one torch thread each")
    # the adaptation
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--max-input-tokens", type=int, default=128)
    p.add_argument("--max-target-tokens", type=int, default=48)
    p.add_argument("--adapt-rows", type=int, default=4000, help="training rows of the adapted languages")
    p.add_argument("--eval-rows", type=int, default=100, help="held-out rows per adapted language")
    p.add_argument("--window", type=int, default=10, help="the curves' points: mean loss over this many steps")
    # the starting model: full fine-tuning of the base on the other languages
    p.add_argument("--start-steps", type=int, default=300, help="0: adapt the base checkpoint itself")
    p.add_argument("--start-batch-size", type=int, default=16)
    p.add_argument("--start-lr", type=float, default=1e-3)
    p.add_argument("--start-rows", type=int, default=20000)
    p.add_argument("--start-seed", type=int, default=0, help="its data order")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    # a task of one's own instead of description_task (the tests' toy task): Parquet with text and summary
    p.add_argument("--base", type=Path, help="the checkpoint to start from (default: description_task's random one)")
    p.add_argument("--start-train", type=Path)
    p.add_argument("--adapt-train", type=Path)
    p.add_argument("--adapt-eval", type=Path)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one run, in its own process: a JSON spec
    return p.parse_args(argv)


# --- the data --------------------------------------------------------------------------------------------------


def task_files(args) -> dict:
    """Parquet files for the three parts: start-train, adapt-train, adapt-eval (with their row counts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if args.adapt_train is not None:
        if args.base is None or args.adapt_eval is None or (args.start_steps and args.start_train is None):
            raise SystemExit("--adapt-train needs --base, --adapt-eval and (unless --start-steps 0) --start-train")
        files = {"base": args.base, "start_train": args.start_train, "adapt_train": args.adapt_train}
        files["adapt_eval"] = args.adapt_eval
    else:
        from benchmarks.description_task import base_checkpoint, prepare

        task = prepare()
        folder = args.work / "data"
        folder.mkdir(parents=True, exist_ok=True)
        train = pq.read_table(task.train).to_pylist()  # shuffled once by prepare(): take the first rows
        evaluation = pq.read_table(task.eval).to_pylist()
        files = {"base": args.base or base_checkpoint(args.d_model, args.layers, seed=0)}
        parts = {
            "start_train": [r for r in train if r["language"] in START_LANGUAGES][: args.start_rows],
            "adapt_train": [r for r in train if r["language"] in ADAPT_LANGUAGES][: args.adapt_rows],
            "adapt_eval": [
                r
                for language in ADAPT_LANGUAGES
                for r in [r for r in evaluation if r["language"] == language][: args.eval_rows]
            ],
        }
        for name, rows in parts.items():
            path = folder / f"{name}-{len(rows)}.parquet"
            if not path.exists():
                pq.write_table(pa.Table.from_pylist(rows), path)
            files[name] = path
    counts = {}
    for name in ("start_train", "adapt_train", "adapt_eval"):
        if files.get(name) is not None:
            table = pq.read_table(files[name])
            languages = table.column("language").to_pylist() if "language" in table.column_names else []
            counts[name] = {"rows": table.num_rows, **{k: languages.count(k) for k in sorted(set(languages))}}
    return {"files": {k: str(v) for k, v in files.items() if v is not None}, "rows": counts}


def finetune_command(model, train, output, method: str, *, steps, batch_size, lr, warmup, seed, args) -> list[str]:
    """jobs/finetune.py with the settings every run shares: one replica on one core, plain cross-entropy."""
    return [
        sys.executable,
        str(ROOT / "jobs" / "finetune.py"),
        "--model", str(model),
        "--train", str(train),
        "--output-model", str(output),
        "--method", method,
        "--max-steps", str(steps),
        "--batch-size", str(batch_size),
        "--lr", str(lr),
        "--warmup-steps", str(warmup),
        "--optimizer", "adafactor",
        "--max-grad-norm", "1.0",
        "--label-smoothing", "0",
        "--max-input-tokens", str(args.max_input_tokens),
        "--max-target-tokens", str(args.max_target_tokens),
        "--lora-rank", str(args.rank),
        "--lora-alpha", str(args.alpha),
        "--lora-dropout", "0",
        "--seed", str(seed),
        "--save-every", str(steps + 1),
        "--log-every", "1",
        "--replicas", "1",
        "--cpus-per-replica", "1",
    ]  # fmt: skip


def job_env() -> dict:
    """A local Ray of the job's own, one torch thread in every process, the checkout first on the path."""
    return {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def starting_checkpoint(args, files: dict) -> dict:
    """The base fully fine-tuned with our job on the start languages, cached under --work by its settings."""
    base = Path(files["base"])
    if not args.start_steps:
        return {"path": str(base), "steps": 0}
    settings = dict(
        base=str(base.resolve()),
        train=str(Path(files["start_train"]).resolve()),
        steps=args.start_steps,
        batch_size=args.start_batch_size,
        lr=args.start_lr,
        seed=args.start_seed,
        inputs=args.max_input_tokens,
        targets=args.max_target_tokens,
    )
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    folder = args.work / f"start-{key}"
    record = folder / "start.json"
    if record.exists():
        return json.loads(record.read_text())
    command = finetune_command(
        base,
        files["start_train"],
        folder / "model",
        "full",
        steps=args.start_steps,
        batch_size=args.start_batch_size,
        lr=args.start_lr,
        warmup=min(50, args.start_steps // 10),
        seed=args.start_seed,
        args=args,
    )
    print(f"[lora-vs-peft] starting model: {shlex.join(command)}", file=sys.stderr, flush=True)
    started = time.monotonic()
    subprocess.run(command, env=job_env(), check=True, cwd=ROOT)
    losses = read_train_log(folder / "model")
    out = {
        "path": str(folder / "model"),
        "steps": args.start_steps,
        "command": shlex.join(command),
        "seconds": round(time.monotonic() - started, 1),
        "loss_first_10": mean(losses[:10]),
        "loss_last_10": mean(losses[-10:]),
        "settings": settings,
    }
    earlier = base.parent / "start.json"  # a base that is itself a starting model of this script
    if earlier.exists():
        out["base_was"] = json.loads(earlier.read_text())
    record.write_text(json.dumps(out, indent=1))
    return out


def read_train_log(model_dir: Path) -> list[float]:
    from pipeline.train import TRAIN_LOG

    records = [json.loads(line) for line in (Path(model_dir) / TRAIN_LOG).read_text().splitlines() if line]
    return [r["loss"] for r in sorted(records, key=lambda r: r["step"])]


# --- one run (in a worker process) -----------------------------------------------------------------------------


def hf_tokenizer(start: Path, work: Path):
    """transformers' tokenizer of the starting checkpoint, converted from its spiece.model once and saved apart
    (a tokenizer.json beside the weights would not change what our job reads, but the folder is the job's)."""
    from transformers import AutoTokenizer

    folder = work / f"hf-tokenizer-{hashlib.sha256(str(start.resolve()).encode()).hexdigest()[:10]}"
    if not (folder / "tokenizer.json").exists():
        AutoTokenizer.from_pretrained(start).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def encode(tokenizer, pairs: list[tuple[str, str]], spec: dict) -> dict:
    """What pipeline/train.py's Trainer._batch feeds the model, from transformers' tokenizer: padded on the right,
    truncated keeping </s> last, padding ignored in the labels (transformers shifts them for the decoder)."""
    enc = tokenizer(
        [t for t, _ in pairs], max_length=spec["max_input_tokens"], truncation=True, padding=True, return_tensors="pt"
    )
    tgt = tokenizer(
        text_target=[s for _, s in pairs],
        max_length=spec["max_target_tokens"],
        truncation=True,
        padding=True,
        return_tensors="pt",
    )
    labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def mismatched_rows(ours, batch: dict, pairs: list[tuple[str, str]], spec: dict) -> int:
    """Rows whose ids from transformers' tokenizer differ from our job's (MT5Tokenizer): they should be none."""
    enc = ours([t for t, _ in pairs], max_length=spec["max_input_tokens"], truncation=True, padding=True)
    tgt = ours([s for _, s in pairs], max_length=spec["max_target_tokens"], truncation=True, padding=True)
    bad = 0
    for i in range(len(pairs)):
        theirs_in = [t for t, m in zip(batch["input_ids"][i].tolist(), batch["attention_mask"][i].tolist()) if m]
        theirs_out = [t for t in batch["labels"][i].tolist() if t != -100]
        ours_in = [t for t, m in zip(enc["input_ids"][i], enc["attention_mask"][i]) if m]
        ours_out = [t for t, m in zip(tgt["input_ids"][i], tgt["attention_mask"][i]) if m]
        bad += theirs_in != ours_in or theirs_out != ours_out
    return bad


def batches_of_our_job(spec: dict) -> tuple[list[tuple[str, str]], list[list[int]]]:
    """The training rows and, per step, the row indices our job's Trainer takes (one replica, no accumulation):
    pipeline/train.py's own load_examples and Trainer._rows, so the order cannot drift from the job's."""
    from pipeline.train import FinetuneSettings, Trainer, load_examples

    examples = load_examples(spec["train"], "text", "summary")
    settings = FinetuneSettings(
        model="", train=spec["train"], output_model="", batch_size=spec["batch_size"], seed=spec["seed"]
    )
    global_batch = spec["batch_size"]
    trainer = SimpleNamespace(
        settings=settings,
        examples=examples,
        steps_per_epoch=max(1, math.ceil(len(examples) / global_batch)),
        global_batch=global_batch,
        world=1,
        rank=0,
    )
    steps = [Trainer._rows(trainer, step) for step in range(spec["steps"])]
    assert all(len(rows) == 1 for rows in steps), "one micro-batch per step"
    return examples, [rows[0] for rows in steps]


def our_initial_adapters(spec: dict) -> dict:
    """The adapters our job starts from for this seed, under peft's key names: the replica seeds torch with
    seed * 1000 + rank (pipeline/replica.py) just before add_lora draws them, in model/lora.py's order."""
    import torch

    from model import MT5ForConditionalGeneration
    from model.lora import LoraConfig, add_lora, lora_state_dict

    model = MT5ForConditionalGeneration.from_pretrained(spec["start"])
    torch.manual_seed(spec["seed"] * 1000 + 0)
    add_lora(model, LoraConfig(rank=spec["rank"], alpha=spec["alpha"], dropout=0.0))
    return {key: value.clone() for key, value in lora_state_dict(model).items()}


def default_targets(model) -> list[str]:
    """model/lora.py's default targets that name modules of this transformers model (wi_0/wi_1 or wi)."""
    from model.lora import LoraConfig

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return [t for t in LoraConfig().targets if t in names]


def peft_model(spec: dict):
    """transformers' model of the starting checkpoint with peft's LoRA: for QLoRA loaded in 4-bit NF4 as our
    QLoRA loads it (double quantization, compute in float32 on CPU; transformers keeps `wo` and lm_head in full
    precision, as model/quantize.py does) and prepared with prepare_model_for_kbit_training."""
    import peft
    import torch
    import transformers

    base_gap = None
    if spec["method"] == "qlora":
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        model = transformers.MT5ForConditionalGeneration.from_pretrained(
            spec["start"], quantization_config=quantization, device_map="cpu", dtype=torch.float32
        )
        if spec["impl"] == "peft-our-init":
            base_gap = use_our_4bit_base(model, spec)
        model = peft.prepare_model_for_kbit_training(model)
    else:
        model = transformers.MT5ForConditionalGeneration.from_pretrained(spec["start"], dtype=torch.float32)
    targets = default_targets(model)
    config = peft.LoraConfig(
        task_type="SEQ_2_SEQ_LM", r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0, target_modules=targets
    )
    torch.manual_seed(spec["seed"])  # peft draws lora_A when it wraps the modules
    model = peft.get_peft_model(model, config)
    if spec["impl"] == "peft-our-init":
        initial = our_initial_adapters(spec)
        loaded = peft.set_peft_model_state_dict(model, initial)
        ours = {k.replace(".weight", ".default.weight") for k in initial}
        theirs = {name for name, _ in model.named_parameters() if "lora_" in name}
        if loaded.unexpected_keys or ours != theirs:
            raise RuntimeError(
                f"our adapters do not map 1:1 onto peft's: {sorted(ours ^ theirs)[:4]}, {loaded.unexpected_keys[:4]}"
            )
    quantized = sorted(
        {
            name.removesuffix(".base_layer").rsplit(".", 1)[-1]  # peft wraps each layer, now its base_layer
            for name, m in model.named_modules()
            if type(m).__name__ == "Linear4bit"
        }
    )
    return model, targets, quantized, base_gap


def use_our_4bit_base(model, spec: dict) -> float:
    """Put our job's NF4 weights into transformers' 4-bit layers: each projection's slice of our fused layers'
    codes, with the block scales our double quantization stores, dequantized once (a layer without double
    quantization: bitsandbytes dequantizes it to the very same weights). Returns the largest difference between
    the weights transformers had quantized itself and ours: what the two NF4 bases differ by."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import torch

    from model import MT5ForConditionalGeneration
    from model.lora import _hf_modules

    ours = MT5ForConditionalGeneration.from_pretrained(spec["start"], quantization="nf4")
    gap = 0.0
    for path, layer in ours.named_modules():
        if type(layer).__name__ != "Linear4bit":
            continue
        state, width = layer.weight.quant_state, layer.in_features
        scales = state.absmax
        if state.nested:
            scales = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        weight = bnbf.dequantize_4bit(layer.weight.data, state)  # [out, in]
        first = 0  # the part's first row
        for hf, rows in _hf_modules(ours, path, layer):
            start, count = first * width, rows * width  # in weights; blocks run along the flattened rows
            if start % state.blocksize or count % state.blocksize:
                raise ValueError(f"{hf}: {rows} rows of {width} do not cut {state.blocksize}-weight blocks")
            part = bnbf.QuantState(
                absmax=scales[start // state.blocksize : (start + count) // state.blocksize].float().clone(),
                shape=torch.Size([rows, width]),
                code=state.code,
                blocksize=state.blocksize,
                quant_type=state.quant_type,
                dtype=state.dtype,
            )
            target = model.get_submodule(hf)
            theirs = bnbf.dequantize_4bit(target.weight.data, target.weight.quant_state)
            gap = max(gap, (theirs - weight[first : first + rows]).abs().max().item())
            target.weight = bnb.nn.Params4bit(
                layer.weight.data[start // 2 : (start + count) // 2].clone(),  # two codes a byte
                requires_grad=False,
                quant_state=part,
                blocksize=state.blocksize,
                compress_statistics=False,
                quant_type=state.quant_type,
                quant_storage=torch.uint8,
                module=target,
                bnb_quantized=True,
            )
            target.quant_state = part
            if not torch.equal(bnbf.dequantize_4bit(target.weight.data, part), weight[first : first + rows]):
                raise RuntimeError(f"{hf}: our NF4 weights did not transplant exactly")
            first += rows
    return gap


def heldout_loss(model, tokenizer, pairs: list[tuple[str, str]], spec: dict) -> float:
    """Token-weighted cross-entropy over the held-out rows. In train mode (every dropout is 0, so it is the same
    function): bitsandbytes' 4-bit layers then take the path they trained on, where in eval mode a CPU with
    AVX-512 BF16 switches them to a bfloat16 kernel, and the figure would depend on the CPU kind."""
    import torch
    import torch.nn.functional as F

    model.train()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(pairs), 16):
            batch = encode(tokenizer, pairs[i : i + 16], spec)
            logits = model(**batch).logits
            total += F.cross_entropy(
                logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum"
            ).item()
            tokens += int((batch["labels"] != -100).sum())
    return total / tokens


def run_peft(spec: dict) -> dict:
    """peft's LoRA / QLoRA in a plain loop with what our job does: transformers' Adafactor (scale_parameter,
    relative_step and warmup_init off: our Adafactor), its linear schedule with warmup, clipping at 1.0, and the
    loss transformers returns (mean cross-entropy over the target tokens: our job's at label smoothing 0)."""
    import torch
    import transformers

    from model import MT5Tokenizer

    tokenizer = hf_tokenizer(Path(spec["start"]), Path(spec["work"]))
    ours_tokenizer = MT5Tokenizer.from_pretrained(spec["start"])
    examples, steps = batches_of_our_job(spec)
    model, targets, quantized, base_gap = peft_model(spec)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = transformers.optimization.Adafactor(
        params, lr=spec["lr"], scale_parameter=False, relative_step=False, warmup_init=False
    )
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, spec["warmup_steps"], spec["steps"])
    losses, mismatched = [], 0
    started = time.monotonic()
    model.train()
    for rows in steps:
        pairs = [examples[i] for i in rows]
        batch = encode(tokenizer, pairs, spec)
        mismatched += mismatched_rows(ours_tokenizer, batch, pairs, spec)
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    seconds = time.monotonic() - started
    evaluation = [tuple(pair) for pair in spec["eval_pairs"]]
    return {
        "losses": losses,
        "train_seconds": round(seconds, 1),
        "eval_loss": heldout_loss(model, tokenizer, evaluation, spec),
        "trainable_parameters": sum(p.numel() for p in params),
        "target_modules": targets,
        "quantized_modules": quantized,
        "nf4_base_max_weight_difference_transformers_vs_ours": base_gap,
        "tokenizer_mismatched_rows": mismatched,
    }


def run_ours(spec: dict, folder: Path) -> dict:
    """Our job, then the held-out loss of the model it saved (adapters merged into the base; for QLoRA into the
    dequantized base, the same function as the 4-bit base plus adapters) through transformers' forward."""
    import torch
    import transformers

    command = finetune_command(
        spec["start"],
        spec["train"],
        folder / "model",
        spec["method"],
        steps=spec["steps"],
        batch_size=spec["batch_size"],
        lr=spec["lr"],
        warmup=spec["warmup_steps"],
        seed=spec["seed"],
        args=SimpleNamespace(**spec),
    )
    started = time.monotonic()
    done = subprocess.run(command, env=job_env(), cwd=ROOT, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{done.stderr[-4000:]}")
    tokenizer = hf_tokenizer(Path(spec["start"]), Path(spec["work"]))
    model = transformers.MT5ForConditionalGeneration.from_pretrained(folder / "model", dtype=torch.float32)
    evaluation = [tuple(pair) for pair in spec["eval_pairs"]]
    adapter = json.loads((folder / "model" / "adapter" / "adapter_config.json").read_text())
    return {
        "losses": read_train_log(folder / "model"),
        "job_seconds": round(seconds, 1),  # Ray's start-up included
        "eval_loss": heldout_loss(model, tokenizer, evaluation, spec),
        "target_modules": adapter["target_modules"],
        "command": shlex.join(command),
    }


def worker(spec: dict) -> None:
    import torch

    torch.set_num_threads(1)
    folder = Path(spec["folder"])
    result = run_ours(spec, folder) if spec["impl"] == "ours" else run_peft(spec)
    (folder / "result.json").write_text(json.dumps({"spec": public(spec), **result}, indent=1))


def public(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k != "eval_pairs"}


# --- many runs, and what they say ------------------------------------------------------------------------------


def run_all(args, start: str, files: dict) -> list[dict]:
    import pyarrow.parquet as pq

    hf_tokenizer(Path(start), args.work)  # converted once, before the runs read it at once

    table = pq.read_table(files["adapt_eval"], columns=["text", "summary"])
    eval_pairs = list(zip(table.column("text").to_pylist(), table.column("summary").to_pylist()))
    shared = dict(
        start=start,
        train=files["adapt_train"],
        work=str(args.work),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        rank=args.rank,
        alpha=args.alpha,
        max_input_tokens=args.max_input_tokens,
        max_target_tokens=args.max_target_tokens,
        eval_rows=len(eval_pairs),
    )
    key = hashlib.sha256(json.dumps({**shared, "work": None}, sort_keys=True).encode()).hexdigest()[:10]
    specs = []
    for method in args.methods.split(","):
        for impl in args.impls.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                folder = args.work / f"runs-{key}" / f"{impl}-{method}-s{seed}"
                specs.append({**shared, "impl": impl, "method": method, "seed": seed, "folder": str(folder)})

    def one(spec: dict) -> dict:
        result = Path(spec["folder"]) / "result.json"
        if not result.exists():
            Path(spec["folder"]).mkdir(parents=True, exist_ok=True)
            (Path(spec["folder"]) / "spec.json").write_text(json.dumps({**spec, "eval_pairs": eval_pairs}))
            started = time.monotonic()
            done = subprocess.run(
                [sys.executable, __file__, "--worker", str(Path(spec["folder"]) / "spec.json")],
                env=job_env(),
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise RuntimeError(f"{spec['impl']} {spec['method']} seed {spec['seed']}:\n{done.stderr[-4000:]}")
            print(
                f"[lora-vs-peft] {spec['impl']} {spec['method']} seed {spec['seed']}: "
                f"{time.monotonic() - started:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        return json.loads(result.read_text())

    # ours and peft first, so that a run cut short still compares them; peft-our-init (the check) last
    specs.sort(key=lambda spec: (spec["impl"] == "peft-our-init", spec["seed"], spec["method"], spec["impl"]))
    with ThreadPoolExecutor(args.parallel) as pool:
        return list(pool.map(one, specs))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def std(values: list[float]) -> float | None:
    """The sample standard deviation (n - 1), None for one value."""
    if len(values) < 2:
        return None
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def windows(losses: list[float], size: int) -> list[tuple[int, float]]:
    """(last step, mean loss over the `size` steps up to it): per-step losses are one batch each, noisy."""
    return [(end, mean(losses[end - size : end])) for end in range(size, len(losses) + 1, size)]


def within_noise(a: list[float], b: list[float]) -> dict:
    """Two groups of per-seed values: the difference of their means against its standard error (from the seeds'
    spread); within noise when it is at most 2 standard errors."""
    sa, sb = std(a), std(b)
    out = {"difference": mean(a) - mean(b)}
    if sa is not None and sb is not None:
        se = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
        out.update(standard_error=se, within_noise=abs(out["difference"]) <= 2 * se)
    return out


def compare(runs: list[dict], window: int) -> dict:
    """Curves (mean ± std across seeds at every window), final and held-out loss, ours against each peft variant."""
    out = {}
    for method in sorted({r["spec"]["method"] for r in runs}):
        by_impl = {}
        for r in runs:
            if r["spec"]["method"] == method:
                by_impl.setdefault(r["spec"]["impl"], []).append(r)
        section = {"curves": {}, "final_loss": {}, "eval_loss": {}, "vs_ours": {}}
        for impl, group in by_impl.items():
            group.sort(key=lambda r: r["spec"]["seed"])
            curves = [windows(r["losses"], window) for r in group]
            section["curves"][impl] = [
                {"step": points[0][0], "mean": mean([p[1] for p in points]), "std": std([p[1] for p in points])}
                for points in zip(*curves)
            ]
            finals = [c[-1][1] for c in curves]
            evals = [r["eval_loss"] for r in group]
            section["final_loss"][impl] = {"mean": mean(finals), "std": std(finals), "seeds": finals}
            section["eval_loss"][impl] = {"mean": mean(evals), "std": std(evals), "seeds": evals}
        ours = {r["spec"]["seed"]: r for r in by_impl.get("ours", [])}
        for impl, group in by_impl.items():
            if impl == "ours" or not ours:
                continue
            paired = [(ours[r["spec"]["seed"]], r) for r in group if r["spec"]["seed"] in ours]
            ours_curves = [windows(o["losses"], window) for o, _ in paired]
            their_curves = [windows(t["losses"], window) for _, t in paired]
            per_window = [
                within_noise([c[k][1] for c in ours_curves], [c[k][1] for c in their_curves])
                for k in range(len(ours_curves[0]))
            ]
            step_gaps = [max(abs(x - y) for x, y in zip(o["losses"], t["losses"])) for o, t in paired]
            section["vs_ours"][impl] = {
                "final_loss": within_noise(
                    section["final_loss"]["ours"]["seeds"], section["final_loss"][impl]["seeds"]
                ),
                "eval_loss": within_noise(section["eval_loss"]["ours"]["seeds"], section["eval_loss"][impl]["seeds"]),
                "windows_within_noise": sum(w.get("within_noise", False) for w in per_window),
                "windows": len(per_window),
                # the same seed is the same data order for both: per-step differences, paired
                "max_abs_step_loss_difference_same_seed": max(step_gaps),
                "final_loss_difference_same_seed": [o[-1][1] - t[-1][1] for o, t in zip(ours_curves, their_curves)],
                "eval_loss_difference_same_seed": [o["eval_loss"] - t["eval_loss"] for o, t in paired],
            }
        out[method] = section
    return out


def print_table(report: dict) -> None:
    for method, section in report["comparison"].items():
        impls = list(section["curves"])
        print(f"\n{method}: loss (mean ± std over seeds of the mean over {report['settings']['window']} steps)")
        print("step  " + "".join(f"{impl:>22}" for impl in impls))
        points = list(zip(*[section["curves"][impl] for impl in impls]))
        every = max(1, math.ceil(len(points) / 8))
        for row in [p for k, p in enumerate(points) if k % every == 0 or k == len(points) - 1]:
            cells = "".join(f"{p['mean']:>14.4f} ± {p['std'] or 0:.4f}" for p in row)
            print(f"{row[0]['step']:>4}  {cells}")
        evals = "".join(
            f"{section['eval_loss'][i]['mean']:>14.4f} ± {section['eval_loss'][i]['std'] or 0:.4f}" for i in impls
        )
        print(f"held  {evals}")
        for impl, verdict in section["vs_ours"].items():
            print(
                f"  ours vs {impl}: final {verdict['final_loss']['difference']:+.4f}, held-out "
                f"{verdict['eval_loss']['difference']:+.4f}, windows within 2 SE "
                f"{verdict['windows_within_noise']}/{verdict['windows']}, largest same-seed step gap "
                f"{verdict['max_abs_step_loss_difference_same_seed']:.2e}"
            )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return
    from benchmarks.run import machine

    started = time.monotonic()
    args.work.mkdir(parents=True, exist_ok=True)
    files = task_files(args)
    start = starting_checkpoint(args, files["files"])
    runs = run_all(args, start["path"], files["files"])
    import peft

    report = {
        "benchmark": "lora-vs-peft",
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": {**machine(SimpleNamespace(threads=1, device="cpu")), "peft": peft.__version__},
        "task": files,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
        "start_model": start,
        "comparison": compare(runs, args.window),
        "runs": runs,
        "seconds": round(time.monotonic() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
