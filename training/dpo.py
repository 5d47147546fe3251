"""Train one LoRA task vector with TRL's DPOTrainer, resumably.

Run as ``python -m training.dpo --aspect helpfulness --data PATH ... --output-dir DIR``. The run
saves a Trainer checkpoint every ``save_every`` steps under ``DIR/checkpoints`` and resumes from
the newest one when started again with the same arguments. When it finishes it writes
``DIR/task_vector.safetensors`` and ``DIR/record.json`` (config, data file hashes, pair counts,
steps, learning-rate schedule, wall time). ``--start-bundle BUNDLE`` trains that bundle's vector
of the aspect further instead of starting from zero. ``--export-checkpoint`` writes the same two files from
the newest checkpoint of a run that was stopped early.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from pydantic import ValidationError

from peo_merge.base_model import load_base_model, resolve_base_model
from peo_merge.task_vector import save_task_vector, task_vector_from_peft
from training.config import DEFAULT_TARGETS, AspectRunConfig, describe_option_errors
from training.data import read_pairs, split_train_heldout, to_dpo_rows
from training.runs import check_resumable, data_hashes, same_data, settings_differences
from training.start_vector import load_start_factors, start_entry

logger = logging.getLogger(__name__)

VECTOR_FILE = "task_vector.safetensors"
RECORD_FILE = "record.json"
WALL_TIME_FILE = "wall_time.json"


def load_split(config: AspectRunConfig) -> tuple[list, list]:
    """Read every data path of a run and return its deterministic ``(train, heldout)`` pairs."""
    pairs = [pair for path in config.data for pair in read_pairs(path)]
    return split_train_heldout(pairs, config.heldout_fraction, config.seed)


class WallTime:
    """Training wall time accumulated across resumed runs in ``wall_time.json``."""

    def __init__(self, path: Path):
        self.path = path
        self.previous = json.loads(path.read_text())["seconds"] if path.is_file() else 0.0
        self.started = time.monotonic()

    def total(self) -> float:
        return self.previous + time.monotonic() - self.started

    def write(self) -> None:
        self.path.write_text(json.dumps({"seconds": round(self.total(), 1)}) + "\n")

    def callback(self, label: str):
        """Return a Trainer callback that writes the wall time at each checkpoint and logs losses."""
        from transformers import TrainerCallback

        wall_time = self

        class Progress(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                wall_time.write()

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    logger.info("%s step %d/%d %s", label, state.global_step, state.max_steps, logs)

        return Progress()


def train_aspect(
    config: AspectRunConfig, model=None, tokenizer=None, expected_init: dict | None = None
) -> Path:
    """Train one aspect's LoRA with DPO and export it as a task vector.

    A finished run of the same settings in ``config.output_dir`` is kept without loading
    anything. An unfinished one resumes from its newest checkpoint.

    Args:
        config: the run description.
        model: the policy to start from; defaults to the resolved base model. The DPO reference
            is this same model with the adapter disabled.
        tokenizer: the tokenizer of ``model``.
        expected_init: the ``init`` entry a finished run's record must have, for a run that
            starts elsewhere than the base model.

    Returns:
        The path of the exported task vector file.

    Raises:
        ValueError: the folder contains checkpoints of a run with other settings or data.
    """
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    finished = finished_vector(config, expected_init)
    if finished is not None:
        logger.info("%s: %s contains this run, already finished; kept", config.aspect, finished)
        return finished
    # a run may be resumed to more steps, which lengthens its learning-rate schedule
    check_resumable(config.output_dir, config, also_allowed=frozenset({"steps"}))
    start = start_entry(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    output_dir = config.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(config.model_dump_json(indent=2) + "\n")

    # load the policy and the data
    source = resolve_base_model(config.base_model)
    if model is None:
        model, tokenizer = load_base_model(source)
    model.requires_grad_(True)
    model.train()

    train_pairs, heldout_pairs = load_split(config)
    if config.max_train_pairs is not None:
        train_pairs = train_pairs[: config.max_train_pairs]
    rows = to_dpo_rows(train_pairs, tokenizer, config.max_prompt_tokens)
    logger.info(
        "%s: %d train pairs, %d held out", config.aspect, len(train_pairs), len(heldout_pairs)
    )

    # train, resuming from the newest checkpoint
    checkpoint_dir = output_dir / "checkpoints"
    args = DPOConfig(
        output_dir=str(checkpoint_dir),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, config.steps // 20),
        beta=config.beta,
        **loss_settings(config),
        max_length=config.max_length,
        logging_steps=1,
        save_steps=config.save_every,
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed if config.data_seed is None else config.data_seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
        gradient_checkpointing=False,
        bf16=config.bf16,
    )
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(config.lora_targets),
        task_type="CAUSAL_LM",
    )
    wall_time = WallTime(output_dir / WALL_TIME_FILE)

    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[wall_time.callback(config.aspect)],
    )
    has_checkpoint = any(checkpoint_dir.glob("checkpoint-*"))
    if start is not None and not has_checkpoint:
        layers = load_start_factors(trainer.model, config)
        logger.info("%s: LoRA starts from %s (%d layers)", config.aspect, start["bundle"], layers)
    trainer.train(resume_from_checkpoint=True if has_checkpoint else None)
    wall_time.write()

    # export the adapter as a task vector with its record
    return export_vector(
        config,
        trainer.model,
        source,
        len(train_pairs),
        len(heldout_pairs),
        trainer.state.global_step,
        trainer.state.log_history,
        wall_time.total(),
        start,
    )


def loss_settings(config: AspectRunConfig) -> dict:
    """Return the DPOConfig loss options of a run: DPO alone, or DPO plus an NLL term on chosen.

    TRL's ``sft`` loss is the mean negative log-likelihood per chosen-response token, so the
    term does not grow with response length. ``sft_weight`` scales it against the DPO loss.
    """
    if config.sft_weight == 0.0:
        return {"loss_type": ["sigmoid"]}
    return {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, config.sft_weight]}


INIT_KEYS = ("lambda", "coefficients", "vector_sha256")


def finished_vector(config: AspectRunConfig, expected_init: dict | None = None) -> Path | None:
    """Return the exported vector of a finished run of ``config`` in its folder, or None.

    The run counts as finished when its record has the same settings (the thread count and
    folders aside), the same data file contents, all the configured steps, and the expected
    ``init`` entry: none for a run from the base model.
    """
    record_path = config.output_dir / RECORD_FILE
    vector_path = config.output_dir / VECTOR_FILE
    if not (record_path.is_file() and vector_path.is_file()):
        return None
    record = json.loads(record_path.read_text())
    if settings_differences(record["config"], config) or record["steps"] != config.steps:
        return None
    if not same_data(record["data_files"], config.data):
        return None
    recorded_init = record.get("init")
    if recorded_init is not None:
        recorded_init = {key: recorded_init.get(key) for key in INIT_KEYS}
    if recorded_init != expected_init:
        return None
    recorded_start = record.get("start")
    expected_start = start_entry(config)
    if (recorded_start or {}).get("sha256") != (expected_start or {}).get("sha256"):
        return None
    return vector_path


def export_vector(
    config: AspectRunConfig,
    model,
    source,
    train_pairs: int,
    heldout_pairs: int,
    steps: int,
    log_history: list[dict],
    wall_seconds: float,
    start: dict | None = None,
) -> Path:
    """Write the adapter of ``model`` as ``DIR/task_vector.safetensors`` and its ``record.json``.

    ``start`` is the :func:`start_entry` of a run that continues a bundle's vector.
    """
    output_dir = config.output_dir
    vector = task_vector_from_peft(model, config.aspect)
    vector_path = output_dir / VECTOR_FILE
    save_task_vector(vector, vector_path)
    record = {
        "aspect": config.aspect,
        "config": json.loads(config.model_dump_json()),
        "base_model": source.identity(),
        "data_files": data_hashes(config.data),
        "train_pairs": train_pairs,
        "heldout_pairs": heldout_pairs,
        "steps": steps,
        "effective_batch_size": config.effective_batch_size,
        "lr_schedule": {
            "kind": "cosine",
            "warmup_steps": max(1, config.steps // 20),
            "horizon_steps": config.steps,
        },
        "wall_time_seconds": round(wall_seconds, 1),
        "final_logs": log_history[-3:],
        "torch_threads": torch.get_num_threads(),
    }
    if start is not None:
        record["start"] = start
    (output_dir / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    logger.info("%s: wrote %s after %d steps", config.aspect, vector_path, steps)
    return vector_path


def export_newest_checkpoint(config: AspectRunConfig) -> Path:
    """Export the newest saved checkpoint of a run as its task vector, without training.

    For a run stopped before ``config.steps``: the record gives the checkpoint's step count as
    ``steps`` and the schedule's length as ``lr_schedule.horizon_steps``.

    Raises:
        FileNotFoundError: the run has no checkpoint.
    """
    from peft import PeftModel

    checkpoints = sorted(
        (config.output_dir / "checkpoints").glob("checkpoint-*"),
        key=lambda path: int(path.name.rsplit("-", 1)[1]),
    )
    if not checkpoints:
        raise FileNotFoundError(f"no checkpoint-* folder under {config.output_dir / 'checkpoints'}")
    newest = checkpoints[-1]
    state = json.loads((newest / "trainer_state.json").read_text())
    source = resolve_base_model(config.base_model)
    model, _ = load_base_model(source)
    model = PeftModel.from_pretrained(model, newest)
    train_pairs, heldout_pairs = load_split(config)
    if config.max_train_pairs is not None:
        train_pairs = train_pairs[: config.max_train_pairs]
    wall_file = config.output_dir / WALL_TIME_FILE
    wall_seconds = json.loads(wall_file.read_text())["seconds"] if wall_file.is_file() else 0.0
    logger.info("%s: exporting %s", config.aspect, newest)
    return export_vector(
        config,
        model,
        source,
        len(train_pairs),
        len(heldout_pairs),
        state["global_step"],
        state["log_history"],
        wall_seconds,
        start_entry(config),
    )


def build_parser(aspect_required: bool = True) -> argparse.ArgumentParser:
    """Return the parser of a DPO run's options; without ``aspect_required``, no ``--aspect``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    if aspect_required:
        parser.add_argument(
            "--aspect", required=True, choices=["helpfulness", "harmlessness", "mixed"]
        )
    parser.add_argument(
        "--data", required=True, nargs="+", type=Path, help="HH-RLHF files or folders"
    )
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument(
        "--base-model", default=None, help="local model folder; default SmolLM2-135M-Instruct"
    )
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per forward pass")
    parser.add_argument("--gradient-accumulation", type=int, default=2)
    parser.add_argument(
        "--max-length", type=int, default=192, help="tokens of prompt plus response"
    )
    parser.add_argument("--max-prompt-tokens", type=int, default=112)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1, help="DPO temperature")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lora-targets", nargs="+", default=list(DEFAULT_TARGETS))
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    parser.add_argument("--max-train-pairs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the order")
    parser.add_argument(
        "--data-seed", type=int, default=None, help="seed of the training order only"
    )
    parser.add_argument("--save-every", type=int, default=10, help="checkpoint interval in steps")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--bf16", action="store_true", help="bfloat16 autocast for forward and backward passes"
    )
    parser.add_argument(
        "--sft-weight",
        type=float,
        default=0.0,
        help="weight of a per-token NLL term on chosen responses added to the DPO loss",
    )
    parser.add_argument(
        "--start-bundle",
        type=Path,
        default=None,
        help="a bundle whose vector of --aspect the LoRA starts from, to train it further",
    )
    parser.add_argument(
        "--export-checkpoint",
        action="store_true",
        help="export the newest checkpoint as the task vector without training further",
    )
    return parser


def config_from_args(args: argparse.Namespace, aspect: str | None = None) -> AspectRunConfig:
    """Return the run config of parsed options; ``aspect`` overrides ``args.aspect``."""
    return AspectRunConfig(
        aspect=aspect or args.aspect,
        data=tuple(args.data),
        output_dir=args.output_dir,
        base_model=args.base_model,
        heldout_fraction=args.heldout_fraction,
        max_train_pairs=args.max_train_pairs,
        steps=args.steps,
        batch_size=args.batch_size,
        gradient_accumulation=args.gradient_accumulation,
        max_length=args.max_length,
        max_prompt_tokens=args.max_prompt_tokens,
        learning_rate=args.learning_rate,
        beta=args.beta,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_targets=tuple(args.lora_targets),
        seed=args.seed,
        data_seed=args.data_seed,
        save_every=args.save_every,
        threads=args.threads,
        bf16=args.bf16,
        start_bundle=args.start_bundle,
        sft_weight=args.sft_weight,
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValidationError as error:
        parser.error(describe_option_errors(error))
    if args.export_checkpoint:
        export_newest_checkpoint(config)
    else:
        train_aspect(config)


if __name__ == "__main__":
    main()
