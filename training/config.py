"""Validated, frozen descriptions of the offline training runs."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ASPECTS = ("helpfulness", "harmlessness")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def describe_option_errors(error: ValidationError) -> str:
    """Return one line per invalid setting, named by its command-line option.

    Example: ``--sft-weight -1.0 is invalid: input should be greater than or equal to 0``.
    """
    lines = []
    for item in error.errors():
        option = "--" + str(item["loc"][0]).replace("_", "-") if item["loc"] else "options"
        message = item["msg"][:1].lower() + item["msg"][1:]
        lines.append(f"{option} {item['input']!r} is invalid: {message}")
    return "\n".join(lines)


class AspectRunConfig(BaseModel):
    """One DPO + LoRA run that produces the task vector of a single aspect."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    aspect: str = Field(pattern="^(helpfulness|harmlessness|mixed)$")
    data: tuple[Path, ...] = Field(min_length=1, description="HH-RLHF files or folders")
    output_dir: Path
    base_model: str | None = None
    heldout_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    max_train_pairs: int | None = Field(default=None, gt=0)
    steps: int = Field(default=100, gt=0)
    batch_size: int = Field(default=4, gt=0)
    gradient_accumulation: int = Field(default=2, gt=0)
    max_length: int = Field(default=192, gt=16)
    max_prompt_tokens: int = Field(default=112, gt=8)
    learning_rate: float = Field(default=5e-4, gt=0.0)
    beta: float = Field(default=0.1, gt=0.0)
    lora_rank: int = Field(default=8, gt=0)
    lora_alpha: float = Field(default=16.0, gt=0.0)
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = 0
    data_seed: int | None = Field(
        default=None,
        description="seed of the training pairs' order; None uses seed, which also fixes the split",
    )
    save_every: int = Field(default=10, gt=0)
    threads: int | None = Field(default=None, gt=0)
    bf16: bool = Field(
        default=False, description="run forward and backward passes under bfloat16 autocast"
    )
    start_bundle: Path | None = Field(
        default=None,
        description="a bundle whose vector of this aspect the LoRA starts from, to train it further",
    )
    sft_weight: float = Field(
        default=0.0,
        ge=0.0,
        description="weight of a per-token negative log-likelihood term on the chosen responses, "
        "added to the DPO loss; 0 trains with DPO alone",
    )

    @property
    def effective_batch_size(self) -> int:
        """Pairs per optimizer step."""
        return self.batch_size * self.gradient_accumulation


class ScorerRunConfig(BaseModel):
    """One reward-model run: a Bradley–Terry scorer of one aspect on a sentence encoder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    aspect: str = Field(pattern="^(helpfulness|harmlessness)$")
    data: tuple[Path, ...] = Field(min_length=1, description="HH-RLHF files or folders")
    output_dir: Path
    encoder: str | None = Field(
        default=None, description="a local encoder folder; None for the packaged all-MiniLM-L6-v2"
    )
    heldout_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    max_train_pairs: int | None = Field(default=None, gt=0)
    max_heldout_pairs: int | None = Field(default=None, gt=0)
    epochs: float = Field(default=1.0, gt=0.0)
    batch_size: int = Field(default=8, gt=0)
    learning_rate: float = Field(default=3e-5, gt=0.0)
    max_length: int = Field(default=256, gt=8)
    seed: int = 0
    save_every: int = Field(default=50, gt=0)
    threads: int | None = Field(default=None, gt=0)
