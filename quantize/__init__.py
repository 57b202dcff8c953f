"""The INT8 model's package: how it is made, and how it is loaded, run and measured (the app imports the latter).

The maintainer step, `python -m quantize` (see README.md):
    __main__.py     the command: arguments, the checks that refuse early, the exit codes
    pipeline.py     its stages, as a list over one context: quantize, baseline, quality, speed, card, publish
    recipe.py       Neural Compressor's SmoothQuant through Optimum Intel on a whole model; `build_int8`
    blockwise.py    the same recipe a decoder block at a time (never the model in FP32): engine families at any size
    calibration.py  the chats it calibrates on
    evaluate.py     quality against BF16 on held-out text, and the quality bar
    card.py         quantize_report.json and the model card (data/model_card.md)
    hub.py          the push to the Hub
    bench.py        python -m quantize.bench: INT8 vs BF16 vs llama.cpp decode speed and memory
    frontier.py     python -m quantize.frontier: quality and speed of every recipe variant

The runtime (app.py, the benchmark and the verification stages use it):
    models.py       model arguments to folders (embedded default, folder, Hub), loading
    engine.py       the decoder the INT8 and BF16 models both run in, so a gain is quantization's
    generate.py     the generation loop
    latency.py      per-token times and their one summary, formatter and speed-up line
    chat.py         a visitor's message checked, the prompt, the live decode loop
    sessions.py     replies in progress per visitor: Stop and Clear
    serving.py      the app's models: pairs, loading, the first-start build, switching
    panel.py        what the page says about the models and the numbers
    files.py        folders and files that appear whole or not at all
"""
