"""The publisher: reads GPUs (NVML, nvidia-smi, Jetson tegrastats/sysfs, simulator, replay) and
publishes one :class:`gpuheal.models.Sample` per GPU per interval on ``P/H/gpu/I/sample``.

``publisher.sources`` holds the readers (plain classes, no MQTT), ``publisher.service`` the thin
MQTT adapter, ``publisher.probe`` the one-shot health check.
"""
