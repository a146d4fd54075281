"""A rank that survives its terminal going away (SIGHUP ignored, as under nohup), then sleeps."""

import os
import signal
import time

signal.signal(signal.SIGHUP, signal.SIG_IGN)
print(f"rank {os.environ.get('RANK')} ignores SIGHUP", flush=True)
time.sleep(1000)
