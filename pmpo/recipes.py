"""What a run trains with: a method's model options, training options and prior templates, resolved
for one protocol, dataset and number of shots.

A baseline is only comparable with its paper when it runs as its authors ran it, and their recipes
differ by protocol (MaPLe prompts 3 layers at lr 0.0026 for cross-dataset transfer, 9 at 0.0035 for
base-to-new), by shots (CoOp trains 50 to 200 epochs depending on K) and by dataset (CoOp's ImageNet
epochs, KgCoOp's DTD prior). Every such exception lives in a shipped YAML file; this module is the
one place that applies them, so ``pmpo recipe`` shows exactly what ``pmpo train``, ``pmpo sweep``
and ``result.json`` use. Later wins:

* model     method preset < its ``protocols.<protocol>`` < its ``datasets.<dataset>`` < ``--config``
            file < explicit options;
* training  ``configs/train/<method>_<protocol>.yaml`` (else ``<protocol>.yaml``) < its
            ``per_shots.<K>`` < its ``per_dataset.<dataset>`` < explicit options;
* templates any of the model layers above that names ``templates`` < otherwise the dataset's own
            (CoOp's ``CUSTOM_TEMPLATES``, the papers' zero-shot rows) < otherwise (user data) the
            preset's generic one. Targets of a transfer protocol are then scored with their own.
            A preset with ``dataset_templates: false`` (VPT, whose code classifies with "a photo of
            a {}." everywhere) keeps its own templates on every dataset and target.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import CONFIG_DIR, METHOD_DIR, PMPOConfig, preset_blocks, read_method_preset
from .data import dataset_templates, resolve_dataset_name
from .engine import TrainConfig, load_train_config, train_preset_path
from .errors import InputError
from .io import read_yaml_mapping
from .protocols import PROTOCOLS

# templates_from when a preset's templates hold on every dataset (``dataset_templates: false``).
OWN_TEMPLATES = "method preset (every dataset)"


@dataclass(frozen=True)
class Recipe:
    """A resolved recipe; ``templates_from`` and ``sources`` say where the values came from."""

    method: str
    protocol: str
    dataset: str | None
    shots: int | None
    model: PMPOConfig
    train: TrainConfig
    templates_from: str  # "options", "method preset (datasets.<d>)", "dataset <d>" or "method preset"
    sources: dict[str, str]  # "model" / "train": the files read, package-relative where shipped
    references: dict[str, str]  # "model" / "train": the authors' file each recipe follows

    @property
    def templates(self) -> list[str]:
        return list(self.model.templates)

    @property
    def target_templates(self) -> bool:
        """Score each transfer target with its own templates (unless the user fixed them)."""
        return self.templates_from not in ("options", OWN_TEMPLATES)

    @property
    def trains(self) -> bool:
        return self.model.n_prompts > 0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "protocol": self.protocol, "dataset": self.dataset, "shots": self.shots,
                "model": self.model.to_dict(), "train": self.train.to_dict() if self.trains else None,
                "templates": self.templates, "templates_from": self.templates_from,
                "target_templates": self.target_templates, "sources": dict(self.sources),
                "references": dict(self.references)}


def _shown(path: Path) -> str:
    try:
        return f"pmpo/configs/{path.resolve().relative_to(CONFIG_DIR)}"
    except ValueError:
        return str(path)


def _train_reference(path: Path) -> str:
    return str(read_yaml_mapping(path, "training config").get("reference", ""))


def resolve_recipe(
    method: str,
    protocol: str,
    dataset: str | None = None,
    shots: int | None = None,
    *,
    config_file: str | Path | None = None,
    model_options: dict[str, Any] | None = None,
    train_file: str | Path | None = None,
    train_options: dict[str, Any] | None = None,
) -> Recipe:
    """The recipe of ``method`` for ``protocol`` on ``dataset`` with ``shots`` images per class.

    ``model_options`` / ``train_options`` are explicit choices (None values mean "not given");
    ``config_file`` is a model YAML (its ``method`` wins over ``method``); ``train_file`` replaces
    the training preset.
    """
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    dataset = resolve_dataset_name(dataset) if dataset else None
    explicit: dict[str, Any] = {}
    if config_file is not None:
        explicit.update(read_yaml_mapping(Path(config_file), "model config"))
        method = explicit.pop("method", method)
    explicit.update({k: v for k, v in (model_options or {}).items() if v is not None})
    explicit.pop("method", None)
    preset = read_method_preset(method)  # read once; a clear error for an unknown method
    blocks = preset_blocks(method, preset)
    layered: dict[str, Any] = dict(blocks["protocols"].get(protocol, {}))
    if dataset is not None:
        layered.update(blocks["datasets"].get(dataset, {}))
    layered.update(explicit)

    if "templates" in explicit:
        templates_from = "options"
    elif "templates" in layered:
        templates_from = f"method preset (datasets.{dataset})"
    elif preset.get("dataset_templates", True) is False:
        templates_from = OWN_TEMPLATES
    elif dataset is not None and dataset_templates(dataset) is not None:
        layered["templates"] = dataset_templates(dataset)
        templates_from = f"dataset {dataset}"
    else:
        templates_from = "method preset"
    try:
        model = PMPOConfig(method=method, **layered)
    except TypeError as exc:  # an unknown option name in a file
        known = ", ".join(f.name for f in dataclasses.fields(PMPOConfig))
        raise InputError(f"{exc}; known options: {known}") from None

    train_path = Path(train_file) if train_file else train_preset_path(method, protocol)
    train = load_train_config(train_path, dataset=dataset, shots=shots, **(train_options or {}))
    preset_path = METHOD_DIR / f"{method}.yaml"
    model_source = _shown(preset_path) + (f" + {config_file}" if config_file else "")
    preset_reference = str(preset.get("reference", ""))
    return Recipe(method=method, protocol=protocol, dataset=dataset, shots=shots, model=model, train=train,
                  templates_from=templates_from, sources={"model": model_source, "train": _shown(train_path)},
                  references={"model": preset_reference, "train": _train_reference(train_path)})


__all__ = ["Recipe", "resolve_recipe"]
