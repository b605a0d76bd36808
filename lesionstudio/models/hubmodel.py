"""Hub-format save/load shared by the models: config.json + model.safetensors, never pickle.

``PyTorchModelHubMixin`` already writes that format; its loader is tightened here: a missing
config or weights file, a corrupt safetensors file or weights that do not fit the config are
errors naming the folder (the stock loader warns, loads non-strictly, or falls back to a
pickled ``pytorch_model.bin``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

T = TypeVar("T", bound="HubModel")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded: missing, corrupt or inconsistent files."""


def check_int(name: str, value: Any, minimum: int | None = None, choices: tuple[int, ...] | None = None) -> int:
    """Validate an integer config value with a message naming it (configs come from JSON)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config value {name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"config value {name} must be at least {minimum}, got {value}")
    if choices is not None and value not in choices:
        raise ValueError(f"config value {name} must be one of {choices}, got {value}")
    return value


def check_float(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"config value {name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def _resolve(model_id: str, filename: str, **hub_kwargs: Any) -> str:
    if os.path.isdir(model_id):
        path = os.path.join(model_id, filename)
        if not os.path.isfile(path):
            raise CheckpointError(f"{model_id}: missing {filename}")
        return path
    try:
        return hf_hub_download(repo_id=model_id, filename=filename, **hub_kwargs)
    except EntryNotFoundError as exc:
        raise CheckpointError(f"Hub repo {model_id}: missing {filename}") from exc


# The shipped weights' licence (trained on ISIC images, some CC-BY-NC / CC BY-NC-SA); the code is Apache-2.0.
WEIGHTS_LICENSE = "cc-by-nc-sa-4.0"


class HubModel(torch.nn.Module, PyTorchModelHubMixin):
    """Base of the LesionStudio models: constructor arguments are the whole config."""

    @classmethod
    def from_pretrained(cls: type[T], pretrained_model_name_or_path: str | Path, **kwargs: Any) -> T:
        model_id = str(pretrained_model_name_or_path)
        hub_keys = ("revision", "cache_dir", "force_download", "token", "local_files_only")
        hub_kwargs = {k: kwargs[k] for k in hub_keys if k in kwargs}
        config_path = _resolve(model_id, CONFIG_NAME, **hub_kwargs)
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{model_id}: {CONFIG_NAME} is not valid JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise CheckpointError(f"{model_id}: {CONFIG_NAME} must hold a JSON object")
        unknown = sorted(set(config) - set(cls._hub_mixin_init_parameters))  # type: ignore[attr-defined]
        if unknown:  # a misspelt key would otherwise be dropped silently and its default used
            raise CheckpointError(f"{model_id}: unknown config keys {unknown} for {cls.__name__}")
        return super().from_pretrained(model_id, **kwargs)  # type: ignore[misc]

    @classmethod
    def _from_pretrained(
        cls: type[T],
        *,
        model_id: str,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        map_location: str = "cpu",
        **model_kwargs: Any,
    ) -> T:
        try:
            model = cls(**model_kwargs)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{model_id}: invalid {CONFIG_NAME} for {cls.__name__}: {exc}") from exc
        weights = _resolve(
            model_id,
            WEIGHTS_NAME,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
        )
        try:
            state = load_file(weights, device=map_location)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{model_id}: {WEIGHTS_NAME} is corrupt or unreadable: {exc}") from exc
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{model_id}: {WEIGHTS_NAME} does not match {CONFIG_NAME} for {cls.__name__}: {exc}"
            ) from exc
        for name, tensor in state.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise CheckpointError(f"{model_id}: {WEIGHTS_NAME} holds NaN or infinite values in {name}")
        return model.eval()

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments, as written to config.json."""
        return dict(getattr(self, "_hub_mixin_config", None) or {})
