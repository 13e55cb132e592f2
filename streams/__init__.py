"""Stream processing: tables and migrations, the stream core (sessions, rollups, raw events), and
the two drivers that run it (embedded runner, Faust worker)."""
