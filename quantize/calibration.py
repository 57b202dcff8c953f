"""Calibration data: chat conversations written for this project, rendered with the model's own chat template,
so the activation ranges INC observes are those of real chat turns (system prompt, roles, answers)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHATS = Path(__file__).parent / "data" / "calibration_chats.json"
MAX_TOKENS = 512


def load_chats(path: Path = CHATS) -> list[list[dict]]:
    return [c["messages"] for c in json.loads(Path(path).read_text())]


def calibration_ids(tokenizer, samples: int, path: Path = CHATS) -> list[torch.Tensor]:
    """Up to `samples` conversations as [1, T] token-id tensors, unpadded (padding skews the observers)."""
    chats = load_chats(path)[:samples]
    if not chats:
        raise ValueError(f"The calibration set {path} is empty.")
    out = []
    for messages in chats:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        out.append(tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :MAX_TOKENS])
    return out
