"""One trial of a gazetune search, in plain Python (no Ray, no MLflow at import time)."""


def train(config: dict, report=None) -> dict:
    """Train one configuration; see `trainable.loop.train`."""
    from trainable.loop import train as _train

    return _train(config, report=report)


__all__ = ["train"]
