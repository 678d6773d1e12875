"""The analyzer: per-GPU stateful detectors that turn samples into retained states and events.

``analyzer.engine.Analyzer`` is the pure logic (no MQTT); ``analyzer.service.run`` is the thin
MQTT adapter; ``analyzer.discovery`` builds the Home Assistant discovery configs.
"""
