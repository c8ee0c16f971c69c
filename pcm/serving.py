"""What a registered version accepts as a request, checked whole before anything is generated.

A request is a table of rows: `prompt` (required) and the optional `negative_prompt`, `steps`, `guidance_scale`,
`gamma` and `seed`; a missing or null value takes the version's defaults (pcm.eval.generate.row_settings). Anything
else (an unknown column, a value of the wrong type, steps or gamma the LoRA's sampler refuses, more steps than the
distillation grid N) is refused with BadRequest, an MlflowException of error code INVALID_PARAMETER_VALUE naming
the row, the column and what is allowed. MLflow's scoring server (`mlflow models serve`) answers it with HTTP 400
and its message, `pcm sample --model` with one line, and a Python caller of `model.predict` can catch it (it is a
ValueError too).

Why the registered version has no input schema in its signature: MLflow enforces a schema before `predict` runs and
drops columns it does not know with a warning, so a typo (`step` for `steps`) would silently sample with the default;
here it is a 400 naming the allowed columns. The columns are documented in the version's description and its input
example instead.

A valid request the model then fails on (out of memory, a base model that broke) is ModelFailure: HTTP 500 with one
line, the error's type and first line, while its traceback goes to the server's log (model_failures). Left alone,
MLflow's scoring server answers any other exception with a 400 ("Verify that the serialized input Dataframe is
compatible") and the traceback in the body: the client's fault, which it was not, and the server's internals, which
the client does not need. Both answers carry their own message only: the scoring server would prefix it with the
whole request ("Failed to predict data '<the frame>'.").
"""

import json
import logging
import math
import numbers
from contextlib import contextmanager

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

from pcm.config import SampleConfig
from pcm.eval.generate import row_settings
from pcm.models.card import ModelCard
from pcm.sampling import Sampling

COLUMNS = {"prompt": str, "negative_prompt": str, "steps": int, "guidance_scale": float, "gamma": float, "seed": int}
MAX_SEED = 2**63 - 1
MAX_MESSAGE = 300  # characters of a failure's first line in a 500's message
log = logging.getLogger(__name__)


class ServingError(MlflowException):
    """An answer of the scoring server: the HTTP status of its error code, and a body of its own one-line message
    (serialize_as_json is what the server sends; it keeps the message this was raised with, not the one the server
    rewrites to include the whole request)."""

    def serialize_as_json(self) -> str:
        return json.dumps({**json.loads(super().serialize_as_json()), "message": self.args[0]})


class BadRequest(ServingError, ValueError):
    """A request the model refuses. MLflow's scoring server answers an MlflowException of INVALID_PARAMETER_VALUE
    with HTTP 400 and its message; in Python it is also a ValueError, as the model's refusals were before."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class ModelFailure(ServingError, RuntimeError):
    """A valid request the model failed on: HTTP 500 (INTERNAL_ERROR) and one line; in Python also a RuntimeError."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INTERNAL_ERROR)


@contextmanager
def model_failures():
    """Around the model's work on checked rows: an exception other than a ServingError is logged with its traceback
    (the server's log) and raised again as ModelFailure, whose message names its type and first line."""
    try:
        yield
    except ServingError:
        raise
    except Exception as err:
        log.exception("pcm: the model failed on a valid request")
        first = (str(err).strip().splitlines() or [""])[0][:MAX_MESSAGE]
        raise ModelFailure(f"the model failed while generating ({type(err).__name__}: {first}); the request was "
                           "valid, the server's log has the traceback") from err


def bad_request(message: str) -> BadRequest:
    return BadRequest(message)


def request_rows(model_input, card: ModelCard, defaults: SampleConfig | None = None) -> list[dict]:
    """The rows of a request with every value resolved (row_settings), or bad_request naming the first problem.
    Every row is checked before the first image is generated, so a bad last row costs nothing."""
    frame = _frame(model_input)
    unknown = [str(c) for c in frame.columns if c not in COLUMNS]
    if unknown or "prompt" not in frame.columns:
        what = f"unknown column(s) {', '.join(map(repr, unknown))}" if unknown else "no 'prompt' column"
        raise bad_request(f"{what}; the columns are prompt (required), {', '.join(list(COLUMNS)[1:])} (optional)")
    if frame.empty:
        raise bad_request("the request has no rows; send at least one prompt")
    rows = []
    for i, raw in enumerate(frame.to_dict("records")):
        for name, value in raw.items():
            _check_value(i, name, value)
        row = row_settings(raw, card, defaults)
        if row["steps"] > card.num_solver_steps:  # more cannot be more accurate, and one request would hold the server
            raise bad_request(f"row {i}: steps={row['steps']}: at most {card.num_solver_steps} (the LoRA's "
                              f"distillation grid N); it was trained for {card.recommended_steps}")
        try:
            Sampling(card, row["steps"], row["guidance_scale"], row["gamma"]).timesteps(card.num_train_timesteps)
        except ValueError as err:
            raise bad_request(f"row {i}: {str(err).splitlines()[0]}") from err
        rows.append(row)
    return rows


def _frame(model_input) -> pd.DataFrame:
    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, dict | list):
        try:
            return pd.DataFrame(model_input)
        except ValueError as err:  # a dict of scalars, lists of unequal lengths
            raise bad_request(f"the request is not a table of rows ({err}); send dataframe_split or "
                              "dataframe_records") from err
    raise bad_request(f"the request is a {type(model_input).__name__}, not a table of rows; send dataframe_split or "
                      "dataframe_records with a prompt column")


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _check_value(i: int, name: str, value) -> None:
    """bad_request unless the value has its column's type (a missing optional value is fine)."""
    where = f"row {i}: {name}={value!r}"
    if _missing(value):
        if name == "prompt":
            raise bad_request(f"row {i}: prompt is missing; every row needs one")
        return
    kind = COLUMNS[name]
    if kind is str:
        if not isinstance(value, str) or (name == "prompt" and not value.strip()):
            raise bad_request(f"{where}: must be a{' non-empty' if name == 'prompt' else ''} string")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise bad_request(f"{where}: must be a finite {'integer' if kind is int else 'number'}")
    if kind is int and not float(value).is_integer():
        raise bad_request(f"{where}: must be an integer")
    if name == "seed" and not 0 <= value <= MAX_SEED:
        raise bad_request(f"{where}: must be in 0..{MAX_SEED}")
    if name == "guidance_scale" and value < 0:
        raise bad_request(f"{where}: must be >= 0 (1 disables classifier-free guidance)")
