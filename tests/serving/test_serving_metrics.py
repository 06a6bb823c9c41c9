"""Prometheus text exposition: counters, cumulative histogram buckets, label escaping."""

from fm_keras.serving.metrics import Metrics


def test_counters_and_histograms_render_as_prometheus_text():
    metrics = Metrics()
    metrics.record_request("ranking", "predict", "GRPC", "OK", 300)
    metrics.record_request("ranking", "predict", "GRPC", "OK", 3_000)
    metrics.record_request("ranking", "predict", "GRPC", "NOT_FOUND", 50)
    metrics.record_batch("ranking", 17)
    lines = metrics.render().splitlines()
    assert "# TYPE :tensorflow:serving:request_count counter" in lines
    assert ':tensorflow:serving:request_count{model_name="ranking",status="OK"} 2' in lines
    assert ':tensorflow:serving:request_count{model_name="ranking",status="NOT_FOUND"} 1' in lines
    prefix = ':tensorflow:serving:request_latency_bucket{API="predict",entrypoint="GRPC",model_name="ranking",'
    buckets = {line.split('le="')[1].split('"')[0]: int(line.rsplit(" ", 1)[1])
               for line in lines if line.startswith(prefix)}
    assert buckets["100"] == 0 and buckets["500"] == 1 and buckets["5000"] == 2  # cumulative
    # TF Serving records the latency of successful requests only: the NOT_FOUND is counted in
    # request_count but is not a latency (it was, pulling the latency quantiles down)
    assert buckets["+Inf"] == 2
    assert any(line.startswith(":tensorflow:serving:request_latency_count") and line.endswith(" 2")
               for line in lines)
    assert any("processed_batch_size_bucket" in line and 'le="32"' in line and line.endswith(" 1")
               for line in lines)


def test_label_values_are_escaped():
    metrics = Metrics()
    metrics.inc("x", {"model_name": 'a"b\\c'})
    assert 'x{model_name="a\\"b\\\\c"} 1' in metrics.render()
