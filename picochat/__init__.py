"""picochat: train your own small ChatGPT from scratch, end to end."""

import time

__version__ = "0.1.0"
PROCESS_T0 = time.time()  # the start-up breakdown (picochat.warmup) counts from here
