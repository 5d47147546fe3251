"""Compare a run folder's recorded settings and data with a run config before reusing it.

A training run is reused in two ways: a finished run is kept as it is, and an unfinished one
resumes from its newest checkpoint. Both are safe only when the folder was trained with the same
settings on the same data. Data files are compared by content and by ``folder/file`` name, so
the same files reached through another spelling of their path, or a link, still match. The
thread count and the output folder never count as a difference.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from peo_merge.base_model import sha256_file
from training.data import data_files

CONFIG_FILE = "config.json"
# settings that may differ between the runs that train one folder
NEUTRAL_SETTINGS = frozenset({"threads", "output_dir", "data"})


def data_hashes(paths: tuple[Path, ...]) -> dict[str, str]:
    """Return ``{file: sha256}`` for every data file a run reads."""
    return {str(file): sha256_file(file) for path in paths for file in data_files(path)}


def portable_hashes(hashes: dict[str, str]) -> dict[str, str]:
    """Key file hashes by ``<folder>/<file>``, so they hold no machine-local path."""
    return {
        f"{Path(path).parent.name}/{Path(path).name}": digest for path, digest in hashes.items()
    }


def settings_differences(
    recorded: dict, config: BaseModel, also_allowed: frozenset[str] = frozenset()
) -> list[str]:
    """Return the names of the settings in which a recorded config differs from ``config``."""
    expected = json.loads(config.model_dump_json())
    neutral = NEUTRAL_SETTINGS | also_allowed
    # a setting added after the run was recorded counts as its default
    defaults = {
        name: json.loads(json.dumps(field.default, default=str))
        for name, field in type(config).model_fields.items()
        if not field.is_required()
    }
    return sorted(
        key
        for key in recorded.keys() | expected.keys()
        if key not in neutral and recorded.get(key, defaults.get(key)) != expected.get(key)
    )


def same_data(recorded_hashes: dict[str, str], paths: tuple[Path, ...]) -> bool:
    """Return whether recorded file hashes describe the files under ``paths``."""
    return portable_hashes(recorded_hashes) == portable_hashes(data_hashes(paths))


def check_resumable(
    output_dir: Path, config: BaseModel, also_allowed: frozenset[str] = frozenset()
) -> None:
    """Raise if ``output_dir`` contains checkpoints of a run with other settings or data.

    Args:
        output_dir: the run folder, with ``config.json`` and ``checkpoints/`` when begun.
        config: the run about to start there.
        also_allowed: settings that may differ besides the thread count and folders, such as
            the number of steps of a run resumed to train longer.

    Raises:
        ValueError: the checkpoints were trained under other settings or data, naming them.
    """
    config_path = Path(output_dir) / CONFIG_FILE
    if not (config_path.is_file() and any((Path(output_dir) / "checkpoints").glob("checkpoint-*"))):
        return
    recorded = json.loads(config_path.read_text())
    differences = settings_differences(recorded, config, also_allowed)
    recorded_paths = tuple(Path(path) for path in recorded.get("data", ()))
    if not all(path.exists() for path in recorded_paths) or portable_hashes(
        data_hashes(recorded_paths)
    ) != portable_hashes(data_hashes(config.data)):
        differences.append("data")
    if differences:
        raise ValueError(
            f"{output_dir} contains checkpoints of a run with other {', '.join(differences)} "
            f"({config_path}); resume it with those settings, or choose another output folder"
        )
