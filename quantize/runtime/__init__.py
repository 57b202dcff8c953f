"""What the app runs (and the maintainer step and the bench measure with): it imports neither quantize.maintainer
nor quantize.tools.

engine.py     the decoder INT8 and BF16 both run in, so a gain is quantization's: the model, its cache slots,
              attention, the loader
kernels.py    the Linears (FBGEMM, oneDNN, compiled rows, BF16) and which one runs per CPU and row count
generate.py   the generation loop: one token per forward pass, a time stamp per token
scheduler.py  the app's replies decoded together: slots, the line, prefill chunks, batched steps
prefixes.py   a visitor's conversation kept for their next turn
decoders.py   the decoder that serves a folder: the engine, or a transformers model behind its interface
remote.py     a pair served elsewhere (vLLM, llama.cpp, TGI) behind the decoder's interface
latency.py    per-token times: the one summary, formatter and speed-up line, and the interleaved measurement
chat.py       a visitor's message checked, the prompt, the live decode loop
sessions.py   replies in progress per visitor: Stop and Clear
admission.py  who sent a request and what they may hold (fairness, the owner's controls)
serving.py    the app's models: pairs, loading, the first-start build (handed in by the app), switching
panel.py      what the page says about the models and the numbers
"""
