"""Serve the pipeline's deployments from this process (`make serve` starts it in the background).

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve
    prefect deployment run train-and-eval/local -p overrides='{"train.epochs": 2}'
    prefect deployment run compare-grid/local -p overrides='{"train.epochs": 2}'

Runs execute in this process's working directory, so start it from the project root.
"""

from __future__ import annotations

import argparse

from prefect import serve

from flows.compare import compare_grid
from flows.train_and_eval import train_and_eval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--name", default="local", help="deployment name (default: %(default)s)")
    args = parser.parse_args()
    serve(
        train_and_eval.to_deployment(
            name=args.name,
            description="Download, align, train, embed, index, evaluate and track one pipeline run.",
            tags=["arcface"],
        ),
        compare_grid.to_deployment(
            name=args.name,
            description="The course report's grid (softmax vs arcface × resnet34 vs resnet50), one "
            "tracked run per combination.",
            tags=["arcface"],
        ),
        limit=1,  # one pipeline at a time: runs share the workspace's files (the lock enforces it too)
    )


if __name__ == "__main__":
    main()
