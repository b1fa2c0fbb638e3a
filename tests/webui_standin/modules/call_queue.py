"""Stand-in for modules.call_queue: the GPU queue lock (the host's is a FIFO lock)."""

import threading

queue_lock = threading.RLock()
