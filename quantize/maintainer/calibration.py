"""Calibration data: chat conversations written for this project, rendered with the model's own chat template,
so the activation ranges INC observes are those of real chat turns (system prompt, roles, answers). A maintainer's
own file may be JSON chats (`[{"messages": [...]}]`) or plain text."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHATS = Path(__file__).parents[1] / "data" / "calibration_chats.json"
MAX_TOKENS = 512


def load_chats(path: Path = CHATS) -> list[list[dict]] | None:
    """The chats of a JSON chat file; None when the file is not one (plain text)."""
    try:
        return [c["messages"] for c in json.loads(Path(path).read_text())]
    except (ValueError, TypeError, KeyError):
        return None


def calibration_ids(tokenizer, samples: int, path: Path = CHATS) -> list[torch.Tensor]:
    """Up to `samples` [1, T] token-id tensors, unpadded (padding skews the observers): each chat rendered with
    the chat template, or a plain text cut into pieces of MAX_TOKENS tokens."""
    chats = load_chats(path)
    if chats is None:
        ids = tokenizer(Path(path).read_text(), return_tensors="pt", add_special_tokens=False).input_ids
        out = [ids[:, i : i + MAX_TOKENS] for i in range(0, ids.shape[1], MAX_TOKENS)][:samples]
    else:
        texts = [tokenizer.apply_chat_template(messages, tokenize=False) for messages in chats[:samples]]
        out = [
            tokenizer(t, return_tensors="pt", add_special_tokens=False).input_ids[:, :MAX_TOKENS]
            for t in texts
        ]
    if not out or out[0].shape[1] < 2:
        raise ValueError(f"The calibration set {path} is empty.")
    return out
