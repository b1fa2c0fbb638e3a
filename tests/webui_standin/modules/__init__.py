"""Stand-in for the WebUI's `modules` package (tests only; see ../README.md)."""

CALLS: list[tuple] = []


def record(*call) -> None:
    CALLS.append(call)
