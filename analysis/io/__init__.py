"""Files in and out: checkpoint readers, the aligned view of several checkpoints, fingerprints, atomic writers."""
