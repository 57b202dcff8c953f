"""Measuring tools over what the maintainer step and the runtime make; they write only their own reports and the
bench's models of random weights.

bench.py         python -m quantize.bench: INT8 vs BF16 vs llama.cpp decode and prompt speed, and memory
random_model.py  the bench's --build-config-model: random-weight models of a real model's size, BF16 and INT8
peer.py          the bench's llama.cpp peer (Q8_0), and the GGUF it runs
app_probe.py     the bench's --app: the running app's panel timed over HTTP
bandwidth.py     the bench's memory-bandwidth floor: DRAM copy speed and each model's time to stream its weights
footprint.py     the bench's memory column: what each engine adds once loaded, in a fresh process
frontier.py      python -m quantize.tools.frontier: quality and speed of every recipe variant
concurrency.py   the bench's --concurrency: N sequences at once through the app's scheduler
visitors.py      python -m quantize.tools.visitors: many visitors at once through a running app, over HTTP
flood.py         python -m quantize.tools.flood: a visitor's wait behind a script's flood
"""
