"""The file MLflow logs as the registered model's code ("models from code").

:func:`mltr.pyfunc.log_pyfunc_model` passes this file's path as ``python_model``: MLflow copies it
into the model and runs it on load, so the model carries no pickled object, only this reference
to the installed mltr package.
"""

import mlflow.models

from mltr.pyfunc import MlTrPyfunc

mlflow.models.set_model(MlTrPyfunc())
