"""TFX-style retraining pipelines: ExampleGen -> validation -> Trainer -> Evaluator ->
InfraValidator -> IndexBuilder -> Pusher, recorded in a metadata store (see runner.py)."""
