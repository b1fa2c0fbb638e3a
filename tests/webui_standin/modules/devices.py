"""Stand-in for modules.devices: the optimal device name (tests set it) and torch_gc."""

from . import record

optimal_device_name = "cpu"


def get_optimal_device_name():
    return optimal_device_name


def torch_gc():
    record("devices.torch_gc")
