"""Train a small classifier on scikit-learn's digits, logged through ops.tracking.

    eval "$(invoke client-env)"; .venv/bin/python examples/train.py --epochs 10

The run records the parameters, the loss and accuracy of every epoch, the fitted model,
and the exact source state, so that `invoke reproduce RUN_ID` can rebuild this code. The
data set ships with scikit-learn: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlflow
import numpy as np
import sklearn
from sklearn.datasets import load_digits
from sklearn.linear_model import SGDClassifier
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

# The toolkit is not installed as a package: make it importable from a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ops.tracking import tracked_run


def main(argv: list[str] | None = None) -> str:
    args = _arguments(argv)
    params = {
        "data": {"name": "digits", "test_size": args.test_size},
        "model": {
            "type": "SGDClassifier",
            "learning_rate": args.learning_rate,
            "alpha": args.alpha,
        },
        "epochs": args.epochs,
        "seed": args.seed,
    }
    features, labels = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(
        features, labels, test_size=args.test_size, random_state=args.seed, stratify=labels
    )
    scaler = StandardScaler().fit(x_train)
    x_train, x_val = scaler.transform(x_train), scaler.transform(x_val)
    classes = np.unique(labels)
    model = SGDClassifier(
        loss="log_loss",
        learning_rate="constant",
        eta0=args.learning_rate,
        alpha=args.alpha,
        random_state=args.seed,
    )
    shuffle = np.random.default_rng(args.seed)

    with tracked_run(args.experiment, params=params, run_name=args.run_name) as run:
        # One pass over the shuffled training set per epoch, so every epoch has a point.
        for epoch in range(args.epochs):
            order = shuffle.permutation(len(x_train))
            model.partial_fit(x_train[order], y_train[order], classes=classes)
            run.log_metrics(
                {
                    "train_loss": log_loss(y_train, model.predict_proba(x_train), labels=classes),
                    "val_loss": log_loss(y_val, model.predict_proba(x_val), labels=classes),
                    "val_accuracy": accuracy_score(y_val, model.predict(x_val)),
                },
                step=epoch,
            )
            print(f"epoch {epoch}: val_accuracy {accuracy_score(y_val, model.predict(x_val)):.3f}")

        # The scaler goes with the model, so the logged model takes raw pixel values.
        pipeline = make_pipeline(scaler, model)
        mlflow.sklearn.log_model(
            pipeline,
            name="model",
            input_example=features[:3],
            # Stated, not inferred: inferring starts a second Python to watch the imports.
            pip_requirements=[f"scikit-learn=={sklearn.__version__}"],
        )
    print(f"logged run {run.run_id}")
    return run.run_id


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="mlflow-ops-demo", help="experiment name")
    parser.add_argument("--run-name", default=None, help="name of the run")
    parser.add_argument("--epochs", type=int, default=20, help="passes over the training set")
    parser.add_argument("--learning-rate", type=float, default=0.01, help="constant step size")
    parser.add_argument("--alpha", type=float, default=1e-4, help="L2 regularisation strength")
    parser.add_argument("--test-size", type=float, default=0.25, help="share held out")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split and shuffling")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
