"""The served model: tinytale's GPT as an MLflow pyfunc model, in models-from-code form.

`pyfunc.log_and_register` logs this file as the model's code; MLflow copies it into the model
and runs it (under a module name of its own) whenever the model is loaded, served or logged,
so it ends with `set_model`. tinytale itself, shipped beside it as code_paths, is imported only
to load and sample. A registered version keeps the copy it was logged with.
"""

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

DEFAULTS = {"max_new_tokens": 100, "temperature": 0.8, "top_k": 0, "top_p": 1.0, "seed": -1,
            "num_samples": 1}
# One request holds a server worker until its last sample is done: bound the batch.
MAX_SAMPLES = 64


class RequestError(MlflowException):
    """A request the client can fix: HTTP 400 whose JSON `message` is one sentence.

    MLflow's scoring server rewrites the message of an MlflowException raised by predict to
    start with a dump of the whole input (`Failed to predict data '<DataFrame>'. Error: ...`);
    the message keeps its first value so that the answer is only the sentence that says what
    to fix. Any other exception becomes MLflow's generic 400 with a traceback in the JSON.
    """

    def __init__(self, message):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self):
        return self._message

    @message.setter
    def message(self, value):
        if "_message" not in self.__dict__:
            self._message = value


def _prompts(model_input):
    """A list of prompts from a list, a string, a Series, an array or a DataFrame."""
    if isinstance(model_input, str):
        return [model_input]
    columns = getattr(model_input, "columns", None)
    if columns is not None:  # a DataFrame: the prompt column, else the first one
        column = "prompt" if "prompt" in columns else columns[0]
        return ["" if v is None else str(v) for v in model_input[column].tolist()]
    if hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    prompts = []
    for item in model_input:
        if isinstance(item, dict):
            item = item.get("prompt", "")
        elif isinstance(item, (list, tuple)):
            item = item[0] if item else ""
        prompts.append("" if item is None else str(item))
    return prompts


def _checked(params):
    """The sampling settings, or RequestError naming the first bad one and its range.

    MLflow has already cast each value to the signature's type (and dropped unknown names).
    """
    p = {**DEFAULTS, **(params or {})}
    ranges = {
        "max_new_tokens": (p["max_new_tokens"] >= 1, "1 or more (default 100)"),
        "temperature": (p["temperature"] >= 0, "0 (greedy) or more (default 0.8)"),
        "top_k": (p["top_k"] >= 0, "0 (all tokens) or more"),
        "top_p": (0 < p["top_p"] <= 1, "a value in (0, 1], e.g. 0.9 (1 keeps every token)"),
        "num_samples": (1 <= p["num_samples"] <= MAX_SAMPLES, f"1 to {MAX_SAMPLES}"),
    }
    for name, (ok, fix) in ranges.items():
        if not ok:
            raise RequestError(f"params.{name}={p[name]!r} is out of range; use {fix}.")
    return p


class TinytaleModel(PythonModel):
    def load_context(self, context):
        from tinytale.inference import load_model

        self.model, self.tokenizer, _ = load_model(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None):
        """`num_samples` continuations of every prompt, as one flat list of strings: prompt
        by prompt, so text j of prompt i is at i * num_samples + j. Prompt i samples with
        seed + i (the CLI's --seed for the first prompt gives the same texts)."""
        from tinytale.errors import UserError
        from tinytale.inference import complete

        p = _checked(params)
        seed = int(p["seed"])
        out = []
        for i, prompt in enumerate(_prompts(model_input)):
            try:
                out.extend(complete(
                    self.model, self.tokenizer, prompt, int(p["max_new_tokens"]),
                    float(p["temperature"]), int(p["top_k"]), float(p["top_p"]),
                    seed=None if seed < 0 else seed + i, num_samples=int(p["num_samples"]),
                ))
            except UserError as exc:  # an unknown word: the client's to fix, not a bug
                shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                raise RequestError(f"inputs[{i}] {shown!r}: {exc}") from None
        return out


mlflow.models.set_model(TinytaleModel())
