"""Fine-tuning on the replicas: data-parallel equals one big batch, a tiny model learns, resume, compatibility,
and the guards (non-finite steps skipped, nothing non-finite saved, empty slices, checked resume, fsync)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from jobs.finetune import build_parser
from model import ModelLoadError, MT5ForConditionalGeneration, MT5Tokenizer
from pipeline.errors import InputError
from pipeline.finetune import finetune
from pipeline.placement import Placement
from pipeline.tokenize_pool import AUTO_MAX_WORKERS
from pipeline.train import (
    TRAIN_LOG,
    FinetuneSettings,
    Trainer,
    TrainingError,
    load_examples,
    prepare_for_training,
    save_final,
)
from synthetic.checkpoints import build_trainable_checkpoint
from synthetic.corpus import first_words_task
from tests.pipeline.helpers import REPO, local_job_env

# The learnable task: the summary is the document's first two words (synthetic/corpus.py).
TASK = dict(max_input_tokens=32, max_target_tokens=8, label_smoothing=0.0, batch_size=32, warmup_steps=20)


@pytest.fixture(scope="module")
def base(tmp_path_factory, spiece_model):
    return build_trainable_checkpoint(tmp_path_factory.mktemp("trainable"), spiece_model)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    pq.write_table(pa.Table.from_pylist(first_words_task(6000, seed=1)), root / "train.parquet")
    pq.write_table(pa.Table.from_pylist(first_words_task(80, seed=9)), root / "eval.parquet")
    return root


def _params(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def _one_process(settings: FinetuneSettings, base: Path, out: Path, replicas: int) -> None:
    """What `replicas` replicas of `settings` compute, in this process: the same global batch as micro-batches
    of the same rows, accumulated `replicas` times, through DDP at world size 1 as on one GPU."""
    single = FinetuneSettings(**{**settings.__dict__, "grad_accum": replicas, "output_model": str(out)})
    model = MT5ForConditionalGeneration.from_pretrained(base)
    prepare_for_training(model, single)
    out.mkdir()
    examples = load_examples(single.train, "text", "summary")
    with _process_group_of_one(out.with_name(out.name + ".store")):
        trainer = Trainer(model, MT5Tokenizer.from_pretrained(base), single, examples, 0, 1, "cpu")
        assert trainer.ddp is not None
        trainer.run(resume=False)
    model.save_pretrained(out)


@contextlib.contextmanager
def _process_group_of_one(store: Path):
    """A gloo process group of this process alone, as a replica of a one-replica job has."""
    dist.init_process_group("gloo", store=dist.FileStore(str(store), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# Replicas and the one process compute each micro-batch's gradient from the same rows, but in other processes
# with other thread counts, so their float32 reductions (over up to 4 x 32 tokens and d_model 128, through 4
# layers) round in another order; the sum over micro-batches is the same two-term sum either way. float32's
# unit roundoff is 6e-8; a rounding error of a few hundred ulps of each tensor's largest element bounds that
# on any CPU, with room to spare. What the test exists to catch is not rounding: a replica's gradient missing
# or counted twice, or a micro-batch normalised by its own token count instead of the global batch's, moves
# gradients by a large fraction of themselves.
GRADIENT_RTOL = 1e-5  # of each tensor's largest absolute value


def _assert_close_relative_to_tensor(got: dict, want: dict, rtol: float, floor: dict | None = None) -> None:
    """Each tensor within rtol of its own largest absolute value (plus floor[key], where given)."""
    assert got.keys() == want.keys()
    for key in want:
        atol = rtol * float(want[key].abs().max()) + (floor[key] if floor else 0.0)
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=atol, msg=key)


def test_two_replicas_step_with_the_gradient_of_one_process_with_accumulated_batches(ray_local, base, data, tmp_path):
    """AdamW divides each step by the root of its second moment, which turns rounding-level differences in
    small gradients into learning-rate-sized updates: its weights cannot be compared to rounding after a few
    steps, but its first step's moments are the gradient itself (exp_avg = (1 - beta1) * clipped gradient)."""
    settings = FinetuneSettings(
        model=str(base),
        train=str(data / "train.parquet"),
        output_model=str(tmp_path / "ddp"),
        max_steps=2,
        save_every=1,
        lr=1e-3,
        optimizer="adamw",
        **{**TASK, "batch_size": 4, "warmup_steps": 0},
    )
    finetune(settings, replicas=2)
    _one_process(settings, base, tmp_path / "single", replicas=2)

    def first_moments(out: Path) -> dict[str, torch.Tensor]:
        state = load_file(out / "_checkpoints" / "step-00000001" / "state.safetensors")
        return {k: v for k, v in state.items() if k.endswith("/exp_avg")}

    ddp, one = first_moments(tmp_path / "ddp"), first_moments(tmp_path / "single")
    assert len(one) == len(list(MT5ForConditionalGeneration.from_pretrained(base).parameters()))
    assert min(float(v.abs().max()) for v in one.values()) > 0  # every parameter had a gradient
    _assert_close_relative_to_tensor(ddp, one, GRADIENT_RTOL)


def test_two_replicas_equal_one_process_with_accumulated_batches(ray_local, base, data, tmp_path):
    """With plain SGD an update is lr x gradient, so gradients that agree to rounding give weights that agree to
    rounding after several steps: each step adds lr x (a rounding-level gradient difference) to the weights, and
    differences in the weights change the next gradients by as little."""
    settings = FinetuneSettings(
        model=str(base),
        train=str(data / "train.parquet"),
        output_model=str(tmp_path / "ddp"),
        max_steps=4,
        lr=1.0,
        optimizer="sgd",
        **{**TASK, "batch_size": 4, "warmup_steps": 0},
    )
    finetune(settings, replicas=2)
    _one_process(settings, base, tmp_path / "single", replicas=2)

    ddp, one, initial = _params(tmp_path / "ddp"), _params(tmp_path / "single"), _params(base)
    assert ddp.keys() == one.keys()
    moved = {k: one[k] - initial[k] for k in one}
    assert max(float(m.abs().max()) for m in moved.values()) > 1e-2  # the steps did change the weights
    # Each tensor is held to the rounding of its update, plus an ulp of its weights for each step's add and one
    # for the subtraction above: a tensor that barely moves is held to its weights' ulps.
    ulp = torch.finfo(torch.float32).eps
    weights_ulps = {
        k: (settings.max_steps + 1) * ulp * max(float(one[k].abs().max()), float(initial[k].abs().max())) for k in one
    }
    _assert_close_relative_to_tensor({k: ddp[k] - initial[k] for k in ddp}, moved, GRADIENT_RTOL, floor=weights_ulps)


def _learn(base: Path, data: Path, out: Path, method: str, steps: int, lr: float) -> dict:
    settings = FinetuneSettings(
        model=str(base),
        train=str(data / "train.parquet"),
        eval=str(data / "eval.parquet"),
        output_model=str(out),
        method=method,
        max_steps=steps,
        lr=lr,
        optimizer="adamw",
        lora_rank=16,
        lora_alpha=32,
        lora_dropout=0.0,
        log_every=10,
        **TASK,
    )
    report = finetune(settings, replicas=1)
    log = [json.loads(line) for line in (out / TRAIN_LOG).read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_second"} <= set(log[0])
    first, last = log[0]["loss"], sum(r["loss"] for r in log[-5:]) / 5
    assert last < first / 2, f"loss {first:.2f} -> {last:.2f}"
    scores = json.loads((out / "eval.json").read_text())
    assert scores == report["eval"]
    # The final model is a plain checkpoint: our summarize job and transformers both load it.
    for name in ("config.json", "model.safetensors", "generation_config.json", "spiece.model", "tokenizer_config.json"):
        assert (out / name).exists(), name
    return scores


@pytest.mark.slow
def test_tiny_model_learns_first_words_task_with_full_fine_tuning(ray_local, base, data, tmp_path):
    scores = _learn(base, data, tmp_path / "full", "full", steps=800, lr=3e-3)
    # ROUGE-1 averages over every summary word of the 63 evaluated documents; a random model scores 0. Exact match
    # is not held to a bar: at this training budget only a few documents come out whole, a count whose spread
    # across CPUs, where rounding sends 800 AdamW steps down other paths, is as large as any bar below it.
    # Measured scores: benchmarks/README.md, "Numerics".
    assert scores["rouge1"] > 25.0, scores


@pytest.fixture(scope="module")
def pretrained(ray_local, base, first_word, tmp_path_factory):
    """LoRA adapts a trained model, not a random one (whose frozen random embeddings and head leave adapters
    little to work with): this one was fully fine-tuned on the task for a few steps, and is still poor at it."""
    out = tmp_path_factory.mktemp("pretrained")
    finetune(
        FinetuneSettings(
            model=str(base),
            train=str(first_word / "train.parquet"),
            output_model=str(out),
            max_steps=40,
            lr=3e-3,
            optimizer="adamw",
            **TASK,
        ),
        replicas=1,
    )
    return out


@pytest.fixture(scope="module")
def first_word(tmp_path_factory):
    root = tmp_path_factory.mktemp("first-word")
    pq.write_table(pa.Table.from_pylist(first_words_task(6000, seed=1, words=1)), root / "train.parquet")
    pq.write_table(pa.Table.from_pylist(first_words_task(80, seed=9, words=1)), root / "eval.parquet")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapters_improve_a_briefly_trained_model_on_the_first_word_task(
    ray_local, pretrained, first_word, tmp_path, method
):
    before = _scores(pretrained, first_word / "eval.parquet")
    scores = _learn(pretrained, first_word, tmp_path / method, method, steps=400, lr=5e-3)
    assert (tmp_path / method / "adapter" / "adapter_model.safetensors").exists()
    assert scores["exact_match"] > before["exact_match"] + 10.0, (before, scores)


def _scores(model_dir: Path, eval_path: Path) -> dict:
    """ROUGE of a checkpoint on an evaluation file, decoded as the fine-tuning job's evaluation does."""
    from pipeline.evaluate import rouge

    rows = pq.read_table(eval_path).to_pylist()
    model, tokenizer = MT5ForConditionalGeneration.from_pretrained(model_dir), MT5Tokenizer.from_pretrained(model_dir)
    batch = tokenizer(
        [r["text"] for r in rows],
        max_length=TASK["max_input_tokens"],
        truncation=True,
        padding=True,
        return_tensors="pt",
    )
    out = model.generate(**batch, num_beams=4, max_new_tokens=TASK["max_target_tokens"])
    predictions = tokenizer.batch_decode(out, skip_special_tokens=True)
    scores = rouge(predictions, [r["summary"] for r in rows])
    scores["exact_match"] = 100.0 * sum(p.strip() == r["summary"] for p, r in zip(predictions, rows)) / len(rows)
    return scores


@pytest.mark.slow
def test_saved_checkpoint_loads_in_transformers_with_identical_logits(ray_local, base, data, tmp_path):
    import transformers

    out = tmp_path / "lora"
    finetune(
        FinetuneSettings(
            model=str(base),
            train=str(data / "train.parquet"),
            output_model=str(out),
            method="lora",
            max_steps=20,
            lr=1e-2,
            optimizer="adamw",
            **TASK,
        ),
        replicas=1,
    )
    ours = MT5ForConditionalGeneration.from_pretrained(out)
    reference = transformers.MT5ForConditionalGeneration.from_pretrained(out).eval()
    batch = MT5Tokenizer.from_pretrained(out)(
        ["Erste jahr über die Stadt.", "House of north water."], padding=True, return_tensors="pt"
    )
    dec = torch.tensor([[0, 5, 6], [0, 7, 8]])
    with torch.no_grad():
        expected = reference(**batch, decoder_input_ids=dec).logits
        got = ours(**batch, decoder_input_ids=dec).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert not torch.equal(_params(out)["lm_head.weight"], _params(base)["lm_head.weight"]) or any(
        not torch.equal(_params(out)[k], _params(base)[k]) for k in _params(base)
    )


def _job_command(base: Path, data: Path, out: Path, *flags: str) -> list[str]:
    """jobs/finetune.py fine-tuning `base` on `data`'s train set into `out`, as a user starts it."""
    return [
        sys.executable,
        str(REPO / "jobs/finetune.py"),
        "--model",
        str(base),
        "--train",
        str(data / "train.parquet"),
        "--output-model",
        str(out),
        *flags,
    ]


@pytest.mark.slow
def test_killed_job_resumes_to_the_parameters_of_an_uninterrupted_run(base, data, tmp_path):
    def command(out: Path, *extra: str) -> list[str]:
        return _job_command(
            base,
            data,
            out,
            "--max-steps",
            "60",
            "--save-every",
            "20",
            "--lr",
            "1e-3",
            "--optimizer",
            "adamw",
            "--batch-size",
            "16",
            "--max-input-tokens",
            "32",
            "--max-target-tokens",
            "8",
            "--seed",
            "3",
            *extra,
        )

    env = local_job_env()
    subprocess.run(command(tmp_path / "straight"), check=True, env=env, timeout=600, capture_output=True)

    killed = tmp_path / "killed"
    job = subprocess.Popen(
        command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not list((killed / "_checkpoints").glob("step-00000020")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (killed / "_checkpoints" / "step-00000020").exists(), "no checkpoint before the deadline"
    os.killpg(job.pid, signal.SIGKILL)  # the driver, its local Ray and the replicas
    job.wait(timeout=60)
    assert not (killed / "model.safetensors").exists()
    subprocess.run(command(killed, "--resume"), check=True, env=env, timeout=600, capture_output=True)

    straight, resumed = _params(tmp_path / "straight"), _params(killed)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=1e-6, msg=key)
    steps = [json.loads(line)["step"] for line in (killed / TRAIN_LOG).read_text().splitlines()]
    assert steps == list(range(1, 61))  # the resumed steps are logged once


def test_bad_input_is_refused_before_any_replica_trains(ray_local, base, data, tmp_path):
    def settings(**changes):
        return FinetuneSettings(
            **{
                **dict(
                    model=str(base), train=str(data / "train.parquet"), output_model=str(tmp_path / "out"), max_steps=2
                ),
                **changes,
            }
        )

    pq.write_table(pa.table({"text": ["a b c"], "headline": ["a"]}), tmp_path / "no_summary.parquet")
    with pytest.raises(InputError, match=r"no_summary\.parquet.*'summary' is missing.*--summary-column"):
        finetune(settings(train=str(tmp_path / "no_summary.parquet")), replicas=1)
    pq.write_table(pa.table({"text": ["a b c", "d e f"], "summary": ["a", "  "]}), tmp_path / "empty.parquet")
    with pytest.raises(InputError, match=r"empty\.parquet row 1: empty target 'summary'"):
        finetune(settings(train=str(tmp_path / "empty.parquet")), replicas=1)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(InputError, match="nothing"):
        finetune(settings(train=str(tmp_path / "nothing")), replicas=1)
    with pytest.raises(ModelLoadError):
        finetune(settings(model=str(tmp_path / "no-model")), replicas=1)
    with pytest.raises(ValueError, match="fp16 training is refused.*bfloat16"):
        settings(dtype="float16")
    assert not (tmp_path / "out" / TRAIN_LOG).exists()


@pytest.mark.parametrize("asked", [None, 3], ids=["auto", "three"])
def test_fine_tuning_asks_a_gpu_node_for_no_cpu_to_tokenize(base, data, tmp_path, monkeypatch, asked):
    """On a (simulated) GPU node of 32 CPUs, the replicas fine-tuning asks Ray for hold one CPU each and no tokenize
    worker, whatever the Placement's tokenize_workers (auto, or 3 from a library caller), where summarizing with the
    same placement asks for several."""
    import ray

    gpu_node = {"CPU": 32.0, "GPU": 1.0}
    monkeypatch.setattr(ray, "cluster_resources", lambda: gpu_node)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": gpu_node}])
    started = []

    class Started(Exception):
        pass

    def start_replicas(*args, target, **kwargs):  # the resource request, where Ray would be asked for it
        started.append(target)
        raise Started

    monkeypatch.setattr("pipeline.finetune.start_replicas", start_replicas)
    settings = FinetuneSettings(
        model=str(base), train=str(data / "train.parquet"), output_model=str(tmp_path / "out"), max_steps=1
    )
    with pytest.raises(Started):
        finetune(settings, replicas=1, placement=Placement(tokenize_workers=asked), out=io.StringIO())
    (target,) = started
    assert target.device == "cuda" and target.options == {"num_cpus": 1, "num_gpus": 1.0}
    assert target.tokenize_workers == 0 and "to tokenize" not in target.reason
    summarizing = Placement(tokenize_workers=asked).target(gpu_node, 1, node_cpus_per_gpu=32.0)
    assert summarizing.tokenize_workers == (asked or AUTO_MAX_WORKERS) > 0  # what fine-tuning no longer asks for


def test_fp16_flag_exits_2_with_the_reason(base, data, tmp_path):
    done = subprocess.run(
        _job_command(base, data, tmp_path / "o", "--dtype", "float16"),
        capture_output=True,
        text=True,
        timeout=120,
        env=local_job_env(),
    )
    assert done.returncode == 2 and "diverges in float16" in done.stderr


# --- the guards, mostly on a Trainer in this process (one replica, CPU) -----------------------------------

ROWS = [(r["text"], r["summary"]) for r in first_words_task(16, seed=1)]  # 12 rows: two steps of 8 per epoch


def _trainer(base: Path, out: Path, rows: list = ROWS, rank: int = 0, world: int = 1, **changes) -> Trainer:
    settings = FinetuneSettings(
        **{
            **TASK,
            "batch_size": 8,
            "warmup_steps": 0,
            "model": str(base),
            "train": "rows given to the Trainer",
            "output_model": str(out),
            "lr": 0.1,
            "optimizer": "sgd",
            **changes,
        }
    )
    quantization = "nf4" if settings.method == "qlora" else "none"
    model = MT5ForConditionalGeneration.from_pretrained(base, quantization=quantization)
    prepare_for_training(model, settings)
    return Trainer(model, MT5Tokenizer.from_pretrained(base), settings, rows, rank, world, "cpu")


def _poison(model, steps: set[int]) -> None:
    """NaN logits in the forward passes numbered in `steps` (from 1; a step of one micro-batch is one pass)."""
    calls = []

    def hook(module, inputs, output):
        calls.append(None)
        return output * float("nan") if len(calls) in steps else None

    model.lm_head.register_forward_hook(hook)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / TRAIN_LOG).read_text().splitlines()]


def _checkpoint(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / "_checkpoints" / f"step-{step:08d}" / "state.safetensors")


def test_a_nonfinite_step_is_skipped_and_counted_in_the_log(base, tmp_path):
    trainer = _trainer(base, tmp_path, max_steps=3, save_every=1)
    _poison(trainer.model, steps={2})
    trainer.run(resume=False)

    log = _log(tmp_path)
    assert [(r["step"], r["skipped"], r["skipped_steps"]) for r in log] == [(1, False, 0), (2, True, 1), (3, False, 1)]
    assert log[1]["loss"] is None and log[2]["loss"] > 0  # the log stays JSON: null, not NaN
    one, two = _checkpoint(tmp_path, 1), _checkpoint(tmp_path, 2)
    assert all(torch.equal(one[k], two[k]) for k in one if k.startswith("param/"))  # step 2 changed nothing
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert not all(torch.equal(two[f"param/{n}"], p) for n, p in trainer.model.named_parameters())  # step 3 trained


def test_nonfinite_steps_in_a_row_stop_training_with_only_finite_checkpoints(base, tmp_path):
    trainer = _trainer(base, tmp_path, max_steps=10, save_every=1, max_nonfinite_steps=3)
    _poison(trainer.model, steps=set(range(2, 11)))
    with pytest.raises(TrainingError, match=r"steps 2-4: .*3 steps in a row \(--max-nonfinite-steps 3\).*--lr"):
        trainer.run(resume=False)

    assert [(r["step"], r["skipped_steps"]) for r in _log(tmp_path)][-1] == (4, 3)
    folders = sorted((tmp_path / "_checkpoints").iterdir())
    assert [f.name for f in folders] == ["step-00000002", "step-00000003"]  # the newest two are kept
    for folder in folders:
        assert all(torch.isfinite(t).all() for t in load_file(folder / "state.safetensors").values()), folder


def test_nonfinite_weights_are_never_saved(base, tmp_path):
    trainer = _trainer(base, tmp_path, max_steps=2)
    with torch.no_grad():
        trainer.model.lm_head.weight[0, 0] = float("inf")  # what a finite but huge update can leave behind
    trainer.step = 1
    with pytest.raises(TrainingError, match=r"step 1: non-finite values in lm_head\.weight.*not saved"):
        trainer.save_checkpoint()
    assert not (tmp_path / "_checkpoints").exists()
    with pytest.raises(TrainingError, match=r"lm_head\.weight; the final model was not saved"):
        save_final(trainer.model, trainer.tokenizer, trainer.settings, None, write=True)
    assert not (tmp_path / "model.safetensors").exists()


def test_diverged_job_exits_1_with_the_reason_and_saves_no_model(base, data, tmp_path):
    """An infinite learning rate makes every weight that has a gradient infinite after step 1, so every later
    step is non-finite: the replica's TrainingError reaches the command line as one message, not a Ray traceback."""
    out = tmp_path / "out"
    done = subprocess.run(
        _job_command(
            base,
            data,
            out,
            "--max-steps",
            "10",
            "--optimizer",
            "sgd",
            "--lr",
            "inf",
            "--batch-size",
            "4",
            "--max-input-tokens",
            "32",
            "--max-target-tokens",
            "8",
            "--max-nonfinite-steps",
            "2",
        ),
        capture_output=True,
        text=True,
        timeout=300,
        env=local_job_env(),
    )
    assert done.returncode == 1, done.stderr
    assert "finetune.py: error: steps 2-3: the loss or gradient was not finite 2 steps in a row" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (out / "model.safetensors").exists()
    assert [r["skipped"] for r in _log(out)] == [False, True, True]


def _train_one_rank(rank: int, world: int, init_method: str, base: str, out: str, rows: list) -> None:
    """One replica of a gloo process group, in a process of its own as a replica actor is."""
    torch.set_num_threads(1)
    # a timeout, so that a replica left waiting in a collective fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        trainer = _trainer(Path(base), Path(out), rows, rank, world, max_steps=2, batch_size=4)
        trainer.run(resume=False)
        save_file(
            {n: p.detach().contiguous() for n, p in trainer.model.named_parameters()},
            Path(out) / f"rank-{rank}.safetensors",
        )
    finally:
        dist.destroy_process_group()


def test_a_replica_whose_slice_is_empty_trains_along_with_zero_gradient(base, tmp_path):
    """3 rows and 2 replicas of 4 rows each: every step, replica 0 gets all 3 rows and replica 1 none."""
    torch.multiprocessing.spawn(
        _train_one_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", str(base), str(tmp_path), ROWS[:3]), nprocs=2
    )
    zero, one = load_file(tmp_path / "rank-0.safetensors"), load_file(tmp_path / "rank-1.safetensors")
    initial = dict(MT5ForConditionalGeneration.from_pretrained(base).named_parameters())
    assert all(torch.equal(zero[k], one[k]) for k in zero)  # the same summed gradient on both
    assert not torch.equal(one["lm_head.weight"], initial["lm_head.weight"])  # replica 1 applied replica 0's
    assert [r["step"] for r in _log(tmp_path)] == [1, 2]


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_one_replica_trains_through_ddp_to_the_weights_of_a_trainer_without_process_group(base, tmp_path, method):
    """At world size 1 DDP's reduction is a copy, so the weights are bit for bit those of the plain model; two
    micro-batches a step take the no_sync path too. What one GPU runs is then the path many GPUs run."""
    settings = dict(max_steps=3, batch_size=4, grad_accum=2, method=method)
    torch.manual_seed(0)  # the same adapter initialisation and dropout masks in both
    plain = _trainer(base, tmp_path / "plain", **settings)
    plain.run(resume=False)
    with _process_group_of_one(tmp_path / "store"):
        torch.manual_seed(0)
        replica = _trainer(base, tmp_path / "ddp", **settings)
        assert replica.ddp is not None
        initial = [p.detach().clone() for p in replica.params]
        replica.run(resume=False)
    assert not any(torch.equal(p, before) for p, before in zip(replica.params, initial))  # every one trained
    for (name, got), want in zip(replica.model.named_parameters(), plain.model.parameters()):
        assert torch.equal(got, want), name


def test_a_step_all_reduces_two_stacked_tensors_on_the_training_device(base, tmp_path, monkeypatch):
    """Every collective takes tensors on the training device (NCCL takes CUDA tensors only), and the scalars
    travel in two all-reduces a step: the token counts before the forward, the loss and skip flag after."""
    reduced = []
    all_reduce = dist.all_reduce

    def recording_all_reduce(tensor, *args, **kwargs):
        reduced.append((tensor.device, tensor.shape))
        return all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", recording_all_reduce)
    with _process_group_of_one(tmp_path / "store"):
        trainer = _trainer(base, tmp_path, max_steps=2, batch_size=4, grad_accum=2)
        trainer.run(resume=False)
    device = trainer.model.device
    assert reduced == [(device, torch.Size([2]))] * 2 * 2  # per step: [target, input tokens], [loss, skip flag]


def test_each_micro_batch_computes_one_cross_entropy_over_the_vocabulary(base, tmp_path, monkeypatch):
    """The model is given decoder inputs, not labels, so it returns logits without a loss of its own that the
    step would throw away; the step's label-smoothed loss is the one cross-entropy."""
    calls = []
    cross_entropy = F.cross_entropy

    def counting_cross_entropy(*args, **kwargs):
        calls.append(None)
        return cross_entropy(*args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", counting_cross_entropy)
    trainer = _trainer(base, tmp_path, max_steps=1, batch_size=4, grad_accum=2)
    trainer.train_step()
    assert len(calls) == 2


def test_resume_with_other_settings_or_replicas_exits_2_naming_each_difference(base, data, tmp_path):
    out = tmp_path / "out"
    command = _job_command(base, data, out, "--max-steps", "3", "--save-every", "1", "--batch-size", "4")
    flags = command[2:]  # after the interpreter and the script
    started = vars(build_parser().parse_args(flags))  # the run as these flags start it, on one replica
    _trainer(base, out, **{k: v for k, v in started.items() if k in FinetuneSettings.__dataclass_fields__}).run(
        resume=False
    )
    log_before = (out / TRAIN_LOG).read_text()
    done = subprocess.run(
        [*command, "--lr", "0.01", "--replicas", "2", "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
        env=local_job_env(),
    )
    assert done.returncode == 2, done.stderr
    assert "step-00000002: --resume must continue the run" in done.stderr
    assert "--lr 0.0005 (now 0.01); --replicas 1 (now 2)" in done.stderr
    assert "Traceback" not in done.stderr
    assert (out / TRAIN_LOG).read_text() == log_before  # nothing trained


def test_resume_drops_the_log_lines_after_its_checkpoint(base, tmp_path):
    _trainer(base, tmp_path, max_steps=4, save_every=2).run(resume=False)
    with (tmp_path / TRAIN_LOG).open("a") as log:
        log.write('{"step": 5, "lo')  # a line the kill cut short
    _trainer(base, tmp_path, max_steps=4, save_every=2).run(resume=True)  # continues from step 2
    assert [r["step"] for r in _log(tmp_path)] == [1, 2, 3, 4]


def test_adafactor_resumes_to_the_weights_of_an_uninterrupted_run(base, tmp_path):
    """Adafactor's step count is a Python int (no host sync to read it): it travels in state.json's scalars."""
    settings = dict(max_steps=4, save_every=2, optimizer="adafactor", lr=1e-2)
    straight = _trainer(base, tmp_path / "straight", **settings)
    straight.run(resume=False)
    _trainer(base, tmp_path / "resumed", **settings).run(resume=False)
    meta = json.loads((tmp_path / "resumed" / "_checkpoints" / "step-00000002" / "state.json").read_text())
    assert meta["scalars"]["0/step"] == 2
    resumed = _trainer(base, tmp_path / "resumed", **settings)
    resumed.run(resume=True)  # steps 3 and 4 again, from the checkpoint of step 2
    for (name, got), want in zip(resumed.model.named_parameters(), straight.model.parameters()):
        assert torch.equal(got, want), name


def test_checkpoint_files_are_fsynced_before_the_rename_and_the_folder_after(base, tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    out = tmp_path.resolve()  # as /proc names the synced files
    _trainer(base, out, max_steps=2, save_every=1).run(resume=False)

    folder = out / "_checkpoints" / "step-00000001"
    tmp = folder.with_name(folder.name + ".tmp")
    rename = events.index(("replace", str(tmp), str(folder)))
    synced = {path for kind, path, *_ in events[:rename] if kind == "fsync"}
    assert {str(tmp / f.name) for f in folder.iterdir()} | {str(tmp)} <= synced, events
    assert ("fsync", str(folder.parent)) in events[rename + 1 :], events
