"""Run every offline phase from one config file, skipping phases whose outputs match it.

Run as ``python -m training.pipeline CONFIG.json``. The phases, in order:

1. ``helpfulness`` and ``harmlessness``: one DPO task vector per aspect, from θ₀.
2. ``aspect_bundle``: a bundle of the two vectors, which θ_init is fused from.

   With ``aspect_bundle`` set in the config, phases 1 and 2 do not run: an existing bundle
   that contains τ_help and τ_harm takes their place, and its vectors, recipes included, are
   copied into the final bundle.
3. ``scorer_helpfulness`` and ``scorer_harmlessness``: the reward-model scorers.
4. ``generalist``: τ_gen, DPO on the mixed data from θ_init.
5. ``mixed``: the single-objective baseline, DPO on the mixed data from θ₀.
6. ``search``: every PEO grid point and baseline generated and scored.
7. ``bundle``: the final bundle with τ_help, τ_harm and τ_gen, the offset θ_init + τ_gen, the
   Pareto data, the preference map and the plot.
8. ``slider``: the bundle's slider checked on held-out prompts the search did not use
   (:mod:`training.slider`); ``slider.json`` goes into the bundle.

Each finished phase writes ``WORK/PHASE/phase.json`` with the sha256 of the config it ran with,
which covers its own settings and those of every phase it depends on. A phase whose record
matches is skipped. A phase whose record is missing or differs runs again; the training phases
resume from their own checkpoints when they can.

A phase folder not begun by the pipeline, such as a run started by hand with the same settings,
is normally wiped. ``--adopt PHASE`` keeps it, so the phase resumes that run instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from peo_merge.base_model import load_base_model, resolve_base_model, sha256_file
from peo_merge.bundle import load_bundle, read_manifest
from peo_merge.task_vector import TaskVector, load_task_vector
from training.bundle_writer import write_bundle
from training.config import DEFAULT_TARGETS, AspectRunConfig, ScorerRunConfig
from training.data import read_pairs, render_prompt, split_train_heldout
from training.dpo import RECORD_FILE, VECTOR_FILE, train_aspect
from training.generalist import train_generalist
from training.report import write_outputs
from training.reward import RewardScorer, train_scorer
from training.runs import data_hashes, portable_hashes
from training.search import (
    Generator,
    evaluate_candidates,
    peo_candidates,
    single_candidates,
    soup_candidates,
)
from training.slider import DEFAULT_POSITIONS, SLIDER_FILE, check_slider, write_slider

logger = logging.getLogger(__name__)

PHASE_FILE = "phase.json"
STARTED_FILE = "phase_started.json"
ASPECTS = ("helpfulness", "harmlessness")
PHASE_NAMES = (
    *ASPECTS,
    "aspect_bundle",
    "scorer_helpfulness",
    "scorer_harmlessness",
    "generalist",
    "mixed",
    "search",
    "bundle",
    "slider",
)


class DpoSettings(BaseModel):
    """The DPO recipe shared by the aspect, generalist and mixed-data runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(default=240, gt=0)
    generalist_steps: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=4, gt=0)
    gradient_accumulation: int = Field(default=2, gt=0)
    max_length: int = Field(default=192, gt=16)
    max_prompt_tokens: int = Field(default=112, gt=8)
    learning_rate: float = Field(default=5e-4, gt=0.0)
    beta: float = Field(default=0.1, gt=0.0)
    lora_rank: int = Field(default=8, gt=0)
    lora_alpha: float = Field(default=16.0, gt=0.0)
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    max_train_pairs: int | None = Field(default=None, gt=0)
    save_every: int = Field(default=10, gt=0)
    bf16: bool = Field(
        default=False, description="run forward and backward passes under bfloat16 autocast"
    )


class ScorerSettings(BaseModel):
    """The reward-model recipe of both scorers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    encoder: str | None = None
    epochs: float = Field(default=1.0, gt=0.0)
    batch_size: int = Field(default=8, gt=0)
    learning_rate: float = Field(default=3e-5, gt=0.0)
    max_length: int = Field(default=256, gt=8)
    max_train_pairs: int | None = Field(default=None, gt=0)
    save_every: int = Field(default=50, gt=0)


class SearchSettings(BaseModel):
    """The grid, the baselines' size and the generation of the search."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alphas: tuple[float, ...] = (-0.5, 0.0, 0.5, 1.0, 1.5)
    betas: tuple[float, ...] = (-0.5, 0.0, 0.5, 1.0, 1.5)
    # None: as many soup points as grid points, so both methods get the same number of models
    soup_points: int | None = Field(default=None, ge=2)
    prompts_per_aspect: int = Field(default=32, gt=0)
    max_prompt_tokens: int = Field(default=112, gt=8)
    max_new_tokens: int = Field(default=48, gt=0)
    batch_size: int = Field(default=16, gt=0)
    candidates_per_batch: int = Field(default=1, gt=0)


class PipelineConfig(BaseModel):
    """Everything one pipeline run depends on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_model: str | None = None
    # an existing bundle with τ_help and τ_harm; when set, phase 1 is not run
    aspect_bundle: Path | None = None
    helpfulness_data: tuple[Path, ...] = Field(min_length=1)
    harmlessness_data: tuple[Path, ...] = Field(min_length=1)
    work_dir: Path
    bundle_dir: Path
    bundle_name: str = "smollm2-hh"
    seed: int = 0
    heldout_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    init_weight: float = Field(default=0.5, ge=0.0, le=1.0)
    threads: int | None = Field(default=None, gt=0)
    dpo: DpoSettings = DpoSettings()
    scorer: ScorerSettings = ScorerSettings()
    search: SearchSettings = SearchSettings()
    # slider positions whose responses are scored on held-out prompts the search did not use
    slider_positions: tuple[float, ...] = DEFAULT_POSITIONS

    @model_validator(mode="after")
    def _bundle_differs_from_its_source(self) -> PipelineConfig:
        if self.aspect_bundle is not None and (
            self.aspect_bundle.resolve() == self.bundle_dir.resolve()
        ):
            raise ValueError(
                f"aspect_bundle and bundle_dir are both {self.bundle_dir}; the final bundle "
                "replaces the folder it would copy τ_help and τ_harm from, so choose another "
                "bundle_dir"
            )
        return self

    @field_validator("slider_positions")
    @classmethod
    def _slider_ends(cls, positions: tuple[float, ...]) -> tuple[float, ...]:
        if (
            0.0 not in positions
            or 1.0 not in positions
            or not all(0.0 <= w <= 1.0 for w in positions)
        ):
            raise ValueError(
                f"slider_positions is {list(positions)}; allowed: numbers in [0, 1] "
                "that include 0 and 1"
            )
        return positions


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


class Phases:
    """Runs named phases once per config, recording each one's config hash and wall time."""

    def __init__(self, work_dir: Path, adopt: tuple[str, ...] = ()):
        self.work_dir = work_dir
        self.adopt = set(adopt)
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def folder(self, name: str) -> Path:
        return self.work_dir / name

    def record(self, name: str) -> dict | None:
        path = self.folder(name) / PHASE_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def run(self, name: str, settings, work) -> dict:
        """Run ``work(folder)`` unless the phase already ran with ``settings``; return its record.

        A phase interrupted under the same settings resumes in its folder. One begun under other
        settings starts from an empty folder, so no checkpoint of the old settings is resumed.
        """
        expected = digest(settings)
        record = self.record(name)
        if record is not None and record["config_sha256"] == expected:
            logger.info("phase %s: outputs match the config, skipped", name)
            self.skipped.append(name)
            return record
        folder = self.folder(name)
        started_file = folder / STARTED_FILE
        begun = (
            json.loads(started_file.read_text())["config_sha256"]
            if started_file.is_file()
            else None
        )
        if folder.exists() and begun is None and name in self.adopt:
            logger.info("phase %s: adopting the run already in %s", name, folder)
        elif folder.exists() and begun != expected:
            logger.info("phase %s: settings changed, starting afresh", name)
            shutil.rmtree(folder)
        elif begun == expected:
            logger.info("phase %s: resuming", name)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PHASE_FILE).unlink(missing_ok=True)
        started_file.write_text(json.dumps({"config_sha256": expected}) + "\n")
        logger.info("phase %s: running", name)
        started = time.monotonic()
        work(folder)
        record = {
            "phase": name,
            "config_sha256": expected,
            "wall_time_seconds": round(time.monotonic() - started, 1),
        }
        (folder / PHASE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        self.ran.append(name)
        return record


def dpo_config(config: PipelineConfig, aspect: str, data, output_dir: Path, steps: int):
    """Return the DPO run of one phase: the shared recipe with this phase's data and steps."""
    return AspectRunConfig(
        **config.dpo.model_dump(exclude={"steps", "generalist_steps"}),
        aspect=aspect,
        data=tuple(data),
        output_dir=output_dir,
        steps=steps,
        base_model=config.base_model,
        heldout_fraction=config.heldout_fraction,
        seed=config.seed,
        threads=config.threads,
    )


def held_out_prompts(config: PipelineConfig, tokenizer, start: int) -> list[tuple[str, tuple]]:
    """Return held-out prompts of each aspect, rendered, with their dialogue turns.

    Of each aspect's held-out pairs, ``search.prompts_per_aspect`` from index ``start``: the
    search uses those from 0, the slider check the ones after them.
    """
    prompts = []
    count = config.search.prompts_per_aspect
    for data in (config.helpfulness_data, config.harmlessness_data):
        pairs = [pair for path in data for pair in read_pairs(path)]
        _, heldout = split_train_heldout(pairs, config.heldout_fraction, config.seed)
        if len(heldout) < start + count:
            raise ValueError(
                f"search.prompts_per_aspect is {count}, but {[str(path) for path in data]} has "
                f"{len(heldout)} held-out pairs, and the search and the slider check need "
                f"{2 * count}; lower prompts_per_aspect or raise heldout_fraction"
            )
        for pair in heldout[start : start + count]:
            prompt = render_prompt(pair, tokenizer, config.search.max_prompt_tokens)
            prompts.append((prompt, pair.messages))
    return prompts


def build_scorers(config: PipelineConfig, phases: Phases) -> dict:
    """Return ``{"help_score": …, "harm_score": …}`` from the two scorer phases."""
    return {
        name: RewardScorer(phases.folder(f"scorer_{aspect}"), config.scorer.max_length).score
        for name, aspect in (("help_score", "helpfulness"), ("harm_score", "harmlessness"))
    }


def existing_aspects(path: Path) -> dict:
    """Return the sha256 of τ_help and τ_harm in an existing bundle, its phase-1 record.

    Raises:
        BundleError: the bundle is invalid, because a valid bundle contains both aspect vectors.
    """
    bundle = load_bundle(path)
    return {
        "bundle_vectors": {
            name: sha256_file(bundle.path / bundle.manifest.vectors[name].file) for name in ASPECTS
        }
    }


def run_pipeline(config: PipelineConfig, adopt: tuple[str, ...] = ()) -> dict:
    """Run every phase that does not match its record yet; return what ran and what was skipped.

    ``adopt`` names phases whose folders contain runs begun outside the pipeline, to resume.
    """
    import torch

    if config.threads:
        torch.set_num_threads(config.threads)
    phases = Phases(config.work_dir, adopt)
    mixed_data = config.helpfulness_data + config.harmlessness_data
    generalist_steps = config.dpo.generalist_steps or config.dpo.steps
    common = {
        "base_model": config.base_model,
        "seed": config.seed,
        "heldout_fraction": config.heldout_fraction,
    }
    dpo_settings = common | {"dpo": config.dpo.model_dump(exclude={"generalist_steps"})}
    records = {}

    if config.aspect_bundle is None:
        for aspect, data in (
            ("helpfulness", config.helpfulness_data),
            ("harmlessness", config.harmlessness_data),
        ):
            settings = dpo_settings | {"aspect": aspect, "data": portable_hashes(data_hashes(data))}
            records[aspect] = phases.run(
                aspect,
                settings,
                lambda folder, aspect=aspect, data=data: train_aspect(
                    dpo_config(config, aspect, data, folder, config.dpo.steps)
                ),
            )

        aspect_settings = {name: records[name]["config_sha256"] for name in ASPECTS}
        records["aspect_bundle"] = phases.run(
            "aspect_bundle",
            aspect_settings,
            lambda folder: write_bundle(
                {name: phases.folder(name) for name in ASPECTS}, folder, "aspects"
            ),
        )
        aspects_path = phases.folder("aspect_bundle")
        aspects_sha256 = records["aspect_bundle"]["config_sha256"]
    else:
        aspects_path = config.aspect_bundle
        aspects_sha256 = digest(existing_aspects(aspects_path))

    for aspect, data in (
        ("helpfulness", config.helpfulness_data),
        ("harmlessness", config.harmlessness_data),
    ):
        name = f"scorer_{aspect}"
        settings = {
            "seed": config.seed,
            "heldout_fraction": config.heldout_fraction,
            "scorer": config.scorer.model_dump(),
            "aspect": aspect,
            "data": portable_hashes(data_hashes(data)),
        }
        records[name] = phases.run(
            name,
            settings,
            lambda folder, aspect=aspect, data=data: train_scorer(
                ScorerRunConfig(
                    **config.scorer.model_dump(),
                    aspect=aspect,
                    data=tuple(data),
                    output_dir=folder,
                    heldout_fraction=config.heldout_fraction,
                    seed=config.seed,
                    threads=config.threads,
                )
            ),
        )

    generalist_settings = dpo_settings | {
        "init_weight": config.init_weight,
        "steps": generalist_steps,
        "aspects": aspects_sha256,
        "data": portable_hashes(data_hashes(mixed_data)),
    }
    records["generalist"] = phases.run(
        "generalist",
        generalist_settings,
        lambda folder: train_generalist(
            dpo_config(config, "mixed", mixed_data, folder, generalist_steps),
            aspects_path,
            config.init_weight,
        ),
    )
    records["mixed"] = phases.run(
        "mixed",
        dpo_settings | {"aspect": "mixed", "data": portable_hashes(data_hashes(mixed_data))},
        lambda folder: train_aspect(
            dpo_config(config, "mixed", mixed_data, folder, config.dpo.steps)
        ),
    )

    offset = {
        "helpfulness": config.init_weight,
        "harmlessness": 1.0 - config.init_weight,
        "generalist": 1.0,
    }
    upstream = {
        name: records[name]["config_sha256"]
        for name in ("generalist", "mixed", "scorer_helpfulness", "scorer_harmlessness")
    }
    search_settings = {"search": config.search.model_dump(), "upstream": upstream} | common

    def search(folder: Path) -> None:
        model, tokenizer = load_base_model(resolve_base_model(config.base_model))
        aspects = load_bundle(aspects_path).vectors
        vectors = {name: aspects[name] for name in ASPECTS}
        for name, run in (("generalist", "generalist"), ("mixed", "mixed")):
            record = json.loads((phases.folder(run) / RECORD_FILE).read_text())
            scaling = record["config"]["lora_alpha"] / record["config"]["lora_rank"]
            vector = load_task_vector(phases.folder(run) / VECTOR_FILE, name, "lowrank", scaling)
            # the bundle stores factors in fp16: score the vectors as they will be served
            vectors[name] = TaskVector(
                name,
                "lowrank",
                scaling,
                factors={
                    target: (a.half().float(), b.half().float())
                    for target, (a, b) in vector.factors.items()
                },
            )
        generator = Generator(
            model,
            tokenizer,
            vectors,
            max_new_tokens=config.search.max_new_tokens,
            batch_size=config.search.batch_size,
        )
        scorers = build_scorers(config, phases)
        candidates = (
            peo_candidates(config.search.alphas, config.search.betas, offset)
            + soup_candidates(
                config.search.soup_points or len(config.search.alphas) * len(config.search.betas)
            )
            + single_candidates("mixed")
        )
        evaluate_candidates(
            candidates,
            held_out_prompts(config, tokenizer, start=0),
            generator,
            scorers,
            folder,
            config.search.candidates_per_batch,
        )

    records["search"] = phases.run("search", search_settings, search)

    def bundle(folder: Path) -> None:
        # training phases count their own time across resumed runs
        wall = {name: record["wall_time_seconds"] for name, record in records.items()}
        for name in ("generalist", "mixed", "scorer_helpfulness", "scorer_harmlessness"):
            run_record = json.loads((phases.folder(name) / RECORD_FILE).read_text())
            wall[name] = run_record["wall_time_seconds"]
        points = [
            json.loads(line)
            for line in (phases.folder("search") / "points.jsonl").read_text().splitlines()
            if line.strip()
        ]
        # the search's runs may have been interrupted, so each point records its own time
        untimed = sum("seconds" not in point for point in points)
        if untimed:
            logger.warning("search: %d points have no recorded seconds", untimed)
        wall["search"] = round(sum(point.get("seconds", 0.0) for point in points), 1)
        # a slider check of the bundle being replaced no longer applies
        (config.bundle_dir / SLIDER_FILE).unlink(missing_ok=True)
        aspect_entries = read_manifest(aspects_path).vectors
        for name in ASPECTS:
            wall[name] = aspect_entries[name].recipe.get("wall_time_seconds")
        write_bundle(
            {"generalist": phases.folder("generalist")},
            config.bundle_dir,
            config.bundle_name,
            copies={name: aspects_path for name in ASPECTS},
            offset=offset,
            phases={
                "aspect_learning": {name: wall[name] for name in ASPECTS},
                "scorers": {name: wall[f"scorer_{name}"] for name in ASPECTS},
                "generalist": wall["generalist"],
                "mixed_dpo_baseline": wall["mixed"],
                "search": wall["search"],
            },
        )
        write_outputs(points, config.bundle_dir)

    records["bundle"] = phases.run(
        "bundle",
        {
            "search": records["search"]["config_sha256"],
            "aspects": aspects_sha256,
            "bundle_dir": config.bundle_dir,
            "bundle_name": config.bundle_name,
        },
        bundle,
    )

    def slider(folder: Path) -> None:
        final = load_bundle(config.bundle_dir)
        model, tokenizer = load_base_model(resolve_base_model(config.base_model))
        generator = Generator(
            model,
            tokenizer,
            dict(final.vectors),
            max_new_tokens=config.search.max_new_tokens,
            batch_size=config.search.batch_size,
        )
        document = check_slider(
            final,
            held_out_prompts(config, tokenizer, start=config.search.prompts_per_aspect),
            generator,
            build_scorers(config, phases),
            config.slider_positions,
        )
        write_slider(document, folder)
        write_slider(document, config.bundle_dir)

    records["slider"] = phases.run(
        "slider",
        {"bundle": records["bundle"]["config_sha256"], "positions": config.slider_positions},
        slider,
    )
    return {"ran": phases.ran, "skipped": phases.skipped}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="a JSON file with the pipeline's settings")
    parser.add_argument(
        "--adopt",
        nargs="+",
        default=[],
        choices=PHASE_NAMES,
        metavar="PHASE",
        help="phases whose folders contain a run begun outside the pipeline with the same settings: "
        "resume it instead of starting afresh",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = PipelineConfig.model_validate_json(args.config.read_text())
    print(json.dumps(run_pipeline(config, tuple(args.adopt))))


if __name__ == "__main__":
    main()
