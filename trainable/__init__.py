"""One trial of a gazetune search, in plain Python (no Ray, no MLflow at import time)."""


def train(config: dict, report=None, resume_from=None) -> dict:
    """Train one configuration; see `trainable.loop.train`."""
    from trainable.loop import train as _train

    return _train(config, report=report, resume_from=resume_from)


__all__ = ["train"]
