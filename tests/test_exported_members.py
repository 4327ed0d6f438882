import loopwatch


def test_public_names_are_sorted_and_exported() -> None:
    assert loopwatch.__all__ == sorted(loopwatch.__all__, key=str.lower) or \
        loopwatch.__all__ == sorted(loopwatch.__all__)
    for name in loopwatch.__all__:
        assert hasattr(loopwatch, name), name
    public = {n for n in dir(loopwatch) if not n.startswith("_") and not
              type(getattr(loopwatch, n)).__name__ == "module"}
    assert public == set(loopwatch.__all__) - {"__version__"}


def test_the_public_names_are_these() -> None:
    assert set(loopwatch.__all__) == {
        "Admission", "BlockEvent", "Config", "Frame", "LoopWatchMiddleware", "Monitor", "Owner",
        "Sink", "Watch", "__version__", "events_app", "get_monitor", "metrics_app", "owner_scope", "ui_app",
        "watch",
    }
