"""The best checkpoint as an MLflow Model: the code MLflow's models-from-code logging stores.

`search.tracking.log_model` saves this file as the model's code (`python_model=<this file>`)
beside a checkpoint artifact (model.pt, config.json, metrics.json). Loading the model
(`mlflow.pyfunc.load_model(uri)`) runs this file, whose last line hands MLflow the model object,
and then `load_context`, which rebuilds the network from the checkpoint
(`trainable.inference.Classifier`: JSON and `torch.load(weights_only=True)`). So nothing is
unpickled beyond what MLflow itself reads; no object of ours is pickled at all.

`predict(images)` takes float32 images [N, S, S] in [0, 1] at the trial's image size S (what
`gazetune prepare` and `gazetune predict` make of a DICOM) and returns a DataFrame with one
column per class, Normal, CHF and pneumonia: one-vs-rest probabilities, independent sigmoids
(they need not sum to 1), as the AUCs score them.

This is the one module of search/ besides `search.tracking` that imports MLflow: MLflow runs it
as a file, outside our package, so it cannot reach MLflow through `search.tracking`.
"""

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

CHECKPOINT = "checkpoint"  # the checkpoint artifact's name (`search.tracking.MODEL_CHECKPOINT`)


class BestCheckpoint(PythonModel):
    """A gazetune classifier as a pyfunc model; `classifier` is its `Classifier` once loaded."""

    classifier = None

    def load_context(self, context):
        from trainable.inference import Classifier

        self.classifier = Classifier.from_checkpoint(context.artifacts[CHECKPOINT])

    # The type hint is numpy's array, which MLflow takes as "validate with the signature only"
    # (without one it warns at every load).
    def predict(self, context, model_input: np.ndarray, params=None):
        """DataFrame [N rows; Normal, CHF, pneumonia] of `model_input`, images [N, S, S]."""
        import pandas as pd

        from trainable.config import CLASS_NAMES

        if isinstance(model_input, pd.DataFrame):
            # Only without MLflow's schema enforcement (which refuses a DataFrame for a tensor
            # input): its values are taken as the array, refused below unless [N, S, S].
            model_input = model_input.to_numpy()
        probs = self.classifier.probabilities(model_input)
        return pd.DataFrame(probs.astype(np.float64), columns=list(CLASS_NAMES))


mlflow.models.set_model(BestCheckpoint())
