"""The healer: a guarded ladder of recovery actions for this host's GPUs.

``policy`` decides (pure, event time), ``actuators`` act, ``service`` is the MQTT adapter.
"""
