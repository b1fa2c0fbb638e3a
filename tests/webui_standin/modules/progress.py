"""Stand-in for modules.progress: the task bookkeeping behind /internal/progress."""

from collections import OrderedDict

from . import record

current_task = None
pending_tasks = OrderedDict()
finished_tasks = []


def add_task_to_queue(id_job):
    record("progress.add_task_to_queue", id_job)
    pending_tasks[id_job] = 0


def start_task(id_task):
    global current_task
    record("progress.start_task", id_task)
    current_task = id_task
    pending_tasks.pop(id_task, None)


def finish_task(id_task):
    global current_task
    record("progress.finish_task", id_task)
    if current_task == id_task:
        current_task = None
    finished_tasks.append(id_task)
