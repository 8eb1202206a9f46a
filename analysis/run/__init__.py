"""Running the engine: the explorer session (the app's one door), scans, the persistent cache, tables."""
