"""Stand-in for modules.call_queue: the GPU queue lock (the host's is not reentrant) and wrap_queued_call."""

import threading

queue_lock = threading.Lock()


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)

    return f
