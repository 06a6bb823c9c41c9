"""A/B experiments between model versions: assignment, event log, analysis, simulator.

    config      the experiment file (unit, salt, arms as (model, label | version), weights)
    assignment  salted SHA-256 into 10,000 buckets -> arm; offline assignment of a file
    events      the event schema (unit, arm, timestamp, impressions, clicks, pre_period)
    analysis    Welch t-test, delta-method CIs, SRM chi-square, CUPED
    report      `ab report`: JSON and an HTML page with plots
    simulate    `ab simulate`: synthetic users, the arms' exports, the planted FM's clicks
    cli         `fm-keras ab report | simulate | assign`

The request-time router is ``fm_keras.serving.client.ExperimentClient``.
"""
