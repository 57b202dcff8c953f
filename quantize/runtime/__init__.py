"""What the app runs (and the build and the bench measure with): it imports neither quantize.maintainer nor quantize.tools.

engine.py     the decoder INT8 and BF16 both run in, so a gain is quantization's: kernels, cache, attention
generate.py   the generation loop: one token per forward pass, a time stamp per token
decoders.py   the decoder that serves a folder: the engine, or a transformers model behind its interface
latency.py    per-token times: the one summary, formatter and speed-up line, and the interleaved measurement
chat.py       a visitor's message checked, the prompt, the live decode loop
sessions.py   replies in progress per visitor: Stop and Clear
serving.py    the app's models: pairs, loading, the first-start build (handed in by the app), switching
panel.py      what the page says about the models and the numbers
"""
