"""Read a torch ``.bin`` weight file without unpickling anything but tensors.

``torch.load(weights_only=True)`` refuses other Python objects; its message then suggests
``weights_only=False``, which would run whatever code the file holds. llavakit never does that: the refusal
is one sentence that says what the file holds and how to get a tensor-only one.
"""

from __future__ import annotations

import pickle

import torch


class TensorFileError(ValueError):
    """A weight file that cannot be read as tensors only."""


def load_tensors(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise TensorFileError(f"{path}: holds Python objects besides tensors; llavakit reads tensor-only files "
                              "and does not unpickle anything else (it could run code). Save a plain dict of "
                              "tensors (torch.save(model.state_dict())) or safetensors") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TensorFileError(f"{path}: cannot read as a torch weight file ({first})") from None
    if not isinstance(state, dict):
        raise TensorFileError(f"{path}: holds a {type(state).__name__}, not a dict of tensors")
    return state


def grow_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with rows appended up to ``rows``, each the mean of the existing rows: how the embeddings of added
    tokens start, in training (the original LLaVA's rule) and in conversion alike."""
    if t.shape[0] >= rows:
        return t
    mean = t.float().mean(0, keepdim=True).to(t.dtype)
    return torch.cat([t, mean.expand(rows - t.shape[0], -1)], 0)
