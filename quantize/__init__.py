"""Q8-Chat's INT8 model: how it is made (maintainer/), how it is run (runtime/), how it is measured (tools/).

    runtime/        what the app runs: the engine, the generation loop, the chat, serving, the panel
    maintainer/     the maintainer step, `python -m quantize`: SmoothQuant INT8, verified, carded, pushed
    tools/          measuring tools: `python -m quantize.bench`, `python -m quantize.tools.frontier`
    data/           calibration chats, held-out text, the model card's template, the latest bench and frontier
    families.py     every model family, one row each: what the engine runs and what the recipe smooths
    models.py       model arguments to folders (embedded default, folder, Hub), transformers and INC loaders
    engine_file.py  the engine's weight file: its reader and its writer, side by side
    machine.py      the CPU, memory rules (what fits), resident memory, the C library's heap
    files.py        folders and files that appear whole or not at all
    errors.py       ModelError, the one sentence a person reads

The runtime imports neither the maintainer step nor the tools; the shared modules above import only each other
(tests/test_house.py holds both). The maintainer's manual and the measured tables: quantize/README.md.
"""
