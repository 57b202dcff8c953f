"""The maintainer step, `python -m quantize`: SmoothQuant INT8 through Neural Compressor, verified, carded, pushed.

cli.py          the command: arguments, the checks that refuse early, the exit codes
pipeline.py     its stages, as a list over one context: quantize, baseline, quality, speed, export, vllm, card,
                publish (the move into --out; cli.py pushes)
recipe.py       the recipes, and Neural Compressor's SmoothQuant on a part of a model (a whole model or a block)
blockwise.py    the same recipe a decoder block at a time (never the model in FP32): any size
reference.py    the BF16 reference of a block-built model, itself run a block at a time
tune.py         the accuracy-aware search when the recipe misses the bar
calibration.py  the chats it calibrates on
evaluate.py     quality against BF16 on held-out text, and the quality bar
card.py         quantize_report.json and the model card (data/model_card.md)
hub.py          the push to the Hub
export.py       the compressed-tensors folder vLLM serves (w8a8/)
vllm_quality.py the export served by vLLM against vLLM on BF16 (vllm_check.py runs in vLLM's venv)
"""
