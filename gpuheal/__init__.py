"""gpuheal: GPU health monitor and self-healer over MQTT (the shared contract package)."""

__version__ = "0.1.0"
