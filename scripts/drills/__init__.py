"""Drills against a running TorchServe: the bad-input corpus, faults, the soak, and the two-replica
rehearsal behind the gateway."""
