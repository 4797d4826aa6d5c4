"""The projector's weights in the original LLaVA's file format and back.

The original saves the stage-1 projector as ``mm_projector.bin`` (a torch pickle) with the keys
``model.mm_projector.0.{weight,bias}`` and ``model.mm_projector.2.{weight,bias}``; transformers' Llava
calls the same tensors ``multi_modal_projector.linear_1`` / ``linear_2``. Both directions live here, and
loading never unpickles anything but tensors (``weights_only=True``).
"""

from __future__ import annotations

import os

import torch

ORIGINAL_TO_HF = {"0": "linear_1", "2": "linear_2"}
HF_PREFIX = "multi_modal_projector."
PROJECTOR_BIN = "mm_projector.bin"
PROJECTOR_SAFETENSORS = "mm_projector.safetensors"


class ProjectorFileError(ValueError):
    """A projector file does not fit the model (or is not a projector file)."""


def to_original(projector_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{linear_1.weight: ...}`` (the projector module's own state dict) → the original's key names."""
    out = {}
    inv = {v: k for k, v in ORIGINAL_TO_HF.items()}
    for k, v in projector_state.items():
        layer, _, param = k.partition(".")
        out[f"model.mm_projector.{inv[layer]}.{param}"] = v.detach().cpu().contiguous()
    return out


def from_original(state: dict[str, torch.Tensor], source: str = "") -> dict[str, torch.Tensor]:
    """Original (or already-HF) projector keys → the projector module's own keys (``linear_1.weight``...)."""
    out = {}
    for k, v in state.items():
        key = k
        for prefix in ("base_model.model.", "model.", ""):
            if key.startswith(prefix + "mm_projector."):
                idx, _, param = key[len(prefix + "mm_projector."):].partition(".")
                if idx not in ORIGINAL_TO_HF:
                    raise ProjectorFileError(f"{source}: key {k!r} is not part of an mlp2x_gelu projector")
                out[f"{ORIGINAL_TO_HF[idx]}.{param}"] = v
                break
        else:
            for hf_prefix in ("model.multi_modal_projector.", HF_PREFIX, ""):
                if key.startswith(hf_prefix) and key[len(hf_prefix):].split(".")[0] in ("linear_1", "linear_2"):
                    out[key[len(hf_prefix):]] = v
                    break
    if not out:
        raise ProjectorFileError(f"{source}: no projector weights found (expected keys like "
                                 f"'model.mm_projector.0.weight'); keys: {sorted(state)[:5]}")
    return out


def read_projector_file(path: str) -> dict[str, torch.Tensor]:
    """Read ``mm_projector.bin`` / ``.safetensors`` (or the directory holding one) as HF projector keys."""
    if os.path.isdir(path):
        for name in (PROJECTOR_SAFETENSORS, PROJECTOR_BIN):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise ProjectorFileError(f"{path}: no {PROJECTOR_BIN} or {PROJECTOR_SAFETENSORS} in this directory")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        from llavakit.model.tensors import TensorFileError, load_tensors

        try:
            state = load_tensors(path)
        except TensorFileError as e:
            raise ProjectorFileError(str(e)) from None
    if not isinstance(state, dict):
        raise ProjectorFileError(f"{path}: expected a dict of tensors")
    return from_original(state, path)


def load_projector(projector: torch.nn.Module, path: str) -> None:
    """Load a projector file into ``projector``; a shape mismatch names the model the file belongs to."""
    state = read_projector_file(path)
    own = projector.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ProjectorFileError(f"{path}: missing projector weights {missing}")
    for k, v in state.items():
        if k not in own:
            raise ProjectorFileError(f"{path}: unexpected projector weight {k!r}")
        if tuple(v.shape) != tuple(own[k].shape):
            w1 = state["linear_1.weight"].shape
            raise ProjectorFileError(
                f"{path}: projector {k} has shape {tuple(v.shape)}, the model needs {tuple(own[k].shape)}. "
                f"The file maps vision features of size {w1[1]} to a language model of hidden size {w1[0]}; "
                f"this model has {own['linear_1.weight'].shape[1]} → {own['linear_1.weight'].shape[0]}. "
                "Use the projector trained for this language model and vision tower.")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))


def save_projector(projector_state: dict[str, torch.Tensor], directory: str) -> str:
    """Write ``mm_projector.bin`` with the original's key names (loadable by the original repository too)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, PROJECTOR_BIN)
    tmp = path + ".tmp"
    torch.save(to_original(projector_state), tmp)
    os.replace(tmp, path)
    return path
