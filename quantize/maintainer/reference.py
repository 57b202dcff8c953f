"""The BF16 reference of a model built block by block, itself run one decoder block at a time: verifying a 7B
model holds one block of its BF16 weights (0.46 GB), not the 14.8 GB model.

transformers' own modules compute it: the skeleton and its blocks as blockwise.py builds them, given the folder's
BF16 weights memory-mapped (no copy), each block loaded for its turn, run on every sequence and let go. What the
quality measure asks of a reference then costs few passes over the blocks:
  * teacher-forced windows, every window in one pass: a BF16 model has no per-call activation scales, so a
    window's logits are the same whether it comes at once or token by token (up to rounding);
  * greedy answers to every prompt together, one pass per new token: the prompts left-padded into one batch,
    masked, with positions counted from each prompt's own first token (as transformers' generate does).
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import torch
import torch.nn.functional as F

from quantize.families import FAMILIES
from quantize.maintainer import blockwise, evaluate


class ByBlock:
    """A BF16 folder's model for `evaluate.compare`, one block at a time (see the module docstring)."""

    label = "transformers BF16, one block at a time"

    def __init__(self, folder: Path) -> None:
        self.source = blockwise.Source.open(Path(folder))
        self.model = blockwise.skeleton(self.source.config)
        self.model.config.cache_implementation = None  # Gemma 2's "hybrid": the answers bring a DynamicCache
        self.path, self.layers = blockwise.decoder_layers(self.model)
        self.takes_positions = "position_ids" in inspect.signature(self.model.forward).parameters
        embed_name = blockwise.module_name(self.model, self.model.get_input_embeddings())
        family = FAMILIES[self.source.config.model_type]
        norm_name, head_name = family.final_norm, family.lm_head
        tied = {f"{head_name}.weight": f"{embed_name}.weight"}
        for name, mod in blockwise.before_blocks(self.model, self.path, family).items():
            self.source.load(mod, name, dtype=torch.bfloat16)
        self.norm = self.source.load(self.model.get_submodule(norm_name), norm_name, dtype=torch.bfloat16)
        self.head = self.source.load(
            self.model.get_output_embeddings(), head_name, fallback=tied, dtype=torch.bfloat16
        )

    def final_hidden(self, calls: list[dict]) -> list[torch.Tensor]:
        """The final-normed hidden states of the model called with each of `calls` (its keyword arguments)."""
        seen = blockwise.first_block_calls(self.model, self.layers, calls)
        hidden = [h for h, _ in seen]
        with torch.no_grad():
            for i in range(len(self.layers)):
                block = self.source.load(
                    copy.deepcopy(self.layers[i]), f"{self.path}.{i}", dtype=torch.bfloat16
                )
                hidden = [block(h, **kwargs)[0] for h, (_, kwargs) in zip(hidden, seen)]
                del block  # its memory-mapped weights leave resident memory with it
            return [self.norm(h) for h in hidden]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        cap = getattr(self.source.config, "final_logit_softcapping", None)  # Gemma 2's, after lm_head
        with torch.no_grad():
            logits = self.head(hidden).float()
            return logits if cap is None else torch.tanh(logits / cap) * cap

    def teacher_forced(
        self, ids: torch.Tensor, window: int = evaluate.WINDOW, prefill: int = evaluate.PREFILL
    ) -> tuple[float, torch.Tensor]:
        """`evaluate.teacher_forced` of this model: `prefill` does not change a BF16 model's logits."""
        spans = evaluate.windows(ids, window)
        finals = self.final_hidden([{"input_ids": x[:, :-1], "use_cache": False} for x in spans])
        nll, n, top = 0.0, 0, []
        for x, h in zip(spans, finals):
            logits = self.logits(h[0])
            nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            n += x.shape[1] - 1
            top.append(logits.argmax(-1))
        return nll / n, torch.cat(top)

    def greedy_answers(
        self, prompts: list[torch.Tensor], new_tokens: int, eos: int | None
    ) -> list[list[int]]:
        """`evaluate.greedy` of every prompt: each answer up to and including `eos`, or `new_tokens` long."""
        from transformers import DynamicCache

        width = max(p.shape[-1] for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - p.shape[-1] :], mask[row, width - p.shape[-1] :] = p.reshape(-1), 1
        # OPT's blocks in transformers 4.45 take no cache object: each pass then runs the whole sequence so far
        cached = getattr(self.model, "_supports_cache_class", False)
        cache, answers = DynamicCache() if cached else None, [[] for _ in prompts]
        for _ in range(new_tokens):
            call = {"input_ids": ids, "attention_mask": mask, "past_key_values": cache, "use_cache": cached}
            if self.takes_positions:  # OPT counts them from the mask itself
                call["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
            (hidden,) = self.final_hidden([call])
            picks = self.logits(hidden[:, -1]).argmax(-1).tolist()
            for answer, token in zip(answers, picks):
                if not answer or answer[-1] != eos:
                    answer.append(token)
            if all(a[-1] == eos for a in answers):
                break
            new = torch.tensor(picks)[:, None]
            ids, mask = (
                new if cached else torch.cat([ids, new], 1),
                torch.cat([mask, torch.ones_like(new)], 1),
            )
        return answers
