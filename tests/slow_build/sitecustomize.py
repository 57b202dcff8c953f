"""On PYTHONPATH of an app a test starts: the app's first-start INT8 build waits before its SmoothQuant step until
the file named by Q8CHAT_TEST_BUILD_GATE exists, so the test can watch the page while the build is in progress."""

import os
import time

if os.environ.get("Q8CHAT_TEST_BUILD_GATE"):
    from quantize.maintainer import recipe

    _run_inc = (
        recipe.run_inc
    )  # INC's step, on the whole model or on a block (quantize/maintainer/blockwise.py)

    def gated_run_inc(*args, **kwargs):
        while not os.path.exists(os.environ["Q8CHAT_TEST_BUILD_GATE"]):
            time.sleep(0.2)
        return _run_inc(*args, **kwargs)

    recipe.run_inc = gated_run_inc
