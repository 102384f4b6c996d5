from m2flow.eval.evaluate import EvalResult, evaluate

__all__ = ["EvalResult", "evaluate"]
