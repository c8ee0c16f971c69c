"""The registered pyfunc's entry as MLflow "models from code": loading a version imports this file instead of
unpickling an object, so no pickled code runs when a model is loaded from the registry."""

import mlflow

from pcm.registry import PCMPipelineModel

mlflow.models.set_model(PCMPipelineModel())
