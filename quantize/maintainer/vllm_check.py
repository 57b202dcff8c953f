"""One model served by vLLM's offline engine, measured on given token ids: run with the vLLM venv's Python (vLLM
needs transformers 5, so it never shares the quantize step's environment), standard library and vLLM only.

    VLLM_PYTHON quantize/maintainer/vllm_check.py MODEL_FOLDER JOB.json OUT.json

JOB.json: {"windows": [[ids]...], "prompts": [[ids]...], "greedy_tokens": N, "follow": [[prompt ids, answer
ids]...], "chat": [messages] or null}. OUT.json: the mean negative log-likelihood of every window read in one pass
(each token's log-probability given those before it) and vLLM's first choice at each of those positions, the
greedy tokens of each prompt, how often each given answer's token is vLLM's own first choice after what precedes
it (top-1 agreement along another engine's answers), the chat answer as vLLM detokenizes it, and what vLLM says it
ran. The pipeline's vLLM stage (maintainer/pipeline.py) and tests/test_export.py run it.
"""

from __future__ import annotations

import json
import math
import os
import sys


def measure(folder: str, job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    longest = max(len(w) for w in job["windows"] + job["prompts"]) + job["greedy_tokens"]
    llm = LLM(model=folder, dtype="bfloat16", max_model_len=max(longest, 1024), seed=0)
    # each window's prompt log-probabilities: the token that follows, given all before it (the first has none)
    scored = llm.generate(
        [TokensPrompt(prompt_token_ids=w) for w in job["windows"]],
        SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0),
    )
    nll, n, top = 0.0, 0, []
    for window, out in zip(job["windows"], scored):
        for token, logprobs in zip(window[1:], out.prompt_logprobs[1:]):
            nll -= logprobs[token].logprob
            n += 1
            top.append(next(t for t, lp in logprobs.items() if lp.rank == 1))
    greedy = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]],
        SamplingParams(max_tokens=job["greedy_tokens"], temperature=0.0),
    )
    followed = (
        llm.generate(
            [TokensPrompt(prompt_token_ids=p + a) for p, a in job["follow"]],
            SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0),
        )
        if job["follow"]
        else []
    )
    ranks = [
        [out.prompt_logprobs[len(p) + i][token].rank for i, token in enumerate(a)]
        for (p, a), out in zip(job["follow"], followed)
    ]
    chat = job.get("chat") and llm.chat(
        job["chat"], SamplingParams(max_tokens=job["greedy_tokens"], temperature=0.0)
    )
    config = llm.llm_engine.model_config
    llm.llm_engine.engine_core.shutdown()  # its engine process and workers: none outlives this one
    return {
        "nll": nll / n,
        "perplexity": math.exp(nll / n),
        "scored_tokens": n,
        "top": top,
        "greedy": [list(o.outputs[0].token_ids) for o in greedy],
        "follow_top1": sum(r == 1 for rs in ranks for r in rs) / max(sum(len(rs) for rs in ranks), 1),
        "chat_answer": chat[0].outputs[0].text if chat else None,
        "quantization": config.quantization,
        "vllm": __import__("vllm").__version__,
    }


if __name__ == "__main__":  # vLLM starts worker processes that import this file again
    folder, job_path, out_path = sys.argv[1:4]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    cores = sorted(os.sched_getaffinity(0))
    if cores == list(
        range(cores[0], cores[-1] + 1)
    ):  # this process's cores as a range; else vLLM's own choice
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}-{cores[-1]}")
    result = measure(folder, json.loads(open(job_path).read()))
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    # vLLM's engine threads can abort the interpreter's shutdown ("terminate called without an active exception",
    # exit 134) once the work is done and written: measure stopped its engine processes, and this one leaves
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
