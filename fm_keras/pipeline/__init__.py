"""TFX-style retraining pipelines: ExampleGen -> validation -> Trainer -> Evaluator ->
InfraValidator -> Pusher -> IndexBuilder, recorded in a metadata store (see runner.py)."""
