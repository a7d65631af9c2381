"""A benchmark run: its settings, problems and TTS paradigms, the runner and session
that time each case, the lossless check, peer implementations, machine information and
the typed case record. Imports the engine, models and drafters below it, never the
report layer."""
