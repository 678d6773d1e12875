"""The recorder: every sample, state, event, action, status and dead letter, in SQLite.

Modules:

* ``schema`` — tables, columns and the numbered migrations (``schema_version``);
* ``rows`` — received message → table row (pure; bad input → a dead-letter row);
* ``store`` — the SQLite file (WAL, batched idempotent writes, retention folding);
* ``buffer`` — the bounded in-memory buffer between the network thread and the writer;
* ``service`` — the MQTT adapter: persistent session, manual acknowledgement after commit;
* ``dbfile`` — opening a recording read-only (history, export, replay);
* ``history`` / ``export`` / ``replay`` — reading a recording without a broker;
* ``timespec`` / ``progress`` — ``--since 1h`` and a terminal-only progress bar.
"""
